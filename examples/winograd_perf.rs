//! Winograd F(2x2,3x3) vs `conv2d_forward` on ResNet-50's 3x3 stride-1 convs, and the end-to-end
//! effect on ResNet-50 (docs/PERF.md method: interleaved rounds, reps >= ~100 ms, wall and on-CPU).
//!
//! ```text
//! cargo run --release --example winograd_perf shapes [rounds] [batch ...]   # default 3 rounds, batch 1 8
//! cargo run --release --example winograd_perf resnet50 [batch] [rounds]     # error + time, whole net
//! cargo run --release --example winograd_perf profile NAME [batch] [secs]   # winograd only (for perf)
//! ```
//! `RAYON_NUM_THREADS=1|2` sets the threads. "eff GFLOP/s" = direct-convolution FLOPs / time (the
//! same numerator for both methods, so the ratio is the speed-up); "on-cpu" = the same FLOPs / the
//! CPU time our threads spent, per thread (see docs/PERF.md).
use capgen::cpu::conv::{conv2d_forward, resnet50_conv_cases, ConvParams, ConvWeights};
use capgen::cpu::peak::process_cpu_ns as cpu_ns;
use capgen::cpu::pool::{global_avg_pool, max_pool2d, PoolParams};
use capgen::cpu::winograd::{
    winograd_applicable, winograd_forward_nchw, workspace_len, WinoTile, WinogradWeights,
};
use capgen::nn::conv::Conv2d;
use capgen::nn::encoder::{Encoder, FeatureLayer};
use capgen::nn::resnet::{state_dict_shapes, ResNet, ResNetConfig};
use capgen::rng::Rng;
use capgen::tensor::Tensor;
use capgen::weights::random::init_tensor;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Runs `f` `reps` times; returns (wall seconds per call, on-CPU seconds per call per thread).
fn time(reps: usize, threads: usize, f: &mut dyn FnMut()) -> (f64, f64) {
    let c0 = cpu_ns();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    let wall = t.elapsed().as_secs_f64() / reps as f64;
    let cpu = (cpu_ns() - c0) as f64 * 1e-9 / reps as f64 / threads as f64;
    (wall, cpu)
}

