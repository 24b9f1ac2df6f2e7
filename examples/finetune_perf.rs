//! Fine-tuning encoder cost, on-CPU time (docs/PERF.md method): ResNet-50 at 224 with layer4 (3
//! blocks) trainable and batch-norm statistics frozen, as `capgen train --fine-tune-encoder` runs it.
//! Per round, for the frozen pieces unfolded (conv, then BN and ReLU passes, weights re-packed each
//! call) and folded (`TrainResNet::fold_frozen`: BN folded, weights packed once, epilogue fused):
//! the training forward (grid features) and the layer4 backward.
//!
//! `RAYON_NUM_THREADS=1 cargo run --release --example finetune_perf [images] [rounds]` (default 2, 3).

use capgen::cpu::peak::process_cpu_ns as cpu_ns;
use capgen::nn::resnet::ResNetConfig;
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
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|s| s.parse().ok()).collect();
    let (n, rounds) = (args.first().copied().unwrap_or(2), args.get(1).copied().unwrap_or(3));
    let mut unfolded = TrainResNet::random(&ResNetConfig::resnet50(), 1);
    unfolded.freeze_all_but_last(3);
    unfolded.set_bn_frozen(true);
    let mut folded = unfolded.clone();
    folded.fold_frozen();
    let x = uniform_vec(1, "x", n * 3 * 224 * 224, -2.0, 2.0);
    println!("resnet50 224, {n} images, layer4 trainable, {} threads", rayon::current_num_threads());
    for round in 0..rounds {
        // Interleaved, so both see the same machine load.
        for (name, net) in [("unfolded", &mut unfolded), ("folded", &mut folded)] {
            let (c0, t0) = (cpu_ns(), Instant::now());
            let (f, cache) = net.forward_train(&x, n, 224, 224, FeatureLayer::Grid).expect("forward");
            let (c1, t1) = (cpu_ns(), Instant::now());
            net.zero_grad();
            net.backward(&cache, &f).expect("backward");
            let c2 = cpu_ns();
            println!(
                "round {round} {name:8}: forward {:.0} ms on-CPU ({:.0} ms wall), layer4 backward {:.0} ms on-CPU",
                (c1 - c0) as f64 / 1e6,
                (t1 - t0).as_secs_f64() * 1e3,
                (c2 - c1) as f64 / 1e6
            );
        }
    }
}
