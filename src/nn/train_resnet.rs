//! A trainable ResNet: the same config family as `nn::resnet` (Basic / Bottleneck, blocks per stage,
//! base width), with unfolded conv weights, batch-norm parameters and running statistics as plain
//! `Vec<f32>`s with matching gradient buffers, a training forward that caches what the backward needs,
//! an eval forward, and export to a torchvision-named state dict (so a trained encoder is an ordinary
//! safetensors file that `ResNet::from_tensor_file` loads for inference).
//!
//! ```text
//! x (N,3,H,W) -> conv1 7x7/2 -> bn1 -> relu -> maxpool 3x3/2 p1          (stem)
//!   -> blocks of layer1..layer4 -> features: grid (N, h*w, C) or pooled (N, C)
//! Basic:      out = relu(bn2(conv2(relu(bn1(conv1(x))))) + id(x))
//! Bottleneck: out = relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + id(x))
//! id(x) = bn_d(conv_d(x)) (1x1/s "downsample") in a stage's first block when the shape changes, else x
//! ```
//!
//! Backward runs the same chain in reverse with `crate::cpu` kernels (conv2d_backward,
//! batchnorm_backward, relu_backward, max_pool2d_backward); the residual add's backward sends the
//! block's output gradient (after the final ReLU's mask) both into the last BN and into id(x).
//! Gradients accumulate (`+=`) until `zero_grad`.
//!
//! Freezing (`--fine-tune` trains only the last blocks): the network is a chain of "pieces" —
//! the stem, then every block in order. `freeze_all_but_last(k)` keeps the last k pieces trainable.
//! Frozen pieces run batch-norm in eval mode (running statistics, which they do not update) and the
//! backward stops at the first frozen piece (nothing before it needs a gradient). The training
//! forward keeps no activations of frozen pieces beyond the input of the first trainable one.
//!
//! `set_bn_frozen(true)` (encoder fine-tuning with small batches) also runs the trainable pieces'
//! batch-norm in eval mode: running statistics used and left alone, gamma and beta still trained.
//! Its backward is then the plain affine one (see `batchnorm_eval_backward`).

use crate::cpu::batchnorm::{
    batchnorm_backward, batchnorm_eval_forward, batchnorm_train_forward, relu_backward, BnShape, BN_EPS,
    BN_MOMENTUM,
};
use crate::cpu::conv::{conv2d_backward, conv2d_forward, ConvParams, ConvShape, ConvWeights};
use crate::cpu::pool::PoolParams;
use crate::cpu::pool::{
    global_avg_pool, global_avg_pool_backward, max_pool2d_backward, max_pool2d_with_argmax,
};
use crate::error::{Error, Result};
use crate::nn::conv::{fold_batchnorm, BatchNorm, ParamFn};
use crate::nn::encoder::FeatureLayer;
use crate::nn::resnet::{state_dict_shapes, BlockKind, ResNet, ResNetConfig};
use crate::tensor::Tensor;
use crate::weights::TensorFile;
use std::collections::BTreeMap;
use std::path::Path;

/// One named parameter with its gradient (same length). `dims` as in the torchvision state dict.
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub dims: Vec<usize>,
    pub data: Vec<f32>,
    pub grad: Vec<f32>,
}

/// A conv (no bias) followed by a batch-norm: indices into `TrainResNet::params` / `stats`.
#[derive(Clone, Debug)]
struct Unit {
    /// (K, C, R, S)
    dims: [usize; 4],
    conv: ConvParams,
    weight: usize,
    gamma: usize,
    beta: usize,
    /// Index into `stats` of the running mean; the running var is the next one.
    running: usize,
}

#[derive(Clone, Debug)]
struct Block {
    /// 2 (Basic) or 3 (Bottleneck) units, in order.
    units: Vec<Unit>,
    downsample: Option<Unit>,
}

/// The trainable network. Parameters (conv weights, BN gamma/beta) live in `params`, BN running
/// statistics in `stats`; `fc.*` is kept (untrained, never used in the forward) only so that the
/// exported state dict is complete for `ResNet::from_tensor_file`.
#[derive(Clone, Debug)]
pub struct TrainResNet {
    pub cfg: ResNetConfig,
    pub params: Vec<Param>,
    /// (name, values): `*.running_mean` and `*.running_var`, each (K).
    pub stats: Vec<(String, Vec<f32>)>,
    fc: Vec<(String, Vec<usize>, Vec<f32>)>,
    stem: Unit,
    /// All blocks of layer1..layer4, in order.
    blocks: Vec<Block>,
    /// Pieces (stem = 0, block b = b + 1) with index >= this are trainable.
    first_trainable: usize,
    /// Batch-norm of trainable pieces in eval mode too (`set_bn_frozen`).
    bn_frozen: bool,
    /// `fold_frozen`'s inference convs of the frozen units (BN folded, weights packed), keyed by
    /// the unit's weight index in `params`; empty until asked for.
    folded: BTreeMap<usize, ConvWeights>,
}

/// What one unit's training forward keeps for the backward.
#[derive(Default)]
struct UnitCache {
    /// Conv output = BN input (N, K, P, Q).
    z: Vec<f32>,
    /// Batch statistics (K).
    mean: Vec<f32>,
    rstd: Vec<f32>,
    /// Spatial size of the unit's input and output.
    in_hw: (usize, usize),
    out_hw: (usize, usize),
    /// BN ran in eval mode: `mean` and `rstd` are the running statistics, constants of the forward.
    eval: bool,
}

#[derive(Default)]
struct BlockCache {
    units: Vec<UnitCache>,
    /// Post-ReLU outputs of every unit but the last (inputs of the next unit).
    inner: Vec<Vec<f32>>,
    downsample: Option<UnitCache>,
}

/// Everything `backward` needs from one `forward_train`.
pub struct TrainCache {
    n: usize,
    layer: FeatureLayer,
    /// The input image batch (N, 3, H, W).
    x: Vec<f32>,
    stem: UnitCache,
    /// Stem output after ReLU, before the max-pool (N, w, H/2, W/2), and the pool's argmax.
    stem_act: Vec<f32>,
    argmax: Vec<u32>,
    /// acts[0] = max-pool output; acts[b + 1] = output of block b.
    acts: Vec<Vec<f32>>,
    /// Spatial size of acts[i].
    acts_hw: Vec<(usize, usize)>,
    blocks: Vec<BlockCache>,
}

