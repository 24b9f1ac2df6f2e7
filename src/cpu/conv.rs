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
//!
//! `conv2d_forward_cn` is the same conv on channel-major activations (C, N, H, W): the batch's images
//! become ONE GEMM with N*P*Q columns (what the ResNet/VGG forwards run; identical at N = 1). The
//! lazy im2col packer is compiled once per ISA and gathers stride-2 rows with AVX-512 permutes.

use rayon::prelude::*;

use crate::cpu::blocked::{blocked_index, blocked_len, from_blocked, BlockedB};
use crate::cpu::gemm::{
    gemm_direct, gemm_driver, pack_a, sgemm, ASrc, CLayout, DirectB, Epilogue, Isa, MatRef, PackB, PackedA,
    COL_BLOCK,
};
use crate::cpu::SharedMut;

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

    /// Frees the raw `weight` copy (leaving it empty), keeping only the packed panels the forward
    /// kernels read: halves an inference network's weight memory (ResNet-50: ~94 MB). After this,
    /// only `conv2d_forward` / `conv2d_forward_cn` may use these weights (`conv2d_reference`,
    /// `Conv2d::fold_batchnorm` and anything else that reads `weight` need it kept).
    pub fn release_raw(&mut self) {
        self.weight = Vec::new();
    }

    /// False once `release_raw` has run.
    pub fn has_raw(&self) -> bool {
        self.weight.len() == self.k * self.c * self.r * self.s
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

/// The B operand of a conv GEMM over `n` images stored channel-major, x (C, N, H, W) (for n = 1
/// that is one NCHW image): (C*R*S, N*P*Q), row (c, r, s), column j = (b, p, q) holds
/// x[c, b, p*sh - ph + r*dh, q*sw - pw + s*dw] (zero outside the image). Packed on the fly into the
/// GEMM's NR-column panels; a panel's columns are consecutive output pixels, i.e. runs along an
/// output row (a run ends at the row's end, the next starts on the next row or image), which for
/// stride 1 are contiguous slices of an input row (copied with memcpy).
struct Im2col<'a> {
    /// (C, N, H, W).
    x: &'a [f32],
    n: usize,
    h: usize,
    w: usize,
    r: usize,
    s: usize,
    p: ConvParams,
    oh: usize,
    ow: usize,
    /// The GEMM's ISA (selects the vectorised packing body).
    isa: Isa,
}

