//! 2-D convolution layer with batch-norm folded in at load time.
//!
//! Batch-norm at inference is an affine map per output channel,
//! `bn(z) = gamma * (z - mean) / sqrt(var + eps) + beta`, so applied after a conv with weight w and
//! bias b it folds into the conv itself (per output channel k, with s_k = gamma_k / sqrt(var_k + eps)):
//!
//! ```text
//! w'[k,...] = w[k,...] * s_k
//! b'[k]     = beta_k + (b_k - mean_k) * s_k        (b_k = 0 for a conv without bias)
//! ```
//!
//! The folded weights go into a `cpu::conv::ConvWeights`, built once (its constructor may pre-pack).

use crate::cpu::conv::{ConvParams, ConvWeights};
use crate::error::Result;
use crate::ops;
use crate::tensor::Tensor;

/// Where a layer's parameters come from: a named, shaped tensor as f32 (a file or a seeded init).
pub type ParamFn<'a> = &'a dyn Fn(&str, &[usize]) -> Result<Vec<f32>>;

/// PyTorch's BatchNorm2d default.
pub const BN_EPS: f32 = 1e-5;

/// Batch-norm parameters of one layer, each (K).
#[derive(Clone, Debug)]
pub struct BatchNorm {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
    pub eps: f32,
}

impl BatchNorm {
    /// `{prefix}.{weight,bias,running_mean,running_var}`, each (k).
    pub fn load(get: ParamFn, prefix: &str, k: usize) -> Result<Self> {
        Ok(BatchNorm {
            gamma: get(&format!("{prefix}.weight"), &[k])?,
            beta: get(&format!("{prefix}.bias"), &[k])?,
            mean: get(&format!("{prefix}.running_mean"), &[k])?,
            var: get(&format!("{prefix}.running_var"), &[k])?,
            eps: BN_EPS,
        })
    }
}

/// Folds batch-norm into a conv's weight (K, C, R, S) and optional bias (K); returns (w', b').
pub fn fold_batchnorm(weight: &[f32], bias: Option<&[f32]>, bn: &BatchNorm) -> (Vec<f32>, Vec<f32>) {
    let k = bn.gamma.len();
    assert!(
        k > 0 && weight.len().is_multiple_of(k),
        "fold_batchnorm: weight {} for {k} channels",
        weight.len()
    );
    let per = weight.len() / k;
    let mut w = weight.to_vec();
    let mut b = vec![0.0f32; k];
    for ko in 0..k {
        // In f64 so folding adds no error beyond the final rounding to f32.
        let s = bn.gamma[ko] as f64 / (bn.var[ko] as f64 + bn.eps as f64).sqrt();
        for v in &mut w[ko * per..(ko + 1) * per] {
            *v = (*v as f64 * s) as f32;
        }
        let b0 = bias.map_or(0.0, |b| b[ko] as f64);
        b[ko] = (bn.beta[ko] as f64 + (b0 - bn.mean[ko] as f64) * s) as f32;
    }
    (w, b)
}

/// A convolution ready to run: folded weights plus geometry.
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weights: ConvWeights,
    pub params: ConvParams,
}

impl Conv2d {
    /// weight (K, C, R, S) row-major, optional bias (K).
    pub fn new(weight: Vec<f32>, bias: Option<Vec<f32>>, dims: [usize; 4], params: ConvParams) -> Self {
        let [k, c, r, s] = dims;
        Conv2d { weights: ConvWeights::new(weight, bias, k, c, r, s), params }
    }

    /// A conv followed by batch-norm, folded into one conv.
    pub fn with_batchnorm(
        weight: &[f32],
        bias: Option<&[f32]>,
        bn: &BatchNorm,
        dims: [usize; 4],
        params: ConvParams,
    ) -> Self {
        let (w, b) = fold_batchnorm(weight, bias, bn);
        Conv2d::new(w, Some(b), dims, params)
    }

    /// This conv with a following batch-norm folded in (builds new `ConvWeights`). Needs the raw
    /// weights (panics after `ConvWeights::release_raw`, a programming error).
    pub fn fold_batchnorm(&self, bn: &BatchNorm) -> Self {
        let w = &self.weights;
        assert!(w.has_raw(), "fold_batchnorm: the raw conv weights were released");
        Conv2d::with_batchnorm(&w.weight, Some(&w.bias), bn, [w.k, w.c, w.r, w.s], self.params)
    }

