//! ResNet-50 forward throughput for the optimisation log (docs/PERF.md), on-CPU as well as wall:
//! `cargo run --release --example resnet_perf [batch] [reps]` (seeded random weights, 224x224).
//! Prints, per forward, wall median / best ms and the on-CPU ms (CPU time of all threads from
//! /proc/self/task/*/schedstat divided by the thread count), and GFLOP/s from each. One warm-up
//! forward fills the activation pool first. (Timings belong here and in benches, never in tests.)
use capgen::cli::bench::resnet50_flops_per_image;
use capgen::cpu::peak::process_cpu_ns as cpu_ns;
use capgen::nn::{load_encoder, EncoderKind};
use capgen::rng::Rng;
use capgen::tensor::Tensor;
use std::time::Instant;

fn main() {
    // Run on a pool worker, as the `capgen` binary does (see `capgen::cli::main`).
    rayon::ThreadPoolBuilder::new().build().expect("thread pool").install(run)
}

fn run() {
    let args: Vec<String> = std::env::args().collect();
    let batch: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let threads = rayon::current_num_threads();
    let enc = load_encoder(EncoderKind::ResNet50, "random", 0).expect("random weights");
    let mut rng = Rng::new(3);
    let x: Vec<f32> = (0..batch * 3 * 224 * 224).map(|_| rng.uniform(-2.0, 2.0)).collect();
    let x = Tensor::from_vec(x, &[batch, 3, 224, 224]).unwrap();
    enc.logits(&x).unwrap();
    let flops = resnet50_flops_per_image() * batch as f64;
    let mut wall = Vec::new();
    let c0 = cpu_ns();
    for _ in 0..reps {
        let t = Instant::now();
        enc.logits(&x).unwrap();
        wall.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let cpu_ms = (cpu_ns() - c0) as f64 / 1e6 / threads as f64 / reps as f64;
    wall.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (med, best) = (wall[reps / 2], wall[0]);
    println!(
        "resnet50 b{batch} threads {threads}: wall median {med:.1} ms, best {best:.1} ms ({:.0} GFLOP/s); \
         on-cpu {cpu_ms:.1} ms ({:.0} GFLOP/s)",
        flops / best / 1e6,
        flops / cpu_ms / 1e6
    );
}
