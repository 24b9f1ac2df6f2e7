//! `capgen bench gemm|conv|resnet50|lstm|train-step`: time kernels and the full network inside a rayon pool of
//! `--threads` workers, and report each case as ms (median of `--reps` after a warm-up), GFLOP/s and
//! percent of the FMA peak measured in the same run (so the ratio holds on any machine).
//!
//! With `--json`, one JSON object per case per stdout line (DESIGN.md section 4 contract): `bench`,
//! `case`, `device`, `threads`, `batch`, `ms_median`, `gflops`, `peak_gflops` (null when unknown or on
//! GPUs), plus `pct_peak`, `reps`, `ms_min` and, for resnet50, `peak_rss_mb`.
//!
//! `lstm` and `train-step` (issue 3, Performance) time whole training steps at the sizes
//! (`DECODER_BENCH`: embedding, hidden and attention 512, vocabulary 8000, 20 steps, 49x2048 grid or
//! 2048 pooled features; batch 64 unless `--batch` is given): forward, loss, backward and Adam.
//! `lstm`: the LSTM layer alone (forward + backward) and the show-tell step; `train-step`: the
//! attention and show-tell steps. tools/bench_decoder_torch.py times the same steps in PyTorch.

use std::time::Instant;

use serde_json::json;

use crate::cli::BenchArgs;
use crate::cpu::adam::{Adam, AdamConfig};
use crate::cpu::conv::{conv2d_forward_cn, resnet50_conv_cases, ConvParams, ConvWeights};
use crate::cpu::gemm::{sgemm, Epilogue, MatRef};
use crate::cpu::lstm::{lstm_backward, lstm_forward, LstmCache, LstmGrads, LstmParams, LstmSize};
use crate::cpu::peak::fma_peak_gflops;
use crate::error::{Error, Result};
use crate::model::checkpoint::{DecoderKind, DecoderParams};
use crate::model::decoder::{
    attention_backward, attention_forward_into, show_tell_backward, show_tell_forward_into, AttentionForward,
    Batch as DecBatch, DecoderDims, ShowTellForward,
};
use crate::nn::{load_encoder, EncoderKind};
use crate::rng::Rng;
use crate::tensor::{Device, Tensor};

/// FLOPs of one ResNet-50 forward at 224x224 (2 per multiply-accumulate): every convolution plus the
/// final 2048 -> 1000 linear layer. Pooling, BN (folded) and ReLU are not counted.
pub fn resnet50_flops_per_image() -> f64 {
    let conv: f64 = resnet50_conv_cases().iter().map(|c| c.flops() * c.count as f64).sum();
    conv + 2.0 * (2048 * 1000) as f64
}

/// Peak resident memory of this process in MiB (VmHWM), where the OS tells it (Linux).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Runs `f` once to warm up (and at least ~0.2 s in total), then `reps` timed runs; returns the
/// median and minimum in milliseconds.
fn time_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    let start = Instant::now();
    f()?;
    while start.elapsed().as_secs_f64() < 0.2 {
        f()?;
    }
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    let median = if reps % 2 == 1 { ms[reps / 2] } else { 0.5 * (ms[reps / 2 - 1] + ms[reps / 2]) };
    Ok((median, ms[0]))
}

fn random_vec(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut v = vec![0.0; n];
    rng.fill_uniform(&mut v, -1.0, 1.0);
    v
}

/// What every measured case reports.
struct Row {
    case: String,
    ms_median: f64,
    ms_min: f64,
    flops: f64,
    peak_rss_mb: Option<f64>,
}

struct Reporter<'a> {
    args: &'a BenchArgs,
    /// The batch reported (the decoder benches default to 64).
    batch: usize,
    threads: usize,
    device: Device,
    peak: Option<f64>,
}

