//! 2-D convolution (cross-correlation, as in PyTorch), NCHW, with a fused epilogue.
//!
//! Math: for input x (N, C, H, W), weight w (K, C, R, S), stride (sh, sw), padding (ph, pw) and
//! dilation (dh, dw), the output y (N, K, P, Q) with P = (H + 2ph - dh(R-1) - 1)/sh + 1 (Q likewise) is
//!
//! ```text
//! y[n,k,p,q] = act( bias[k] + residual[n,k,p,q]
//!                   + sum_{c,r,s} w[k,c,r,s] * x[n, c, p*sh - ph + r*dh, q*sw - pw + s*dw] )
//! ```
//!
//! with out-of-range input positions read as zero. Batch-norm is folded into `w` and `bias` at load
//! time (see `crate::nn`). As a GEMM per image: M = K, N = P*Q, depth = C*R*S; a 1x1 stride-1 conv is
//! exactly a GEMM of the weight (K x C) with the image (C x H*W).
//!
//! `conv2d_forward` runs that GEMM per image on the packed SGEMM (`crate::cpu::gemm`): the weight is
//! the A operand, packed once in `ConvWeights::new`; a 1x1 stride-1 unpadded conv uses the image
//! itself as B; any other conv packs its patches straight into the GEMM's B panels ("lazy im2col",
//! `Im2col` below), so no (C*R*S, P*Q) matrix is ever materialised. Bias, residual and ReLU run in
//! the GEMM's epilogue, on the output tile while it is in registers.

use crate::cpu::gemm::{gemm_driver, pack_a, ASrc, Epilogue, MatRef, PackB, PackedA};

/// Geometry of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvParams {
    pub stride: (usize, usize),
    pub pad: (usize, usize),
    pub dilation: (usize, usize),
}

impl Default for ConvParams {
    fn default() -> Self {
        ConvParams { stride: (1, 1), pad: (0, 0), dilation: (1, 1) }
    }
}

impl ConvParams {
    pub fn new(stride: usize, pad: usize) -> Self {
        ConvParams { stride: (stride, stride), pad: (pad, pad), dilation: (1, 1) }
    }
    /// Output height and width for an input of (h, w) and a kernel of (r, s); None if empty.
    pub fn out_hw(&self, h: usize, w: usize, r: usize, s: usize) -> Option<(usize, usize)> {
        let eh = self.dilation.0 * (r - 1) + 1;
        let ew = self.dilation.1 * (s - 1) + 1;
        let (hp, wp) = (h + 2 * self.pad.0, w + 2 * self.pad.1);
        if hp < eh || wp < ew {
            return None;
        }
        Some(((hp - eh) / self.stride.0 + 1, (wp - ew) / self.stride.1 + 1))
    }
}

/// A convolution's weights, ready for the forward kernel. Construction is where per-layer work that
/// does not depend on the input (e.g. packing the weight into GEMM panels) happens, once.
#[derive(Clone, Debug)]
pub struct ConvWeights {
    pub k: usize,
    pub c: usize,
    pub r: usize,
    pub s: usize,
    /// (K, C, R, S) row-major, batch-norm already folded in.
    pub weight: Vec<f32>,
    /// (K); zeros when the conv has no bias.
    pub bias: Vec<f32>,
    /// `weight` as a (K, C*R*S) GEMM A operand, packed into micro-kernel panels for this CPU.
    packed: PackedA,
}

impl ConvWeights {
    pub fn new(weight: Vec<f32>, bias: Option<Vec<f32>>, k: usize, c: usize, r: usize, s: usize) -> Self {
        assert_eq!(weight.len(), k * c * r * s, "conv weight size");
        let bias = bias.unwrap_or_else(|| vec![0.0; k]);
        assert_eq!(bias.len(), k, "conv bias size");
        let packed = pack_a(MatRef::row_major(&weight, k, c * r * s));
        ConvWeights { k, c, r, s, weight, bias, packed }
    }
}

/// One distinct convolution shape of a network, with how many times it occurs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvCase {
    pub name: &'static str,
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub r: usize,
    pub s: usize,
    pub stride: usize,
    pub pad: usize,
    /// Occurrences in one forward pass.
    pub count: usize,
}

impl ConvCase {
    /// FLOPs of one occurrence (2 per multiply-add), for GFLOP/s reports.
    pub fn flops(&self) -> f64 {
        let (p, q) = ConvParams::new(self.stride, self.pad).out_hw(self.h, self.w, self.r, self.s).unwrap();
        2.0 * (self.n * self.k * p * q * self.c * self.r * self.s) as f64
    }
}

