//! ResNet (torchvision layout, v1.5: in a Bottleneck the stride sits on the 3x3 conv), built from a
//! config so ResNet-18/34/50/101/152 and narrow test variants share one code path.
//!
//! ```text
//! x (N,3,H,W) -> conv1 7x7/2 + BN + ReLU (N,w,H/2,W/2) -> maxpool 3x3/2 pad 1 (N,w,H/4,W/4)
//!   -> layer1 (stride 1) -> layer2 (/2) -> layer3 (/2) -> layer4 (/2)  (N, 8*w*e, H/32, W/32)
//!   -> global average pool (N, 8*w*e) -> fc (N, classes)
//! ```
//!
//! with w the base width (64 in torchvision) and e the block expansion (Basic 1, Bottleneck 4).
//! layer k has `layers[k]` blocks of `planes = w * 2^k`:
//! - Basic:      relu(bn2(conv2_3x3(relu(bn1(conv1_3x3/s(x))))) + id(x))
//! - Bottleneck: relu(bn3(conv3_1x1(relu(bn2(conv2_3x3/s(relu(bn1(conv1_1x1(x)))))))) + id(x))
//!
//! where id = downsample (1x1/s conv + BN) in the first block of a layer when the stride or the
//! channel count changes, else the identity. Every BN is folded into its conv at load, and the
//! residual add and ReLU run in the conv's epilogue.

use std::sync::Mutex;

use crate::cpu::blocked;
use crate::cpu::conv::{blocked_conv_path, conv2d_forward_blocked, conv_path, ConvInput, Residual};
use crate::cpu::conv::{swap_leading_axes, ConvParams};
use crate::cpu::pool::{max_pool2d_blocked, PoolParams};
use crate::cpu::winograd::{winograd_applicable, winograd_forward, ActLayout, WinoTile, WinogradWeights};
use crate::error::{Error, Result};
use crate::nn::buffers::ActivationPool;
use crate::nn::conv::{Conv2d, ParamFn};
use crate::nn::encoder::{Encoder, EncoderKind, FeatureLayer};
use crate::nn::linear::FrozenLinear;
use crate::nn::profile;
use crate::tensor::Tensor;
use crate::weights::TensorFile;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    Basic,
    Bottleneck,
}

impl BlockKind {
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResNetConfig {
    pub block: BlockKind,
    /// Blocks per stage.
    pub layers: [usize; 4],
    /// Base width (channels after the stem): 64 in torchvision.
    pub width: usize,
    pub num_classes: usize,
}

impl ResNetConfig {
    pub fn resnet18() -> Self {
        ResNetConfig { block: BlockKind::Basic, layers: [2, 2, 2, 2], width: 64, num_classes: 1000 }
    }
    pub fn resnet34() -> Self {
        ResNetConfig { block: BlockKind::Basic, layers: [3, 4, 6, 3], width: 64, num_classes: 1000 }
    }
    pub fn resnet50() -> Self {
        ResNetConfig { block: BlockKind::Bottleneck, layers: [3, 4, 6, 3], width: 64, num_classes: 1000 }
    }
    pub fn resnet101() -> Self {
        ResNetConfig { block: BlockKind::Bottleneck, layers: [3, 4, 23, 3], width: 64, num_classes: 1000 }
    }
    pub fn resnet152() -> Self {
        ResNetConfig { block: BlockKind::Bottleneck, layers: [3, 8, 36, 3], width: 64, num_classes: 1000 }
    }
    /// "resnet18" .. "resnet152".
    pub fn by_name(name: &str) -> Option<Self> {
        Some(match name {
            "resnet18" => Self::resnet18(),
            "resnet34" => Self::resnet34(),
            "resnet50" => Self::resnet50(),
            "resnet101" => Self::resnet101(),
            "resnet152" => Self::resnet152(),
            _ => return None,
        })
    }

    /// Channels of layer4's output = length of the pooled feature.
    pub fn feature_dim(&self) -> usize {
        self.width * 8 * self.block.expansion()
    }

    /// A short name for messages ("resnet50", or the config spelled out).
    pub fn name(&self) -> String {
        for n in ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] {
            if Self::by_name(n).as_ref() == Some(self) {
                return n.into();
            }
        }
        format!(
            "resnet({:?} {:?} width {} classes {})",
            self.block, self.layers, self.width, self.num_classes
        )
    }

    /// The conv layers in state-dict order: (conv name, BN prefix, dims (K,C,R,S), params), plus
    /// the block/stage structure implied by the names.
    fn convs(&self) -> Vec<ConvSpec> {
        let w = self.width;
        let e = self.block.expansion();
        let mut out = vec![ConvSpec::new("conv1", "bn1", [w, 3, 7, 7], ConvParams::new(2, 3))];
        let mut inplanes = w;
        for (li, &nblocks) in self.layers.iter().enumerate() {
            let planes = w << li;
            for bi in 0..nblocks {
                let stride = if bi == 0 && li > 0 { 2 } else { 1 };
                let p = format!("layer{}.{bi}", li + 1);
                match self.block {
                    BlockKind::Basic => {
                        out.push(ConvSpec::new(
                            &format!("{p}.conv1"),
                            &format!("{p}.bn1"),
                            [planes, inplanes, 3, 3],
                            ConvParams::new(stride, 1),
                        ));
                        out.push(ConvSpec::new(
                            &format!("{p}.conv2"),
                            &format!("{p}.bn2"),
                            [planes, planes, 3, 3],
                            ConvParams::new(1, 1),
                        ));
                    }
                    BlockKind::Bottleneck => {
                        out.push(ConvSpec::new(
                            &format!("{p}.conv1"),
                            &format!("{p}.bn1"),
                            [planes, inplanes, 1, 1],
                            ConvParams::new(1, 0),
                        ));
                        out.push(ConvSpec::new(
                            &format!("{p}.conv2"),
                            &format!("{p}.bn2"),
                            [planes, planes, 3, 3],
                            ConvParams::new(stride, 1),
                        ));
                        out.push(ConvSpec::new(
                            &format!("{p}.conv3"),
                            &format!("{p}.bn3"),
                            [planes * e, planes, 1, 1],
                            ConvParams::new(1, 0),
                        ));
                    }
                }
                if bi == 0 && (stride != 1 || inplanes != planes * e) {
                    out.push(ConvSpec::new(
                        &format!("{p}.downsample.0"),
                        &format!("{p}.downsample.1"),
                        [planes * e, inplanes, 1, 1],
                        ConvParams::new(stride, 0),
                    ));
                }
                inplanes = planes * e;
            }
        }
        out
    }
}