impl TrainResNet {
    /// Builds the network with each state-dict tensor from `get(name, dims)`.
    fn build(cfg: &ResNetConfig, get: ParamFn) -> Result<Self> {
        let mut net = TrainResNet {
            cfg: cfg.clone(),
            params: Vec::new(),
            stats: Vec::new(),
            fc: Vec::new(),
            stem: Unit {
                dims: [0; 4],
                conv: ConvParams::default(),
                weight: 0,
                gamma: 0,
                beta: 0,
                running: 0,
            },
            blocks: Vec::new(),
            first_trainable: 0,
            bn_frozen: false,
            folded: BTreeMap::new(),
        };
        let add_unit = |net: &mut TrainResNet, conv: &str, bn: &str, dims: [usize; 4], p: ConvParams| {
            let param = |net: &mut TrainResNet, name: String, d: Vec<usize>| -> Result<usize> {
                let data = get(&name, &d)?;
                let grad = vec![0.0; data.len()];
                net.params.push(Param { name, dims: d, data, grad });
                Ok(net.params.len() - 1)
            };
            let weight = param(net, format!("{conv}.weight"), dims.to_vec())?;
            let gamma = param(net, format!("{bn}.weight"), vec![dims[0]])?;
            let beta = param(net, format!("{bn}.bias"), vec![dims[0]])?;
            let running = net.stats.len();
            for t in ["running_mean", "running_var"] {
                let name = format!("{bn}.{t}");
                let v = get(&name, &[dims[0]])?;
                net.stats.push((name, v));
            }
            Ok::<Unit, Error>(Unit { dims, conv: p, weight, gamma, beta, running })
        };
        let w = cfg.width;
        let e = cfg.block.expansion();
        net.stem = add_unit(&mut net, "conv1", "bn1", [w, 3, 7, 7], ConvParams::new(2, 3))?;
        let mut inplanes = w;
        for (li, &nblocks) in cfg.layers.iter().enumerate() {
            let planes = w << li;
            for bi in 0..nblocks {
                let stride = if bi == 0 && li > 0 { 2 } else { 1 };
                let p = format!("layer{}.{bi}", li + 1);
                let specs: Vec<([usize; 4], ConvParams)> = match cfg.block {
                    BlockKind::Basic => vec![
                        ([planes, inplanes, 3, 3], ConvParams::new(stride, 1)),
                        ([planes, planes, 3, 3], ConvParams::new(1, 1)),
                    ],
                    BlockKind::Bottleneck => vec![
                        ([planes, inplanes, 1, 1], ConvParams::new(1, 0)),
                        ([planes, planes, 3, 3], ConvParams::new(stride, 1)),
                        ([planes * e, planes, 1, 1], ConvParams::new(1, 0)),
                    ],
                };
                let mut units = Vec::new();
                for (i, (dims, cp)) in specs.into_iter().enumerate() {
                    units.push(add_unit(
                        &mut net,
                        &format!("{p}.conv{}", i + 1),
                        &format!("{p}.bn{}", i + 1),
                        dims,
                        cp,
                    )?);
                }
                let downsample = if bi == 0 && (stride != 1 || inplanes != planes * e) {
                    Some(add_unit(
                        &mut net,
                        &format!("{p}.downsample.0"),
                        &format!("{p}.downsample.1"),
                        [planes * e, inplanes, 1, 1],
                        ConvParams::new(stride, 0),
                    )?)
                } else {
                    None
                };
                net.blocks.push(Block { units, downsample });
                inplanes = planes * e;
            }
        }
        for (name, d) in
            [("fc.weight", vec![cfg.num_classes, cfg.feature_dim()]), ("fc.bias", vec![cfg.num_classes])]
        {
            let v = get(name, &d)?;
            net.fc.push((name.to_string(), d, v));
        }
        Ok(net)
    }

    /// Seeded random weights, identical to `ResNet::random(cfg, seed)` (same `init_tensor` rule),
    /// so `tools/capgen_rng.py` can rebuild them in PyTorch.
    pub fn random(cfg: &ResNetConfig, seed: u64) -> Self {
        let get = |name: &str, dims: &[usize]| Ok(crate::weights::random::init_tensor(name, dims, seed));
        Self::build(cfg, &get).expect("random weights always fit")
    }

    /// Weights from a torchvision-named state dict (e.g. pretrained, for fine-tuning). The file must
    /// hold exactly the state dict (`num_batches_tracked` aside).
    pub fn from_tensor_file(cfg: &ResNetConfig, f: &TensorFile) -> Result<Self> {
        f.check_exact(&state_dict_shapes(cfg), &cfg.name())?;
        let get = |name: &str, dims: &[usize]| f.require_f32(name, dims);
        Self::build(cfg, &get)
    }

    /// Number of freezable pieces: the stem plus every block.
    pub fn num_pieces(&self) -> usize {
        1 + self.blocks.len()
    }

    /// Keeps only the last `k` pieces (blocks; the stem counts as the first piece) trainable;
    /// `k >= num_pieces()` makes everything trainable.
    pub fn freeze_all_but_last(&mut self, k: usize) {
        self.first_trainable = self.num_pieces().saturating_sub(k);
        self.folded.clear();
    }

    /// Speeds up the frozen pieces' forward (training and eval): each frozen conv + batch-norm
    /// becomes one inference conv with the BN folded in, its weights packed once, bias, residual and
    /// ReLU fused (as `nn::resnet`), instead of conv (weights re-packed every call) then BN then
    /// ReLU passes. A snapshot: call it after loading weights and freezing (frozen weights and
    /// statistics never change in training); `freeze_all_but_last` drops it.
    pub fn fold_frozen(&mut self) {
        let mut folded = BTreeMap::new();
        for piece in 0..self.first_trainable {
            for u in self.units_of_piece(piece) {
                let bn = BatchNorm {
                    gamma: self.params[u.gamma].data.clone(),
                    beta: self.params[u.beta].data.clone(),
                    mean: self.stats[u.running].1.clone(),
                    var: self.stats[u.running + 1].1.clone(),
                    eps: BN_EPS,
                };
                let (w, b) = fold_batchnorm(&self.params[u.weight].data, None, &bn);
                let [k, c, r, s] = u.dims;
                folded.insert(u.weight, ConvWeights::new(w, Some(b), k, c, r, s));
            }
        }
        self.folded = folded;
    }

