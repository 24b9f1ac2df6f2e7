//! Convolution throughput on every distinct ResNet-50 conv shape at 224x224, batch 1
//! (`resnet50_conv_cases`), with ReLU fused as in the network. Throughput is reported as
//! elements/s with one "element" per FLOP, so "Gelem/s" reads as GFLOP/s; the FMA peak measured at
//! start is printed for the percentage. Run: `cargo bench --bench conv`.
use capgen::cpu::conv::{conv2d_forward, resnet50_conv_cases, ConvParams, ConvWeights};
use capgen::cpu::peak::{fma_peak_gflops, isa_name};
use capgen::rng::Rng;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;

fn bench_conv(cr: &mut Criterion) {
    let threads = rayon::current_num_threads();
    eprintln!("isa {} threads {threads} fma peak {:.1} GFLOP/s", isa_name(), fma_peak_gflops(threads));
    let mut g = cr.benchmark_group("conv2d");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    let mut rng = Rng::new(11);
    for cs in resnet50_conv_cases() {
        let wt: Vec<f32> = (0..cs.k * cs.c * cs.r * cs.s).map(|_| rng.uniform(-0.1, 0.1)).collect();
        let bias: Vec<f32> = (0..cs.k).map(|_| rng.uniform(-0.1, 0.1)).collect();
        let w = ConvWeights::new(wt, Some(bias), cs.k, cs.c, cs.r, cs.s);
        let p = ConvParams::new(cs.stride, cs.pad);
        let (oh, ow) = p.out_hw(cs.h, cs.w, cs.r, cs.s).expect("valid case");
        let x: Vec<f32> = (0..cs.n * cs.c * cs.h * cs.w).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let mut y = vec![0.0f32; cs.n * cs.k * oh * ow];
        g.throughput(Throughput::Elements(cs.flops() as u64));
        g.bench_function(BenchmarkId::from_parameter(cs.name), |bch| {
            bch.iter(|| conv2d_forward(&x, cs.n, cs.h, cs.w, &w, &p, None, true, &mut y))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_conv);
criterion_main!(benches);