struct ConvSpec {
    conv: String,
    bn: String,
    dims: [usize; 4],
    params: ConvParams,
}

impl ConvSpec {
    fn new(conv: &str, bn: &str, dims: [usize; 4], params: ConvParams) -> Self {
        ConvSpec { conv: conv.into(), bn: bn.into(), dims, params }
    }
}

/// Every tensor of the torchvision state dict (`num_batches_tracked` excluded), in torchvision order.
pub fn state_dict_shapes(cfg: &ResNetConfig) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for s in cfg.convs() {
        out.push((format!("{}.weight", s.conv), s.dims.to_vec()));
        for t in ["weight", "bias", "running_mean", "running_var"] {
            out.push((format!("{}.{t}", s.bn), vec![s.dims[0]]));
        }
    }
    out.push(("fc.weight".into(), vec![cfg.num_classes, cfg.feature_dim()]));
    out.push(("fc.bias".into(), vec![cfg.num_classes]));
    out
}

/// One residual block: 2 (Basic) or 3 (Bottleneck) convs and an optional downsample.
#[derive(Debug)]
struct Block {
    convs: Vec<NetConv>,
    downsample: Option<NetConv>,
}

/// A conv of the inference net, with its Winograd weights (F(4x4,3x3) or F(2x2,3x3), `wino_tile`)
/// when it is a stride-1 3x3 conv (see `run_conv` for when they are used).
#[derive(Debug)]
struct NetConv {
    conv: Conv2d,
    wino: Option<WinogradWeights>,
}

impl NetConv {
    /// The Winograd weights when `run_conv` takes the Winograd path for an N x H x W input.
    fn winograd_for(&self, n: usize, h: usize, w: usize) -> Option<&WinogradWeights> {
        let ww = self.wino.as_ref()?;
        let m = ww.tile.m();
        (n * h.div_ceil(m) * w.div_ceil(m) >= WINOGRAD_MIN_TILES).then_some(ww)
    }
}

#[derive(Debug)]
pub struct ResNet {
    pub cfg: ResNetConfig,
    stem: NetConv,
    /// Blocks of each of the four stages.
    stages: Vec<Vec<Block>>,
    fc: FrozenLinear,
    /// Reused activation buffers (see `nn::buffers`).
    pool: Mutex<ActivationPool>,
}

/// How far a forward pass goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Until {
    /// layer4 as a spatial-major grid (N, H*W, C).
    Layer4,
    Pooled,
    Logits,
}

impl ResNet {
    fn build(cfg: &ResNetConfig, get: ParamFn) -> Result<ResNet> {
        let mut stem = None;
        let mut stages: Vec<Vec<Block>> = (0..4).map(|_| Vec::new()).collect();
        for s in cfg.convs() {
            let mut conv = Conv2d::load_conv_bn(get, &s.conv, &s.bn, s.dims, s.params)?;
            // Stride-1 3x3 convs also get Winograd weights, transformed from the raw ones.
            let wino = winograd_applicable(&conv.weights, &conv.params)
                .then(|| WinogradWeights::from_conv(&conv.weights, wino_tile(conv.weights.c)))
                .transpose()?;
            // Inference reads only the packed weights: drop the raw copy at once, so it is never
            // held for the whole net (half the weight memory, also at peak).
            conv.weights.release_raw();
            let conv = NetConv { conv, wino };
            if s.conv == "conv1" {
                stem = Some(conv);
                continue;
            }
            // "layer{L}.{B}.conv{i}" or "layer{L}.{B}.downsample.0"
            let mut parts = s.conv.split('.');
            let li: usize = parts
                .next()
                .and_then(|l| l.strip_prefix("layer"))
                .and_then(|l| l.parse().ok())
                .expect("name");
            let bi: usize = parts.next().and_then(|b| b.parse().ok()).expect("name");
            let stage = &mut stages[li - 1];
            if stage.len() == bi {
                stage.push(Block { convs: Vec::new(), downsample: None });
            }
            if s.conv.ends_with("downsample.0") {
                stage[bi].downsample = Some(conv);
            } else {
                stage[bi].convs.push(conv);
            }
        }
        let (classes, dim) = (cfg.num_classes, cfg.feature_dim());
        let fc = FrozenLinear::new(
            &get("fc.weight", &[classes, dim])?,
            classes,
            dim,
            Some(get("fc.bias", &[classes])?),
        );
        let stem = stem.expect("conv1 is always first");
        Ok(ResNet { cfg: cfg.clone(), stem, stages, fc, pool: Mutex::new(ActivationPool::new()) })
    }