    /// `{conv}.weight` (no bias) followed by the batch-norm `{bn}`, as torchvision's ResNet names them.
    pub fn load_conv_bn(
        get: ParamFn,
        conv: &str,
        bn: &str,
        dims: [usize; 4],
        params: ConvParams,
    ) -> Result<Self> {
        let w = get(&format!("{conv}.weight"), &dims)?;
        let bn = BatchNorm::load(get, bn, dims[0])?;
        Ok(Conv2d::with_batchnorm(&w, None, &bn, dims, params))
    }

    /// `{prefix}.weight` and `{prefix}.bias` (VGG's convs).
    pub fn load_biased(get: ParamFn, prefix: &str, dims: [usize; 4], params: ConvParams) -> Result<Self> {
        let w = get(&format!("{prefix}.weight"), &dims)?;
        let b = get(&format!("{prefix}.bias"), &[dims[0]])?;
        Ok(Conv2d::new(w, Some(b), dims, params))
    }

    pub fn out_dims(&self, x: &[usize]) -> Result<Vec<usize>> {
        ops::conv2d_out_dims(x, &self.weights, &self.params)
    }

    /// y = act(conv(x) + bias + residual).
    pub fn forward(&self, x: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
        ops::conv2d(x, &self.weights, &self.params, residual, relu)
    }

    pub fn forward_into(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
        out: &mut Tensor,
    ) -> Result<()> {
        ops::conv2d_into(x, &self.weights, &self.params, residual, relu, out)
    }
}

impl Conv2d {
    /// Output dims for a channel-major input (C, N, H, W): (K, N, P, Q).
    pub fn out_dims_cn(&self, x: &[usize]) -> Result<Vec<usize>> {
        ops::conv2d_cn_out_dims(x, &self.weights, &self.params)
    }

    /// y = act(conv(x) + bias + residual) on channel-major activations: x (C, N, H, W) ->
    /// out (K, N, P, Q), residual like out. The whole batch runs as one GEMM
    /// (`cpu::conv::conv2d_forward_cn`); at N = 1 this is `forward_into`.
    pub fn forward_cn_into(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
        out: &mut Tensor,
    ) -> Result<()> {
        ops::conv2d_cn_into(x, &self.weights, &self.params, residual, relu, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::uniform_vec;

    #[test]
    fn folded_conv_equals_conv_then_batchnorm() {
        let (k, c, r, s, h, w) = (5, 3, 3, 3, 7, 6);
        let weight = uniform_vec(1, "w", k * c * r * s, -0.5, 0.5);
        let bias = uniform_vec(2, "b", k, -0.5, 0.5);
        let bn = BatchNorm {
            gamma: uniform_vec(3, "g", k, 0.5, 1.5),
            beta: uniform_vec(4, "be", k, -0.3, 0.3),
            mean: uniform_vec(5, "m", k, -0.3, 0.3),
            var: uniform_vec(6, "v", k, 0.2, 2.0),
            eps: BN_EPS,
        };
        let x = Tensor::from_vec(uniform_vec(7, "x", 2 * c * h * w, -1.0, 1.0), &[2, c, h, w]).unwrap();
        let p = ConvParams::new(2, 1);
        for b in [None, Some(&bias[..])] {
            let plain = Conv2d::new(weight.clone(), b.map(|b| b.to_vec()), [k, c, r, s], p);
            // Conv, then batch-norm applied separately in f64.
            let z = plain.forward(&x, None, false).unwrap();
            let (oh, ow) = (z.dims()[2], z.dims()[3]);
            let zv = z.to_f32_vec();
            let mut want = vec![0.0f32; zv.len()];
            for (i, (o, &v)) in want.iter_mut().zip(&zv).enumerate() {
                let ko = (i / (oh * ow)) % k;
                let sc = bn.gamma[ko] as f64 / (bn.var[ko] as f64 + 1e-5).sqrt();
                *o = ((v as f64 - bn.mean[ko] as f64) * sc + bn.beta[ko] as f64) as f32;
            }
            let folded = Conv2d::with_batchnorm(&weight, b, &bn, [k, c, r, s], p);
            let y = folded.forward(&x, None, false).unwrap().to_f32_vec();
            let y2 = plain.fold_batchnorm(&bn).forward(&x, None, false).unwrap().to_f32_vec();
            let err = |a: &[f32]| {
                let n: f64 = a.iter().zip(&want).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
                (n / want.iter().map(|q| (*q as f64).powi(2)).sum::<f64>()).sqrt()
            };
            // Folding reorders f32 rounding only (27-term dot products): 1e-5 is ~100 ulps of headroom.
            assert!(err(&y) <= 1e-5, "{}", err(&y));
            assert!(err(&y2) <= 1e-5, "{}", err(&y2));
        }
    }
}