impl Reporter<'_> {
    fn header(&self) {
        if !self.args.json {
            let peak = self.peak.map_or("unknown".to_string(), |p| format!("{p:.1} GFLOP/s"));
            println!(
                "bench {}  device {}  threads {}  batch {}  reps {}  FMA peak {}",
                self.args.what, self.device, self.threads, self.batch, self.args.reps, peak
            );
            println!("{:<48} {:>10} {:>10} {:>9} {:>8}", "case", "ms", "GFLOP/s", "% peak", "RSS MiB");
        }
    }

    fn row(&self, r: &Row) {
        let gflops = r.flops / (r.ms_median * 1e-3) / 1e9;
        let pct = self.peak.map(|p| 100.0 * gflops / p);
        if self.args.json {
            let line = json!({
                "bench": self.args.what,
                "case": r.case,
                "device": self.device.to_string(),
                "threads": self.threads,
                "batch": self.batch,
                "reps": self.args.reps,
                "ms_median": r.ms_median,
                "ms_min": r.ms_min,
                "gflops": gflops,
                "peak_gflops": self.peak,
                "pct_peak": pct,
                "peak_rss_mb": r.peak_rss_mb,
            });
            println!("{line}");
        } else {
            let pct = pct.map_or("-".to_string(), |p| format!("{p:.1}"));
            let rss = r.peak_rss_mb.map_or("-".to_string(), |m| format!("{m:.0}"));
            println!("{:<48} {:>10.3} {:>10.1} {:>9} {:>8}", r.case, r.ms_median, gflops, pct, rss);
        }
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let device = Device::parse(&args.device)?;
    match args.what.as_str() {
        "gemm" | "conv" | "resnet50" | "lstm" | "train-step" => {}
        other => {
            return Err(Error::msg(format!(
                "bench {other}: expected gemm, conv, resnet50, lstm or train-step"
            )))
        }
    }
    if args.reps == 0 || args.batch == 0 {
        return Err(Error::msg("--reps and --batch must be at least 1"));
    }
    let threads = match args.threads {
        Some(0) => return Err(Error::msg("--threads 0: use at least one thread")),
        Some(t) => t,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::msg(format!("cannot start {threads} worker threads ({e})")))?;
    pool.install(|| {
        let peak = fma_peak_gflops(threads);
        // The decoder benches measure the batch 64 unless --batch says otherwise.
        let decoder = matches!(args.what.as_str(), "lstm" | "train-step");
        let batch = if decoder && args.batch == 1 { DECODER_BENCH.0 } else { args.batch };
        let peak = (peak.is_finite() && peak > 0.0).then_some(peak);
        let rep = Reporter { args, batch, threads, device, peak };
        rep.header();
        match args.what.as_str() {
            "gemm" => bench_gemm(&rep),
            "conv" => bench_conv(&rep),
            "lstm" => bench_lstm(&rep),
            "train-step" => bench_train_step(&rep),
            _ => bench_resnet50(&rep),
        }
    })
}

fn bench_gemm(rep: &Reporter) -> Result<()> {
    let sizes = match rep.args.size {
        Some(0) => return Err(Error::msg("--size 0: use a positive matrix size")),
        Some(n) => vec![n],
        None => vec![256, 512, 1024, 2048],
    };
    let mut rng = Rng::new(1);
    for n in sizes {
        let a = random_vec(&mut rng, n * n);
        let b = random_vec(&mut rng, n * n);
        let mut c = vec![0.0f32; n * n];
        let (ms_median, ms_min) = time_ms(rep.args.reps, || {
            let (ma, mb) = (MatRef::row_major(&a, n, n), MatRef::row_major(&b, n, n));
            sgemm(ma, mb, &mut c, n, &Epilogue::default());
            Ok(())
        })?;
        let flops = 2.0 * (n as f64).powi(3);
        rep.row(&Row { case: format!("sgemm {n}x{n}x{n}"), ms_median, ms_min, flops, peak_rss_mb: None });
    }
    Ok(())
}

fn bench_conv(rep: &Reporter) -> Result<()> {
    let nb = rep.args.batch;
    let mut rng = Rng::new(2);
    for case in resnet50_conv_cases() {
        let wt = ConvWeights::new(
            random_vec(&mut rng, case.k * case.c * case.r * case.s),
            Some(random_vec(&mut rng, case.k)),
            case.k,
            case.c,
            case.r,
            case.s,
        );
        let params = ConvParams::new(case.stride, case.pad);
        let (p, q) = params
            .out_hw(case.h, case.w, case.r, case.s)
            .ok_or_else(|| Error::shape(format!("conv case {} has an empty output", case.name)))?;
        let x = random_vec(&mut rng, nb * case.c * case.h * case.w);
        let mut y = vec![0.0f32; nb * case.k * p * q];
        let (ms_median, ms_min) = time_ms(rep.args.reps, || {
            // Channel-major, the whole batch as one GEMM: what the ResNet forward runs.
            conv2d_forward_cn(&x, nb, case.h, case.w, &wt, &params, None, true, &mut y);
            Ok(())
        })?;
        // `flops()` is for the case's own batch (1).
        let flops = case.flops() / case.n as f64 * nb as f64;
        rep.row(&Row { case: case.name.to_string(), ms_median, ms_min, flops, peak_rss_mb: None });
    }
    Ok(())
}