    /// Seeded random weights: every state-dict tensor from `crate::weights::random::init_tensor`.
    pub fn random(cfg: &ResNetConfig, seed: u64) -> ResNet {
        let get = |name: &str, dims: &[usize]| Ok(crate::weights::random::init_tensor(name, dims, seed));
        Self::build(cfg, &get).expect("random weights always fit")
    }

    /// Weights from a safetensors file with torchvision names. The file must hold exactly the
    /// state dict (`num_batches_tracked` aside); otherwise one error lists every missing,
    /// unexpected and misshapen tensor.
    pub fn from_tensor_file(cfg: &ResNetConfig, f: &TensorFile) -> Result<ResNet> {
        f.check_exact(&state_dict_shapes(cfg), &cfg.name())?;
        let get = |name: &str, dims: &[usize]| f.require_f32(name, dims);
        Self::build(cfg, &get)
    }

    /// Activation buffers allocated so far (for tests of the pool).
    pub fn pool_allocations(&self) -> usize {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).allocations
    }

    fn run(&self, x: &Tensor, until: Until, tap: Option<Tap>) -> Result<Tensor> {
        match x.dims() {
            [n, 3, h, w] if *n >= 1 && *h >= 1 && *w >= 1 => {}
            d => {
                return Err(Error::shape(format!(
                    "{}: expected a non-empty (N, 3, H, W) image batch, got {d:?}",
                    self.cfg.name()
                )))
            }
        }
        crate::nn::buffers::with_pool(&self.pool, |pool| self.run_with(x, until, tap, pool))
    }

    /// The forward pass. The stem and max-pool run on channel-major (C, N, H, W) activations; from
    /// layer1 on they are column-blocked (`cpu::blocked`: the (C, N*H*W) matrix in blocks of 32
    /// columns, `Act`), so every conv is ONE GEMM over the whole batch whose B panels (1x1 convs)
    /// are read in place and whose output tiles are contiguous. The input is converted on entry, the
    /// outputs (and traced activations) back to the public layouts on exit.
    fn run_with(
        &self,
        x: &Tensor,
        until: Until,
        mut tap: Option<Tap>,
        pool: &mut ActivationPool,
    ) -> Result<Tensor> {
        let (n, h, w) = (x.dims()[0], x.dims()[2], x.dims()[3]);
        // (N, 3, H, W) -> (3, N, H, W)
        let mut xc = pool.take(&[3, n, h, w]);
        match x.as_f32_slice() {
            Ok(xs) => swap_leading_axes(xs, n, 3, h * w, xc.as_f32_slice_mut()?),
            // Another dtype or a strided view: widen / gather first.
            Err(_) => swap_leading_axes(&x.to_f32_vec(), n, 3, h * w, xc.as_f32_slice_mut()?),
        }
        let mut t = pool.take(&self.stem.conv.out_dims_cn(xc.dims())?);
        run_conv_cn(&self.stem, &xc, &mut t)?;
        pool.give(xc);
        emit(&mut tap, "conv1", &t)?;
        // Max-pool works plane by plane, so (C, N, H, W) passes as a batch of C "images" of N
        // planes; the output goes straight into the column-blocked layout of layer1 on.
        let mp = PoolParams::new(3, 2, 1);
        let &[c0, _, sh, sw] = t.dims() else { unreachable!("stem output is 4-D") };
        let (h0, w0) = mp.out_hw(sh, sw).ok_or_else(|| Error::shape("max-pool: empty output"))?;
        let mut cur = Act::take(pool, c0, n, h0, w0)?;
        let (src, dst) = (t.as_f32_slice()?, cur.data_mut()?);
        profile::time(|| ("max-pool 3x3/2".into(), 0.0), || max_pool2d_blocked(src, c0, n, sh, sw, &mp, dst));
        pool.give(t);
        if tap.is_some() {
            emit(&mut tap, "maxpool", &cur.to_channel_major()?)?;
        }
        for (li, stage) in self.stages.iter().enumerate() {
            for block in stage {
                cur = self.block_forward(block, cur, pool)?;
            }
            if tap.is_some() {
                emit(&mut tap, &format!("layer{}", li + 1), &cur.to_channel_major()?)?;
            }
        }
        let (c, hw) = (cur.c, cur.h * cur.w);
        if until == Until::Layer4 {
            // (C, N*H*W) blocked -> (N, H*W, C), a fresh tensor; the layer4 buffer goes back.
            let mut grid = vec![0.0f32; n * hw * c];
            blocked::blocked_to_grid(cur.data()?, c, n, hw, &mut grid);
            cur.give(pool);
            return Tensor::from_vec(grid, &[n, hw, c]);
        }
        let mut pooled = pool.take(&[n, c]);
        let (src, dst) = (cur.data()?, pooled.as_f32_slice_mut()?);
        profile::time(
            || ("global avg-pool".into(), 0.0),
            || blocked::global_avg_pool_blocked(src, c, n, hw, dst),
        );
        cur.give(pool);
        if let Some(tap) = tap.as_mut() {
            tap("pooled", &pooled);
        }
        if until == Until::Pooled {
            return Ok(pooled);
        }
        let flops = 2.0 * (n * c * self.cfg.num_classes) as f64;
        let logits = profile::time(
            || (format!("fc {c}->{}", self.cfg.num_classes), flops),
            || self.fc.forward(&pooled, false),
        )?;
        pool.give(pooled);
        Ok(logits)
    }

    /// One residual block on column-blocked activations. Takes the input by value: after the
    /// block's last conv nothing needs it (nor the downsampled identity), so that buffer becomes
    /// the block's output, the residual sum taken in place (`Skip::InPlace`).
    fn block_forward(&self, b: &Block, x: Act, pool: &mut ActivationPool) -> Result<Act> {
        let (last, inner_convs) = match b.convs.split_last() {
            Some((last, rest)) if !rest.is_empty() => (last, rest),
            _ => return Err(Error::msg("a residual block has at least two convs")),
        };
        let identity = match &b.downsample {
            Some(ds) => Some(run_conv(ds, &x, Skip::None, false, pool)?),
            None => None,
        };
        let mut inner = run_conv(&inner_convs[0], &x, Skip::None, true, pool)?;
        for conv in &inner_convs[1..] {
            let out = run_conv(conv, &inner, Skip::None, true, pool)?;
            std::mem::replace(&mut inner, out).give(pool);
        }
        // The last conv adds the identity and applies the final ReLU in its epilogue.
        let skip = match identity {
            Some(d) => {
                x.give(pool);
                d
            }
            None => x,
        };
        let out = run_conv(last, &inner, Skip::InPlace(skip), true, pool)?;
        inner.give(pool);
        Ok(out)
    }
}