// SAFETY: `in_place` is the default (None): every panel is packed.
unsafe impl PackB for Im2col<'_> {
    fn pack(&self, k0: usize, kc: usize, j0: usize, nc: usize, nr: usize, out: &mut [f32]) {
        // The same code compiled three times, so that LLVM vectorises the copies and the stride-2
        // gathers for the widest ISA the GEMM itself runs (the crate is built for baseline x86-64).
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` comes from the packed weights, built only for an ISA this CPU supports
            // (`Isa::supported`, checked at detection), so the features the function enables exist.
            Isa::Avx512 => unsafe { pack_im2col_avx512(self, k0, kc, j0, nc, nr, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2Fma => unsafe { pack_im2col_avx2(self, k0, kc, j0, nc, nr, out) },
            _ => pack_im2col::<false>(self, k0, kc, j0, nc, nr, out),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn pack_im2col_avx512(im: &Im2col, k0: usize, kc: usize, j0: usize, nc: usize, nr: usize, out: &mut [f32]) {
    pack_im2col::<true>(im, k0, kc, j0, nc, nr, out)
}

/// d[t] = src[2t]: 16 outputs per step from two 16-float loads and one two-source permute (the
/// even lanes), the tail scalar. The stride-2 convs' (stem, downsamples, 3x3/2) gather.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn gather_stride2_avx512(d: &mut [f32], src: &[f32]) {
    use std::arch::x86_64::*;
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let mut t = 0;
    // A step reads src[2t .. 2t + 32] and writes d[t .. t + 16].
    while t + 16 <= d.len() && 2 * t + 32 <= src.len() {
        // SAFETY: the loop condition keeps both 16-float loads inside `src` and the store inside
        // `d`; unaligned loads/stores are used, and avx512f is enabled on this function.
        unsafe {
            let a = _mm512_loadu_ps(src.as_ptr().add(2 * t));
            let b = _mm512_loadu_ps(src.as_ptr().add(2 * t + 16));
            _mm512_storeu_ps(d.as_mut_ptr().add(t), _mm512_permutex2var_ps(a, even, b));
        }
        t += 16;
    }
    for (i, v) in d.iter_mut().enumerate().skip(t) {
        *v = src[2 * i];
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn pack_im2col_avx2(im: &Im2col, k0: usize, kc: usize, j0: usize, nc: usize, nr: usize, out: &mut [f32]) {
    pack_im2col::<false>(im, k0, kc, j0, nc, nr, out)
}

/// Copies a short run (at most one NR panel row) with fixed 8-float chunks, which inline to a
/// couple of vector moves instead of a call to libc's memmove per run.
#[inline(always)]
fn copy_run(d: &mut [f32], src: &[f32]) {
    let mut dc = d.chunks_exact_mut(8);
    let mut sc = src.chunks_exact(8);
    for (x, y) in (&mut dc).zip(&mut sc) {
        x.copy_from_slice(y);
    }
    for (x, y) in dc.into_remainder().iter_mut().zip(sc.remainder()) {
        *x = *y;
    }
}

/// See `Im2col`; rows (c, r, s) are walked incrementally (no divisions per row). `AVX512`: use the
/// AVX-512 stride-2 gather (only instantiated inside `pack_im2col_avx512`).
#[inline(always)]
fn pack_im2col<const AVX512: bool>(
    im: &Im2col,
    k0: usize,
    kc: usize,
    j0: usize,
    nc: usize,
    nr: usize,
    out: &mut [f32],
) {
    let (h, w, oh, ow) = (im.h as isize, im.w as isize, im.oh, im.ow);
    let (sh, sw) = im.p.stride;
    let (ph, pw) = (im.p.pad.0 as isize, im.p.pad.1 as isize);
    let (dh, dw) = im.p.dilation;
    let plane = im.h * im.w;
    for (t, panel) in out.chunks_mut(kc * nr).take(nc.div_ceil(nr)).enumerate() {
        let jb = j0 + t * nr;
        let nv = nr.min(j0 + nc - jb);
        // Output row index over all images (b * P + p) and column of the panel's first pixel.
        let (row0, px0) = (jb / ow, jb % ow);
        let (b0, py0) = (row0 / oh, row0 % oh);
        let (mut ci, mut rr, mut ss) = (k0 / (im.r * im.s), (k0 / im.s) % im.r, k0 % im.s);
        for dst in panel.chunks_exact_mut(nr).take(kc) {
            let (mut b, mut py, mut px) = (b0, py0, px0);
            let mut jj = 0;
            while jj < nv {
                let run = (nv - jj).min(ow - px);
                let d = &mut dst[jj..jj + run];
                let iy = (py * sh + rr * dh) as isize - ph;
                if iy < 0 || iy >= h {
                    d.fill(0.0);
                } else {
                    let base = (ci * im.n + b) * plane + iy as usize * im.w;
                    let xrow = &im.x[base..base + im.w];
                    let ix0 = (px * sw + ss * dw) as isize - pw;
                    if sw == 1 {
                        // Valid t: 0 <= ix0 + t < w.
                        let lo = (-ix0).clamp(0, run as isize) as usize;
                        let hi = (w - ix0).clamp(lo as isize, run as isize) as usize;
                        // (Zero-length fills skipped: each would be a memset call.)
                        if lo > 0 {
                            d[..lo].fill(0.0);
                        }
                        if hi > lo {
                            let s0 = (ix0 + lo as isize) as usize;
                            copy_run(&mut d[lo..hi], &xrow[s0..s0 + (hi - lo)]);
                        }
                        if hi < run {
                            d[hi..].fill(0.0);
                        }
                    } else {
                        // Valid t: 0 <= ix0 + t*sw < w; clip once, then a branch-free strided
                        // copy (stride 2, the common case, with a constant stride LLVM
                        // vectorises with shuffles).
                        let swi = sw as isize;
                        let lo = if ix0 < 0 { (-ix0 + swi - 1) / swi } else { 0 }.min(run as isize);
                        let hi = ((w - ix0 + swi - 1) / swi).clamp(lo, run as isize);
                        let (lo, hi) = (lo as usize, hi as usize);
                        if lo > 0 {
                            d[..lo].fill(0.0);
                        }
                        if hi > lo {
                            let start = (ix0 + (lo * sw) as isize) as usize;
                            let src = &xrow[start..start + (hi - lo - 1) * sw + 1];
                            let dd = &mut d[lo..hi];
                            if sw == 2 && AVX512 {
                                #[cfg(target_arch = "x86_64")]
                                // SAFETY: AVX512 is true only in pack_im2col_avx512, which runs
                                // only on a CPU with AVX-512F (see `PackB for Im2col`).
                                unsafe {
                                    gather_stride2_avx512(dd, src)
                                };
                            } else if sw == 2 {
                                for (t, v) in dd.iter_mut().enumerate() {
                                    *v = src[2 * t];
                                }
                            } else {
                                for (t, v) in dd.iter_mut().enumerate() {
                                    *v = src[t * sw];
                                }
                            }
                        }
                        if hi < run {
                            d[hi..].fill(0.0);
                        }
                    }
                }
                jj += run;
                px += run;
                if px == ow {
                    px = 0;
                    py += 1;
                    if py == oh {
                        py = 0;
                        b += 1;
                    }
                }
            }
            if nv < nr {
                dst[nv..].fill(0.0);
            }
            // Next row (c, r, s).
            ss += 1;
            if ss == im.s {
                ss = 0;
                rr += 1;
                if rr == im.r {
                    rr = 0;
                    ci += 1;
                }
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
    let (chw, pq) = (c * h * w, oh * ow);
    assert_eq!(x.len(), n * chw, "conv input size");
    assert_eq!(y.len(), n * k * pq, "conv output size");
    if let Some(r) = residual {
        assert_eq!(r.len(), y.len(), "conv residual size");
    }
    // Per image, (K, P*Q) = (K, C*R*S) x (C*R*S, P*Q): the channel-major path at N = 1.
    for b in 0..n {
        let res = residual.map(|r| &r[b * k * pq..(b + 1) * k * pq]);
        let yi = &mut y[b * k * pq..(b + 1) * k * pq];
        conv2d_forward_cn(&x[b * chw..(b + 1) * chw], 1, h, w, wt, p, res, relu, yi);
    }
}

/// The same convolution on channel-major activations, with the whole batch as ONE GEMM:
/// x (C, N, H, W) -> y (K, N, P, Q), residual like y.
///
/// (K, N*P*Q) = (K, C*R*S) x (C*R*S, N*P*Q), + bias[k] + residual, ReLU. Against `conv2d_forward`
/// (one GEMM per image) every weight panel now feeds N times as many columns, which is what the
/// narrow deep layers need (ResNet-50 layer4 has P*Q = 49: at batch 8 the GEMM is 392 wide). A 1x1
/// stride-1 unpadded conv needs no packing at all: (C, N*H*W) is B itself. At N = 1 the layout, the
/// GEMM and the result are exactly those of `conv2d_forward`.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_forward_cn(
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
    let cols = n * oh * ow;
    assert_eq!(x.len(), c * n * h * w, "conv input size");
    assert_eq!(y.len(), k * cols, "conv output size");
    if let Some(r) = residual {
        assert_eq!(r.len(), y.len(), "conv residual size");
    }
    let epi = Epilogue {
        row_bias: Some(&wt.bias),
        residual: residual.map(|r| (r, cols)),
        relu,
        ..Default::default()
    };
    conv_channel_major_input(conv_path(wt, p, h, w), x, n, h, w, wt, p, y, CLayout::Rows(cols), &epi);
}

/// Runs a conv whose input x (C, N, H, W) is channel-major on `path`, C laid out as `cl`: the
/// routing `conv2d_forward_cn` and `conv2d_forward_blocked` share.
#[allow(clippy::too_many_arguments)]
fn conv_channel_major_input(
    path: ConvPath,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    wt: &ConvWeights,
    p: &ConvParams,
    y: &mut [f32],
    cl: CLayout,
    epi: &Epilogue,
) {
    let (oh, ow) = p.out_hw(h, w, wt.r, wt.s).expect("conv output is empty");
    let (c, k, isa) = (wt.c, wt.k, wt.packed.isa());
    let (cols, crs) = (n * oh * ow, c * wt.r * wt.s);
    let a = ASrc::Packed(&wt.packed);
    match path {
        ConvPath::Gemm => gemm_driver(isa, k, cols, crs, &a, &MatRef::row_major(x, c, n * h * w), y, cl, epi),
        ConvPath::Direct => {
            let b = DirectB::new(x, c, n, h, w, wt.r, wt.s);
            gemm_direct(k, cols, crs, &wt.packed, &b, y, cl, epi);
        }
        ConvPath::DirectS2 => conv2d_direct_s2(ConvInput::ChannelMajor(x), n, h, w, wt, epi, y, cl),
        ConvPath::Im2col | ConvPath::SubsampledGemm => {
            let im = Im2col { x, n, h, w, r: wt.r, s: wt.s, p: *p, oh, ow, isa };
            gemm_driver(isa, k, cols, crs, &a, &im, y, cl, epi);
        }
    }
}

/// The input of `conv2d_forward_blocked`: channel-major (C, N, H, W), or column-blocked
/// (`cpu::blocked`: the (C, N*H*W) matrix in blocks of 32 columns).
#[derive(Clone, Copy, Debug)]
pub enum ConvInput<'a> {
    ChannelMajor(&'a [f32]),
    Blocked(&'a [f32]),
}

/// The residual a conv adds before its ReLU (`conv2d_forward_blocked`).
#[derive(Clone, Copy, Debug)]
pub enum Residual<'a> {
    None,
    /// A separate activation laid out like the output: y = act((W*x + bias) + r).
    Add(&'a [f32]),
    /// The output buffer holds the residual on entry and the sum replaces it: y = act((y + W*x) +
    /// bias), the GEMM's first depth block accumulating onto C (beta = 1). A ResNet block's
    /// identity is not needed after its last conv, and reading the residual where the output goes
    /// spares a separate write stream (each output line is fetched once, not once as residual and
    /// again for the store). Same terms as `Add`, summed in another order (y + W*x first): equal
    /// up to rounding, not bit for bit.
    InOutput,
}

/// `conv2d_forward_cn` with a column-blocked output: y (K, N*P*Q) and the residual like y, in
/// `cpu::blocked` layout. A 1x1 conv reads a blocked input in place (stride 1: the GEMM's B panels
/// are the input's blocks) or subsamples it into `scratch` first (stride 2, ResNet's
/// downsampling); the stride-2 direct conv splits a blocked input straight into its phase planes;
/// the other paths (`conv_path`) read a channel-major input, which a blocked one is converted to,
/// in `scratch`. Without `Residual::InOutput` each path writes the same values `conv2d_forward_cn`
/// would.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_forward_blocked(
    x: ConvInput,
    n: usize,
    h: usize,
    w: usize,
    wt: &ConvWeights,
    p: &ConvParams,
    residual: Residual,
    relu: bool,
    y: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (oh, ow) = p.out_hw(h, w, wt.r, wt.s).expect("conv output is empty");
    let (c, k) = (wt.c, wt.k);
    let (cols, crs) = (n * oh * ow, c * wt.r * wt.s);
    let xlen = match x {
        ConvInput::ChannelMajor(v) => (v.len(), c * n * h * w),
        ConvInput::Blocked(v) => (v.len(), blocked_len(c, n * h * w)),
    };
    assert_eq!(xlen.0, xlen.1, "conv input size");
    assert_eq!(y.len(), blocked_len(k, cols), "conv output size");
    if let Residual::Add(r) = residual {
        assert_eq!(r.len(), y.len(), "conv residual size");
    }
    let a = ASrc::Packed(&wt.packed);
    let epi = Epilogue {
        row_bias: Some(&wt.bias),
        // (Blocked like y; the leading dimension is not used.)
        residual: match residual {
            Residual::Add(r) => Some((r, 0)),
            _ => None,
        },
        beta: if matches!(residual, Residual::InOutput) { 1.0 } else { 0.0 },
        relu,
        ..Default::default()
    };
    let isa = wt.packed.isa();
    match blocked_conv_path(wt, p, h, w) {
        ConvPath::Gemm | ConvPath::SubsampledGemm => {
            // B = the input (C, N*H*W), or its stride-subsampled columns (C, N*P*Q), blocked.
            let xb: &[f32] = match (x, p.stride) {
                (ConvInput::Blocked(v), (1, 1)) => v,
                (x, _) => {
                    scratch.resize(blocked_len(c, cols), 0.0);
                    subsample_blocked(x, c, n, h, w, p.stride, oh, ow, scratch);
                    scratch
                }
            };
            gemm_driver(isa, k, cols, crs, &a, &BlockedB::new(xb, c, cols), y, CLayout::Blocked, &epi);
        }
        // (Split into phases straight from the blocks: one copy, not two.)
        ConvPath::DirectS2 => conv2d_direct_s2(x, n, h, w, wt, &epi, y, CLayout::Blocked),
        path => {
            let xc: &[f32] = match x {
                ConvInput::ChannelMajor(v) => v,
                ConvInput::Blocked(v) => {
                    scratch.resize(c * n * h * w, 0.0);
                    from_blocked(v, c, n * h * w, scratch);
                    scratch
                }
            };
            conv_channel_major_input(path, xc, n, h, w, wt, p, y, CLayout::Blocked, &epi);
        }
    }
}

/// Which path `conv2d_forward_blocked` takes: `conv_path`, except that every unpadded 1x1 conv is a
/// GEMM on (subsampled, if strided) blocked columns.
pub fn blocked_conv_path(wt: &ConvWeights, p: &ConvParams, h: usize, w: usize) -> ConvPath {
    match conv_path(wt, p, h, w) {
        ConvPath::Im2col if wt.r == 1 && wt.s == 1 && p.pad == (0, 0) && p.dilation == (1, 1) => {
            ConvPath::SubsampledGemm
        }
        path => path,
    }
}

/// The columns a 1x1 conv of stride (sh, sw) reads: out (C, N*P*Q) column-blocked, out[c][(n, i, j)]
/// = x[c][(n, i*sh, j*sw)], from x (C, N*H*W) channel-major or column-blocked. Parallel over the
/// output's blocks; each block looks up its 32 source columns once for all channels.
#[allow(clippy::too_many_arguments)]
fn subsample_blocked(
    x: ConvInput,
    c: usize,
    n: usize,
    h: usize,
    w: usize,
    (sh, sw): (usize, usize),
    oh: usize,
    ow: usize,
    out: &mut [f32],
) {
    let cols = n * oh * ow;
    let block = |(b, ob): (usize, &mut [f32])| {
        // Where source column l of this block lives within channel 0 (the others: + ci * stride).
        let nv = COL_BLOCK.min(cols - b * COL_BLOCK);
        let src: [usize; COL_BLOCK] = std::array::from_fn(|l| {
            let j = b * COL_BLOCK + l.min(nv - 1);
            let (img, pq) = (j / (oh * ow), j % (oh * ow));
            let pix = img * h * w + (pq / ow) * sh * w + (pq % ow) * sw;
            match x {
                ConvInput::ChannelMajor(_) => pix,
                ConvInput::Blocked(_) => blocked_index(c, 0, pix),
            }
        });
        let (xs, cstride) = match x {
            ConvInput::ChannelMajor(v) => (v, n * h * w),
            ConvInput::Blocked(v) => (v, COL_BLOCK),
        };
        for (ci, row) in ob.chunks_exact_mut(COL_BLOCK).enumerate() {
            let xc = &xs[ci * cstride..];
            for (l, o) in row.iter_mut().enumerate() {
                *o = if l < nv { xc[src[l]] } else { 0.0 };
            }
        }
    };
    if c == 0 || cols == 0 {
        return;
    }
    if out.len() >= 1 << 16 {
        out.par_chunks_mut(c * COL_BLOCK).enumerate().for_each(block);
    } else {
        out.chunks_mut(c * COL_BLOCK).enumerate().for_each(block);
    }
}

/// The implementation `conv2d_forward_cn` runs for a conv.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvPath {
    /// 1x1, stride 1, no padding: one GEMM straight on the activation.
    Gemm,
    /// Stride-1 "same" conv read in place (`direct_applicable`).
    Direct,
    /// Stride-2 direct conv over the input's four phases (`direct_s2_applicable`, few channels).
    DirectS2,
    /// Lazy im2col packed into the GEMM's B panels.
    Im2col,
    /// A strided 1x1 conv as one GEMM on the subsampled columns (`conv2d_forward_blocked` only).
    SubsampledGemm,
}

impl ConvPath {
    pub fn name(self) -> &'static str {
        match self {
            ConvPath::Gemm => "gemm",
            ConvPath::Direct => "direct",
            ConvPath::DirectS2 => "direct-s2",
            ConvPath::Im2col => "im2col",
            ConvPath::SubsampledGemm => "subsample+gemm",
        }
    }
}

/// Which path `conv2d_forward_cn` takes for input size H x W.
pub fn conv_path(wt: &ConvWeights, p: &ConvParams, h: usize, w: usize) -> ConvPath {
    if wt.r == 1 && wt.s == 1 && p.stride == (1, 1) && p.pad == (0, 0) {
        ConvPath::Gemm
    } else if direct_applicable(wt, p) {
        ConvPath::Direct
    } else if wt.c <= DIRECT_S2_MAX_CHANNELS && direct_s2_applicable(wt, p, h, w) {
        ConvPath::DirectS2
    } else {
        ConvPath::Im2col
    }
}

thread_local! {
    // Whether conv2d_forward_cn may take the direct path (tests turn it off to compare with im2col).
    static DIRECT: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Runs `f` with the direct convolution path switched off on this thread (im2col instead).
#[cfg(test)]
pub(crate) fn without_direct_conv<T>(f: impl FnOnce() -> T) -> T {
    DIRECT.with(|d| d.set(false));
    let out = f();
    DIRECT.with(|d| d.set(true));
    out
}

/// Whether a conv runs as a direct convolution (`gemm::DirectB`): AVX-512 weights, stride 1, no
/// dilation, "same" padding (R = 2*pad_h + 1, S = 2*pad_w + 1) and 2..=256 taps. B is then
/// read from the input in place instead of being packed by im2col.
pub fn direct_applicable(wt: &ConvWeights, p: &ConvParams) -> bool {
    direct_kernel_usable(wt, p) && p.stride == (1, 1) && wt.r == 2 * p.pad.0 + 1 && wt.s == 2 * p.pad.1 + 1
}

/// What both direct paths need whatever the stride: AVX-512 weights (masked loads), the path not
/// switched off (tests), no dilation, 2..=256 taps (`DirectB` indexes taps with a byte) and some
/// input channels.
fn direct_kernel_usable(wt: &ConvWeights, p: &ConvParams) -> bool {
    wt.packed.isa() == Isa::Avx512
        && DIRECT.with(|d| d.get())
        && p.dilation == (1, 1)
        && wt.r * wt.s > 1
        && wt.r * wt.s <= 256
        && wt.c > 0
}

/// Whether a stride-2 conv can run as a direct convolution over its input's four phases
/// (`split_phases`, `gemm::DirectB::phases`): AVX-512 weights, stride 2, no dilation, odd R and S
/// with padding ((R - 1) / 2, (S - 1) / 2) and 2..=256 taps, and an even H x W input, so that
/// the output is (H / 2) x (W / 2), the size of a phase. (ResNet's stem and 3x3/2 convs; it is
/// taken only up to `DIRECT_S2_MAX_CHANNELS` input channels.)
pub fn direct_s2_applicable(wt: &ConvWeights, p: &ConvParams, h: usize, w: usize) -> bool {
    direct_kernel_usable(wt, p)
        && p.stride == (2, 2)
        && !wt.r.is_multiple_of(2)
        && !wt.s.is_multiple_of(2)
        && p.pad == ((wt.r - 1) / 2, (wt.s - 1) / 2)
        && h.is_multiple_of(2)
        && w.is_multiple_of(2)
        && h > 0
        && w > 0
}

/// Most input channels for the stride-2 direct conv. Measured in ResNet-50: the stem (C = 3) runs
/// ~10% faster than through im2col. The 3x3/2 convs of layers 2-4 depend on the CPU: on an AVX-512
/// Xeon (48 KiB L1d, 2 MiB L2) they ran up to 20% slower at batch 8 (each depth step reads one of
/// four phase planes per channel, and the split is a full copy of a large input); on Zen 4 (32 KiB
/// L1d, 1 MiB L2) layers 2 and 3 (C = 128, 256) run 7-9% faster at batch 1 and 8, layer4 (C = 512)
/// 5% faster at batch 1 but 7% slower at batch 8. Up to 256, then.
const DIRECT_S2_MAX_CHANNELS: usize = 256;

/// The stride-2 direct convolution (`direct_s2_applicable` holds): split x (C, N, H, W),
/// channel-major or column-blocked, into its phases, then one GEMM with B read from them in place.
/// y (K, N, H/2, W/2), laid out as `cl` says.
#[allow(clippy::too_many_arguments)]
fn conv2d_direct_s2(
    x: ConvInput,
    n: usize,
    h: usize,
    w: usize,
    wt: &ConvWeights,
    epi: &Epilogue,
    y: &mut [f32],
    cl: CLayout,
) {
    let (c, k, crs) = (wt.c, wt.k, wt.c * wt.r * wt.s);
    let cols = n * (h / 2) * (w / 2);
    let mut xp = PHASES.with(|b| b.take());
    xp.resize(c * n * h * w, 0.0);
    match x {
        ConvInput::ChannelMajor(v) => split_phases(v, c, n, h, w, &mut xp),
        ConvInput::Blocked(v) => split_phases_blocked(v, c, n, h, w, &mut xp),
    }
    let b = DirectB::phases(&xp, c, n, h / 2, w / 2, wt.r, wt.s);
    gemm_direct(k, cols, crs, &wt.packed, &b, y, cl, epi);
    PHASES.with(|b| b.set(xp));
}

thread_local! {
    /// The phases of a stride-2 direct conv's input, reused across calls.
    static PHASES: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The four phases of a channel-major x (C, N, H, W) with H, W even: xp (C, 2, 2, N, H/2, W/2),
/// xp[c][a][b][n][u][v] = x[c][n][2u + a][2v + b]. A stride-2 conv's taps then read each phase with
/// a stride-1 pattern over the flattened (N, H/2, W/2) output (see `gemm::DirectB`). Parallel over
/// channels; memory speed.
pub fn split_phases(x: &[f32], c: usize, n: usize, h: usize, w: usize, xp: &mut [f32]) {
    assert!(h.is_multiple_of(2) && w.is_multiple_of(2), "split_phases: H and W must be even");
    assert_eq!(x.len(), c * n * h * w, "split_phases input size");
    assert_eq!(xp.len(), x.len(), "split_phases output size");
    let (ph, pw) = (h / 2, w / 2);
    let chan = n * h * w;
    if chan == 0 {
        return;
    }
    let plane = n * ph * pw; // one phase of one channel
    let avx512 = Isa::Avx512.supported();
    let one = |(xc, yc): (&[f32], &mut [f32])| {
        let (top, bottom) = yc.split_at_mut(2 * plane);
        let (p00, p01) = top.split_at_mut(plane);
        let (p10, p11) = bottom.split_at_mut(plane);
        let mut phases = [(p00, p01), (p10, p11)];
        for (img, xi) in xc.chunks_exact(h * w).enumerate() {
            for u in 0..ph {
                let o = img * ph * pw + u * pw;
                for (a, (even, odd)) in phases.iter_mut().enumerate() {
                    let row = &xi[(2 * u + a) * w..(2 * u + a + 1) * w];
                    deinterleave(row, &mut even[o..o + pw], &mut odd[o..o + pw], avx512);
                }
            }
        }
    };
    if x.len() >= 1 << 16 {
        use rayon::prelude::*;
        x.par_chunks(chan).zip(xp.par_chunks_mut(chan)).for_each(one);
    } else {
        x.chunks(chan).zip(xp.chunks_mut(chan)).for_each(one);
    }
}

/// `split_phases` of a column-blocked x (`cpu::blocked`: the (C, N*H*W) matrix in blocks of 32
/// columns), H and W even: the same xp (C, 2, 2, N, H/2, W/2). Parallel over x's blocks, each read
/// in order (a walk channel by channel would jump C * 128 bytes per block). A block's 32 columns
/// fall into runs within one image row; as W and 32 are even, every run starts at an even column
/// and has even length, so it deinterleaves into one row of phase (a, 0) and one of (a, 1).
pub fn split_phases_blocked(xb: &[f32], c: usize, n: usize, h: usize, w: usize, xp: &mut [f32]) {
    assert!(h.is_multiple_of(2) && w.is_multiple_of(2), "split_phases: H and W must be even");
    let cols = n * h * w;
    assert_eq!(xb.len(), blocked_len(c, cols), "split_phases input size");
    assert_eq!(xp.len(), c * cols, "split_phases output size");
    if c == 0 || cols == 0 {
        return;
    }
    let (ph, pw) = (h / 2, w / 2);
    let plane = n * ph * pw; // one phase of one channel
    let avx512 = Isa::Avx512.supported();
    let out = SharedMut::new(xp.as_mut_ptr());
    let block = |b: usize| {
        let blk = &xb[b * c * COL_BLOCK..(b + 1) * c * COL_BLOCK];
        let (mut j, end) = (b * COL_BLOCK, cols.min((b + 1) * COL_BLOCK));
        while j < end {
            let (img, y, x0) = (j / (h * w), (j / w) % h, j % w);
            let len = (w - x0).min(end - j);
            // Phase (y % 2, 0) and (y % 2, 1), row y / 2, columns x0 / 2 .. (x0 + len) / 2.
            let at = img * ph * pw + (y / 2) * pw + x0 / 2;
            let (e0, o0) = ((2 * (y % 2)) * plane + at, (2 * (y % 2) + 1) * plane + at);
            for ci in 0..c {
                let src = &blk[ci * COL_BLOCK + j % COL_BLOCK..][..len];
                // SAFETY: xp holds c * 4 * plane floats (asserted); e0, o0 + len / 2 stay within
                // their phase plane (x0 + len <= W); the runs of distinct blocks are distinct
                // columns, so no two tasks write the same element, and they join before return.
                let (e, o) = unsafe {
                    let base = out.get().add(ci * 4 * plane);
                    (
                        std::slice::from_raw_parts_mut(base.add(e0), len / 2),
                        std::slice::from_raw_parts_mut(base.add(o0), len / 2),
                    )
                };
                deinterleave(src, e, o, avx512);
            }
            j += len;
        }
    };
    let blocks = 0..cols.div_ceil(COL_BLOCK);
    if c * cols >= 1 << 16 {
        blocks.into_par_iter().with_min_len(4).for_each(block);
    } else {
        blocks.for_each(block);
    }
}

/// e[t] = row[2t], o[t] = row[2t + 1] (row.len() = 2 * e.len() = 2 * o.len()).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn deinterleave(row: &[f32], e: &mut [f32], o: &mut [f32], avx512: bool) {
    assert!(row.len() == 2 * e.len() && e.len() == o.len(), "deinterleave: lengths");
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: `avx512` is `Isa::Avx512.supported()` (the caller's); lengths asserted.
        unsafe { deinterleave_avx512(row, e, o) };
        return;
    }
    for ((pair, e), o) in row.chunks_exact(2).zip(e).zip(o) {
        *e = pair[0];
        *o = pair[1];
    }
}

/// `deinterleave` 16 outputs of each at a time: two 16-float loads, an even-lane and an odd-lane
/// two-source permute; the tail with masked loads and stores.
///
/// # Safety
/// The CPU supports AVX-512F; row.len() = 2 * e.len() = 2 * o.len().
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn deinterleave_avx512(row: &[f32], e: &mut [f32], o: &mut [f32]) {
    use std::arch::x86_64::*;
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let n = e.len();
    let mut t = 0;
    while t < n {
        let rem = n - t;
        // Lanes: outputs t..t + min(rem, 16) from inputs 2t..2t + 2 min(rem, 16).
        let (ma, mb, mo) = if rem >= 16 {
            (u16::MAX, u16::MAX, u16::MAX)
        } else {
            let lanes = |k: usize| if k >= 16 { u16::MAX } else { ((1u32 << k) - 1) as u16 };
            (lanes(2 * rem), lanes((2 * rem).saturating_sub(16)), lanes(rem))
        };
        // SAFETY: masked-off lanes are neither read nor written; the set lanes are inputs
        // < 2n = row.len() and outputs < n.
        let a = _mm512_maskz_loadu_ps(ma, row.as_ptr().add(2 * t));
        let b = _mm512_maskz_loadu_ps(mb, row.as_ptr().wrapping_add(2 * t + 16));
        _mm512_mask_storeu_ps(e.as_mut_ptr().add(t), mo, _mm512_permutex2var_ps(a, even, b));
        _mm512_mask_storeu_ps(o.as_mut_ptr().add(t), mo, _mm512_permutex2var_ps(a, odd, b));
        t += 16;
    }
}

/// Swaps the two leading axes of an (A, B, L) array: x (A, B, L) -> y (B, A, L). Converts NCHW to
/// the channel-major (C, N, H, W) and back (L = H*W).
pub fn swap_leading_axes(x: &[f32], a: usize, b: usize, l: usize, y: &mut [f32]) {
    assert_eq!(x.len(), a * b * l, "swap_leading_axes input size");
    assert_eq!(y.len(), x.len(), "swap_leading_axes output size");
    if l == 0 {
        return;
    }
    for (ib, yb) in y.chunks_mut(a * l).enumerate() {
        for (ia, ya) in yb.chunks_mut(l).enumerate() {
            ya.copy_from_slice(&x[(ia * b + ib) * l..(ia * b + ib + 1) * l]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward.
//
// Math: with y = conv(x, w) + b as above, L a scalar and dy = dL/dy (N, K, P, Q):
//
//   db[k]       = sum_{n,p,q} dy[n,k,p,q]
//   dw[k,c,r,s] = sum_{n,p,q} dy[n,k,p,q] * x[n, c, p*sh - ph + r*dh, q*sw - pw + s*dw]
//   dx[n,c,i,j] = sum over every (k, p, q, r, s) whose tap lands on (i, j) of dy[n,k,p,q] * w[k,c,r,s]
//
// Per image, with cols = im2col(x) (C*R*S, P*Q) and W the weight as a (K, C*R*S) matrix:
//   dW (K, CRS) += dY (K, PQ) . cols^T (PQ, CRS)
//   dcols (CRS, PQ) = W^T (CRS, K) . dY (K, PQ), then col2im scatter-adds dcols into dx.
// Both products run on the packed sgemm (transposed operands are free strided views).
//
// Choice: an explicit im2col / col2im buffer per chunk of images (C*R*S x m*P*Q floats: 1.3 MB for
// the 7x7 stem on one 96x96 image; m images per chunk so that m*P*Q >= 256, which keeps the deep
// layers' GEMMs (P*Q = 9..36) from being all overhead), not a lazily packed operand: the backward
// operands are transposed relative to the forward's B panels, and at the demo's scale the buffer is
// small (at 224 with 64 channels a 3x3 layer's buffer is 37 MB per worker: bounded, but not tiled).
// A 1x1 stride-1 unpadded conv with one image per chunk skips it (cols is the image itself). Chunks
// run in parallel (rayon), each worker with its own buffers and dW accumulator, summed at the end.
// Every gradient accumulates (`+=`), like llm.c.

/// For one kernel column offset `off` = s*dw - pw: the output columns q whose input column
/// q*sw + off lies inside [0, w), as a range (clipped once per row, so the copy loops are branch-free).
fn valid_cols(off: isize, sw: usize, w: usize, ow: usize) -> (usize, usize) {
    let swi = sw as isize;
    let lo = if off < 0 { (-off + swi - 1) / swi } else { 0 };
    let hi = (w as isize - off + swi - 1).div_euclid(swi);
    let lo = lo.clamp(0, ow as isize) as usize;
    (lo, hi.clamp(lo as isize, ow as isize) as usize)
}

/// im2col of one image x (C, H, W) into cols (C*R*S, P*Q) with leading dimension `ld` (>= P*Q):
/// row (c, r, s), column (p, q) holds x[c, p*sh - ph + r*dh, q*sw - pw + s*dw], zero outside the
/// image.
#[allow(clippy::too_many_arguments)]
pub fn im2col(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    r: usize,
    s: usize,
    p: &ConvParams,
    cols: &mut [f32],
    ld: usize,
) {
    let (oh, ow) = p.out_hw(h, w, r, s).expect("conv output is empty");
    assert_eq!(x.len(), c * h * w, "im2col input size");
    assert!(ld >= oh * ow && cols.len() >= (c * r * s - 1) * ld + oh * ow, "im2col output size");
    let sw = p.stride.1;
    for row in 0..c * r * s {
        let (ci, rr, ss) = (row / (r * s), (row / s) % r, row % s);
        let off = (ss * p.dilation.1) as isize - p.pad.1 as isize;
        let (lo, hi) = valid_cols(off, sw, w, ow);
        let dst = &mut cols[row * ld..row * ld + oh * ow];
        for py in 0..oh {
            let d = &mut dst[py * ow..(py + 1) * ow];
            let iy = (py * p.stride.0 + rr * p.dilation.0) as isize - p.pad.0 as isize;
            if iy < 0 || iy >= h as isize || hi == lo {
                d.fill(0.0);
                continue;
            }
            let base = (ci * h + iy as usize) * w;
            let start = (base as isize + off + (lo * sw) as isize) as usize;
            d[..lo].fill(0.0);
            if sw == 1 {
                d[lo..hi].copy_from_slice(&x[start..start + (hi - lo)]);
            } else {
                // Slice once so the strided reads need no bounds checks; stride 2 as a constant.
                let src = &x[start..start + (hi - lo - 1) * sw + 1];
                if sw == 2 {
                    for (t, v) in d[lo..hi].iter_mut().enumerate() {
                        *v = src[2 * t];
                    }
                } else {
                    for (t, v) in d[lo..hi].iter_mut().enumerate() {
                        *v = src[t * sw];
                    }
                }
            }
            d[hi..].fill(0.0);
        }
    }
}

/// The adjoint of `im2col`: dx (C, H, W) += scatter of cols (C*R*S, P*Q), leading dimension `ld`.
#[allow(clippy::too_many_arguments)]
pub fn col2im_add(
    cols: &[f32],
    ld: usize,
    c: usize,
    h: usize,
    w: usize,
    r: usize,
    s: usize,
    p: &ConvParams,
    dx: &mut [f32],
) {
    let (oh, ow) = p.out_hw(h, w, r, s).expect("conv output is empty");
    assert_eq!(dx.len(), c * h * w, "col2im output size");
    assert!(ld >= oh * ow && cols.len() >= (c * r * s - 1) * ld + oh * ow, "col2im input size");
    let sw = p.stride.1;
    for row in 0..c * r * s {
        let (ci, rr, ss) = (row / (r * s), (row / s) % r, row % s);
        let off = (ss * p.dilation.1) as isize - p.pad.1 as isize;
        let (lo, hi) = valid_cols(off, sw, w, ow);
        if hi == lo {
            continue;
        }
        let src = &cols[row * ld..row * ld + oh * ow];
        for py in 0..oh {
            let iy = (py * p.stride.0 + rr * p.dilation.0) as isize - p.pad.0 as isize;
            if iy < 0 || iy >= h as isize {
                continue;
            }
            let base = (ci * h + iy as usize) * w;
            let start = (base as isize + off + (lo * sw) as isize) as usize;
            let sv = &src[py * ow + lo..py * ow + hi];
            if sw == 1 {
                dx[start..start + (hi - lo)].iter_mut().zip(sv).for_each(|(o, &v)| *o += v);
            } else {
                for (t, &v) in sv.iter().enumerate() {
                    dx[start + t * sw] += v;
                }
            }
        }
    }
}

/// Shapes of a conv for the backward: input (N, C, H, W), weight dims (K, C, R, S).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub r: usize,
    pub s: usize,
}

impl ConvShape {
    /// Output (P, Q) under `p`; panics if empty (a caller bug: layers check shapes up front).
    pub fn out_hw(&self, p: &ConvParams) -> (usize, usize) {
        p.out_hw(self.h, self.w, self.r, self.s).expect("conv output is empty")
    }
}

/// Slow direct definition of the backward (the formulas above as loops), for tests.
/// Accumulates into dx (N, C, H, W), dw (K, C, R, S) and db (K).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward_reference(
    x: &[f32],
    wt: &[f32],
    g: &ConvShape,
    p: &ConvParams,
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    let (oh, ow) = g.out_hw(p);
    let (c, h, w, k) = (g.c, g.h, g.w, g.k);
    for b in 0..g.n {
        for ko in 0..k {
            for py in 0..oh {
                for px in 0..ow {
                    let d = dy[((b * k + ko) * oh + py) * ow + px];
                    db[ko] += d;
                    for ci in 0..c {
                        for r in 0..g.r {
                            let iy = (py * p.stride.0 + r * p.dilation.0) as isize - p.pad.0 as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for s in 0..g.s {
                                let ix = (px * p.stride.1 + s * p.dilation.1) as isize - p.pad.1 as isize;
                                if ix < 0 || ix >= w as isize {
                                    continue;
                                }
                                let wi = ((ko * c + ci) * g.r + r) * g.s + s;
                                let xi = ((b * c + ci) * h + iy as usize) * w + ix as usize;
                                dw[wi] += d * x[xi];
                                dx[xi] += d * wt[wi];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Conv backward on the sgemm. x (N, C, H, W), wt (K, C, R, S), dy (N, K, P, Q). Accumulates
/// dx (N, C, H, W) if given (None: the input needs no gradient, e.g. the image), dw (K, C, R, S), and
/// db (K) if given.
///
/// Images are processed in chunks of m so that each GEMM's P*Q side is at least ~256 columns (deep
/// layers have P*Q = 9..36, where one image per GEMM would be all overhead): the chunk's dy is
/// gathered into (K, m*PQ) and its im2col into (CRS, m*PQ), image j in columns j*PQ... Chunks run in
/// parallel, each worker with its own buffers and dW accumulator.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward(
    x: &[f32],
    wt: &[f32],
    g: &ConvShape,
    p: &ConvParams,
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) {
    use rayon::prelude::*;
    let (oh, ow) = g.out_hw(p);
    let (chw, pq, crs, k, n) = (g.c * g.h * g.w, oh * ow, g.c * g.r * g.s, g.k, g.n);
    assert_eq!(x.len(), n * chw, "conv backward input size");
    assert_eq!(wt.len(), k * crs, "conv backward weight size");
    assert_eq!(dy.len(), n * k * pq, "conv backward dy size");
    assert_eq!(dw.len(), k * crs, "conv backward dw size");
    let direct = g.r == 1 && g.s == 1 && p.stride == (1, 1) && p.pad == (0, 0);
    let acc = Epilogue { beta: 1.0, ..Default::default() };
    // Images per chunk.
    let m = 256usize.div_ceil(pq).clamp(1, n.max(1));
    let nchunks = n.div_ceil(m);

    if let Some(db) = db {
        assert_eq!(db.len(), k, "conv backward db size");
        // db[k] += sum over n, p, q of dy: f64 sums per channel (PQ can be thousands of terms).
        for (kk, d) in db.iter_mut().enumerate() {
            let mut sum = 0.0f64;
            for b in 0..n {
                let row = &dy[(b * k + kk) * pq..(b * k + kk + 1) * pq];
                sum += row.iter().map(|&v| v as f64).sum::<f64>();
            }
            *d += sum as f32;
        }
    }

    // dy of images b0..b0+mc as (K, mc*PQ): a view of dy itself when mc == 1, else gathered.
    let gather_dy = |b0: usize, mc: usize, buf: &mut Vec<f32>| {
        buf.resize(k * mc * pq, 0.0);
        for j in 0..mc {
            for kk in 0..k {
                let src = &dy[((b0 + j) * k + kk) * pq..((b0 + j) * k + kk + 1) * pq];
                buf[kk * mc * pq + j * pq..kk * mc * pq + (j + 1) * pq].copy_from_slice(src);
            }
        }
    };

    // dW (K, CRS) += dY_chunk (K, m*PQ) . cols_chunk^T (m*PQ, CRS). The chunks are split into at most
    // DW_GROUPS contiguous groups; each group sums its chunks in order into its own partial, and the
    // partials are added in group order, so the result does not depend on thread timing (an exact
    // training resume needs the same bits every run).
    const DW_GROUPS: usize = 8;
    let groups = nchunks.min(DW_GROUPS);
    let partials: Vec<Vec<f32>> = (0..groups)
        .into_par_iter()
        .map(|gi| {
            let (mut acc_w, mut cols, mut dyb) = (vec![0.0f32; k * crs], Vec::new(), Vec::new());
            for ci in gi * nchunks / groups..(gi + 1) * nchunks / groups {
                let (b0, mc) = (ci * m, m.min(n - ci * m));
                let ld = mc * pq;
                let cols_ref: &[f32] = if direct && mc == 1 {
                    &x[b0 * chw..(b0 + 1) * chw]
                } else {
                    cols.resize(crs * ld, 0.0);
                    for j in 0..mc {
                        let xi = &x[(b0 + j) * chw..(b0 + j + 1) * chw];
                        im2col(xi, g.c, g.h, g.w, g.r, g.s, p, &mut cols[j * pq..], ld);
                    }
                    &cols
                };
                let dy_ref: &[f32] = if mc == 1 {
                    &dy[b0 * k * pq..(b0 + 1) * k * pq]
                } else {
                    gather_dy(b0, mc, &mut dyb);
                    &dyb
                };
                let a = MatRef::row_major(dy_ref, k, ld);
                sgemm(a, MatRef::row_major(cols_ref, crs, ld).t(), &mut acc_w, crs, &acc);
            }
            acc_w
        })
        .collect();
    let partial = partials.into_iter().reduce(|mut a, b| {
        a.iter_mut().zip(&b).for_each(|(u, v)| *u += v);
        a
    });
    if let Some(pw) = partial {
        dw.iter_mut().zip(&pw).for_each(|(u, v)| *u += v);
    }

    if let Some(dx) = dx {
        assert_eq!(dx.len(), n * chw, "conv backward dx size");
        let wt_t = MatRef::row_major(wt, k, crs).t(); // (CRS, K)
        dx.par_chunks_mut(m * chw).enumerate().for_each_init(
            || (Vec::new(), Vec::new()),
            |(cols, dyb), (ci, dxc)| {
                let (b0, mc) = (ci * m, m.min(n - ci * m));
                let ld = mc * pq;
                let dy_ref: &[f32] = if mc == 1 {
                    &dy[b0 * k * pq..(b0 + 1) * k * pq]
                } else {
                    gather_dy(b0, mc, dyb);
                    dyb
                };
                let dyc = MatRef::row_major(dy_ref, k, ld);
                if direct && mc == 1 {
                    // (C, HW) += (C, K) . (K, HW)
                    sgemm(wt_t, dyc, dxc, pq, &acc);
                    return;
                }
                // dcols (CRS, m*PQ) = (CRS, K) . (K, m*PQ), then scatter-add per image.
                cols.resize(crs * ld, 0.0);
                sgemm(wt_t, dyc, cols, ld, &Epilogue::default());
                for j in 0..mc {
                    col2im_add(
                        &cols[j * pq..],
                        ld,
                        g.c,
                        g.h,
                        g.w,
                        g.r,
                        g.s,
                        p,
                        &mut dxc[j * chw..(j + 1) * chw],
                    );
                }
            },
        );
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
            (1, 16, 9, 11, 20, 1, 1, 1, 0, 1, false),  // 1x1 s1: straight GEMM
            (2, 16, 9, 11, 20, 1, 1, 2, 0, 1, false),  // 1x1 s2 (downsample)
            (1, 8, 13, 10, 17, 3, 3, 1, 1, 1, false),  // 3x3 s1 p1
            (1, 8, 13, 10, 17, 3, 3, 2, 1, 1, true),   // 3x3 s2 p1
            (1, 3, 23, 19, 10, 7, 7, 2, 3, 1, false),  // 7x7 s2 p3 (the stem)
            (1, 5, 15, 14, 9, 3, 3, 1, 2, 2, false),   // dilation 2
            (3, 7, 12, 9, 33, 3, 3, 1, 1, 1, true),    // batch 3, residual + relu
            (1, 64, 56, 56, 64, 3, 3, 1, 1, 1, true),  // a real ResNet layer1 3x3 (parallel)
            (1, 130, 12, 12, 40, 3, 3, 1, 1, 1, true), // depth 1170: 2+ depth blocks at every KC
            (2, 40, 17, 17, 70, 1, 1, 1, 0, 1, true),  // 1x1 s1 with residual + relu, batch 2
            (1, 6, 5, 8, 4, 3, 2, 1, 0, 1, false),     // non-square kernel, odd sizes
        ];
        for (i, &g) in cases.iter().enumerate() {
            check(g, 100 + i as u64);
        }
    }

    /// (N, C, H, W) -> (C, N, H, W) by the index formula (independent of `swap_leading_axes`).
    fn to_cn(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
        let mut y = vec![0.0; x.len()];
        for b in 0..n {
            for ci in 0..c {
                for i in 0..hw {
                    y[(ci * n + b) * hw + i] = x[(b * c + ci) * hw + i];
                }
            }
        }
        y
    }

    /// One channel-major conv case: random weights and bias, input and residual (uniform in
    /// [-1, 1], drawn from `rng` in that order), and the reference output (residual + ReLU when
    /// `fused`), all in the (C, N, H, W) / (K, N, P, Q) layouts the `_cn` paths use.
    struct CnCase {
        cw: ConvWeights,
        p: ConvParams,
        n: usize,
        h: usize,
        w: usize,
        fused: bool,
        xc: Vec<f32>,
        res_cn: Vec<f32>,
        want: Vec<f32>,
    }

    impl CnCase {
        #[allow(clippy::too_many_arguments)]
        fn new(
            seed: u64,
            n: usize,
            c: usize,
            h: usize,
            w: usize,
            k: usize,
            r: usize,
            s: usize,
            p: ConvParams,
            fused: bool,
        ) -> Self {
            let mut rng = Rng::new(seed);
            let wt: Vec<f32> = (0..k * c * r * s).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let bias: Vec<f32> = (0..k).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let cw = ConvWeights::new(wt, Some(bias), k, c, r, s);
            let (oh, ow) = p.out_hw(h, w, r, s).unwrap();
            let x: Vec<f32> = (0..n * c * h * w).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let res: Vec<f32> = (0..n * k * oh * ow).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let mut want = vec![f32::NAN; n * k * oh * ow];
            conv2d_reference(&x, n, h, w, &cw, &p, fused.then_some(&res[..]), fused, &mut want);
            let want = to_cn(&want, n, k, oh * ow);
            let (xc, res_cn) = (to_cn(&x, n, c, h * w), to_cn(&res, n, k, oh * ow));
            CnCase { cw, p, n, h, w, fused, xc, res_cn, want }
        }

        /// `conv2d_forward_cn` on the case (whichever path it routes to).
        fn forward(&self) -> Vec<f32> {
            let mut y = vec![f32::NAN; self.want.len()];
            let res = self.fused.then_some(&self.res_cn[..]);
            conv2d_forward_cn(&self.xc, self.n, self.h, self.w, &self.cw, &self.p, res, self.fused, &mut y);
            y
        }

        /// Tolerance against the reference: as in `check`.
        fn tol(&self) -> f64 {
            1e-6 * ((self.cw.c * self.cw.r * self.cw.s) as f64).sqrt()
        }
    }

    #[test]
    fn batched_channel_major_conv_matches_reference() {
        // Batch > 1 with odd sizes, so the GEMM's NR panels straddle output rows and images.
        let cases: &[Geo] = &[
            (3, 16, 9, 11, 20, 1, 1, 1, 0, 1, true), // 1x1 s1: (C, N*H*W) is B itself
            (5, 16, 9, 11, 20, 1, 1, 2, 0, 1, false), // 1x1 s2 (downsample)
            (3, 8, 13, 10, 17, 3, 3, 1, 1, 1, true), // 3x3 s1 p1, residual + relu
            (4, 8, 13, 11, 17, 3, 3, 2, 1, 1, false), // 3x3 s2 p1, odd width
            (2, 3, 23, 19, 10, 7, 7, 2, 3, 1, true), // 7x7 s2 p3 (the stem)
            (3, 5, 15, 14, 9, 3, 3, 1, 2, 2, false), // dilation 2
            (7, 24, 7, 7, 40, 3, 3, 1, 1, 1, true),  // layer4-like: 7x7 maps, 7 images
            (8, 64, 14, 14, 48, 3, 3, 2, 1, 1, true), // 8 images, depth 576
            (2, 120, 10, 10, 24, 3, 3, 2, 1, 1, true), // depth 1080: 2+ depth blocks at every KC
            (1, 6, 5, 8, 4, 3, 2, 1, 0, 1, false),   // n = 1, non-square kernel
            // Wide stride-2 rows (Q = 34, 35): runs of 16+ outputs take the AVX-512 vector gather.
            (2, 3, 9, 70, 10, 7, 7, 2, 3, 1, true),  // stem-like
            (3, 8, 5, 67, 12, 1, 1, 2, 0, 1, false), // 1x1 s2, odd width
            (2, 4, 6, 69, 9, 3, 3, 2, 1, 1, true),   // 3x3 s2
        ];
        for (i, &g) in cases.iter().enumerate() {
            let (n, c, h, w, k, r, s, st, pd, dil, fused) = g;
            let p = ConvParams { stride: (st, st), pad: (pd, pd), dilation: (dil, dil) };
            let cs = CnCase::new(300 + i as u64, n, c, h, w, k, r, s, p, fused);
            let e = rel_l2(&cs.forward(), &cs.want);
            // As in `check`: depth c*r*s products summed in another order.
            let tol = cs.tol();
            assert!(e <= tol, "{g:?}: rel L2 {e:.3e} > {tol:.3e}");
        }
    }

    /// `conv2d_forward_blocked` against `conv2d_forward_cn`: every path (1x1 in place, strided 1x1
    /// subsampled, im2col, direct, stride-2 direct) from a blocked and from a channel-major input,
    /// batches whose columns straddle blocks, images and rows, with and without residual + ReLU.
    /// The same kernels see the same B panels in the same order, so the values are the same bits;
    /// the output's padding columns stay as they were (zero). With the residual in the output
    /// buffer (`Residual::InOutput`), every path gives the same values up to rounding.
    #[test]
    fn blocked_conv_is_the_channel_major_conv() {
        use crate::cpu::blocked::to_blocked;
        let cases: &[Geo] = &[
            (3, 16, 9, 11, 20, 1, 1, 1, 0, 1, true),
            (5, 16, 9, 11, 20, 1, 1, 2, 0, 1, false),
            (3, 8, 5, 67, 12, 1, 1, 2, 0, 1, true),
            (3, 8, 13, 10, 17, 3, 3, 1, 1, 1, true),
            (4, 8, 13, 11, 17, 3, 3, 2, 1, 1, false),
            (2, 3, 23, 19, 10, 7, 7, 2, 3, 1, true),
            (2, 3, 32, 30, 20, 7, 7, 2, 3, 1, true), // even: the stride-2 direct path (AVX-512)
            (7, 24, 7, 7, 40, 3, 3, 1, 1, 1, true),
            (8, 64, 14, 14, 48, 3, 3, 2, 1, 1, true),
            // The stride-2 direct path from blocks (AVX-512): runs split at rows and blocks; the
            // second spans two depth blocks (the residual in the output added by the first).
            (3, 40, 14, 14, 24, 3, 3, 2, 1, 1, true),
            (2, 120, 10, 10, 24, 3, 3, 2, 1, 1, true),
            (1, 1100, 7, 7, 33, 1, 1, 1, 0, 1, true), // depth 1100: two depth blocks, n = 49
            // B read in place (AVX-512): the column-split order (wide, 2+ threads), the whole-B
            // order (n <= NC, two depth blocks); the smaller 1x1 cases above run single-threaded
            // in the default order, which reads B in place too.
            (2, 70, 28, 28, 64, 1, 1, 1, 0, 1, true),
            (1, 1100, 14, 14, 64, 1, 1, 1, 0, 1, true),
        ];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for (i, &g) in cases.iter().enumerate() {
            let (n, c, h, w, k, r, s, st, pd, dil, fused) = g;
            let p = ConvParams { stride: (st, st), pad: (pd, pd), dilation: (dil, dil) };
            let cs = CnCase::new(1300 + i as u64, n, c, h, w, k, r, s, p, fused);
            let want = pool.install(|| cs.forward());
            let cols = want.len() / k;
            let blk = |v: &[f32], rows: usize, cols: usize| {
                let mut o = vec![0.0; blocked_len(rows, cols)];
                to_blocked(v, rows, cols, &mut o);
                o
            };
            let (mut xb, mut resb) = (blk(&cs.xc, c, n * h * w), blk(&cs.res_cn, k, cols));
            // NaN in the padding of the input and the residual: it must not reach a stored value.
            for j in n * h * w..(n * h * w).div_ceil(COL_BLOCK) * COL_BLOCK {
                (0..c).for_each(|ci| xb[blocked_index(c, ci, j)] = f32::NAN);
            }
            for j in cols..cols.div_ceil(COL_BLOCK) * COL_BLOCK {
                (0..k).for_each(|ki| resb[blocked_index(k, ki, j)] = f32::NAN);
            }
            for input in [ConvInput::Blocked(&xb), ConvInput::ChannelMajor(&cs.xc)] {
                let mut yb = vec![7.5; blocked_len(k, cols)];
                let mut scratch = vec![f32::NAN; 7];
                let res = if fused { Residual::Add(&resb) } else { Residual::None };
                pool.install(|| {
                    conv2d_forward_blocked(input, n, h, w, &cs.cw, &p, res, fused, &mut yb, &mut scratch)
                });
                let mut got = vec![0.0; k * cols];
                from_blocked(&yb, k, cols, &mut got);
                let path = blocked_conv_path(&cs.cw, &p, h, w).name();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(
                    bits(&got) == bits(&want),
                    "case {i} {g:?} ({path}, blocked input {input}): differs from conv2d_forward_cn",
                    input = matches!(input, ConvInput::Blocked(_))
                );
                for j in cols..cols.div_ceil(COL_BLOCK) * COL_BLOCK {
                    for ki in 0..k {
                        assert_eq!(yb[blocked_index(k, ki, j)], 7.5, "case {i}: padding ({ki}, {j}) written");
                    }
                }
                if !fused {
                    continue;
                }
                // The residual in the output buffer: the same terms in another order, so equal
                // up to a few roundings of the output's magnitude (1e-6 relative L2: ~8 ulps);
                // the padding is left alone.
                let mut yi = resb.clone();
                for j in cols..cols.div_ceil(COL_BLOCK) * COL_BLOCK {
                    (0..k).for_each(|ki| yi[blocked_index(k, ki, j)] = 7.5);
                }
                pool.install(|| {
                    conv2d_forward_blocked(
                        input,
                        n,
                        h,
                        w,
                        &cs.cw,
                        &p,
                        Residual::InOutput,
                        true,
                        &mut yi,
                        &mut scratch,
                    )
                });
                let mut got_in = vec![0.0; k * cols];
                from_blocked(&yi, k, cols, &mut got_in);
                let e = rel_l2(&got_in, &want);
                assert!(e <= 1e-6, "case {i} {g:?} ({path}): residual in the output {e:.3e} off");
                for j in cols..cols.div_ceil(COL_BLOCK) * COL_BLOCK {
                    for ki in 0..k {
                        assert_eq!(yi[blocked_index(k, ki, j)], 7.5, "case {i}: padding ({ki}, {j}) written");
                    }
                }
            }
        }
    }

    /// The direct convolution (B read in place, AVX-512) against the reference and against the im2col
    /// path on the same inputs: "same" convs of several kernel sizes (3x3, 5x5, 1x3, 7x1), tiny and
    /// odd images (panels straddle rows and images, taps fall off every edge), channel counts that
    /// give several depth blocks, edge rows of K, with and without residual + ReLU. Tolerance as in
    /// `check`; the two paths run the same FMAs in the same order (padding taps are zero either way),
    /// so they agree to ~1e-7 at most.
    #[test]
    fn direct_conv_matches_reference_and_im2col() {
        // (n, c, h, w, k, r, s, fused)
        let cases = [
            (1, 8, 13, 10, 17, 3, 3, false),
            (3, 7, 12, 9, 33, 3, 3, true),
            (2, 120, 7, 7, 30, 3, 3, true), // depth 1080: two depth blocks; 98 columns
            (1, 1, 1, 1, 1, 3, 3, false),   // one pixel: every tap but the centre is padding
            (4, 3, 2, 3, 5, 3, 3, true),
            (2, 5, 9, 11, 15, 5, 5, false),
            (3, 6, 5, 8, 14, 1, 3, true),
            (2, 6, 8, 5, 28, 7, 1, false),
            (1, 64, 56, 56, 64, 3, 3, true), // ResNet layer1: wide B, columns split over threads
            (1, 240, 7, 7, 64, 3, 3, true),  // layer4-like: narrow B, the task grid, 3 depth blocks
            (1, 5, 9, 9, 20, 3, 3, false),   // n = 81 = 2*32 + 17: the 16+1-column kernel
            (3, 4, 3, 9, 10, 3, 3, true),    // the same over a batch (81 columns across 3 images)
        ];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for (i, &(n, c, h, w, k, r, s, fused)) in cases.iter().enumerate() {
            let p = ConvParams { stride: (1, 1), pad: ((r - 1) / 2, (s - 1) / 2), dilation: (1, 1) };
            let cs = CnCase::new(700 + i as u64, n, c, h, w, k, r, s, p, fused);
            if !direct_applicable(&cs.cw, &p) {
                println!("direct conv test skipped: no AVX-512 on this CPU");
                return;
            }
            let direct = pool.install(|| cs.forward());
            let im2col = pool.install(|| without_direct_conv(|| cs.forward()));
            let (want, tol) = (&cs.want, cs.tol());
            let e = rel_l2(&direct, want);
            assert!(e <= tol, "case {i}: direct vs reference {e:.3e} > {tol:.3e}");
            let e2 = rel_l2(&direct, &im2col);
            assert!(e2 <= 1e-7, "case {i}: direct vs im2col {e2:.3e}");
        }
    }

    /// The stride-2 direct convolution over the input's phases (`split_phases` +
    /// `DirectB::phases`) against the reference and the im2col path: the stem's 7x7/2 and the
    /// 3x3/2 shapes, 5x5 and 1x3 kernels, odd and tiny even images (every tap of a 2x2 input but
    /// a few falls in the padding), batches (phase planes hold all images), several depth blocks,
    /// edge rows of K, with and without residual + ReLU; `conv2d_direct_s2` is called directly, so
    /// the deep shapes are covered though the net only routes few-channel convs to it. An odd H
    /// must not be applicable. Tolerances as in the stride-1 test.
    #[test]
    fn direct_stride2_conv_matches_reference_and_im2col() {
        // (n, c, h, w, k, r, s, fused)
        let cases = [
            (1, 3, 32, 30, 20, 7, 7, true), // stem-like
            (2, 8, 12, 10, 17, 3, 3, false),
            (3, 5, 2, 2, 15, 3, 3, true),
            (1, 120, 14, 14, 30, 3, 3, true), // depth 1080: two depth blocks
            (2, 6, 10, 8, 14, 5, 5, false),
            (1, 4, 6, 8, 9, 1, 3, true),
            (1, 128, 16, 16, 64, 3, 3, true), // layer2-like 3x3/2: columns split over threads
            (1, 6, 7, 8, 5, 3, 3, false),     // odd H: im2col
            (1, 8, 14, 14, 15, 3, 3, true),   // n = 49 = 32 + 17: the 16+1-column kernel
        ];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for (i, &(n, c, h, w, k, r, s, fused)) in cases.iter().enumerate() {
            let p = ConvParams { stride: (2, 2), pad: ((r - 1) / 2, (s - 1) / 2), dilation: (1, 1) };
            let cs = CnCase::new(900 + i as u64, n, c, h, w, k, r, s, p, fused);
            if cs.cw.packed.isa() != Isa::Avx512 {
                println!("stride-2 direct conv test skipped: no AVX-512 on this CPU");
                return;
            }
            let even = h % 2 == 0 && w % 2 == 0;
            assert_eq!(direct_s2_applicable(&cs.cw, &p, h, w), even, "case {i}");
            let im2col = pool.install(|| without_direct_conv(|| cs.forward()));
            let (want, tol) = (&cs.want, cs.tol());
            let e = rel_l2(&im2col, want);
            assert!(e <= tol, "case {i}: im2col vs reference {e:.3e} > {tol:.3e}");
            if !even {
                continue;
            }
            // The direct path itself, whatever the channel count (conv2d_forward_cn takes it
            // only for few channels).
            let epi = Epilogue {
                row_bias: Some(&cs.cw.bias),
                residual: fused.then_some((&cs.res_cn[..], want.len() / k)),
                relu: fused,
                ..Default::default()
            };
            let direct = pool.install(|| {
                let mut y = vec![f32::NAN; want.len()];
                conv2d_direct_s2(
                    ConvInput::ChannelMajor(&cs.xc),
                    n,
                    h,
                    w,
                    &cs.cw,
                    &epi,
                    &mut y,
                    CLayout::Rows(want.len() / k),
                );
                y
            });
            let e = rel_l2(&direct, want);
            assert!(e <= tol, "case {i}: direct vs reference {e:.3e} > {tol:.3e}");
            let e2 = rel_l2(&direct, &im2col);
            assert!(e2 <= 1e-7, "case {i}: direct vs im2col {e2:.3e}");
            // And the routing: conv2d_forward_cn takes the direct path for few channels only,
            // either way within the same bound.
            let routed = pool.install(|| cs.forward());
            let e3 = rel_l2(&routed, &im2col);
            assert!(e3 <= 1e-7, "case {i}: conv2d_forward_cn vs im2col {e3:.3e}");
        }
    }

    /// `split_phases` and `split_phases_blocked` against the definition: tiny rows, several
    /// images, and (blocked) rows and images that straddle blocks.
    #[test]
    fn split_phases_deinterleaves_rows_and_columns() {
        use crate::cpu::blocked::to_blocked;
        for (c, n, h, w) in [(3, 2, 6, 4), (5, 3, 10, 14), (2, 1, 4, 70)] {
            let mut rng = Rng::new(5 + w as u64);
            let x: Vec<f32> = (0..c * n * h * w).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let mut xb = vec![f32::NAN; blocked_len(c, n * h * w)];
            to_blocked(&x, c, n * h * w, &mut xb);
            let (mut xp, mut xpb) = (vec![f32::NAN; x.len()], vec![f32::NAN; x.len()]);
            split_phases(&x, c, n, h, w, &mut xp);
            split_phases_blocked(&xb, c, n, h, w, &mut xpb);
            let (ph, pw) = (h / 2, w / 2);
            for ci in 0..c {
                for a in 0..2 {
                    for b in 0..2 {
                        for img in 0..n {
                            for u in 0..ph {
                                for v in 0..pw {
                                    let at = (((ci * 4 + a * 2 + b) * n + img) * ph + u) * pw + v;
                                    let want = x[((ci * n + img) * h + 2 * u + a) * w + 2 * v + b];
                                    let what = format!(
                                        "{c}x{n}x{h}x{w}: c {ci} phase ({a}, {b}) image {img} ({u}, {v})"
                                    );
                                    assert_eq!(xp[at], want, "{what}");
                                    assert_eq!(xpb[at], want, "blocked {what}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn swap_leading_axes_is_the_transpose() {
        let (a, b, l) = (3, 5, 7);
        let x: Vec<f32> = (0..a * b * l).map(|i| i as f32).collect();
        let mut y = vec![0.0; x.len()];
        swap_leading_axes(&x, a, b, l, &mut y);
        assert_eq!(y, to_cn(&x, a, b, l));
        let mut back = vec![0.0; x.len()];
        swap_leading_axes(&y, b, a, l, &mut back);
        assert_eq!(back, x);
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