fn bench_resnet50(rep: &Reporter) -> Result<()> {
    let nb = rep.args.batch;
    let encoder = load_encoder(EncoderKind::ResNet50, &rep.args.weights, 0)?;
    let mut rng = Rng::new(3);
    let x = Tensor::from_vec(random_vec(&mut rng, nb * 3 * 224 * 224), &[nb, 3, 224, 224])?;
    let (ms_median, ms_min) = time_ms(rep.args.reps, || encoder.logits(&x).map(|_| ()))?;
    let flops = resnet50_flops_per_image() * nb as f64;
    rep.row(&Row {
        case: format!("resnet50 224x224 batch {nb}"),
        ms_median,
        ms_min,
        flops,
        peak_rss_mb: peak_rss_mb(),
    });
    if rep.args.layers {
        bench_resnet50_layers(rep, &*encoder, &x)?;
    }
    Ok(())
}

/// `bench resnet50 --layers`: `reps` more forwards with `nn::profile` on; one row per distinct op
/// (label "layer: 3x3/1 64->64 @56x56 F(4x4,3x3) x3": shape, method, ops per forward), its ms per
/// forward (summed over those ops; mean, not median) and GFLOP/s of its direct-form FLOPs.
fn bench_resnet50_layers(rep: &Reporter, encoder: &dyn crate::nn::Encoder, x: &Tensor) -> Result<()> {
    use crate::nn::profile;
    let reps = rep.args.reps.max(1);
    profile::take();
    profile::set_enabled(true);
    let run = (0..reps).try_for_each(|_| encoder.logits(x).map(|_| ()));
    profile::set_enabled(false);
    run?;
    let rows = profile::per_forward(&profile::take(), reps);
    let total: f64 = rows.iter().map(|r| r.3).sum();
    for (label, count, flops, ms) in rows {
        rep.row(&Row {
            case: format!("layer: {label} x{count}"),
            ms_median: ms,
            ms_min: ms,
            flops,
            peak_rss_mb: None,
        });
    }
    if !rep.args.json {
        println!("{:<48} {:>10.3}   (sum of the ops above; the rest is glue)", "all ops", total);
    }
    Ok(())
}

/// (batch, steps) of the decoder benches and their dims (issue 3, Performance).
pub const DECODER_BENCH: (usize, usize) = (64, 20);
pub const DECODER_BENCH_DIMS: DecoderDims =
    DecoderDims { vocab: 8000, embed: 512, feat: 2048, regions: 49, hidden: 512, att: 512 };

/// FLOPs of an LSTM over (B,T) with input I and hidden H, forward + backward: the forward's
/// multiply-adds are the gate GEMMs B*T*4H*(I+H); the backward costs two such GEMMs (input and weight
/// gradients), so 3x the forward, x2 FLOPs per multiply-add. Element-wise gate math is not counted.
pub fn lstm_train_flops(b: usize, t: usize, i: usize, h: usize) -> f64 {
    3.0 * 2.0 * (b * t * 4 * h * (i + h)) as f64
}

/// FLOPs of one show-tell training step (every row live for all T steps): init linears 2 x (B,D)x(D,H),
/// the LSTM (I = E), the output layer (B*T,H)x(H,V); forward + backward = 3x forward, x2 per MAC.
pub fn show_tell_train_flops(d: &DecoderDims, b: usize, t: usize) -> f64 {
    let fwd_mac = 2 * b * d.feat * d.hidden + b * t * d.hidden * d.vocab;
    3.0 * 2.0 * fwd_mac as f64 + lstm_train_flops(b, t, d.embed, d.hidden)
}