/// What a conv adds to its output before the ReLU (`run_conv`).
enum Skip {
    None,
    /// The block's identity, which the conv may overwrite: its buffer becomes the output (the
    /// sum in place, `Residual::InOutput`), except on the Winograd path, which adds a separate
    /// residual (and the identity's buffer goes back to the pool).
    InPlace(Act),
}

/// An activation inside the ResNet forward from layer1 on: (C, N, H, W) as the column-blocked
/// (C, N*H*W) matrix (`cpu::blocked`), in a pool buffer of `blocked_len(C, N*H*W)` floats whose
/// padding columns are zero.
struct Act {
    t: Tensor,
    c: usize,
    n: usize,
    h: usize,
    w: usize,
}

impl Act {
    /// A buffer from the pool, padding zeroed (the contents are otherwise unspecified).
    fn take(pool: &mut ActivationPool, c: usize, n: usize, h: usize, w: usize) -> Result<Act> {
        let mut t = pool.take(&[blocked::blocked_len(c, n * h * w)]);
        blocked::zero_padding(t.as_f32_slice_mut()?, c, n * h * w);
        Ok(Act { t, c, n, h, w })
    }
    fn give(self, pool: &mut ActivationPool) {
        pool.give(self.t);
    }
    fn data(&self) -> Result<&[f32]> {
        self.t.as_f32_slice()
    }
    fn data_mut(&mut self) -> Result<&mut [f32]> {
        self.t.as_f32_slice_mut()
    }
    /// A channel-major (C, N, H, W) copy (for trace taps).
    fn to_channel_major(&self) -> Result<Tensor> {
        let mut v = vec![0.0f32; self.c * self.n * self.h * self.w];
        blocked::from_blocked(self.data()?, self.c, self.n * self.h * self.w, &mut v);
        Tensor::from_vec(v, &[self.c, self.n, self.h, self.w])
    }
}

/// The one place a ResNet conv after the stem is run: x -> an activation, column-blocked (a
/// pool buffer, or with `Skip::InPlace` the identity's buffer, which the sum overwrites).
///
/// Stride-1 3x3 convs run as Winograd (`cpu::winograd`): F(4x4,3x3) up to
/// `WINOGRAD_F4_MAX_CHANNELS` input channels, F(2x2,3x3) above (see `wino_tile`). Pooled ResNet-50
/// features differ from the direct path by ~1e-6 relative L2, far inside the 1e-4 bound. Winograd
/// runs when the batch has at least `WINOGRAD_MIN_TILES` output tiles (else the direct convolution
/// where available). Every other conv is an implicit GEMM
/// (`conv2d_forward_blocked`: 1x1 convs read the blocked input in place, strided ones after a
/// subsample; stride-1 3x3 as a direct convolution reading the input in place on AVX-512; lazy
/// im2col otherwise).
fn run_conv(conv: &NetConv, x: &Act, skip: Skip, relu: bool, pool: &mut ActivationPool) -> Result<Act> {
    let wt = &conv.conv.weights;
    let p = &conv.conv.params;
    let (oh, ow) = p
        .out_hw(x.h, x.w, wt.r, wt.s)
        .ok_or_else(|| Error::shape(format!("conv {}x{}: input {}x{} too small", wt.r, wt.s, x.h, x.w)))?;
    if x.c != wt.c {
        return Err(Error::shape(format!("conv: {} input channels, weights want {}", x.c, wt.c)));
    }
    if let Skip::InPlace(r) = &skip {
        if (r.c, r.n, r.h, r.w) != (wt.k, x.n, oh, ow) {
            return Err(Error::shape("conv: residual shape differs from the output's"));
        }
    }
    let wino = conv.winograd_for(x.n, x.h, x.w);
    // The output buffer; the residual if it is a separate one; whether the output holds it.
    let (mut out, separate, sum_in_place) = match skip {
        Skip::None => (Act::take(pool, wt.k, x.n, oh, ow)?, None, false),
        Skip::InPlace(r) if wino.is_some() => (Act::take(pool, wt.k, x.n, oh, ow)?, Some(r), false),
        Skip::InPlace(r) => (r, None, true),
    };
    let label = || {
        let method = match wino {
            Some(ww) => ww.tile.name(),
            None => blocked_conv_path(wt, p, x.h, x.w).name(),
        };
        let label = format!("{}x{}/{} {}->{} @{}x{} {method}", wt.r, wt.s, p.stride.0, wt.c, wt.k, x.h, x.w);
        (label, 2.0 * (wt.c * wt.r * wt.s * wt.k * x.n * oh * ow) as f64)
    };
    profile::time(label, || -> Result<()> {
        let xs = x.data()?;
        let (n, h, w) = (x.n, x.h, x.w);
        let ActivationPool { workspace, scratch, .. } = pool;
        let ys = out.t.as_f32_slice_mut()?;
        if let Some(ww) = wino {
            // Stride 1, pad 1 keeps H x W.
            let (xl, yl) = (ActLayout::blocked(wt.c, h, w), ActLayout::blocked(wt.k, h, w));
            let rs = separate.as_ref().map(|r| r.data()).transpose()?;
            winograd_forward(ww, xs, xl, n, h, w, rs.map(|r| (r, yl)), relu, ys, yl, workspace);
        } else {
            let res = if sum_in_place { Residual::InOutput } else { Residual::None };
            conv2d_forward_blocked(ConvInput::Blocked(xs), n, h, w, wt, p, res, relu, ys, scratch);
        }
        Ok(())
    })?;
    if let Some(r) = separate {
        r.give(pool);
    }
    Ok(out)
}

