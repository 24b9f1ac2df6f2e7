//! Times TrainResNet forward_train + backward (batch-norm in training mode, grid features) on random
//! 96x96 images, the demo's scale. A measurement tool, not a test.
//!
//!     cargo run --release --example cnn_train_perf -- [batch] [width] [blocks-per-stage] [basic|bottleneck]
//!
//! Prints the median of 5 timed steps (after 1 warm-up) for the forward, the backward and both.

use capgen::nn::resnet::{BlockKind, ResNetConfig};
use capgen::nn::train_resnet::TrainResNet;
use capgen::nn::FeatureLayer;
use capgen::rng::uniform_vec;
use std::time::Instant;

fn main() {
    // Run on a pool worker, as the `capgen` binary does (see `capgen::cli::main`): kernels called
    // from outside the pool pay a hand-over and wake-up per call.
    rayon::ThreadPoolBuilder::new().build().expect("thread pool").install(run)
}

fn run() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (batch, width, blocks) = (arg(1, 32), arg(2, 16), arg(3, 1));
    let block = if args.get(4).map(|s| s.as_str()) == Some("bottleneck") {
        BlockKind::Bottleneck
    } else {
        BlockKind::Basic
    };
    let cfg = ResNetConfig { block, layers: [blocks; 4], width, num_classes: 10 };
    let mut net = TrainResNet::random(&cfg, 1);
    let nparams: usize = net.params.iter().map(|p| p.data.len()).sum();
    let (h, w) = (96, 96);
    let x = uniform_vec(2, "x", batch * 3 * h * w, -2.0, 2.0);
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    for it in 0..6 {
        let t0 = Instant::now();
        let (g, cache) = net.forward_train(&x, batch, h, w, FeatureLayer::Grid).unwrap();
        let t1 = Instant::now();
        net.backward(&cache, &g).unwrap();
        let t2 = Instant::now();
        if it > 0 {
            fwd.push((t1 - t0).as_secs_f64() * 1e3);
            bwd.push((t2 - t1).as_secs_f64() * 1e3);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (f, b) = (med(&mut fwd), med(&mut bwd));
    println!(
        "{} ({nparams} params), batch {batch} at {h}x{w}, {} threads: forward {f:.1} ms, backward {b:.1} ms, \
         total {:.1} ms",
        cfg.name(),
        rayon::current_num_threads(),
        f + b
    );
}