fn shapes(rounds: usize, batches: &[usize]) {
    let threads = rayon::current_num_threads();
    println!("threads {threads}, {rounds} interleaved rounds, reps sized to >= 100 ms");
    let mut rng = Rng::new(1);
    for &n in batches {
        let (mut tot_d, mut tot_w, mut tot_4) = (0.0, 0.0, 0.0);
        for cs in resnet50_conv_cases().into_iter().filter(|c| c.r == 3 && c.stride == 1) {
            let (c, k, h, w) = (cs.c, cs.k, cs.h, cs.w);
            let wt: Vec<f32> = (0..k * c * 9).map(|_| rng.uniform(-0.1, 0.1)).collect();
            let cw = ConvWeights::new(wt.clone(), None, k, c, 3, 3);
            let ww = WinogradWeights::new(WinoTile::F2, &wt, None, k, c);
            let w4 = WinogradWeights::new(WinoTile::F4, &wt, None, k, c);
            let p = ConvParams::new(1, 1);
            let x: Vec<f32> = (0..n * c * h * w).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let mut yd = vec![0.0f32; n * k * h * w];
            let mut yw = vec![0.0f32; n * k * h * w];
            let mut ws = Vec::new();
            let mut direct = || conv2d_forward(&x, n, h, w, &cw, &p, None, true, &mut yd);
            let mut y4 = vec![0.0f32; n * k * h * w];
            let mut ws4 = Vec::new();
            let mut wino = || winograd_forward_nchw(&x, n, h, w, &ww, None, true, &mut yw, &mut ws);
            let mut wino4 = || winograd_forward_nchw(&x, n, h, w, &w4, None, true, &mut y4, &mut ws4);
            // Warm up and size the reps from one timed call of each.
            direct();
            wino();
            wino4();
            let t1 = time(1, threads, &mut direct).0.max(1e-5);
            let reps = ((0.1 / t1).ceil() as usize).clamp(3, 2000);
            let (mut dw, mut dc, mut ww_, mut wc) = (vec![], vec![], vec![], vec![]);
            let (mut w4w, mut w4c) = (vec![], vec![]);
            for _ in 0..rounds {
                let (a, b) = time(reps, threads, &mut wino4);
                w4w.push(a);
                w4c.push(b);
                let (a, b) = time(reps, threads, &mut direct);
                dw.push(a);
                dc.push(b);
                let (a, b) = time(reps, threads, &mut wino);
                ww_.push(a);
                wc.push(b);
            }
            let (dw, dc, wwm, wc) = (median(dw), median(dc), median(ww_), median(wc));
            let (w4w, w4c) = (median(w4w), median(w4c));
            let f = 2.0 * (n * k * c * 9 * h * w) as f64;
            // The counts behind the prediction (see the report): tiles, GEMM FLOPs, transform bytes.
            let t = n * h.div_ceil(2) * w.div_ceil(2);
            let fg = 2.0 * 16.0 * (k * c * t) as f64;
            let bytes = 4.0 * (2 * n * c * h * w + 2 * 16 * c * t + 2 * 16 * k * t + n * k * h * w) as f64;
            let ws_mb = workspace_len(&ww, n, h, w) as f64 * 4.0 / 1048576.0;
            println!(
                "n{n} {:<22} direct {:7.3} ms {:6.1} eff GFLOP/s (on-cpu {:6.1}) | winograd {:7.3} ms {:6.1} \
                 eff (on-cpu {:6.1}) | speed-up wall {:.2} on-cpu {:.2} | GEMM FLOP ratio {:.2}, \
                 transform {:.1} MB = {:.3} B/GEMM-FLOP, U {:.1} MB, ws {:.1} MB | F4 {:7.3} ms {:6.1} eff \
                 (on-cpu {:6.1}), vs F2 wall {:.2}",
                cs.name,
                dw * 1e3,
                f / dw / 1e9,
                f / dc / 1e9,
                wwm * 1e3,
                f / wwm / 1e9,
                f / wc / 1e9,
                dw / wwm,
                dc / wc,
                f / fg,
                bytes / 1e6,
                bytes / fg,
                16.0 * (k * c) as f64 * 4.0 / 1e6,
                ws_mb,
                w4w * 1e3,
                f / w4w / 1e9,
                f / w4c / 1e9,
                wwm / w4w,
            );
            tot_d += dc * cs.count as f64;
            tot_w += wc * cs.count as f64;
            tot_4 += w4c * cs.count as f64;
        }
        println!(
            "n{n}: all 3x3 stride-1 convs of one forward (x count), on-cpu: direct {:.2} ms, winograd {:.2} ms, F4 {:.2} ms",
            tot_d * 1e3,
            tot_w * 1e3,
            tot_4 * 1e3
        );
    }
}

/// ResNet-50 (v1.5) built here from the same seeded weights as `ResNet::random`, so each 3x3
/// stride-1 conv can run either way. Checked against `ResNet::random` before use.
struct Net {
    stem: Conv2d,
    /// (convs, downsample) per block, all stages in order.
    blocks: Vec<(Vec<Conv2d>, Option<Conv2d>)>,
    /// Winograd weights of each 3x3 stride-1 conv, by (block, conv index).
    wino: Vec<Vec<Option<WinogradWeights>>>,
}