/// The stem: x (3, N, H, W) -> out (K, N, P, Q), both channel-major (the max-pool after it works
/// plane by plane).
fn run_conv_cn(conv: &NetConv, x: &Tensor, out: &mut Tensor) -> Result<()> {
    let (wt, p) = (&conv.conv.weights, &conv.conv.params);
    let &[_, _, h, w] = x.dims() else { return Err(Error::shape("stem input must be (C, N, H, W)")) };
    let outputs = out.numel();
    let label = || {
        let method = conv_path(wt, p, h, w).name();
        let label = format!("{}x{}/{} {}->{} @{h}x{w} {method}", wt.r, wt.s, p.stride.0, wt.c, wt.k);
        (label, 2.0 * (wt.c * wt.r * wt.s * outputs) as f64)
    };
    profile::time(label, || conv.conv.forward_cn_into(x, None, true, out))
}

/// The Winograd variant a stride-1 3x3 conv with `c` input channels holds: F(4x4,3x3) up to
/// `WINOGRAD_F4_MAX_CHANNELS` (layers 1-2 of ResNet-50), F(2x2,3x3) above, where F(4x4)'s 4x
/// larger weights (38 MB per layer4 conv) make its few-tile GEMMs weight-bandwidth-bound at
/// batch 1. Measured per conv (`examples/winograd_perf shapes`, 2 threads, Zen 4), F(4x4) time
/// over F(2x2) time at batch 1 and 8: layer1 0.66 and 0.64 (and 0.49 of the direct conv), layer2
/// 0.73 and 0.80, layer3 0.99 and 1.04, layer4 2.2 and 0.76. Layer4 at batch 8 would gain ~5 ms,
/// but holding both sets of its weights costs 113 MB, so layer3-4 keep F(2x2).
fn wino_tile(c: usize) -> WinoTile {
    if c <= WINOGRAD_F4_MAX_CHANNELS {
        WinoTile::F4
    } else {
        WinoTile::F2
    }
}

const WINOGRAD_F4_MAX_CHANNELS: usize = 128;

/// Fewest output tiles (m x m for F(m x m, 3x3), over the batch) for which a stride-1 3x3 conv takes
/// the Winograd path. Layer4 at batch 1 has 16 F(2x2) tiles: its 16 GEMMs are half a 32-wide kernel
/// panel each, yet on Zen 4 they beat the direct conv (2 convs: 2.64 -> 2.11 ms); on the AVX-512
/// Xeon of earlier sessions the two were level, so the bound stays for still narrower inputs.
const WINOGRAD_MIN_TILES: usize = 16;

/// A trace callback (see `Encoder::forward_trace`).
pub(crate) type Tap<'a> = &'a mut dyn FnMut(&str, &Tensor);

/// Passes a channel-major activation (C, N, H, W) to the trace tap as NCHW (a copy when N > 1;
/// nothing at all when there is no tap).
pub(crate) fn emit(tap: &mut Option<Tap>, name: &str, t: &Tensor) -> Result<()> {
    let Some(tap) = tap.as_mut() else { return Ok(()) };
    let &[c, n, h, w] = t.dims() else {
        return Err(Error::shape(format!("{name}: expected a (C, N, H, W) activation, got {:?}", t.dims())));
    };
    if n == 1 {
        tap(name, &t.reshape(&[1, c, h, w])?);
    } else {
        let mut v = vec![0.0f32; t.numel()];
        swap_leading_axes(t.as_f32_slice()?, c, n, h * w, &mut v);
        tap(name, &Tensor::from_vec(v, &[n, c, h, w])?);
    }
    Ok(())
}

/// (N, C, H, W) -> (N, H*W, C): the spatial-major grid DESIGN.md's features file uses.
pub(crate) fn to_grid(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = match *x.dims() {
        [n, c, h, w] => (n, c, h, w),
        _ => return Err(Error::shape(format!("grid features from {:?}", x.dims()))),
    };
    Ok(x.reshape(&[n, c, h * w])?.transpose(1, 2)?.contiguous())
}

impl Encoder for ResNet {
    /// Any ResNet reports `ResNet50`: the only ResNet kind the CLI names.
    fn kind(&self) -> EncoderKind {
        EncoderKind::ResNet50
    }

