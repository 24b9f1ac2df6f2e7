//! Keeping the pool's other workers awake for the length of one compute-heavy call.
//!
//! A rayon worker that finds no work goes to sleep after a few microseconds, and waking it costs a
//! futex wake and, in a VM, an inter-processor interrupt through the hypervisor. Measured on this
//! project's 2-vCPU KVM machines: a parallel region of two 20 us tasks takes 21 us when the other
//! worker was busy until just before, and 40-90 us when it had been idle for 20 us or more. A
//! ResNet-50 forward runs over a hundred parallel regions (every conv, Winograd transform and pool)
//! separated by short serial stretches, so most regions paid that wake-up.
//!
//! `hot(f)` runs `f` on the calling worker while every other worker of the pool runs a job that
//! executes whatever pool work is pending (`rayon::yield_now`) and otherwise spins (PAUSE), until
//! `f` returns. The price: those cores stay busy for the call's duration (what OpenMP's active wait
//! policy and onnxruntime's spinning thread pool do by default). Only the encoders' forwards use it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `hot` calls running now, in any pool; while one runs, others (in this pool or another) just run
/// their closure, without spinners of their own.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// A spinner that found no work for this long returns (and its worker may sleep again); so does one
/// that starts this long after `hot` queued it. Within a forward the serial stretches are tens of
/// microseconds, and an idle worker picks its copy up within ~0.1 ms. The late start is the risky
/// case: a worker that was busy when `hot` began picks its copy up from inside a wait of its own
/// (rayon runs pending broadcast jobs there), and while it spins it does not return to that wait;
/// if the caller's work kept coming, the worker's own task would stall until the caller's `f`
/// ends. Bounding idleness alone would not prevent that, hence both limits.
const MAX_IDLE: Duration = Duration::from_millis(1);

/// Decrements `ACTIVE` and stops the spinners when the call ends, however it ends.
struct Active(Option<Arc<AtomicBool>>);

impl Drop for Active {
    fn drop(&mut self) {
        if let Some(stop) = &self.0 {
            stop.store(true, Ordering::Release);
        }
        ACTIVE.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs `f`, with the other workers of the current rayon pool kept spinning (see the module doc).
/// Outside a pool, in a one-thread pool, or while another `hot` call runs it is just `f()`. A
/// worker still spinning for a concurrent call in the same pool can delay its own task until that
/// call ends (see `MAX_IDLE`); the encoders are run one forward at a time.
pub fn hot<R>(f: impl FnOnce() -> R) -> R {
    let Some(me) = rayon::current_thread_index() else { return f() };
    if rayon::current_num_threads() < 2 {
        return f();
    }
    if ACTIVE.fetch_add(1, Ordering::AcqRel) > 0 {
        let _active = Active(None);
        return f();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    // One copy per worker, each run by that worker only (broadcast jobs are not stolen); the
    // caller's own copy returns at once, whenever it gets to it.
    let queued = Instant::now();
    rayon::spawn_broadcast(move |ctx| {
        if ctx.index() == me || queued.elapsed() > MAX_IDLE {
            return;
        }
        let mut last = Instant::now();
        while !flag.load(Ordering::Acquire) {
            if rayon::yield_now() == Some(rayon::Yield::Executed) {
                last = Instant::now();
            } else if last.elapsed() > MAX_IDLE {
                return;
            } else {
                std::hint::spin_loop();
            }
        }
    });
    let _active = Active(Some(stop));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Work inside `hot` runs on both workers and gives what it gives without it; nested calls and
    /// calls outside a pool just run; afterwards the pool still runs other work (the spinners
    /// stopped). Also two `hot` calls at once on the two workers of one pool (each may end up
    /// spinning for the other's call: the idle limit must keep that from hanging).
    #[test]
    fn hot_runs_parallel_work_and_stops() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let want: u64 = (0..100_000u64).map(|i| i * i % 7).sum();
        for _ in 0..20 {
            let got = pool.install(|| {
                hot(|| {
                    let inner = hot(|| (0..100_000u64).into_par_iter().map(|i| i * i % 7).sum::<u64>());
                    let threads: std::collections::HashSet<usize> = (0..64)
                        .into_par_iter()
                        .map(|_| {
                            std::thread::sleep(std::time::Duration::from_micros(200));
                            rayon::current_thread_index().unwrap()
                        })
                        .collect();
                    assert_eq!(threads.len(), 2, "both workers took part");
                    inner
                })
            });
            assert_eq!(got, want);
        }
        assert_eq!(hot(|| 3), 3, "outside a pool");
        let total: u64 = pool.install(|| (0..1000u64).into_par_iter().sum());
        assert_eq!(total, 499_500);
        let sums: Vec<u64> = pool.install(|| {
            (0..8u64)
                .into_par_iter()
                .map(|j| hot(|| (0..50_000u64).into_par_iter().map(|i| (i + j) % 5).sum::<u64>()))
                .collect()
        });
        for (j, &s) in sums.iter().enumerate() {
            assert_eq!(s, (0..50_000u64).map(|i| (i + j as u64) % 5).sum::<u64>());
        }
    }
}