    /// A folded unit: conv + bias (+ residual) (+ ReLU) in one pass. x (N, C, H, W) -> (N, K, P, Q).
    fn folded_forward(
        &self,
        u: &Unit,
        x: &[f32],
        n: usize,
        hw: (usize, usize),
        residual: Option<&[f32]>,
        relu: bool,
    ) -> (Vec<f32>, (usize, usize)) {
        let cw = &self.folded[&u.weight];
        let (oh, ow) = u.conv.out_hw(hw.0, hw.1, u.dims[2], u.dims[3]).expect("checked in check_input");
        let mut y = vec![0.0f32; n * u.dims[0] * oh * ow];
        conv2d_forward(x, n, hw.0, hw.1, cw, &u.conv, residual, relu, &mut y);
        (y, (oh, ow))
    }

    /// A frozen block through its folded convs: out = relu(conv_last(...) + id(x)).
    fn folded_block_forward(
        &self,
        b: &Block,
        x: &[f32],
        n: usize,
        hw: (usize, usize),
    ) -> (Vec<f32>, (usize, usize)) {
        let identity = b.downsample.as_ref().map(|d| self.folded_forward(d, x, n, hw, None, false).0);
        let (mut cur, mut cur_hw) = (None::<Vec<f32>>, hw);
        let last = b.units.len() - 1;
        for (i, u) in b.units.iter().enumerate() {
            let input: &[f32] = cur.as_deref().unwrap_or(x);
            let res = if i == last { Some(identity.as_deref().unwrap_or(x)) } else { None };
            let (y, ohw) = self.folded_forward(u, input, n, cur_hw, res, true);
            cur = Some(y);
            cur_hw = ohw;
        }
        (cur.expect("a block has units"), cur_hw)
    }

    /// The first trainable piece (0 = the stem, b + 1 = block b); `num_pieces()` when all are frozen.
    pub fn first_trainable_piece(&self) -> usize {
        self.first_trainable
    }

    /// Batch-norm in eval mode in the trainable pieces too (running statistics, not updated; gamma
    /// and beta still trained), or back to batch statistics (the default).
    pub fn set_bn_frozen(&mut self, frozen: bool) {
        self.bn_frozen = frozen;
    }