/// FLOPs of one attention-decoder training step (every row live): the encoder projection
/// (B,L,D)x(D,A) once and the init linears; per step and row the decoder projection H*A, the scores
/// L*A, the context L*D, the gate H*D, the LSTM cell 4H*(E+D+H) and the output H*V multiply-adds.
/// Forward + backward = 3x forward, x2 per MAC; element-wise math (tanh, softmax) is not counted.
pub fn attention_train_flops(d: &DecoderDims, b: usize, t: usize) -> f64 {
    let (l, f, h, a, e, v) = (d.regions, d.feat, d.hidden, d.att, d.embed, d.vocab);
    let once = b * l * f * a + 2 * b * f * h;
    let per = h * a + l * a + l * f + h * f + 4 * h * (e + f + h) + h * v;
    3.0 * 2.0 * (once + b * t * per) as f64
}

/// A decoder training-step fixture: parameters (uniform +-0.05), gradients, Adam state, a batch of
/// random tokens, every caption T long. Public for `examples/decoder_perf.rs` (on-CPU timing).
pub struct StepFixture {
    params: DecoderParams,
    grads: DecoderParams,
    adam: Adam,
    feats: Vec<f32>,
    tokens: Vec<u32>,
    targets: Vec<u32>,
    lengths: Vec<usize>,
    steps: usize,
    /// Forward state kept across steps (its buffers are reused, as a training loop would).
    st_fw: ShowTellForward,
    att_fw: AttentionForward,
}

impl StepFixture {
    pub fn new(kind: DecoderKind, d: &DecoderDims, b: usize, t: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut params = DecoderParams::zeros(kind, d);
        params.named_mut().into_iter().for_each(|(_, p)| rng.fill_uniform(p, -0.05, 0.05));
        let grads = params.zeros_like();
        let sizes: Vec<usize> = params.named().iter().map(|(_, p)| p.len()).collect();
        let adam = Adam::new(AdamConfig { lr: 4e-4, ..AdamConfig::default() }, &sizes);
        let feat_len = match kind {
            DecoderKind::ShowTell => d.feat,
            DecoderKind::Attention => d.regions * d.feat,
        };
        let mut feats = vec![0.0; b * feat_len];
        rng.fill_uniform(&mut feats, 0.0, 1.0);
        let mut word = || 4 + rng.below(d.vocab - 4) as u32;
        let tokens: Vec<u32> = (0..b * t).map(|_| word()).collect();
        let targets: Vec<u32> = (0..b * t).map(|_| word()).collect();
        StepFixture {
            params,
            grads,
            adam,
            feats,
            tokens,
            targets,
            lengths: vec![t; b],
            steps: t,
            st_fw: ShowTellForward::default(),
            att_fw: AttentionForward::default(),
        }
    }

    /// Zero gradients, forward, loss + backward, Adam.
    pub fn step(&mut self, d: &DecoderDims) -> Result<()> {
        self.grads.zero();
        let batch = DecBatch {
            feats: &self.feats,
            tokens: &self.tokens,
            targets: &self.targets,
            lengths: &self.lengths,
            steps: self.steps,
        };
        let loss = match (&self.params, &mut self.grads) {
            (DecoderParams::ShowTell(p), DecoderParams::ShowTell(g)) => {
                show_tell_forward_into(&mut self.st_fw, p, d, &batch, None)?;
                show_tell_backward(p, g, d, &batch, &mut self.st_fw, 0.0)?
            }
            (DecoderParams::Attention(p), DecoderParams::Attention(g)) => {
                attention_forward_into(&mut self.att_fw, p, d, &batch, None)?;
                attention_backward(p, g, d, &batch, &mut self.att_fw, 1.0, 0.0, false)?
            }
            _ => unreachable!("fixture parameters and gradients are the same kind"),
        };
        if !loss.ce.is_finite() {
            return Err(Error::msg("bench: the loss is not finite"));
        }
        let grads: Vec<&[f32]> = self.grads.named().into_iter().map(|(_, g)| g).collect();
        let mut params: Vec<&mut [f32]> = self.params.named_mut().into_iter().map(|(_, p)| p).collect();
        self.adam.step(&mut params, &grads);
        Ok(())
    }
}