/// Every distinct conv shape of torchvision's ResNet-50 (v1.5: stride on the 3x3) at 224x224,
/// batch 1, with its number of occurrences (53 convs in all). Used by `capgen bench conv` and
/// benches/conv.rs.
pub fn resnet50_conv_cases() -> Vec<ConvCase> {
    let cc = |name, c, h, k, r, stride, pad, count| ConvCase {
        name,
        n: 1,
        c,
        h,
        w: h,
        k,
        r,
        s: r,
        stride,
        pad,
        count,
    };
    vec![
        cc("conv1 7x7/2 3->64 @224", 3, 224, 64, 7, 2, 3, 1),
        cc("l1 1x1 64->64 @56", 64, 56, 64, 1, 1, 0, 1),
        cc("l1 3x3 64->64 @56", 64, 56, 64, 3, 1, 1, 3),
        cc("l1 1x1 64->256 @56", 64, 56, 256, 1, 1, 0, 4),
        cc("l1 1x1 256->64 @56", 256, 56, 64, 1, 1, 0, 2),
        cc("l2 1x1 256->128 @56", 256, 56, 128, 1, 1, 0, 1),
        cc("l2 3x3/2 128->128 @56", 128, 56, 128, 3, 2, 1, 1),
        cc("l2 1x1 128->512 @28", 128, 28, 512, 1, 1, 0, 4),
        cc("l2 ds 1x1/2 256->512 @56", 256, 56, 512, 1, 2, 0, 1),
        cc("l2 1x1 512->128 @28", 512, 28, 128, 1, 1, 0, 3),
        cc("l2 3x3 128->128 @28", 128, 28, 128, 3, 1, 1, 3),
        cc("l3 1x1 512->256 @28", 512, 28, 256, 1, 1, 0, 1),
        cc("l3 3x3/2 256->256 @28", 256, 28, 256, 3, 2, 1, 1),
        cc("l3 1x1 256->1024 @14", 256, 14, 1024, 1, 1, 0, 6),
        cc("l3 ds 1x1/2 512->1024 @28", 512, 28, 1024, 1, 2, 0, 1),
        cc("l3 1x1 1024->256 @14", 1024, 14, 256, 1, 1, 0, 5),
        cc("l3 3x3 256->256 @14", 256, 14, 256, 3, 1, 1, 5),
        cc("l4 1x1 1024->512 @14", 1024, 14, 512, 1, 1, 0, 1),
        cc("l4 3x3/2 512->512 @14", 512, 14, 512, 3, 2, 1, 1),
        cc("l4 1x1 512->2048 @7", 512, 7, 2048, 1, 1, 0, 3),
        cc("l4 ds 1x1/2 1024->2048 @14", 1024, 14, 2048, 1, 2, 0, 1),
        cc("l4 1x1 2048->512 @7", 2048, 7, 512, 1, 1, 0, 2),
        cc("l4 3x3 512->512 @7", 512, 7, 512, 3, 1, 1, 2),
    ]
}

/// The B operand of one image's conv GEMM, (C*R*S, P*Q): row (c, r, s), column (p, q) holds
/// x[c, p*sh - ph + r*dh, q*sw - pw + s*dw] (zero outside the image). Packed on the fly into the
/// GEMM's NR-column panels; a panel's columns are consecutive output pixels, i.e. runs along an
/// output row, which for stride 1 are contiguous slices of an input row (copied with memcpy).
struct Im2col<'a> {
    /// One image, (C, H, W).
    x: &'a [f32],
    h: usize,
    w: usize,
    r: usize,
    s: usize,
    p: ConvParams,
    ow: usize,
}

