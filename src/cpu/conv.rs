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
}

impl ConvWeights {
    pub fn new(weight: Vec<f32>, bias: Option<Vec<f32>>, k: usize, c: usize, r: usize, s: usize) -> Self {
        assert_eq!(weight.len(), k * c * r * s, "conv weight size");
        let bias = bias.unwrap_or_else(|| vec![0.0; k]);
        assert_eq!(bias.len(), k, "conv bias size");
        ConvWeights { k, c, r, s, weight, bias }
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
    // Placeholder until the implicit-GEMM kernel lands.
    conv2d_reference(x, n, h, w, wt, p, residual, relu, y);
}
