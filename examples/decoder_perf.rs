//! On-CPU timing of the decoder training steps of `capgen bench train-step` (issue 3, Performance),
//! for comparing builds on a shared machine (docs/PERF.md, "on-CPU throughput").
//!
//! ```text
//! cargo run --release --example decoder_perf -- [attention|show-tell|both] [reps] [threads] [batch]
//! ```
//!
//! Each rep is one full step (zero grads, forward, loss, backward, Adam) at the bench sizes. Prints per
//! rep the wall time and the on-CPU time of all of the pool's threads (Linux schedstat) divided by
//! the thread count: what the step would take if the threads were never descheduled. Rayon workers
//! spinning while they wait count as busy, so with 2 threads this errs high. Median of the reps.

use capgen::cli::bench::{StepFixture, DECODER_BENCH, DECODER_BENCH_DIMS};
use capgen::cpu::peak::process_cpu_ns as cpu_ns;
use capgen::model::checkpoint::DecoderKind;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let what = args.get(1).map(String::as_str).unwrap_or("both");
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let threads: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let batch: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(DECODER_BENCH.0);
    let kinds: Vec<DecoderKind> = match what {
        "attention" => vec![DecoderKind::Attention],
        "show-tell" => vec![DecoderKind::ShowTell],
        _ => vec![DecoderKind::Attention, DecoderKind::ShowTell],
    };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
    let d = DECODER_BENCH_DIMS;
    for kind in kinds {
        let mut fx = StepFixture::new(kind, &d, batch, DECODER_BENCH.1, 4);
        pool.install(|| fx.step(&d)).expect("warm-up step");
        let (mut wall, mut oncpu) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let c0 = cpu_ns();
            let t0 = std::time::Instant::now();
            pool.install(|| fx.step(&d)).expect("step");
            wall.push(t0.elapsed().as_secs_f64() * 1e3);
            oncpu.push((cpu_ns() - c0) as f64 / 1e6 / threads as f64);
        }
        println!(
            "{} B{batch} threads {threads}: wall median {:.1} ms (min {:.1}), on-cpu median {:.1} ms (min {:.1})",
            kind.name(),
            median(wall.clone()),
            wall.iter().cloned().fold(f64::INFINITY, f64::min),
            median(oncpu.clone()),
            oncpu.iter().cloned().fold(f64::INFINITY, f64::min),
        );
    }
}