impl PackB for Im2col<'_> {
    fn pack(&self, k0: usize, kc: usize, j0: usize, nc: usize, nr: usize, out: &mut [f32]) {
        let (h, w, ow) = (self.h as isize, self.w as isize, self.ow);
        let (sh, sw) = self.p.stride;
        let (ph, pw) = (self.p.pad.0 as isize, self.p.pad.1 as isize);
        let (dh, dw) = self.p.dilation;
        for (t, panel) in out.chunks_mut(kc * nr).take(nc.div_ceil(nr)).enumerate() {
            let jb = j0 + t * nr;
            let nv = nr.min(j0 + nc - jb);
            for pk in 0..kc {
                let row = k0 + pk;
                let (ci, rr, ss) = (row / (self.r * self.s), (row / self.s) % self.r, row % self.s);
                let dst = &mut panel[pk * nr..(pk + 1) * nr];
                let (mut py, mut px) = (jb / ow, jb % ow);
                let mut jj = 0;
                while jj < nv {
                    let run = (nv - jj).min(ow - px);
                    let d = &mut dst[jj..jj + run];
                    let iy = (py * sh + rr * dh) as isize - ph;
                    if iy < 0 || iy >= h {
                        d.fill(0.0);
                    } else {
                        let base = (ci * self.h + iy as usize) * self.w;
                        let xrow = &self.x[base..base + self.w];
                        let ix0 = (px * sw + ss * dw) as isize - pw;
                        if sw == 1 {
                            // Valid t: 0 <= ix0 + t < w.
                            let lo = (-ix0).clamp(0, run as isize) as usize;
                            let hi = (w - ix0).clamp(lo as isize, run as isize) as usize;
                            d[..lo].fill(0.0);
                            if hi > lo {
                                let s0 = (ix0 + lo as isize) as usize;
                                d[lo..hi].copy_from_slice(&xrow[s0..s0 + (hi - lo)]);
                            }
                            d[hi..].fill(0.0);
                        } else {
                            for (tt, v) in d.iter_mut().enumerate() {
                                let ix = ix0 + (tt * sw) as isize;
                                *v = if ix >= 0 && ix < w { xrow[ix as usize] } else { 0.0 };
                            }
                        }
                    }
                    jj += run;
                    px += run;
                    if px == ow {
                        px = 0;
                        py += 1;
                    }
                }
                dst[nv..].fill(0.0);
            }
        }
    }
}

/// The direct seven-loop definition; slow, used as the reference in tests.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_reference(
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    wt: &ConvWeights,
    p: &ConvParams,
    residual: Option<&[f32]>,
    relu: bool,
    y: &mut [f32],
) {
    let (oh, ow) = p.out_hw(h, w, wt.r, wt.s).expect("conv output is empty");
    let (c, k) = (wt.c, wt.k);
    assert_eq!(x.len(), n * c * h * w);
    assert_eq!(y.len(), n * k * oh * ow);
    for b in 0..n {
        for ko in 0..k {
            for py in 0..oh {
                for px in 0..ow {
                    let mut acc = 0.0f32;
                    for ci in 0..c {
                        for r in 0..wt.r {
                            let iy = (py * p.stride.0 + r * p.dilation.0) as isize - p.pad.0 as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for s in 0..wt.s {
                                let ix = (px * p.stride.1 + s * p.dilation.1) as isize - p.pad.1 as isize;
                                if ix < 0 || ix >= w as isize {
                                    continue;
                                }
                                acc += wt.weight[((ko * c + ci) * wt.r + r) * wt.s + s]
                                    * x[((b * c + ci) * h + iy as usize) * w + ix as usize];
                            }
                        }
                    }
                    let o = ((b * k + ko) * oh + py) * ow + px;
                    let mut v = acc + wt.bias[ko];
                    if let Some(res) = residual {
                        v += res[o];
                    }
                    y[o] = if relu { v.max(0.0) } else { v };
                }
            }
        }
    }
}