impl Net {
    fn new(cfg: &ResNetConfig, seed: u64) -> Net {
        let shapes = state_dict_shapes(cfg);
        let dims = |name: &str| -> [usize; 4] {
            let d = &shapes.iter().find(|(n, _)| n == name).expect("name").1;
            [d[0], d[1], d[2], d[3]]
        };
        let get = |name: &str, d: &[usize]| Ok(init_tensor(name, d, seed));
        let load = |conv: &str, bn: &str, p: ConvParams| {
            Conv2d::load_conv_bn(&get, conv, bn, dims(&format!("{conv}.weight")), p).expect("random weights")
        };
        let stem = load("conv1", "bn1", ConvParams::new(2, 3));
        let mut blocks = Vec::new();
        for (li, &nb) in cfg.layers.iter().enumerate() {
            for bi in 0..nb {
                let pre = format!("layer{}.{bi}", li + 1);
                let stride = if bi == 0 && li > 0 { 2 } else { 1 };
                let convs = vec![
                    load(&format!("{pre}.conv1"), &format!("{pre}.bn1"), ConvParams::new(1, 0)),
                    load(&format!("{pre}.conv2"), &format!("{pre}.bn2"), ConvParams::new(stride, 1)),
                    load(&format!("{pre}.conv3"), &format!("{pre}.bn3"), ConvParams::new(1, 0)),
                ];
                let ds_name = format!("{pre}.downsample.0.weight");
                let ds = shapes.iter().any(|(n, _)| *n == ds_name).then(|| {
                    load(
                        &format!("{pre}.downsample.0"),
                        &format!("{pre}.downsample.1"),
                        ConvParams::new(stride, 0),
                    )
                });
                blocks.push((convs, ds));
            }
        }
        let wino = blocks
            .iter()
            .map(|(convs, _)| {
                convs
                    .iter()
                    .map(|cv| {
                        winograd_applicable(&cv.weights, &cv.params)
                            .then(|| WinogradWeights::from_conv(&cv.weights, WinoTile::F2).expect("3x3"))
                    })
                    .collect()
            })
            .collect();
        Net { stem, blocks, wino }
    }

    /// Pooled features (N, 2048); `use_wino` picks the path for the 3x3 stride-1 convs.
    fn forward(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        use_wino: bool,
        ws: &mut Vec<f32>,
    ) -> Vec<f32> {
        let conv = |cv: &Conv2d,
                    wn: Option<&WinogradWeights>,
                    x: &[f32],
                    h,
                    w,
                    res: Option<&[f32]>,
                    relu,
                    ws: &mut Vec<f32>| {
            let wt = &cv.weights;
            let (oh, ow) = cv.params.out_hw(h, w, wt.r, wt.s).unwrap();
            let mut y = vec![0.0f32; n * wt.k * oh * ow];
            match wn {
                Some(wn) if use_wino => winograd_forward_nchw(x, n, h, w, wn, res, relu, &mut y, ws),
                _ => conv2d_forward(x, n, h, w, wt, &cv.params, res, relu, &mut y),
            }
            (y, oh, ow)
        };
        let (t, h1, w1) = conv(&self.stem, None, x, h, w, None, true, ws);
        let mp = PoolParams::new(3, 2, 1);
        let (ph, pw) = mp.out_hw(h1, w1).unwrap();
        let c1 = self.stem.weights.k;
        let mut cur = vec![0.0f32; n * c1 * ph * pw];
        max_pool2d(&t, n, c1, h1, w1, &mp, &mut cur);
        let (mut h, mut w) = (ph, pw);
        for ((convs, ds), wino) in self.blocks.iter().zip(&self.wino) {
            let identity = ds.as_ref().map(|d| conv(d, None, &cur, h, w, None, false, ws).0);
            let (a, h1, w1) = conv(&convs[0], wino[0].as_ref(), &cur, h, w, None, true, ws);
            let (b, h2, w2) = conv(&convs[1], wino[1].as_ref(), &a, h1, w1, None, true, ws);
            let res = identity.as_deref().unwrap_or(&cur);
            let (o, h3, w3) = conv(&convs[2], wino[2].as_ref(), &b, h2, w2, Some(res), true, ws);
            (cur, h, w) = (o, h3, w3);
        }
        let c = self.blocks.last().unwrap().0[2].weights.k;
        let mut pooled = vec![0.0f32; n * c];
        global_avg_pool(&cur, n, c, h, w, &mut pooled);
        pooled
    }
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut r) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        d += (x as f64 - y as f64).powi(2);
        r += (y as f64).powi(2);
    }
    (d / r).sqrt()
}

