//! Quick GEMM / conv throughput check for the optimisation log (docs/PERF.md):
//! `cargo run --release --example gemm_perf [gemm|conv] [reps] [MxNxK ... | conv name filter]`. Prints median and best GFLOP/s of
//! `reps` runs and the percentage of the FMA peak measured in the same run. (Timings belong here and
//! in benches, never in tests.)
use capgen::cpu::conv::{conv2d_forward, resnet50_conv_cases, ConvParams, ConvWeights};
use capgen::cpu::gemm::{sgemm, Epilogue, MatRef};
use capgen::cpu::peak::{fma_peak_gflops, isa_name, process_cpu_ns as cpu_ns};
use capgen::rng::Rng;
use std::time::Instant;

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0])
}

fn main() {
    // Run on a pool worker, as the `capgen` binary does (see `capgen::cli::main`): kernels called
    // from outside the pool pay a hand-over and wake-up per call.
    rayon::ThreadPoolBuilder::new().build().expect("thread pool").install(run)
}

fn run() {
    let args: Vec<String> = std::env::args().collect();
    let what = args.get(1).map(String::as_str).unwrap_or("gemm");
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(7);
    let threads = rayon::current_num_threads();
    let peak = fma_peak_gflops(threads);
    println!("isa {} threads {threads} peak {peak:.1} GFLOP/s", isa_name());
    let mut rng = Rng::new(1);
    let custom: Vec<(usize, usize, usize)> = args
        .iter()
        .skip(3)
        .filter_map(|s| {
            let v: Vec<usize> = s.split('x').filter_map(|t| t.parse().ok()).collect();
            (v.len() == 3).then(|| (v[0], v[1], v[2]))
        })
        .collect();
    if what == "gemm" {
        let default = [
            (256, 256, 256),
            (512, 512, 512),
            (1024, 1024, 1024),
            (2048, 2048, 2048),
            (64, 3136, 256),
            (256, 3136, 64),
            (128, 784, 512),
            (512, 784, 128),
            (256, 196, 1024),
            (1024, 196, 256),
            (512, 49, 2048),
            (2048, 49, 512),
        ];
        for &(m, n, k) in if custom.is_empty() { &default[..] } else { &custom[..] } {
            let a: Vec<f32> = (0..m * k).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let mut c = vec![0.0f32; m * n];
            let run = |c: &mut [f32]| {
                sgemm(MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n), c, n, &Epilogue::default())
            };
            run(&mut c);
            let cpu0 = cpu_ns();
            let ts: Vec<f64> = (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    run(&mut c);
                    t.elapsed().as_secs_f64()
                })
                .collect();
            let cpu_s = (cpu_ns() - cpu0) as f64 * 1e-9 / reps as f64 / threads as f64;
            let (med, best) = stats(ts);
            let f = 2.0 * (m * n * k) as f64 / 1e9;
            println!(
                "gemm {m}x{n}x{k}: median {:.3} ms {:.1} GFLOP/s ({:.0}% peak), best {:.1} ({:.0}%), \
                 on-cpu {:.1} ({:.0}%)",
                med * 1e3,
                f / med,
                100.0 * f / med / peak,
                f / best,
                100.0 * f / best / peak,
                f / cpu_s,
                100.0 * f / cpu_s / peak
            );
        }
    } else {
        let (mut tot_med, mut tot_cpu) = (0.0, 0.0);
        // Optional third argument: only cases whose name contains it (e.g. "conv1", "l4").
        let filter = args.get(3).cloned().unwrap_or_default();
        for cs in resnet50_conv_cases().into_iter().filter(|c| c.name.contains(filter.as_str())) {
            let wt: Vec<f32> = (0..cs.k * cs.c * cs.r * cs.s).map(|_| rng.uniform(-0.1, 0.1)).collect();
            let w = ConvWeights::new(wt, None, cs.k, cs.c, cs.r, cs.s);
            let p = ConvParams::new(cs.stride, cs.pad);
            let (oh, ow) = p.out_hw(cs.h, cs.w, cs.r, cs.s).unwrap();
            let x: Vec<f32> = (0..cs.n * cs.c * cs.h * cs.w).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let mut y = vec![0.0f32; cs.n * cs.k * oh * ow];
            conv2d_forward(&x, cs.n, cs.h, cs.w, &w, &p, None, true, &mut y);
            let cpu0 = cpu_ns();
            let ts: Vec<f64> = (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    conv2d_forward(&x, cs.n, cs.h, cs.w, &w, &p, None, true, &mut y);
                    t.elapsed().as_secs_f64()
                })
                .collect();
            let cpu_s = (cpu_ns() - cpu0) as f64 * 1e-9 / reps as f64 / threads as f64;
            let (med, best) = stats(ts);
            tot_med += med * cs.count as f64;
            tot_cpu += cpu_s * cs.count as f64;
            let f = cs.flops() / 1e9;
            println!(
                "conv {:<28} x{:<2} median {:.3} ms {:.1} GFLOP/s ({:.0}% peak), best {:.1}, on-cpu {:.1} \
                 ({:.0}%)",
                cs.name,
                cs.count,
                med * 1e3,
                f / med,
                100.0 * f / med / peak,
                f / best,
                f / cpu_s,
                100.0 * f / cpu_s / peak
            );
        }
        println!(
            "sum over ResNet-50 convs (x count): median {:.1} ms, on-cpu {:.1} ms",
            tot_med * 1e3,
            tot_cpu * 1e3
        );
    }
}
