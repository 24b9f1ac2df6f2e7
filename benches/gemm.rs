//! SGEMM throughput: square 256..2048 and the GEMMs ResNet-50's 1x1 convs produce (M = out
//! channels, N = pixels, K = in channels at batch 1). Throughput is reported as elements/s with one
//! "element" per FLOP, so criterion's "Gelem/s" reads as GFLOP/s; the FMA peak measured at start
//! is printed for the percentage. Few samples, short runs: the machine is shared.
//! Run: `cargo bench --bench gemm` (`CAPGEN_ISA=avx2` or `portable` to measure a narrower path).
use capgen::cpu::gemm::{sgemm, Epilogue, MatRef};
use capgen::cpu::peak::{fma_peak_gflops, isa_name};
use capgen::rng::Rng;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;

fn bench_gemm(cr: &mut Criterion) {
    let threads = rayon::current_num_threads();
    eprintln!("isa {} threads {threads} fma peak {:.1} GFLOP/s", isa_name(), fma_peak_gflops(threads));
    let mut g = cr.benchmark_group("sgemm");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let square = [256, 512, 1024, 2048].map(|s| (s, s, s));
    // (M, N, K) of ResNet-50's 1x1 convs at 224x224, batch 1.
    let resnet = [
        (64, 3136, 64),
        (256, 3136, 64),
        (64, 3136, 256),
        (128, 3136, 256),
        (512, 784, 128),
        (128, 784, 512),
        (256, 784, 512),
        (1024, 196, 256),
        (256, 196, 1024),
        (512, 196, 1024),
        (2048, 49, 512),
        (512, 49, 2048),
    ];
    let mut rng = Rng::new(7);
    for (m, n, k) in square.into_iter().chain(resnet) {
        let a: Vec<f32> = (0..m * k).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let mut c = vec![0.0f32; m * n];
        g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        g.bench_function(BenchmarkId::from_parameter(format!("{m}x{n}x{k}")), |bch| {
            bch.iter(|| {
                sgemm(
                    MatRef::row_major(&a, m, k),
                    MatRef::row_major(&b, k, n),
                    &mut c,
                    n,
                    &Epilogue::default(),
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_gemm);
criterion_main!(benches);