fn resnet50(n: usize, rounds: usize) {
    let threads = rayon::current_num_threads();
    let cfg = ResNetConfig::resnet50();
    let seed = 7;
    let net = Net::new(&cfg, seed);
    let (h, w) = (224, 224);
    let x: Vec<f32> = {
        let mut rng = Rng::new(3);
        (0..n * 3 * h * w).map(|_| rng.uniform(-2.0, 2.0)).collect()
    };
    let mut ws = Vec::new();
    let direct = net.forward(&x, n, h, w, false, &mut ws);
    let wino = net.forward(&x, n, h, w, true, &mut ws);
    // This file's net must be the crate's ResNet-50 for the comparison to mean anything.
    let crate_net = ResNet::random(&cfg, seed);
    let xt = Tensor::from_vec(x.clone(), &[n, 3, h, w]).unwrap();
    let official = crate_net.features(&xt, FeatureLayer::Pooled).unwrap().to_f32_vec();
    println!("ResNet-50 224x224 batch {n}, seeded random weights, pooled features (N, 2048):");
    println!(
        "  this example's direct forward vs capgen's ResNet::random: rel L2 {:.2e}",
        rel_l2(&direct, &official)
    );
    println!("  winograd 3x3 s1 vs direct: rel L2 {:.2e}", rel_l2(&wino, &direct));
    let (mut dt, mut wt) = (vec![], vec![]);
    for _ in 0..rounds {
        dt.push(time(1, threads, &mut || {
            net.forward(&x, n, h, w, false, &mut ws);
        }));
        wt.push(time(1, threads, &mut || {
            net.forward(&x, n, h, w, true, &mut ws);
        }));
    }
    let f = 8.18e9 * n as f64;
    let (dw, dc) = (median(dt.iter().map(|t| t.0).collect()), median(dt.iter().map(|t| t.1).collect()));
    let (ww, wc) = (median(wt.iter().map(|t| t.0).collect()), median(wt.iter().map(|t| t.1).collect()));
    println!(
        "  whole forward ({threads} threads, median of {rounds}): direct {:.1} ms (on-cpu {:.1} ms, {:.0} GFLOP/s), \
         winograd {:.1} ms (on-cpu {:.1} ms, {:.0} GFLOP/s)",
        dw * 1e3,
        dc * 1e3,
        f / dc / 1e9,
        ww * 1e3,
        wc * 1e3,
        f / wc / 1e9
    );
}

/// Runs only the Winograd path of the 3x3 stride-1 shapes whose name contains `filter`, for `secs`
/// seconds each (to profile it with `perf record`; `WINO_TILE=f4` for F(4x4,3x3)).
fn profile(filter: &str, n: usize, secs: f64) {
    let mut rng = Rng::new(1);
    for cs in
        resnet50_conv_cases().into_iter().filter(|c| c.r == 3 && c.stride == 1 && c.name.contains(filter))
    {
        let (c, k, h, w) = (cs.c, cs.k, cs.h, cs.w);
        let wt: Vec<f32> = (0..k * c * 9).map(|_| rng.uniform(-0.1, 0.1)).collect();
        let tile =
            if std::env::var("WINO_TILE").is_ok_and(|t| t == "f4") { WinoTile::F4 } else { WinoTile::F2 };
        let ww = WinogradWeights::new(tile, &wt, None, k, c);
        let x: Vec<f32> = (0..n * c * h * w).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let mut y = vec![0.0f32; n * k * h * w];
        let mut ws = Vec::new();
        let t = Instant::now();
        let mut calls = 0;
        while t.elapsed().as_secs_f64() < secs {
            winograd_forward_nchw(&x, n, h, w, &ww, None, true, &mut y, &mut ws);
            calls += 1;
        }
        println!("{}: {calls} calls", cs.name);
    }
}

fn main() {
    // Run on a pool worker, as the `capgen` binary does (see `capgen::cli::main`): kernels called
    // from outside the pool pay a hand-over and wake-up per call.
    rayon::ThreadPoolBuilder::new().build().expect("thread pool").install(run)
}

fn run() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str).unwrap_or("shapes") {
        "resnet50" => {
            let n = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
            let rounds = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
            resnet50(n, rounds);
        }
        "profile" => {
            let filter = args.get(2).cloned().unwrap_or_default();
            let n = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
            let secs = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(2.0);
            profile(&filter, n, secs);
        }
        _ => {
            let rounds = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
            let mut batches: Vec<usize> = args.iter().skip(3).filter_map(|s| s.parse().ok()).collect();
            if batches.is_empty() {
                batches = vec![1, 8];
            }
            shapes(rounds, &batches);
        }
    }
}