/// y = act(conv(x, w) + bias + residual). x (N, C, H, W), y (N, K, P, Q), residual like y.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_forward(
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    wt: &ConvWeights,
    p: &ConvParams,
    residual: Option<&[f32]>,
    relu: bool,
    y: &mut [f32],
) {
    let (oh, ow) = p.out_hw(h, w, wt.r, wt.s).expect("conv output is empty");
    let (c, k) = (wt.c, wt.k);
    let (chw, pq, crs) = (c * h * w, oh * ow, c * wt.r * wt.s);
    assert_eq!(x.len(), n * chw, "conv input size");
    assert_eq!(y.len(), n * k * pq, "conv output size");
    if let Some(r) = residual {
        assert_eq!(r.len(), y.len(), "conv residual size");
    }
    let a = ASrc::Packed(&wt.packed);
    let isa = wt.packed.isa();
    for b in 0..n {
        let xi = &x[b * chw..(b + 1) * chw];
        let yi = &mut y[b * k * pq..(b + 1) * k * pq];
        // (K, P*Q) = (K, C*R*S) x (C*R*S, P*Q), then + bias[k] + residual, ReLU.
        let epi = Epilogue {
            row_bias: Some(&wt.bias),
            residual: residual.map(|r| (&r[b * k * pq..(b + 1) * k * pq], pq)),
            relu,
            ..Default::default()
        };
        if wt.r == 1 && wt.s == 1 && p.stride == (1, 1) && p.pad == (0, 0) {
            // 1x1 stride 1: B is the image itself, (C, H*W) row-major.
            gemm_driver(isa, k, pq, crs, &a, &MatRef::row_major(xi, c, h * w), yi, pq, &epi);
        } else {
            let im = Im2col { x: xi, h, w, r: wt.r, s: wt.s, p: *p, ow };
            gemm_driver(isa, k, pq, crs, &a, &im, yi, pq, &epi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
        let (mut d, mut w) = (0.0f64, 0.0f64);
        for (&g, &e) in got.iter().zip(want) {
            d += (g as f64 - e as f64).powi(2);
            w += (e as f64).powi(2);
        }
        (d / w.max(1e-300)).sqrt()
    }

    /// (n, c, h, w, k, r, s, stride, pad, dilation, residual+relu)
    type Geo = (usize, usize, usize, usize, usize, usize, usize, usize, usize, usize, bool);

    fn check(g: Geo, seed: u64) {
        let (n, c, h, w, k, r, s, st, pd, dil, fused) = g;
        let mut rng = Rng::new(seed);
        let wt: Vec<f32> = (0..k * c * r * s).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let bias: Vec<f32> = (0..k).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let cw = ConvWeights::new(wt, Some(bias), k, c, r, s);
        let p = ConvParams { stride: (st, st), pad: (pd, pd), dilation: (dil, dil) };
        let (oh, ow) = p.out_hw(h, w, r, s).unwrap();
        let x: Vec<f32> = (0..n * c * h * w).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let res: Vec<f32> = (0..n * k * oh * ow).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let resid = fused.then_some(&res[..]);
        let mut want = vec![f32::NAN; n * k * oh * ow];
        conv2d_reference(&x, n, h, w, &cw, &p, resid, fused, &mut want);
        // Output starts as NaN: every element must be written, and never read (beta = 0).
        let mut got = vec![f32::NAN; n * k * oh * ow];
        conv2d_forward(&x, n, h, w, &cw, &p, resid, fused, &mut got);
        let e = rel_l2(&got, &want);
        // Same argument as the GEMM tests: depth c*r*s f32 products summed in different orders,
        // relative error ~ 6e-8 * sqrt(depth); 1e-6 * sqrt(depth) gives ample headroom.
        let tol = 1e-6 * ((c * r * s) as f64).sqrt();
        assert!(e <= tol, "{g:?}: rel L2 {e:.3e} > {tol:.3e}");
    }

    #[test]
    fn conv_matches_reference() {
        let cases: &[Geo] = &[
            (1, 16, 9, 11, 20, 1, 1, 1, 0, 1, false), // 1x1 s1: straight GEMM
            (2, 16, 9, 11, 20, 1, 1, 2, 0, 1, false), // 1x1 s2 (downsample)
            (1, 8, 13, 10, 17, 3, 3, 1, 1, 1, false), // 3x3 s1 p1
            (1, 8, 13, 10, 17, 3, 3, 2, 1, 1, true),  // 3x3 s2 p1
            (1, 3, 23, 19, 10, 7, 7, 2, 3, 1, false), // 7x7 s2 p3 (the stem)
            (1, 5, 15, 14, 9, 3, 3, 1, 2, 2, false),  // dilation 2
            (3, 7, 12, 9, 33, 3, 3, 1, 1, 1, true),   // batch 3, residual + relu
            (1, 64, 56, 56, 64, 3, 3, 1, 1, 1, true), // a real ResNet layer1 3x3 (k > KC, parallel)
            (2, 40, 17, 17, 70, 1, 1, 1, 0, 1, true), // 1x1 s1 with residual + relu, batch 2
            (1, 6, 5, 8, 4, 3, 2, 1, 0, 1, false),    // non-square kernel, odd sizes
        ];
        for (i, &g) in cases.iter().enumerate() {
            check(g, 100 + i as u64);
        }
    }

    #[test]
    fn resnet50_cases_add_up_to_the_published_flops() {
        // ResNet-50 at 224 is 4.09 GMAC (torchvision / the paper's 3.8-4.1 GFLOPs "multiply-adds"),
        // of which the fc layer is 2048*1000 = 2 MMAC; the convs must account for the rest.
        let cases = resnet50_conv_cases();
        assert_eq!(cases.iter().map(|c| c.count).sum::<usize>(), 53);
        let gmac: f64 = cases.iter().map(|c| c.flops() * c.count as f64 / 2.0).sum::<f64>() / 1e9;
        assert!((4.05..4.10).contains(&gmac), "ResNet-50 convs {gmac} GMAC");
    }
}
