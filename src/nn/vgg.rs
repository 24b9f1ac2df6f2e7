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

use crate::cpu::conv::{swap_leading_axes, ConvParams};
use crate::cpu::pool::PoolParams;
use crate::error::{Error, Result};
use crate::nn::buffers::ActivationPool;
use crate::nn::conv::{Conv2d, ParamFn};
use crate::nn::encoder::{Encoder, EncoderKind, FeatureLayer};
use crate::nn::linear::FrozenLinear;
use crate::nn::resnet::{emit, to_grid, Tap};
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
    // Boxed: a conv holds its packed weights inline and dwarfs the pool variant.
    Conv(usize, Box<Conv2d>),
    Pool(usize),
}

#[derive(Debug)]
pub struct Vgg {
    pub cfg: VggConfig,
    features: Vec<Stage>,
    fc6: FrozenLinear,
    fc7: FrozenLinear,
    fc8: FrozenLinear,
    pool: Mutex<ActivationPool>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Until {
    /// The last features block as a spatial-major grid (N, H*W, C).
    Features,
    Fc7,
    Logits,
}

impl Vgg {
    fn build(cfg: &VggConfig, get: ParamFn) -> Result<Vgg> {
        let mut features = Vec::new();
        for (i, l, c) in cfg.indexed() {
            features.push(match l {
                VggLayer::Conv(k) => {
                    let mut conv = Conv2d::load_biased(
                        get,
                        &format!("features.{i}"),
                        [k, c, 3, 3],
                        ConvParams::new(1, 1),
                    )?;
                    // Inference reads only the packed weights: drop the raw copy at once.
                    conv.weights.release_raw();
                    Stage::Conv(i, Box::new(conv))
                }
                VggLayer::Pool => Stage::Pool(i),
            });
        }
        let lin = |(i, o, inp): (usize, usize, usize)| -> Result<FrozenLinear> {
            let w = get(&format!("classifier.{i}.weight"), &[o, inp])?;
            let b = get(&format!("classifier.{i}.bias"), &[o])?;
            Ok(FrozenLinear::new(&w, o, inp, Some(b)))
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

    fn run(&self, x: &Tensor, until: Until, tap: Option<Tap>) -> Result<Tensor> {
        // Each 2x2/2 max-pool halves the image, so it must be at least 2^pools on each side.
        let min = 1usize << self.cfg.layers.iter().filter(|l| **l == VggLayer::Pool).count();
        match x.dims() {
            [n, 3, h, w] if *n >= 1 && *h >= min && *w >= min => {}
            d => {
                return Err(Error::shape(format!(
                    "{}: expected a non-empty (N, 3, H, W) image batch with H, W >= {min}, got {d:?}",
                    self.cfg.name()
                )))
            }
        }
        crate::nn::buffers::with_pool(&self.pool, |pool| self.run_with(x, until, tap, pool))
    }

    /// The forward pass. `features` runs channel-major (C, N, H, W), so each conv is ONE GEMM over the
    /// whole batch (`Conv2d::forward_cn_into`; at N = 1 the layout is NCHW itself); the last block is
    /// converted back to NCHW for the classifier / grid, traced activations on the way.
    fn run_with(
        &self,
        x: &Tensor,
        until: Until,
        mut tap: Option<Tap>,
        pool: &mut ActivationPool,
    ) -> Result<Tensor> {
        let mp = PoolParams::new(2, 2, 0);
        let (n, h, w) = (x.dims()[0], x.dims()[2], x.dims()[3]);
        // (N, 3, H, W) -> (3, N, H, W)
        let mut cur = pool.take(&[3, n, h, w]);
        match x.as_f32_slice() {
            Ok(xs) => swap_leading_axes(xs, n, 3, h * w, cur.as_f32_slice_mut()?),
            Err(_) => swap_leading_axes(&x.to_f32_vec(), n, 3, h * w, cur.as_f32_slice_mut()?),
        }
        for stage in &self.features {
            let out = match stage {
                Stage::Conv(i, conv) => {
                    let mut out = pool.take(&conv.out_dims_cn(cur.dims())?);
                    conv.forward_cn_into(&cur, None, true, &mut out)?;
                    emit(&mut tap, &format!("features.{}", i + 1), &out)?; // after the ReLU
                    out
                }
                Stage::Pool(i) => {
                    // Plane by plane, so (C, N, H, W) passes as C "images" of N planes.
                    let mut out = pool.take(&ops::max_pool2d_out_dims(cur.dims(), &mp)?);
                    ops::max_pool2d_into(&cur, &mp, &mut out)?;
                    emit(&mut tap, &format!("features.{i}"), &out)?;
                    out
                }
            };
            pool.give(std::mem::replace(&mut cur, out));
        }
        // (C, N, H', W') -> (N, C, H', W')
        let [c, _, fh, fw] = *cur.dims() else { unreachable!("activations are 4-D") };
        let mut feats = pool.take(&[n, c, fh, fw]);
        swap_leading_axes(cur.as_f32_slice()?, c, n, fh * fw, feats.as_f32_slice_mut()?);
        pool.give(cur);
        if until == Until::Features {
            // The grid is a fresh tensor; the feature buffer goes back to the pool.
            let grid = to_grid(&feats);
            pool.give(feats);
            return grid;
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
        if let Some(tap) = tap.as_mut() {
            tap("fc6", &fc6);
        }
        let mut fc7 = pool.take(&[n, self.cfg.hidden]);
        self.fc7.forward_into(&fc6, true, &mut fc7)?;
        pool.give(fc6);
        if let Some(tap) = tap.as_mut() {
            tap("fc7", &fc7);
        }
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
            FeatureLayer::Pooled => self.run(x, Until::Fc7, None),
            FeatureLayer::Grid => self.run(x, Until::Features, None),
        }
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, Until::Logits, None)
    }

    fn forward_trace(&self, x: &Tensor, tap: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        self.run(x, Until::Logits, Some(tap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::conv::{conv2d_reference, ConvWeights};
    use crate::rng::uniform_vec;
    use crate::weights::random::init_tensor;
    use std::collections::HashMap;

    fn tiny() -> VggConfig {
        use VggLayer::{Conv as C, Pool as P};
        VggConfig { layers: vec![C(4), P, C(6), C(6), P], pool_hw: 2, hidden: 12, num_classes: 5 }
    }

    fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        (num / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>()).sqrt()
    }

    #[test]
    fn vgg16_state_dict_matches_torchvision() {
        let sd = state_dict_shapes(&VggConfig::vgg16());
        let convs: Vec<usize> = sd
            .iter()
            .filter(|(n, d)| n.starts_with("features.") && d.len() == 4)
            .map(|(n, _)| n.split('.').nth(1).unwrap().parse().unwrap())
            .collect();
        assert_eq!(convs, [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]);
        assert_eq!(sd.len(), 32); // 16 weight/bias pairs, as torchvision's vgg16().state_dict()
        let params: usize = sd.iter().map(|(_, d)| d.iter().product::<usize>()).sum();
        assert_eq!(params, 138_357_544); // torchvision's published VGG16 parameter count
        assert!(sd.contains(&("classifier.0.weight".to_string(), vec![4096, 25088])));
        assert!(sd.contains(&("classifier.6.bias".to_string(), vec![1000])));
    }

    #[test]
    fn tiny_vgg_shapes_and_independent_check() {
        let cfg = tiny();
        let net = Vgg::random(&cfg, 3);
        let (n, h, w) = (2, 17, 20);
        let x = Tensor::from_vec(uniform_vec(4, "x", n * 3 * h * w, -2.0, 2.0), &[n, 3, h, w]).unwrap();
        let mut taps: HashMap<String, Tensor> = HashMap::new();
        let mut order = Vec::new();
        let logits = net
            .forward_trace(&x, &mut |name, t| {
                order.push(name.to_string());
                taps.insert(name.to_string(), t.clone());
            })
            .unwrap();
        assert_eq!(
            order,
            ["features.1", "features.2", "features.4", "features.6", "features.7", "fc6", "fc7"]
        );
        let dims = |k: &str| taps[k].dims().to_vec();
        assert_eq!(dims("features.1"), [2, 4, 17, 20]);
        assert_eq!(dims("features.2"), [2, 4, 8, 10]);
        assert_eq!(dims("features.7"), [2, 6, 4, 5]);
        assert_eq!(dims("fc7"), [2, 12]);
        assert_eq!(logits.dims(), &[2, 5]);

        // features.1 = relu(conv(x) + b), by the reference loop.
        let cw = ConvWeights::new(
            init_tensor("features.0.weight", &[4, 3, 3, 3], 3),
            Some(init_tensor("features.0.bias", &[4], 3)),
            4,
            3,
            3,
            3,
        );
        let mut f1 = vec![0.0; n * 4 * h * w];
        conv2d_reference(&x.to_f32_vec(), n, h, w, &cw, &ConvParams::new(1, 1), None, true, &mut f1);
        // Same arithmetic, possibly reordered by the fast kernel: 1e-5.
        assert!(rel_l2(&taps["features.1"].to_f32_vec(), &f1) < 1e-5);

        // fc6 = relu(W0 flatten(avgpool_2x2(features.7)) + b0): the adaptive bins of 4 -> 2 are
        // rows [0,2) [2,4), of 5 -> 2 columns [0,3) [2,5) (PyTorch's floor/ceil rule).
        let f7 = taps["features.7"].to_f32_vec();
        let mut flat = vec![0.0f64; n * 6 * 4];
        for b in 0..n * 6 {
            for (i, (r0, r1)) in [(0, 2), (2, 4)].into_iter().enumerate() {
                for (j, (c0, c1)) in [(0, 3), (2, 5)].into_iter().enumerate() {
                    let mut s = 0.0f64;
                    for r in r0..r1 {
                        for c in c0..c1 {
                            s += f7[b * 20 + r * 5 + c] as f64;
                        }
                    }
                    flat[b * 4 + i * 2 + j] = s / ((r1 - r0) * (c1 - c0)) as f64;
                }
            }
        }
        let dense = |inp: &[f64], name: &str, o: usize, i: usize, relu: bool| -> Vec<f64> {
            let wt = init_tensor(&format!("{name}.weight"), &[o, i], 3);
            let bs = init_tensor(&format!("{name}.bias"), &[o], 3);
            let mut out = vec![0.0f64; n * o];
            for b in 0..n {
                for k in 0..o {
                    let s: f64 =
                        (0..i).map(|p| inp[b * i + p] * wt[k * i + p] as f64).sum::<f64>() + bs[k] as f64;
                    out[b * o + k] = if relu { s.max(0.0) } else { s };
                }
            }
            out
        };
        let fc6 = dense(&flat, "classifier.0", 12, 24, true);
        let fc7 = dense(&fc6, "classifier.3", 12, 12, true);
        let lg = dense(&fc7, "classifier.6", 5, 12, false);
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        // f32 vs f64 over dot products of <= 24 terms: 1e-5.
        assert!(rel_l2(&taps["fc6"].to_f32_vec(), &f32s(&fc6)) < 1e-5);
        assert!(rel_l2(&taps["fc7"].to_f32_vec(), &f32s(&fc7)) < 1e-5);
        assert!(rel_l2(&logits.to_f32_vec(), &f32s(&lg)) < 1e-5);

        // Pooled = fc7, Grid = features.7 spatial-major.
        assert_eq!(net.features(&x, FeatureLayer::Pooled).unwrap().to_f32_vec(), taps["fc7"].to_f32_vec());
        let g = net.features(&x, FeatureLayer::Grid).unwrap();
        assert_eq!(g.dims(), &[2, 20, 6]);
        let gv = g.to_f32_vec();
        assert_eq!(gv[(20 + 7) * 6 + 5], f7[(6 + 5) * 20 + 7]);
        assert!(matches!(net.logits(&Tensor::zeros(&[2, 3, 17])), Err(Error::Shape(_))));
        assert!(matches!(net.logits(&Tensor::zeros(&[0, 3, 17, 20])), Err(Error::Shape(_))));
        // Two max-pools need at least 4x4; 3 rows would leave an empty image.
        let e = net.logits(&Tensor::zeros(&[1, 3, 3, 20])).unwrap_err().to_string();
        assert!(e.contains("H, W >= 4"), "{e}");
        assert_eq!(net.logits(&Tensor::zeros(&[1, 3, 4, 4])).unwrap().dims(), &[1, 5]);
    }

    #[test]
    fn misshapen_vgg_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("capgen-vgg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = tiny();
        let mut sd = state_dict_shapes(&cfg);
        sd[2].1 = vec![6, 4, 5, 5]; // features.3.weight: a 5x5 kernel
        sd.remove(0); // no features.0.weight
        let ts: Vec<(String, Tensor)> =
            sd.iter().map(|(n, d)| (n.clone(), Tensor::from_vec(init_tensor(n, d, 1), d).unwrap())).collect();
        let refs: Vec<(&str, &Tensor)> = ts.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let path = dir.join("vgg.safetensors");
        crate::weights::save_safetensors(&path, &refs, &Default::default()).unwrap();
        let e = Vgg::from_tensor_file(&cfg, &TensorFile::load(&path).unwrap()).unwrap_err().to_string();
        assert!(e.contains("vgg.safetensors"), "{e}");
        assert!(e.contains("missing [features.0.weight]"), "{e}");
        assert!(e.contains("features.3.weight [6, 4, 5, 5] (want [6, 4, 3, 3])"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
