//! VGG (torchvision layout, no batch-norm), built from a config; `VggConfig::vgg16()` is VGG16.
//!
//! ```text
//! x (N,3,H,W) -> features: [conv3x3 pad 1 + ReLU | maxpool 2x2/2]*  (N,512,H/32,W/32)
//!   -> AdaptiveAvgPool2d(7,7) (N,512,7,7) -> flatten (N,25088)
//!   -> classifier.0 linear + ReLU = fc6 (N,4096) -> [dropout] -> classifier.3 + ReLU = fc7 (N,4096)
//!   -> [dropout] -> classifier.6 (N,1000)
//! ```
//!
//! Dropout is the identity at inference. State-dict names: `features.{i}.{weight,bias}` where `i`
//! counts the modules of `features` (a conv and its ReLU take two indices, a max-pool one), and
//! `classifier.{0,3,6}.{weight,bias}`.

use std::sync::Mutex;

use crate::cpu::conv::ConvParams;
use crate::cpu::pool::PoolParams;
use crate::error::{Error, Result};
use crate::nn::buffers::ActivationPool;
use crate::nn::conv::{Conv2d, ParamFn};
use crate::nn::encoder::{Encoder, EncoderKind, FeatureLayer};
use crate::nn::linear::Linear;
use crate::nn::resnet::to_grid;
use crate::ops;
use crate::tensor::Tensor;
use crate::weights::TensorFile;

/// One entry of `features`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VggLayer {
    /// 3x3 conv (pad 1) with this many output channels, then ReLU.
    Conv(usize),
    /// 2x2 max-pool, stride 2.
    Pool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VggConfig {
    pub layers: Vec<VggLayer>,
    /// Output side of the adaptive average pool (7 in torchvision).
    pub pool_hw: usize,
    /// Width of fc6 and fc7 (4096 in torchvision).
    pub hidden: usize,
    pub num_classes: usize,
}

impl VggConfig {
    pub fn vgg16() -> Self {
        use VggLayer::{Conv as C, Pool as P};
        let layers = vec![
            C(64),
            C(64),
            P,
            C(128),
            C(128),
            P,
            C(256),
            C(256),
            C(256),
            P,
            C(512),
            C(512),
            C(512),
            P,
            C(512),
            C(512),
            C(512),
            P,
        ];
        VggConfig { layers, pool_hw: 7, hidden: 4096, num_classes: 1000 }
    }

    pub fn name(&self) -> String {
        if *self == Self::vgg16() {
            "vgg16".into()
        } else {
            format!(
                "vgg({:?} pool {} hidden {} classes {})",
                self.layers, self.pool_hw, self.hidden, self.num_classes
            )
        }
    }

    /// Channels out of `features` (3 if there is no conv).
    pub fn out_channels(&self) -> usize {
        self.layers
            .iter()
            .rev()
            .find_map(|l| if let VggLayer::Conv(k) = l { Some(*k) } else { None })
            .unwrap_or(3)
    }

    /// (module index, layer, input channels) of each `features` entry.
    fn indexed(&self) -> Vec<(usize, VggLayer, usize)> {
        let (mut idx, mut c) = (0, 3);
        let mut out = Vec::new();
        for &l in &self.layers {
            out.push((idx, l, c));
            match l {
                VggLayer::Conv(k) => {
                    idx += 2;
                    c = k;
                }
                VggLayer::Pool => idx += 1,
            }
        }
        out
    }

    fn classifier(&self) -> [(usize, usize, usize); 3] {
        let flat = self.out_channels() * self.pool_hw * self.pool_hw;
        [(0, self.hidden, flat), (3, self.hidden, self.hidden), (6, self.num_classes, self.hidden)]
    }
}

/// Every tensor of the torchvision state dict, in torchvision order.
pub fn state_dict_shapes(cfg: &VggConfig) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for (i, l, c) in cfg.indexed() {
        if let VggLayer::Conv(k) = l {
            out.push((format!("features.{i}.weight"), vec![k, c, 3, 3]));
            out.push((format!("features.{i}.bias"), vec![k]));
        }
    }
    for (i, o, inp) in cfg.classifier() {
        out.push((format!("classifier.{i}.weight"), vec![o, inp]));
        out.push((format!("classifier.{i}.bias"), vec![o]));
    }
    out
}

#[derive(Debug)]
enum Stage {
    Conv(usize, Conv2d),
    Pool(usize),
}

