//! Fully connected layer: y = x W^T + b, x (N, I), W (O, I), b (O) -> (N, O) (PyTorch `nn.Linear`).

use crate::cpu::linear::PackedLinear;
use crate::error::Result;
use crate::ops;
use crate::tensor::Tensor;
use crate::weights::TensorFile;

#[derive(Clone, Debug)]
pub struct Linear {
    /// (O, I), f32.
    pub weight: Tensor,
    /// (O), f32.
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `{prefix}.weight` (O, I) and `{prefix}.bias` (O) from a file, widened to f32.
    pub fn load(f: &TensorFile, prefix: &str, out: usize, inp: usize) -> Result<Self> {
        let w = f.require(&format!("{prefix}.weight"), &[out, inp])?.to_dtype(crate::tensor::DType::F32);
        let b = f.require(&format!("{prefix}.bias"), &[out])?.to_dtype(crate::tensor::DType::F32);
        Ok(Linear::new(w, Some(b)))
    }

    /// Seeded random weights (`crate::weights::random`), same names as `load`.
    pub fn random(prefix: &str, out: usize, inp: usize, seed: u64) -> Self {
        let wn = format!("{prefix}.weight");
        let bn = format!("{prefix}.bias");
        let w = crate::weights::random::init_tensor(&wn, &[out, inp], seed);
        let b = crate::weights::random::init_tensor(&bn, &[out], seed);
        Linear::new(
            Tensor::from_vec(w, &[out, inp]).expect("size"),
            Some(Tensor::from_vec(b, &[out]).expect("size")),
        )
    }

    pub fn forward(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        ops::linear(x, &self.weight, self.bias.as_ref(), relu)
    }

    pub fn forward_into(&self, x: &Tensor, relu: bool, out: &mut Tensor) -> Result<()> {
        ops::linear_into(x, &self.weight, self.bias.as_ref(), relu, out)
    }
}

/// A `Linear` frozen for inference: the weights packed once (see `cpu::linear::PackedLinear`), the
/// raw copy dropped. The encoders' classifier layers use it; training keeps `Linear`.
#[derive(Clone, Debug)]
pub struct FrozenLinear {
    w: PackedLinear,
}

impl FrozenLinear {
    /// W (O, I) and bias (O) as f32 vectors, row-major.
    pub fn new(w: &[f32], out: usize, inp: usize, bias: Option<Vec<f32>>) -> Self {
        FrozenLinear { w: PackedLinear::new(w, out, inp, bias) }
    }
    pub fn in_features(&self) -> usize {
        self.w.in_features()
    }
    pub fn out_features(&self) -> usize {
        self.w.out_features()
    }

    pub fn forward(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let mut out = Tensor::zeros(&[x.dims().first().copied().unwrap_or(0), self.out_features()]);
        self.forward_into(x, relu, &mut out)?;
        Ok(out)
    }

    pub fn forward_into(&self, x: &Tensor, relu: bool, out: &mut Tensor) -> Result<()> {
        ops::linear_packed_into(x, &self.w, relu, out)
    }
}