    /// The input of the first trainable piece as kept by `forward_train` — (N, C, H, W) values and
    /// (H, W) — or None when the stem is trainable (its input is the image batch).
    pub fn trainable_input<'a>(&self, cache: &'a TrainCache) -> Option<(&'a [f32], (usize, usize))> {
        let f = self.first_trainable;
        if f == 0 || f > cache.acts.len() {
            return None;
        }
        Some((&cache.acts[f - 1], cache.acts_hw[f - 1]))
    }

    fn piece_trainable(&self, piece: usize) -> bool {
        piece >= self.first_trainable
    }

    /// Whether the piece's batch-norm uses batch statistics in the training forward.
    fn bn_batch_stats(&self, piece: usize) -> bool {
        self.piece_trainable(piece) && !self.bn_frozen
    }

    fn units_of_piece(&self, piece: usize) -> Vec<&Unit> {
        if piece == 0 {
            return vec![&self.stem];
        }
        let b = &self.blocks[piece - 1];
        b.units.iter().chain(b.downsample.as_ref()).collect()
    }

    /// (name, param, grad) of every trainable parameter, for an optimiser.
    pub fn trainable_params(&mut self) -> Vec<(&str, &mut [f32], &[f32])> {
        let mut train = vec![false; self.params.len()];
        for piece in self.first_trainable..self.num_pieces() {
            for u in self.units_of_piece(piece) {
                for i in [u.weight, u.gamma, u.beta] {
                    train[i] = true;
                }
            }
        }
        self.params
            .iter_mut()
            .zip(train)
            .filter(|(_, t)| *t)
            .map(|(p, _)| (p.name.as_str(), &mut p.data[..], &p.grad[..]))
            .collect()
    }

    /// (name, param, grad) of every trainable parameter, gradients mutable too (for clipping).
    pub fn trainable_params_mut(&mut self) -> Vec<(&str, &mut [f32], &mut [f32])> {
        let keep: Vec<bool> = {
            let names: Vec<String> = self.trainable_params().iter().map(|(n, _, _)| n.to_string()).collect();
            self.params.iter().map(|p| names.contains(&p.name)).collect()
        };
        self.params
            .iter_mut()
            .zip(keep)
            .filter(|(_, t)| *t)
            .map(|(p, _)| (p.name.as_str(), &mut p.data[..], &mut p.grad[..]))
            .collect()
    }

    /// Sets every gradient to zero.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.grad.fill(0.0);
        }
    }

    /// The parameter called `name` (torchvision name), if any.
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }

    /// The running statistic called `name`, if any.
    pub fn stat(&self, name: &str) -> Option<&[f32]> {
        self.stats.iter().find(|(n, _)| n == name).map(|(_, v)| &v[..])
    }

    /// The full torchvision state dict (conv weights, BN weight/bias/running stats, fc), in
    /// torchvision order.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut by_name: BTreeMap<&str, &[f32]> = BTreeMap::new();
        for p in &self.params {
            by_name.insert(&p.name, &p.data);
        }
        for (n, v) in &self.stats {
            by_name.insert(n, v);
        }
        for (n, _, v) in &self.fc {
            by_name.insert(n, v);
        }
        state_dict_shapes(&self.cfg)
            .into_iter()
            .map(|(name, dims)| {
                let v = by_name[name.as_str()];
                let t = Tensor::from_vec(v.to_vec(), &dims).expect("state dict shapes match");
                (name, t)
            })
            .collect()
    }

    /// The trained network as an inference `ResNet` (BN folded into the convs there).
    pub fn to_resnet(&self) -> Result<ResNet> {
        let f = TensorFile {
            path: "<trained resnet>".into(),
            tensors: self.state_dict().into_iter().collect(),
            metadata: BTreeMap::new(),
        };
        ResNet::from_tensor_file(&self.cfg, &f)
    }

    /// Saves the state dict as safetensors (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let sd = self.state_dict();
        let refs: Vec<(&str, &Tensor)> = sd.iter().map(|(n, t)| (n.as_str(), t)).collect();
        crate::weights::save_safetensors(path, &refs, &BTreeMap::new())
    }

    fn check_input(&self, x: &[f32], n: usize, h: usize, w: usize) -> Result<()> {
        if n == 0 || h == 0 || w == 0 || x.len() != n * 3 * h * w {
            return Err(Error::shape(format!(
                "{}: expected a non-empty (N, 3, H, W) image batch of {n}x3x{h}x{w} = {} values, got {}",
                self.cfg.name(),
                n * 3 * h * w,
                x.len()
            )));
        }
        // Every conv and pool must have a non-empty output: simulate the spatial sizes.
        let mut hw = ConvParams::new(2, 3).out_hw(h, w, 7, 7);
        hw = hw.and_then(|(a, b)| PoolParams::new(3, 2, 1).out_hw(a, b));
        for b in &self.blocks {
            for u in &b.units {
                hw = hw.and_then(|(a, c)| u.conv.out_hw(a, c, u.dims[2], u.dims[3]));
            }
        }
        if hw.is_none() {
            return Err(Error::shape(format!("{}: input {h}x{w} is too small", self.cfg.name())));
        }
        if n == 1 && hw == Some((1, 1)) {
            return Err(Error::shape(format!(
                "{}: training batch-norm needs more than one value per channel (batch 1 with a 1x1 \
                 final grid)",
                self.cfg.name()
            )));
        }
        Ok(())
    }

    /// Training forward: batch-norm with batch statistics (running stats updated) in trainable
    /// pieces, eval-mode BN in frozen ones. x (N, 3, H, W). Returns the features — grid (N, h*w, C)
    /// or pooled (N, C) — and the cache for `backward`.
    pub fn forward_train(
        &mut self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        layer: FeatureLayer,
    ) -> Result<(Vec<f32>, TrainCache)> {
        self.check_input(x, n, h, w)?;
        // The running stats are updated on a copy (a few KB) so the forward can borrow self shared.
        let mut stats = self.stats.clone();
        let out = self.forward(x, n, h, w, layer, Some(&mut stats));
        self.stats = stats;
        Ok(out)
    }

    /// Eval forward: every BN with its running statistics (no state changes). x (N, 3, H, W).
    pub fn forward_eval(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        layer: FeatureLayer,
    ) -> Result<Vec<f32>> {
        self.check_input(x, n, h, w)?;
        Ok(self.forward(x, n, h, w, layer, None).0)
    }

    /// conv -> BN for one unit; returns BN output (N, K, P, Q) and the cache. With `running`, BN
    /// uses batch statistics and updates those running stats; without, it uses `self.stats`.
    fn unit_forward(
        &self,
        u: &Unit,
        x: &[f32],
        n: usize,
        hw: (usize, usize),
        running: Option<&mut Stats>,
    ) -> (Vec<f32>, UnitCache) {
        let [k, c, r, s] = u.dims;
        let (oh, ow) = u.conv.out_hw(hw.0, hw.1, r, s).expect("checked in check_input");
        let cw = ConvWeights::new(self.params[u.weight].data.clone(), None, k, c, r, s);
        let mut z = vec![0.0f32; n * k * oh * ow];
        conv2d_forward(x, n, hw.0, hw.1, &cw, &u.conv, None, false, &mut z);
        let g = BnShape { n, c: k, hw: oh * ow };
        let mut y = vec![0.0f32; z.len()];
        let (mut mean, mut rstd) = (vec![0.0f32; k], vec![0.0f32; k]);
        let (gamma, beta) = (&self.params[u.gamma].data, &self.params[u.beta].data);
        let mut eval = false;
        match running {
            Some(stats) => {
                let (a, b) = stats.split_at_mut(u.running + 1);
                let (rm, rv) = (&mut a[u.running].1, &mut b[0].1);
                batchnorm_train_forward(
                    &z,
                    &g,
                    gamma,
                    beta,
                    rm,
                    rv,
                    BN_MOMENTUM,
                    BN_EPS,
                    &mut y,
                    &mut mean,
                    &mut rstd,
                );
            }
            None => {
                let (rm, rv) = (&self.stats[u.running].1, &self.stats[u.running + 1].1);
                batchnorm_eval_forward(&z, &g, gamma, beta, rm, rv, BN_EPS, &mut y);
                mean.copy_from_slice(rm);
                rstd.iter_mut().zip(rv).for_each(|(r, &v)| *r = 1.0 / (v + BN_EPS).sqrt());
                eval = true;
            }
        }
        (y, UnitCache { z, mean, rstd, in_hw: hw, out_hw: (oh, ow), eval })
    }

    fn forward(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        layer: FeatureLayer,
        mut running: Option<&mut Stats>,
    ) -> (Vec<f32>, TrainCache) {
        // BN of a trainable piece in training mode updates `running`; any other BN is eval-mode.
        // Stem: conv1 -> bn1 -> relu -> maxpool.
        let stem = &self.stem;
        let (a, stem_cache) = if self.folded.contains_key(&stem.weight) {
            let (a, out_hw) = self.folded_forward(stem, x, n, (h, w), None, true);
            (a, UnitCache { in_hw: (h, w), out_hw, eval: true, ..Default::default() })
        } else {
            let (mut a, c) =
                self.unit_forward(stem, x, n, (h, w), reborrow_if(self.bn_batch_stats(0), &mut running));
            relu(&mut a);
            (a, c)
        };
        let mp = PoolParams::new(3, 2, 1);
        let (sh, sw) = stem_cache.out_hw;
        let (ph, pw) = mp.out_hw(sh, sw).expect("checked in check_input");
        let wc = stem.dims[0];
        let mut pooled = vec![0.0f32; n * wc * ph * pw];
        let mut argmax = vec![0u32; pooled.len()];
        max_pool2d_with_argmax(&a, n, wc, sh, sw, &mp, &mut pooled, &mut argmax);
        let mut cache = TrainCache {
            n,
            layer,
            x: x.to_vec(),
            stem: stem_cache,
            stem_act: a,
            argmax,
            acts: vec![pooled],
            acts_hw: vec![(ph, pw)],
            blocks: Vec::new(),
        };
        if !self.piece_trainable(0) {
            // A frozen stem is never differentiated: keep none of its activations.
            cache.x = Vec::new();
            cache.stem = UnitCache::default();
            cache.stem_act = Vec::new();
            cache.argmax = Vec::new();
        }
        for bi in 0..self.blocks.len() {
            let block = &self.blocks[bi];
            let xin = cache.acts.last().expect("at least the stem");
            let hw = *cache.acts_hw.last().expect("at least the stem");
            if self.folded.contains_key(&block.units[0].weight) {
                // Frozen and folded: forward only, nothing kept but the output.
                let (out, out_hw) = self.folded_block_forward(block, xin, n, hw);
                cache.acts[bi] = Vec::new();
                cache.acts.push(out);
                cache.acts_hw.push(out_hw);
                cache.blocks.push(BlockCache::default());
                continue;
            }
            let mut bc = BlockCache::default();
            let identity = match &block.downsample {
                Some(d) => {
                    let (y, uc) = self.unit_forward(
                        d,
                        xin,
                        n,
                        hw,
                        reborrow_if(self.bn_batch_stats(bi + 1), &mut running),
                    );
                    bc.downsample = Some(uc);
                    Some(y)
                }
                None => None,
            };
            let mut cur_hw = hw;
            let last = block.units.len() - 1;
            let mut out = Vec::new();
            for (i, u) in block.units.iter().enumerate() {
                let input: &[f32] = if i == 0 { xin } else { &bc.inner[i - 1] };
                let (mut y, uc) = self.unit_forward(
                    u,
                    input,
                    n,
                    cur_hw,
                    reborrow_if(self.bn_batch_stats(bi + 1), &mut running),
                );
                cur_hw = uc.out_hw;
                bc.units.push(uc);
                if i == last {
                    // out = relu(y + id(x))
                    let id: &[f32] = identity.as_deref().unwrap_or(xin);
                    y.iter_mut().zip(id).for_each(|(v, &r)| *v = (*v + r).max(0.0));
                    out = y;
                } else {
                    relu(&mut y);
                    bc.inner.push(y);
                }
            }
            if !self.piece_trainable(bi + 1) {
                // Frozen block: forward only. Its input is no longer needed (the next trainable
                // block needs only this block's output), nor are its inner activations.
                cache.acts[bi] = Vec::new();
                bc = BlockCache::default();
            }
            cache.acts.push(out);
            cache.acts_hw.push(cur_hw);
            cache.blocks.push(bc);
        }
        let last = cache.acts.last().expect("at least the stem");
        let (fh, fw) = *cache.acts_hw.last().expect("at least the stem");
        let c = last.len() / (n * fh * fw);
        let feats = match layer {
            FeatureLayer::Grid => {
                // (N, C, hw) -> (N, hw, C)
                let hw = fh * fw;
                let mut g = vec![0.0f32; last.len()];
                for b in 0..n {
                    for ch in 0..c {
                        for p in 0..hw {
                            g[(b * hw + p) * c + ch] = last[(b * c + ch) * hw + p];
                        }
                    }
                }
                g
            }
            FeatureLayer::Pooled => {
                let mut p = vec![0.0f32; n * c];
                global_avg_pool(last, n, c, fh, fw, &mut p);
                p
            }
        };
        (feats, cache)
    }

    /// BN backward then conv backward for one unit. dy (N, K, P, Q) is the gradient of the BN
    /// output; x the unit's input. Accumulates into the unit's parameter gradients and, if given,
    /// into dx.
    fn unit_backward(
        &mut self,
        u: &Unit,
        uc: &UnitCache,
        x: &[f32],
        n: usize,
        dy: &[f32],
        dx: Option<&mut [f32]>,
    ) {
        let [k, c, r, s] = u.dims;
        let g = BnShape { n, c: k, hw: uc.out_hw.0 * uc.out_hw.1 };
        let mut dz = vec![0.0f32; dy.len()];
        // gamma comes before beta in `params` (pushed in that order).
        let (a, b) = self.params.split_at_mut(u.beta);
        let gp = &mut a[u.gamma];
        let bn_backward = if uc.eval { batchnorm_eval_backward } else { batchnorm_backward };
        bn_backward(&uc.z, &g, &gp.data, &uc.mean, &uc.rstd, dy, &mut dz, &mut gp.grad, &mut b[0].grad);
        let shape = ConvShape { n, c, h: uc.in_hw.0, w: uc.in_hw.1, k, r, s };
        let p = &mut self.params[u.weight];
        // conv2d_backward sums its chunks' weight gradients in a fixed order: the same bits every run.
        conv2d_backward(x, &p.data, &shape, &u.conv, &dz, dx, &mut p.grad, None);
    }

    /// Backward from the gradient of the features `forward_train` returned (same shape);
    /// accumulates every trainable parameter's gradient. Stops at the first frozen piece.
    pub fn backward(&mut self, cache: &TrainCache, dfeat: &[f32]) -> Result<()> {
        self.backward_impl(cache, dfeat, false).map(|_| ())
    }

    /// `backward`, also returning the gradient of the input images (N, 3, H, W). Needs every piece
    /// trainable (else an error: the chain stops at the first frozen piece).
    pub fn backward_with_input_grad(&mut self, cache: &TrainCache, dfeat: &[f32]) -> Result<Vec<f32>> {
        if self.first_trainable != 0 {
            return Err(Error::msg(format!(
                "{}: an input gradient needs the whole network trainable (the first {} pieces are frozen)",
                self.cfg.name(),
                self.first_trainable
            )));
        }
        Ok(self.backward_impl(cache, dfeat, true)?.expect("requested"))
    }

    fn backward_impl(
        &mut self,
        cache: &TrainCache,
        dfeat: &[f32],
        want_dx: bool,
    ) -> Result<Option<Vec<f32>>> {
        let n = cache.n;
        let last = cache.acts.last().expect("at least the stem");
        let (fh, fw) = *cache.acts_hw.last().expect("at least the stem");
        let hw = fh * fw;
        let c = last.len() / (n * hw);
        let want = match cache.layer {
            FeatureLayer::Grid => n * hw * c,
            FeatureLayer::Pooled => n * c,
        };
        if dfeat.len() != want {
            return Err(Error::shape(format!(
                "{}: feature gradient has {} values, the features had {want}",
                self.cfg.name(),
                dfeat.len()
            )));
        }
        let mut dout = vec![0.0f32; last.len()];
        match cache.layer {
            FeatureLayer::Grid => {
                for b in 0..n {
                    for ch in 0..c {
                        for p in 0..hw {
                            dout[(b * c + ch) * hw + p] = dfeat[(b * hw + p) * c + ch];
                        }
                    }
                }
            }
            FeatureLayer::Pooled => global_avg_pool_backward(dfeat, n, c, fh, fw, &mut dout),
        }
        for bi in (0..self.blocks.len()).rev() {
            if !self.piece_trainable(bi + 1) {
                return Ok(None);
            }
            let block = self.blocks[bi].clone();
            let bc = &cache.blocks[bi];
            let xin = &cache.acts[bi];
            let need_dx = self.piece_trainable(bi);
            let mut dx = vec![0.0f32; if need_dx { xin.len() } else { 0 }];
            // out = relu(y_last + id): mask by out > 0.
            let mut dsum = vec![0.0f32; dout.len()];
            relu_backward(&cache.acts[bi + 1], &dout, &mut dsum);
            let mut dy = dsum.clone();
            for i in (0..block.units.len()).rev() {
                let input: &[f32] = if i == 0 { xin } else { &bc.inner[i - 1] };
                if i == 0 {
                    self.unit_backward(
                        &block.units[i],
                        &bc.units[i],
                        input,
                        n,
                        &dy,
                        need_dx.then_some(&mut dx[..]),
                    );
                } else {
                    let mut da = vec![0.0f32; input.len()];
                    self.unit_backward(&block.units[i], &bc.units[i], input, n, &dy, Some(&mut da));
                    // input = relu(BN output of unit i-1)
                    let mut dprev = vec![0.0f32; da.len()];
                    relu_backward(input, &da, &mut dprev);
                    dy = dprev;
                }
            }
            match (&block.downsample, &bc.downsample) {
                (Some(d), Some(dc)) => {
                    self.unit_backward(d, dc, xin, n, &dsum, need_dx.then_some(&mut dx[..]));
                }
                _ => {
                    if need_dx {
                        dx.iter_mut().zip(&dsum).for_each(|(a, &b)| *a += b);
                    }
                }
            }
            if !need_dx {
                return Ok(None);
            }
            dout = dx;
        }
        if !self.piece_trainable(0) {
            return Ok(None);
        }
        // Stem: maxpool -> relu -> bn1 -> conv1 (no input gradient: it is the image).
        let stem = self.stem.clone();
        let (sh, sw) = cache.stem.out_hw;
        let wc = stem.dims[0];
        let mut dact = vec![0.0f32; cache.stem_act.len()];
        max_pool2d_backward(&dout, &cache.argmax, n, wc, sh, sw, &mut dact);
        let mut dy = vec![0.0f32; dact.len()];
        relu_backward(&cache.stem_act, &dact, &mut dy);
        let mut dx = vec![0.0f32; if want_dx { cache.x.len() } else { 0 }];
        self.unit_backward(&stem, &cache.stem, &cache.x, n, &dy, want_dx.then_some(&mut dx[..]));
        Ok(want_dx.then_some(dx))
    }
}

