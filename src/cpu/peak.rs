//! The machine's measured f32 FMA peak, so benchmarks report percent of *this* machine's peak.

/// Measured peak f32 throughput in GFLOP/s (an FMA counts 2 FLOPs) with `threads` threads, using
/// the widest FMA this CPU has.
pub fn fma_peak_gflops(threads: usize) -> f64 {
    let _ = threads;
    f64::NAN // placeholder until the FMA loop lands
}