fn bench_decoder_step(rep: &Reporter, kind: DecoderKind) -> Result<()> {
    let (b, t) = (rep.batch, DECODER_BENCH.1);
    let d = DECODER_BENCH_DIMS;
    let mut fx = StepFixture::new(kind, &d, b, t, 4);
    let (ms_median, ms_min) = time_ms(rep.args.reps, || fx.step(&d))?;
    let flops = match kind {
        DecoderKind::ShowTell => show_tell_train_flops(&d, b, t),
        DecoderKind::Attention => attention_train_flops(&d, b, t),
    };
    rep.row(&Row {
        case: format!("{} train step B{b} T{t}", kind.name()),
        ms_median,
        ms_min,
        flops,
        peak_rss_mb: peak_rss_mb(),
    });
    Ok(())
}

fn bench_lstm(rep: &Reporter) -> Result<()> {
    let (b, t) = (rep.batch, DECODER_BENCH.1);
    let (i, h) = (DECODER_BENCH_DIMS.embed, DECODER_BENCH_DIMS.hidden);
    let mut rng = Rng::new(5);
    let (w_ih, w_hh) = (random_vec(&mut rng, 4 * h * i), random_vec(&mut rng, 4 * h * h));
    let (b_ih, b_hh) = (random_vec(&mut rng, 4 * h), random_vec(&mut rng, 4 * h));
    let x = random_vec(&mut rng, b * t * i);
    let (h0, c0) = (random_vec(&mut rng, b * h), random_vec(&mut rng, b * h));
    let dhs = random_vec(&mut rng, b * t * h);
    let p = LstmParams { w_ih: &w_ih, w_hh: &w_hh, b_ih: &b_ih, b_hh: &b_hh };
    let (mut gw_ih, mut gw_hh) = (vec![0.0; w_ih.len()], vec![0.0; w_hh.len()]);
    let (mut gb_ih, mut gb_hh) = (vec![0.0; 4 * h], vec![0.0; 4 * h]);
    let active = vec![b; t];
    let sz = LstmSize { b, t, i, h };
    let (ms_median, ms_min) = time_ms(rep.args.reps, || {
        let mut hs = vec![0.0; b * t * h];
        let mut cache = LstmCache::default();
        lstm_forward(&mut hs, &mut cache, &x, &h0, &c0, &p, &active, sz);
        let mut dx = vec![0.0; b * t * i];
        let mut g = LstmGrads { w_ih: &mut gw_ih, w_hh: &mut gw_hh, b_ih: &mut gb_ih, b_hh: &mut gb_hh };
        lstm_backward(Some(&mut dx), None, None, &mut g, &dhs, &hs, &cache, &x, &h0, &c0, &p, &active, sz);
        Ok(())
    })?;
    rep.row(&Row {
        case: format!("lstm fwd+bwd B{b} T{t} I{i} H{h}"),
        ms_median,
        ms_min,
        flops: lstm_train_flops(b, t, i, h),
        peak_rss_mb: None,
    });
    bench_decoder_step(rep, DecoderKind::ShowTell)
}

fn bench_train_step(rep: &Reporter) -> Result<()> {
    bench_decoder_step(rep, DecoderKind::Attention)?;
    bench_decoder_step(rep, DecoderKind::ShowTell)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resnet50_flops_match_the_published_count() {
        // torchvision documents ResNet-50 at 4.09 GMAC (8.18 GFLOP) per 224x224 image.
        let gflop = resnet50_flops_per_image() / 1e9;
        assert!((gflop - 8.18).abs() < 0.02, "{gflop}");
    }

    #[test]
    fn decoder_flop_counts_by_hand() {
        // LSTM: 3 * 2 * B*T*4H*(I+H) with B=1, T=1, I=1, H=1 -> 3*2*4*2 = 48.
        assert_eq!(lstm_train_flops(1, 1, 1, 1), 48.0);
        let d = DecoderDims { vocab: 3, embed: 1, feat: 2, regions: 1, hidden: 1, att: 1 };
        // show-tell: 3*2*(2*1*2*1 + 1*1*1*3) + LSTM(I=1,H=1) 48 = 42 + 48.
        assert_eq!(show_tell_train_flops(&d, 1, 1), 90.0);
        // attention: once 1*1*2*1 + 2*1*2*1 = 6; per 1 + 1 + 2 + 2 + 4*(1+2+1) + 3 = 25; 3*2*31.
        assert_eq!(attention_train_flops(&d, 1, 1), 186.0);
    }
}