/// Eval-mode batch-norm backward: with mean and rstd constants (the running statistics), the layer
/// is the per-channel affine map y = gamma * xhat + beta, xhat = (x - mean) * rstd, so
/// `dbeta += sum dy`, `dgamma += sum dy * xhat`, `dx += gamma * rstd * dy` (overwrites nothing).
/// x, dy, dx (N, C, HW); gamma, mean, rstd, dgamma, dbeta (C). Same signature as
/// `batchnorm_backward`, so a unit picks either.
#[allow(clippy::too_many_arguments)]
fn batchnorm_eval_backward(
    x: &[f32],
    g: &BnShape,
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let (c, hw) = (g.c, g.hw);
    assert!(x.len() == g.n * c * hw && dy.len() == x.len() && dx.len() == x.len(), "batchnorm sizes");
    // Per-channel sums in f64, as the training-mode backward does.
    let (mut sdy, mut sdyx) = (vec![0.0f64; c], vec![0.0f64; c]);
    for (i, (xp, dp)) in x.chunks(hw).zip(dy.chunks(hw)).enumerate() {
        let ch = i % c;
        let (mu, rs) = (mean[ch], rstd[ch]);
        for (&v, &d) in xp.iter().zip(dp) {
            sdy[ch] += d as f64;
            sdyx[ch] += d as f64 * ((v - mu) * rs) as f64;
        }
    }
    for ch in 0..c {
        dbeta[ch] += sdy[ch] as f32;
        dgamma[ch] += sdyx[ch] as f32;
    }
    for (i, (op, dp)) in dx.chunks_mut(hw).zip(dy.chunks(hw)).enumerate() {
        let k = gamma[i % c] * rstd[i % c];
        op.iter_mut().zip(dp).for_each(|(o, &d)| *o += k * d);
    }
}