    fn features(&self, x: &Tensor, layer: FeatureLayer) -> Result<Tensor> {
        match layer {
            FeatureLayer::Pooled => self.run(x, Until::Pooled, None),
            FeatureLayer::Grid => self.run(x, Until::Layer4, None),
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
    use crate::tensor::DType;
    use crate::weights::random::init_tensor;
    use std::collections::BTreeMap;

    fn narrow(block: BlockKind) -> ResNetConfig {
        ResNetConfig { block, layers: [1, 2, 1, 1], width: 8, num_classes: 10 }
    }

    fn image(n: usize, h: usize, w: usize) -> Tensor {
        Tensor::from_vec(uniform_vec(11, "img", n * 3 * h * w, -2.0, 2.0), &[n, 3, h, w]).unwrap()
    }

    fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        (num / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>()).sqrt()
    }

    #[test]
    fn state_dict_matches_torchvision_counts() {
        // torchvision: len(resnet50().state_dict()) == 320 and resnet18 == 122, each including one
        // num_batches_tracked per BN (53 and 20), which we leave out. Parameter counts (weights and
        // BN affine, not running stats) are the published 25,557,032 and 11,689,512.
        for (cfg, entries, bns, params) in [
            (ResNetConfig::resnet50(), 320, 53, 25_557_032usize),
            (ResNetConfig::resnet18(), 122, 20, 11_689_512),
        ] {
            let sd = state_dict_shapes(&cfg);
            assert_eq!(sd.len() + bns, entries, "{}", cfg.name());
            let p: usize = sd
                .iter()
                .filter(|(n, _)| !n.contains("running"))
                .map(|(_, d)| d.iter().product::<usize>())
                .sum();
            assert_eq!(p, params, "{}", cfg.name());
        }
        let sd = state_dict_shapes(&ResNetConfig::resnet50());
        assert_eq!(sd[0], ("conv1.weight".to_string(), vec![64, 3, 7, 7]));
        let find = |n: &str| sd.iter().find(|(k, _)| k == n).map(|(_, d)| d.clone());
        assert_eq!(find("layer2.0.conv2.weight"), Some(vec![128, 128, 3, 3]));
        assert_eq!(find("layer1.0.downsample.0.weight"), Some(vec![256, 64, 1, 1]));
        assert_eq!(find("layer3.5.bn3.running_var"), Some(vec![1024]));
        assert_eq!(find("layer2.1.downsample.0.weight"), None);
        assert_eq!(sd.last().unwrap(), &("fc.bias".to_string(), vec![1000]));
        let basic = state_dict_shapes(&ResNetConfig::resnet18());
        assert!(basic.iter().all(|(n, _)| !n.contains("layer1.0.downsample")));
    }

    /// An independent forward: unfolded conv (reference loop) then BN in f64, separate residual add
    /// and ReLU, max-pool and mean by direct loops, straight from the named random tensors.
    fn reference_forward(cfg: &ResNetConfig, seed: u64, x: &Tensor) -> Vec<f32> {
        struct Act {
            v: Vec<f32>,
            c: usize,
            h: usize,
            w: usize,
        }
        let n = x.dims()[0];
        let conv_bn = |a: &Act, conv: &str, bn: &str, k: usize, r: usize, stride: usize, pad: usize| -> Act {
            let w = init_tensor(&format!("{conv}.weight"), &[k, a.c, r, r], seed);
            let cw = ConvWeights::new(w, None, k, a.c, r, r);
            let p = ConvParams::new(stride, pad);
            let (oh, ow) = p.out_hw(a.h, a.w, r, r).unwrap();
            let mut y = vec![0.0; n * k * oh * ow];
            conv2d_reference(&a.v, n, a.h, a.w, &cw, &p, None, false, &mut y);
            let g = init_tensor(&format!("{bn}.weight"), &[k], seed);
            let b = init_tensor(&format!("{bn}.bias"), &[k], seed);
            let m = init_tensor(&format!("{bn}.running_mean"), &[k], seed);
            let v = init_tensor(&format!("{bn}.running_var"), &[k], seed);
            for (i, y) in y.iter_mut().enumerate() {
                let ko = (i / (oh * ow)) % k;
                *y = ((*y as f64 - m[ko] as f64) / (v[ko] as f64 + 1e-5).sqrt() * g[ko] as f64 + b[ko] as f64)
                    as f32;
            }
            Act { v: y, c: k, h: oh, w: ow }
        };
        let relu = |mut a: Act| {
            a.v.iter_mut().for_each(|v| *v = v.max(0.0));
            a
        };
        let (h, w) = (x.dims()[2], x.dims()[3]);
        let a = relu(conv_bn(&Act { v: x.to_f32_vec(), c: 3, h, w }, "conv1", "bn1", cfg.width, 7, 2, 3));
        // max-pool 3x3/2 pad 1
        let (oh, ow) = ((a.h - 1) / 2 + 1, (a.w - 1) / 2 + 1);
        let mut mp = vec![f32::NEG_INFINITY; n * a.c * oh * ow];
        for plane in 0..n * a.c {
            for i in 0..oh {
                for j in 0..ow {
                    for r in 0..3 {
                        for s in 0..3 {
                            let (y, xx) = ((2 * i + r) as isize - 1, (2 * j + s) as isize - 1);
                            if y >= 0 && xx >= 0 && (y as usize) < a.h && (xx as usize) < a.w {
                                let v = a.v[plane * a.h * a.w + y as usize * a.w + xx as usize];
                                let o = &mut mp[plane * oh * ow + i * ow + j];
                                *o = o.max(v);
                            }
                        }
                    }
                }
            }
        }
        let mut cur = Act { v: mp, c: a.c, h: oh, w: ow };
        let e = cfg.block.expansion();
        for (li, &nb) in cfg.layers.iter().enumerate() {
            let planes = cfg.width << li;
            for bi in 0..nb {
                let s = if bi == 0 && li > 0 { 2 } else { 1 };
                let p = format!("layer{}.{bi}", li + 1);
                let out = match cfg.block {
                    BlockKind::Basic => {
                        let t =
                            relu(conv_bn(&cur, &format!("{p}.conv1"), &format!("{p}.bn1"), planes, 3, s, 1));
                        conv_bn(&t, &format!("{p}.conv2"), &format!("{p}.bn2"), planes, 3, 1, 1)
                    }
                    BlockKind::Bottleneck => {
                        let t =
                            relu(conv_bn(&cur, &format!("{p}.conv1"), &format!("{p}.bn1"), planes, 1, 1, 0));
                        let t =
                            relu(conv_bn(&t, &format!("{p}.conv2"), &format!("{p}.bn2"), planes, 3, s, 1));
                        conv_bn(&t, &format!("{p}.conv3"), &format!("{p}.bn3"), planes * e, 1, 1, 0)
                    }
                };
                let id = if bi == 0 && (s != 1 || cur.c != planes * e) {
                    conv_bn(
                        &cur,
                        &format!("{p}.downsample.0"),
                        &format!("{p}.downsample.1"),
                        planes * e,
                        1,
                        s,
                        0,
                    )
                    .v
                } else {
                    cur.v.clone()
                };
                let v = out.v.iter().zip(&id).map(|(a, b)| (a + b).max(0.0)).collect();
                cur = Act { v, c: out.c, h: out.h, w: out.w };
            }
        }
        let hw = cur.h * cur.w;
        cur.v.chunks(hw).map(|p| (p.iter().map(|&v| v as f64).sum::<f64>() / hw as f64) as f32).collect()
    }

    #[test]
    fn narrow_resnets_match_an_unfused_reference() {
        // 64x48: enough tiles for Winograd in layer1, whose basic blocks then add a separate
        // residual; the other convs sum theirs in the identity's buffer.
        for (block, (h, w)) in
            [BlockKind::Bottleneck, BlockKind::Basic].into_iter().flat_map(|b| [(b, (35, 32)), (b, (64, 48))])
        {
            let cfg = narrow(block);
            let net = ResNet::random(&cfg, 42);
            let x = image(2, h, w);
            let got = net.features(&x, FeatureLayer::Pooled).unwrap();
            assert_eq!(got.dims(), &[2, cfg.feature_dim()]);
            let want = reference_forward(&cfg, 42, &x);
            // BN folding and fused epilogues only reorder f32 rounding through ~12 layers; the
            // observed error is ~1e-7, 1e-5 leaves room for the fast kernel's summation order.
            let e = rel_l2(&got.to_f32_vec(), &want);
            assert!(e < 1e-5, "{block:?} {h}x{w}: rel L2 {e}");
        }
    }

    #[test]
    fn real_resnet50_wiring_at_32x32() {
        // The full ResNet-50 state dict and block structure on a tiny image (0.08 GMAC), against
        // the unfused reference; tolerance as above.
        let cfg = ResNetConfig::resnet50();
        let net = ResNet::random(&cfg, 9);
        let x = image(1, 32, 32);
        let got = net.features(&x, FeatureLayer::Pooled).unwrap();
        assert_eq!(got.dims(), &[1, 2048]);
        let e = rel_l2(&got.to_f32_vec(), &reference_forward(&cfg, 9, &x));
        assert!(e < 1e-5, "rel L2 {e}");
        assert_eq!(net.features(&x, FeatureLayer::Grid).unwrap().dims(), &[1, 1, 2048]);
    }

    #[test]
    fn trace_shapes_grid_and_buffer_reuse() {
        let cfg = narrow(BlockKind::Bottleneck);
        let net = ResNet::random(&cfg, 1);
        let x = image(2, 64, 48);
        let mut seen: Vec<(String, Vec<usize>)> = Vec::new();
        let mut pooled = None;
        let logits = net
            .forward_trace(&x, &mut |name, t| {
                seen.push((name.to_string(), t.dims().to_vec()));
                if name == "pooled" {
                    pooled = Some(t.to_f32_vec());
                }
            })
            .unwrap();
        let want: Vec<(String, Vec<usize>)> = [
            ("conv1", vec![2, 8, 32, 24]),
            ("maxpool", vec![2, 8, 16, 12]),
            ("layer1", vec![2, 32, 16, 12]),
            ("layer2", vec![2, 64, 8, 6]),
            ("layer3", vec![2, 128, 4, 3]),
            ("layer4", vec![2, 256, 2, 2]),
            ("pooled", vec![2, 256]),
        ]
        .into_iter()
        .map(|(n, d)| (n.to_string(), d))
        .collect();
        assert_eq!(seen, want);
        assert_eq!(logits.dims(), &[2, 10]);
        // logits = fc(pooled), checked with an f64 loop.
        let (pv, lv) = (pooled.unwrap(), logits.to_f32_vec());
        let fw = init_tensor("fc.weight", &[10, 256], 1);
        let fb = init_tensor("fc.bias", &[10], 1);
        let mut wl = vec![0.0f32; 20];
        for i in 0..2 {
            for o in 0..10 {
                let s: f64 = (0..256).map(|k| pv[i * 256 + k] as f64 * fw[o * 256 + k] as f64).sum();
                wl[i * 10 + o] = (s + fb[o] as f64) as f32;
            }
        }
        assert!(rel_l2(&lv, &wl) < 1e-5);
        // Grid = layer4 in spatial-major order: grid[n, p, c] = layer4[n, c, p].
        let mut l4 = Vec::new();
        net.forward_trace(&x, &mut |name, t| {
            if name == "layer4" {
                l4 = t.to_f32_vec();
            }
        })
        .unwrap();
        let allocs = net.pool_allocations();
        let grid = net.features(&x, FeatureLayer::Grid).unwrap();
        assert_eq!(grid.dims(), &[2, 4, 256]);
        let g = grid.to_f32_vec();
        for n in 0..2 {
            for p in 0..4 {
                for c in 0..256 {
                    assert_eq!(g[(n * 4 + p) * 256 + c], l4[(n * 256 + c) * 4 + p]);
                }
            }
        }
        // Once warm, a pass takes every activation buffer from the pool: no new allocations.
        assert_eq!(net.pool_allocations(), allocs);
        net.features(&x, FeatureLayer::Grid).unwrap();
        net.logits(&x).unwrap();
        assert_eq!(net.pool_allocations(), allocs);
        // One pass produces 22 activations (20 convs, max-pool, average pool); four passes allocated
        // far fewer buffers than one pass has layers.
        assert!(
            net.pool_allocations() < 20,
            "pool holds a handful of buffers, got {}",
            net.pool_allocations()
        );
    }

    fn write_state_dict(path: &std::path::Path, sd: &[(String, Vec<usize>)], seed: u64) {
        let ts: Vec<(String, Tensor)> = sd
            .iter()
            .map(|(n, d)| (n.clone(), Tensor::from_vec(init_tensor(n, d, seed), d).unwrap()))
            .collect();
        let refs: Vec<(&str, &Tensor)> = ts.iter().map(|(n, t)| (n.as_str(), t)).collect();
        crate::weights::save_safetensors(path, &refs, &BTreeMap::new()).unwrap();
    }

    #[test]
    fn load_from_file_and_state_dict_errors() {
        let dir = std::env::temp_dir().join(format!("capgen-resnet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = narrow(BlockKind::Basic);
        let sd = state_dict_shapes(&cfg);
        let path = dir.join("net.safetensors");
        write_state_dict(&path, &sd, 5);
        // A file with the random weights gives exactly the random net (same f32 values, same folding).
        let f = TensorFile::load(&path).unwrap();
        let net = ResNet::from_tensor_file(&cfg, &f).unwrap();
        let x = image(1, 32, 32);
        let a = net.logits(&x).unwrap().to_f32_vec();
        let b = ResNet::random(&cfg, 5).logits(&x).unwrap().to_f32_vec();
        assert_eq!(a, b);
        // The same weights stored as F16 load (widened) and give nearly the same logits: f16 keeps
        // 11 significant bits, so weights move by <= 2^-11 relative and the logits by ~1e-3.
        let f16s: Vec<(String, Tensor)> =
            f.tensors.iter().map(|(n, t)| (n.clone(), t.to_dtype(DType::F16))).collect();
        let refs: Vec<(&str, &Tensor)> = f16s.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let hpath = dir.join("half.safetensors");
        crate::weights::save_safetensors(&hpath, &refs, &BTreeMap::new()).unwrap();
        let hf = TensorFile::load(&hpath).unwrap();
        assert_eq!(hf.get("conv1.weight").unwrap().dtype(), DType::F16);
        let h = ResNet::from_tensor_file(&cfg, &hf).unwrap().logits(&x).unwrap().to_f32_vec();
        let e = rel_l2(&h, &a);
        assert!(e > 0.0 && e < 5e-3, "f16 weights: rel L2 {e}");
        // Missing, extra and misshapen tensors: one line naming the file and each tensor.
        let mut bad = sd.clone();
        bad.retain(|(n, _)| n != "layer2.0.bn1.running_var");
        bad.push(("layer9.extra".to_string(), vec![2]));
        bad.iter_mut().find(|(n, _)| n == "fc.weight").unwrap().1 = vec![10, 63];
        let bpath = dir.join("bad.safetensors");
        write_state_dict(&bpath, &bad, 5);
        let e = ResNet::from_tensor_file(&cfg, &TensorFile::load(&bpath).unwrap()).unwrap_err().to_string();
        for want in [
            "bad.safetensors",
            "missing [layer2.0.bn1.running_var]",
            "unexpected [layer9.extra]",
            "fc.weight [10, 63]",
        ] {
            assert!(e.contains(want), "{want} not in: {e}");
        }
        assert!(!e.contains('\n'));
        // load_encoder: a missing file is an error naming it; "random" builds the real nets.
        let missing = dir.join("nope.safetensors");
        let e = crate::nn::load_encoder(EncoderKind::ResNet50, missing.to_str().unwrap(), 0).err().unwrap();
        assert!(e.to_string().contains("nope.safetensors"), "{e}");
        let e = crate::nn::load_encoder(EncoderKind::ResNet50, path.to_str().unwrap(), 0).err().unwrap();
        // (The narrow file infers 10 classes, then fails the ResNet-50 shapes.)
        assert!(e.to_string().contains("does not fit resnet(Bottleneck [3, 4, 6, 3]"), "{e}");
        assert!(matches!(net.logits(&Tensor::zeros(&[1, 4, 32, 32])), Err(Error::Shape(_))));
        assert!(matches!(net.logits(&Tensor::zeros(&[0, 3, 32, 32])), Err(Error::Shape(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