#[derive(Debug)]
pub struct Vgg {
    pub cfg: VggConfig,
    features: Vec<Stage>,
    fc6: Linear,
    fc7: Linear,
    fc8: Linear,
    pool: Mutex<ActivationPool>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Until {
    Features,
    Fc7,
    Logits,
}

impl Vgg {
    fn build(cfg: &VggConfig, get: ParamFn) -> Result<Vgg> {
        let mut features = Vec::new();
        for (i, l, c) in cfg.indexed() {
            features.push(match l {
                VggLayer::Conv(k) => Stage::Conv(
                    i,
                    Conv2d::load_biased(get, &format!("features.{i}"), [k, c, 3, 3], ConvParams::new(1, 1))?,
                ),
                VggLayer::Pool => Stage::Pool(i),
            });
        }
        let lin = |(i, o, inp): (usize, usize, usize)| -> Result<Linear> {
            let w = get(&format!("classifier.{i}.weight"), &[o, inp])?;
            let b = get(&format!("classifier.{i}.bias"), &[o])?;
            Ok(Linear::new(Tensor::from_vec(w, &[o, inp])?, Some(Tensor::from_vec(b, &[o])?)))
        };
        let [c0, c3, c6] = cfg.classifier();
        Ok(Vgg {
            cfg: cfg.clone(),
            features,
            fc6: lin(c0)?,
            fc7: lin(c3)?,
            fc8: lin(c6)?,
            pool: Mutex::new(ActivationPool::new()),
        })
    }

    /// Seeded random weights: every state-dict tensor from `crate::weights::random::init_tensor`.
    pub fn random(cfg: &VggConfig, seed: u64) -> Vgg {
        let get = |name: &str, dims: &[usize]| Ok(crate::weights::random::init_tensor(name, dims, seed));
        Self::build(cfg, &get).expect("random weights always fit")
    }

    /// Weights from a safetensors file with torchvision names (exactly the state dict).
    pub fn from_tensor_file(cfg: &VggConfig, f: &TensorFile) -> Result<Vgg> {
        f.check_exact(&state_dict_shapes(cfg), &cfg.name())?;
        let get = |name: &str, dims: &[usize]| f.require_f32(name, dims);
        Self::build(cfg, &get)
    }

    fn run(&self, x: &Tensor, until: Until, tap: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        if !matches!(x.dims(), [_, 3, _, _]) {
            return Err(Error::shape(format!(
                "{}: expected an (N, 3, H, W) image batch, got {:?}",
                self.cfg.name(),
                x.dims()
            )));
        }
        let mut pool = std::mem::take(&mut *self.pool.lock().unwrap_or_else(|e| e.into_inner()));
        let result = self.run_with(x, until, tap, &mut pool);
        let mut slot = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.allocations += slot.allocations;
        *slot = pool;
        result
    }

    fn run_with(
        &self,
        x: &Tensor,
        until: Until,
        tap: &mut dyn FnMut(&str, &Tensor),
        pool: &mut ActivationPool,
    ) -> Result<Tensor> {
        let mp = PoolParams::new(2, 2, 0);
        let mut cur: Option<Tensor> = None;
        for stage in &self.features {
            let input = cur.as_ref().unwrap_or(x);
            let out = match stage {
                Stage::Conv(i, conv) => {
                    let mut out = pool.take(&conv.out_dims(input.dims())?);
                    conv.forward_into(input, None, true, &mut out)?;
                    tap(&format!("features.{}", i + 1), &out); // after the ReLU
                    out
                }
                Stage::Pool(i) => {
                    let mut out = pool.take(&ops::max_pool2d_out_dims(input.dims(), &mp)?);
                    ops::max_pool2d_into(input, &mp, &mut out)?;
                    tap(&format!("features.{i}"), &out);
                    out
                }
            };
            if let Some(prev) = cur.replace(out) {
                pool.give(prev);
            }
        }
        let feats = match cur {
            Some(t) => t,
            None => x.clone(),
        };
        if until == Until::Features {
            return Ok(feats);
        }
        let (n, c) = (feats.dims()[0], feats.dims()[1]);
        let s = self.cfg.pool_hw;
        let mut avg = pool.take(&[n, c, s, s]);
        ops::adaptive_avg_pool2d_into(&feats, s, s, &mut avg)?;
        pool.give(feats);
        let flat = avg.reshape(&[n, c * s * s])?;
        drop(avg);
        let mut fc6 = pool.take(&[n, self.cfg.hidden]);
        self.fc6.forward_into(&flat, true, &mut fc6)?;
        pool.give(flat);
        tap("fc6", &fc6);
        let mut fc7 = pool.take(&[n, self.cfg.hidden]);
        self.fc7.forward_into(&fc6, true, &mut fc7)?;
        pool.give(fc6);
        tap("fc7", &fc7);
        if until == Until::Fc7 {
            return Ok(fc7);
        }
        let logits = self.fc8.forward(&fc7, false)?;
        pool.give(fc7);
        Ok(logits)
    }
}

impl Encoder for Vgg {
    fn kind(&self) -> EncoderKind {
        EncoderKind::Vgg16
    }

    fn features(&self, x: &Tensor, layer: FeatureLayer) -> Result<Tensor> {
        match layer {
            FeatureLayer::Pooled => self.run(x, Until::Fc7, &mut |_, _| {}),
            FeatureLayer::Grid => to_grid(&self.run(x, Until::Features, &mut |_, _| {})?),
        }
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, Until::Logits, &mut |_, _| {})
    }

    fn forward_trace(&self, x: &Tensor, tap: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        self.run(x, Until::Logits, tap)
    }
}
