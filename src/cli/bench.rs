//! `capgen bench gemm|conv|resnet50`: time kernels and the full network inside a rayon pool of
//! `--threads` workers, and report each case as ms (median of `--reps` after a warm-up), GFLOP/s and
//! percent of the FMA peak measured in the same run (so the ratio holds on any machine).
//!
//! With `--json`, one JSON object per case per stdout line (DESIGN.md section 4 contract): `bench`,
//! `case`, `device`, `threads`, `batch`, `ms_median`, `gflops`, `peak_gflops` (null when unknown or on
//! GPUs), plus `pct_peak`, `reps`, `ms_min` and, for resnet50, `peak_rss_mb`.

use std::time::Instant;

use serde_json::json;

use crate::cli::BenchArgs;
use crate::cpu::conv::{conv2d_forward, resnet50_conv_cases, ConvParams, ConvWeights};
use crate::cpu::gemm::{sgemm, Epilogue, MatRef};
use crate::cpu::peak::fma_peak_gflops;
use crate::error::{Error, Result};
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
                self.args.what, self.device, self.threads, self.args.batch, self.args.reps, peak
            );
            println!("{:<32} {:>10} {:>10} {:>9} {:>8}", "case", "ms", "GFLOP/s", "% peak", "RSS MiB");
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
                "batch": self.args.batch,
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
            println!("{:<32} {:>10.3} {:>10.1} {:>9} {:>8}", r.case, r.ms_median, gflops, pct, rss);
        }
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let device = Device::parse(&args.device)?;
    match args.what.as_str() {
        "gemm" | "conv" | "resnet50" => {}
        "lstm" | "train-step" => {
            return Err(Error::msg(format!("`capgen bench {}` is not implemented yet (issue 3)", args.what)))
        }
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
        let rep = Reporter { args, threads, device, peak: (peak.is_finite() && peak > 0.0).then_some(peak) };
        rep.header();
        match args.what.as_str() {
            "gemm" => bench_gemm(&rep),
            "conv" => bench_conv(&rep),
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
            conv2d_forward(&x, nb, case.h, case.w, &wt, &params, None, true, &mut y);
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
    Ok(())
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
}