/// BN running statistics: (name, values) pairs.
type Stats = Vec<(String, Vec<f32>)>;

/// `r`'s stats, reborrowed, when `cond`; else None.
fn reborrow_if<'a>(cond: bool, r: &'a mut Option<&mut Stats>) -> Option<&'a mut Stats> {
    if cond {
        r.as_deref_mut()
    } else {
        None
    }
}

fn relu(v: &mut [f32]) {
    v.iter_mut().for_each(|x| *x = x.max(0.0));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::encoder::Encoder;
    use crate::rng::uniform_vec;

    fn cfg(block: BlockKind) -> ResNetConfig {
        ResNetConfig { block, layers: [1, 2, 1, 1], width: 4, num_classes: 5 }
    }

    fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
        assert!(den > 0.0);
        (num / den).sqrt()
    }

    #[test]
    fn eval_forward_matches_exported_inference_resnet() {
        // After a training step has moved the running stats, eval mode (running stats, unfolded)
        // must equal the inference ResNet built from the exported state dict (BN folded into the
        // convs, fused epilogues): two independent code paths.
        for block in [BlockKind::Basic, BlockKind::Bottleneck] {
            let c = cfg(block);
            let mut net = TrainResNet::random(&c, 3);
            let (n, h, w) = (2, 64, 48);
            let x = uniform_vec(4, "x", n * 3 * h * w, -2.0, 2.0);
            let before = net.stat("layer2.0.bn1.running_mean").unwrap().to_vec();
            net.forward_train(&x, n, h, w, FeatureLayer::Grid).unwrap();
            assert_ne!(net.stat("layer2.0.bn1.running_mean").unwrap(), &before[..]);
            for layer in [FeatureLayer::Grid, FeatureLayer::Pooled] {
                let ours = net.forward_eval(&x, n, h, w, layer).unwrap();
                let inf = net.to_resnet().unwrap();
                let t = Tensor::from_vec(x.clone(), &[n, 3, h, w]).unwrap();
                let want = inf.features(&t, layer).unwrap().to_f32_vec();
                // Folding BN changes the rounding of every conv: f32, ~10 layers deep.
                let e = rel_l2(&ours, &want);
                assert!(e < 1e-5, "{block:?}: eval vs inference rel L2 {e:.2e}");
            }
        }
    }

    #[test]
    fn pooled_backward_equals_grid_backward_of_the_mean() {
        // d/dgrid of sum(pooled * r) is r[n,c] / hw at every grid position: both paths must give the
        // same parameter gradients.
        let c = cfg(BlockKind::Basic);
        let (n, h, w) = (2, 64, 64);
        let x = uniform_vec(9, "x", n * 3 * h * w, -2.0, 2.0);
        let mut a = TrainResNet::random(&c, 1);
        let mut b = a.clone();
        let (p, ca) = a.forward_train(&x, n, h, w, FeatureLayer::Pooled).unwrap();
        let r = uniform_vec(9, "r", p.len(), -1.0, 1.0);
        a.backward(&ca, &r).unwrap();
        let (g, cb) = b.forward_train(&x, n, h, w, FeatureLayer::Grid).unwrap();
        let (ch, hw) = (p.len() / n, g.len() / p.len());
        let dg: Vec<f32> = (0..g.len()).map(|i| r[(i / (hw * ch)) * ch + i % ch] / hw as f32).collect();
        b.backward(&cb, &dg).unwrap();
        for (pa, pb) in a.params.iter().zip(&b.params) {
            let e = rel_l2(&pa.grad, &pb.grad);
            assert!(e < 1e-5, "{}: {e:.2e}", pa.name);
        }
    }

    #[test]
    fn freezing_trains_only_the_last_pieces() {
        let c = cfg(BlockKind::Bottleneck);
        let mut net = TrainResNet::random(&c, 2);
        assert_eq!(net.num_pieces(), 6); // stem + 5 blocks
        net.freeze_all_but_last(2); // layer3.0 and layer4.0
        let (n, h, w) = (2, 64, 64);
        let x = uniform_vec(5, "x", n * 3 * h * w, -2.0, 2.0);
        let stats_before = net.stats.clone();
        let (g, cache) = net.forward_train(&x, n, h, w, FeatureLayer::Grid).unwrap();
        let r = uniform_vec(5, "r", g.len(), -1.0, 1.0);
        net.backward(&cache, &r).unwrap();
        let trainable = |name: &str| name.starts_with("layer3.") || name.starts_with("layer4.");
        for p in &net.params {
            let nonzero = p.grad.iter().any(|&v| v != 0.0);
            assert_eq!(nonzero, trainable(&p.name), "{}", p.name);
        }
        for ((name, after), (_, before)) in net.stats.iter().zip(&stats_before) {
            assert_eq!(after != before, trainable(name), "{name}");
        }
        let names: Vec<String> = net.trainable_params().iter().map(|(n, _, _)| n.to_string()).collect();
        assert!(!names.is_empty() && names.iter().all(|n| trainable(n)));
        assert!(net.backward_with_input_grad(&cache, &r).is_err());
        net.zero_grad();
        assert!(net.params.iter().all(|p| p.grad.iter().all(|&v| v == 0.0)));
    }

    #[test]
    fn frozen_pieces_keep_no_activations() {
        // Fine-tuning memory: with only layer4.0 trainable, the cache holds the input of layer4.0 and
        // what its backward needs, nothing of the stem or the frozen blocks.
        let c = ResNetConfig { block: BlockKind::Basic, layers: [1, 1, 1, 1], width: 4, num_classes: 2 };
        let mut net = TrainResNet::random(&c, 3);
        net.freeze_all_but_last(1);
        net.set_bn_frozen(true);
        let (n, h, w) = (2, 64, 64);
        let x = uniform_vec(4, "x", n * 3 * h * w, -2.0, 2.0);
        let stats = net.stats.clone();
        let (_, cache) = net.forward_train(&x, n, h, w, FeatureLayer::Grid).unwrap();
        assert!(cache.x.is_empty() && cache.stem_act.is_empty() && cache.argmax.is_empty());
        assert!(cache.stem.z.is_empty());
        let f = net.first_trainable_piece();
        assert_eq!(f, 4);
        for (i, a) in cache.acts.iter().enumerate() {
            // acts[i] is the output of piece i: kept only for the input of piece f and after.
            assert_eq!(a.is_empty(), i + 1 < f, "acts[{i}]");
        }
        for (b, bc) in cache.blocks.iter().enumerate() {
            assert_eq!(bc.units.is_empty(), b + 1 < f, "block {b}");
        }
        assert_eq!(net.trainable_input(&cache).unwrap().0.len(), n * 16 * 4 * 4);
        // Frozen statistics: nothing updated, even in the trainable block.
        assert_eq!(net.stats, stats);

        // The folded fast path of the frozen pieces computes the same function (BN folded into the
        // convs changes only the rounding, f32 over ~8 layers: 1e-5), and keeps nothing either.
        let mut fast = net.clone();
        fast.fold_frozen();
        let (g_ref, c_ref) = net.forward_train(&x, n, h, w, FeatureLayer::Grid).unwrap();
        let (g_fast, c_fast) = fast.forward_train(&x, n, h, w, FeatureLayer::Grid).unwrap();
        let e = rel_l2(&g_fast, &g_ref);
        assert!(e < 1e-5, "folded frozen forward: rel L2 {e:.2e}");
        assert!(c_fast.acts[..f - 1].iter().all(|a| a.is_empty()) && c_fast.x.is_empty());
        let r = uniform_vec(4, "r", g_ref.len(), -1.0, 1.0);
        net.zero_grad();
        net.backward(&c_ref, &r).unwrap();
        fast.backward(&c_fast, &r).unwrap();
        for (a, b) in fast.params.iter().zip(&net.params) {
            if b.grad.iter().any(|&v| v != 0.0) {
                let e = rel_l2(&a.grad, &b.grad);
                assert!(e < 1e-5, "{}: {e:.2e}", a.name);
            }
        }
        let e = rel_l2(
            &fast.forward_eval(&x, n, h, w, FeatureLayer::Pooled).unwrap(),
            &net.forward_eval(&x, n, h, w, FeatureLayer::Pooled).unwrap(),
        );
        assert!(e < 1e-5, "folded eval forward: {e:.2e}");
        // Re-freezing drops the snapshot.
        fast.freeze_all_but_last(2);
        assert!(fast.folded.is_empty());
    }

    #[test]
    fn deterministic_backward_is_bit_reproducible() {
        // 48 images with an 8x8 grid after layer1: conv2d_backward splits them into several chunks
        // summed in parallel; the sum order is fixed, so every run must give the same bits (an exact
        // `--resume` depends on it).
        let c = ResNetConfig { block: BlockKind::Basic, layers: [1, 1, 1, 1], width: 4, num_classes: 2 };
        let mut net = TrainResNet::random(&c, 1);
        let (n, h) = (48, 64);
        let x = uniform_vec(2, "x", n * 3 * h * h, -2.0, 2.0);
        let grads = || {
            let mut a = net.clone();
            let (f, cache) = a.forward_train(&x, n, h, h, FeatureLayer::Grid).unwrap();
            a.backward(&cache, &f).unwrap();
            a.params.iter().map(|p| p.grad.clone()).collect::<Vec<_>>()
        };
        let first = grads();
        for _ in 0..4 {
            let again = grads();
            for (a, b) in again.iter().zip(&first) {
                assert!(a.iter().zip(b).all(|(u, v)| u.to_bits() == v.to_bits()), "not reproducible");
            }
        }
        net.zero_grad();
    }

    #[test]
    fn state_dict_round_trips_through_safetensors() {
        let c = cfg(BlockKind::Basic);
        let net = TrainResNet::random(&c, 6);
        let dir = std::env::temp_dir().join(format!("capgen_train_resnet_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("enc.safetensors");
        net.save(&path).unwrap();
        let f = TensorFile::load(&path).unwrap();
        let back = TrainResNet::from_tensor_file(&c, &f).unwrap();
        for (a, b) in net.params.iter().zip(&back.params) {
            assert_eq!((&a.name, &a.data), (&b.name, &b.data));
        }
        assert_eq!(net.stats, back.stats);
        // Names follow torchvision.
        for name in ["conv1.weight", "bn1.running_var", "layer2.0.downsample.0.weight", "layer2.1.bn2.bias"] {
            assert!(f.get(name).is_some(), "{name}");
        }
        // A wrong config is an error naming the problem, not a panic.
        let wrong = ResNetConfig { width: 8, ..c };
        assert!(TrainResNet::from_tensor_file(&wrong, &f).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut net = TrainResNet::random(&cfg(BlockKind::Basic), 1);
        assert!(net.forward_train(&[0.0; 10], 1, 3, 3, FeatureLayer::Grid).is_err());
        // One 32x32 image ends in a 1x1 grid: batch-norm would normalise single values.
        let one = uniform_vec(1, "x", 3 * 32 * 32, -1.0, 1.0);
        let e = net.forward_train(&one, 1, 32, 32, FeatureLayer::Grid).err().expect("an error");
        assert!(e.to_string().contains("more than one value"), "{e}");
        let x = uniform_vec(1, "x", 2 * 3 * 32 * 32, -1.0, 1.0);
        let (g, cache) = net.forward_train(&x, 2, 32, 32, FeatureLayer::Grid).unwrap();
        assert!(net.backward(&cache, &g[..g.len() - 1]).is_err());
    }

    #[test]
    fn adam_on_trainable_params_fits_a_target() {
        // The optimiser API end to end: a few Adam steps on L = mean((pooled - target)^2) must cut
        // the loss well down (a broken gradient or update would not).
        use crate::cpu::adam::{Adam, AdamConfig};
        let c = ResNetConfig { block: BlockKind::Basic, layers: [1, 1, 1, 1], width: 4, num_classes: 2 };
        let mut net = TrainResNet::random(&c, 8);
        let (n, h, w) = (4, 32, 32);
        let x = uniform_vec(8, "x", n * 3 * h * w, -2.0, 2.0);
        let target = uniform_vec(8, "t", n * c.feature_dim(), 0.0, 1.0);
        let sizes: Vec<usize> = net.trainable_params().iter().map(|(_, p, _)| p.len()).collect();
        let mut adam = Adam::new(AdamConfig { lr: 1e-2, ..Default::default() }, &sizes);
        let mut losses = Vec::new();
        for _ in 0..30 {
            net.zero_grad();
            let (p, cache) = net.forward_train(&x, n, h, w, FeatureLayer::Pooled).unwrap();
            let m = p.len() as f32;
            losses.push(p.iter().zip(&target).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / m);
            let dp: Vec<f32> = p.iter().zip(&target).map(|(a, b)| 2.0 * (a - b) / m).collect();
            net.backward(&cache, &dp).unwrap();
            let (mut ps, gs): (Vec<&mut [f32]>, Vec<&[f32]>) =
                net.trainable_params().into_iter().map(|(_, p, g)| (p, g)).unzip();
            adam.step(&mut ps, &gs);
        }
        let (first, last) = (losses[0], *losses.last().unwrap());
        assert!(last < 0.2 * first, "loss {first} -> {last}");
    }
}
