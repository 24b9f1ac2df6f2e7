//! The machine's measured f32 FMA peak, so benchmarks report percent of *this* machine's peak.
//!
//! One thread runs a loop of independent fused multiply-adds on the widest vectors the CPU has
//! (AVX-512, else AVX2+FMA, else a portable loop LLVM vectorises for the baseline target). Modern
//! cores retire two vector FMAs per cycle with a latency of about 4 cycles, so at least 8 independent
//! accumulator chains are needed to keep both ports busy; we use 12 (AVX-512/AVX2: 12 registers of
//! accumulators plus 2 multiplier registers fit in 16 or 32 registers without spilling).

use crate::cpu::gemm::{detect_isa, Isa};
use std::time::Instant;

/// The instruction set the GEMM (and the peak loop) use on this CPU: "avx512", "avx2+fma" or
/// "portable".
pub fn isa_name() -> &'static str {
    detect_isa().name()
}

/// Iterations of the inner loop per timed run (per thread). 12 accumulators x 16 lanes x 2 FLOPs x
/// 2M iterations = 768 MFLOP per AVX-512 thread, a few ms at ~100 GFLOP/s/core: long enough to
/// swamp timer and thread-start noise, short enough for a bench preamble.
const ITERS: usize = 2_000_000;

/// Measured peak f32 throughput in GFLOP/s (an FMA counts 2 FLOPs) of `threads` threads, using
/// the widest FMA this CPU has: one core's peak, measured on one thread (best of 7 runs: the peak
/// is a maximum, so noise only lowers it), times the cores those threads can occupy, i.e. `threads`
/// but at most the physical cores (`physical_cores`: two hyperthreads share one core's FMA units).
///
/// Why not all threads at once: on a shared VM the vCPUs are sometimes placed on the two
/// hyperthreads of one core. Measured here (Zen 4, 2 vCPUs), one thread read 116-118 GFLOP/s in
/// every one of 20 runs, while two concurrent threads read anywhere from 117 (one core's worth)
/// to 231, depending on the moment; a GEMM timed a second after a low reading then ran at "140%
/// of peak". The per-core figure is stable, and times `threads` it is what that many real cores
/// give (at most the single-core clock's few percent over the all-core one: conservative).
pub fn fma_peak_gflops(threads: usize) -> f64 {
    let isa = detect_isa();
    let mut best = 0.0f64;
    for _ in 0..7 {
        let t0 = Instant::now();
        let flops = run_loop(isa, ITERS);
        best = best.max(flops / t0.elapsed().as_secs_f64() / 1e9);
    }
    let cores = physical_cores().map_or(threads, |p| threads.min(p));
    best * cores.max(1) as f64
}

/// Physical cores of this machine where Linux tells them (distinct (package, core) pairs among the
/// online CPUs in /sys), else `None`. A VM sees what its hypervisor presents (here: 2 cores of one
/// thread each).
pub fn physical_cores() -> Option<usize> {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    let mut cpus = Vec::new();
    for part in online.trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        cpus.extend(a.parse::<usize>().ok()?..=b.parse::<usize>().ok()?);
    }
    let mut cores = std::collections::BTreeSet::new();
    for cpu in cpus {
        let read =
            |f: &str| std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu{cpu}/topology/{f}")).ok();
        cores.insert((read("physical_package_id")?.trim().to_string(), read("core_id")?.trim().to_string()));
    }
    (!cores.is_empty()).then_some(cores.len())
}

/// Runs the FMA loop once; returns the FLOPs it performed.
fn run_loop(isa: Isa, iters: usize) -> f64 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: detect_isa only returns Avx512 when the CPU supports avx512f.
        Isa::Avx512 => unsafe { x86::fma_loop_avx512(iters) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: detect_isa only returns Avx2Fma when the CPU supports avx2 and fma.
        Isa::Avx2Fma => unsafe { x86::fma_loop_avx2(iters) },
        _ => fma_loop_portable(iters),
    }
}

/// 48 independent chains (12 SSE/NEON registers of 4 lanes: 8+ chains cover 2 ports x 4 cycles
/// latency, 12 + 2 operands fit 16 registers without spilling), a flat array LLVM vectorises for whatever baseline the
/// target has (SSE2 on x86-64, NEON on aarch64; without FMA hardware this is mul + add).
fn fma_loop_portable(iters: usize) -> f64 {
    let mut acc = [1.0f32; 48];
    let x = std::hint::black_box(0.999_999f32);
    let y = std::hint::black_box(1e-7f32);
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = crate::cpu::gemm::madd(*a, x, y);
        }
    }
    std::hint::black_box(acc);
    (iters * 48 * 2) as f64
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support avx512f.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma_loop_avx512(iters: usize) -> f64 {
        let x = _mm512_set1_ps(std::hint::black_box(0.999_999));
        let y = _mm512_set1_ps(std::hint::black_box(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); 12];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, x, y);
            }
        }
        let mut s = acc[0];
        for a in &acc[1..] {
            s = _mm512_add_ps(s, *a);
        }
        std::hint::black_box(_mm512_reduce_add_ps(s));
        (iters * 12 * 16 * 2) as f64
    }

    /// # Safety
    /// The CPU must support avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma_loop_avx2(iters: usize) -> f64 {
        let x = _mm256_set1_ps(std::hint::black_box(0.999_999));
        let y = _mm256_set1_ps(std::hint::black_box(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); 12];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, x, y);
            }
        }
        let mut s = acc[0];
        for a in &acc[1..] {
            s = _mm256_add_ps(s, *a);
        }
        let mut out = [0.0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        std::hint::black_box(out);
        (iters * 12 * 8 * 2) as f64
    }
}

/// Nanoseconds all of this process's threads have spent on a CPU (Linux schedstat; 0 elsewhere).
/// The "on-CPU" timing of docs/PERF.md: on a machine shared with other busy processes, FLOPs per
/// on-CPU second per thread shows what a kernel does when it runs, independent of how often it is
/// descheduled. Rayon workers that spin while waiting count as busy, so it errs low.
pub fn process_cpu_ns() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return 0 };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_is_positive_and_finite() {
        // Not a timing test: only checks the loop runs and the arithmetic of the result is sane.
        let p = fma_peak_gflops(1);
        assert!(p.is_finite() && p > 0.1, "peak {p}");
        assert!(["avx512", "avx2+fma", "portable"].contains(&isa_name()));
        if let Some(c) = physical_cores() {
            let cpus = std::thread::available_parallelism().map_or(c, |n| n.get());
            assert!(c >= 1 && c <= cpus, "{c} cores of {cpus} CPUs");
        }
    }
}
