//! Per-op wall times inside an encoder forward, for `capgen bench resnet50 --layers`.
//!
//! Off by default: each op then costs one thread-local flag read. When on, every timed op appends
//! (label, FLOPs, milliseconds) to the log, which `take` empties. Flag and log belong to the
//! calling thread: a forward times its ops one after the other on the thread that runs it (the
//! forward is sequential; each op is parallel inside), so the times add up to the forward's wall
//! time, less the glue between ops, and forwards on other threads (tests running in parallel)
//! neither record nor disturb the log.

use std::cell::{Cell, RefCell};
use std::time::Instant;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static LOG: RefCell<Vec<OpTime>> = const { RefCell::new(Vec::new()) };
}

/// One timed op.
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    pub label: String,
    /// Multiply-adds x 2 of the op as written (a convolution's direct FLOPs, also when it runs as
    /// Winograd), 0 for ops that are not counted (pooling).
    pub flops: f64,
    pub ms: f64,
}

/// Turns recording on or off for the calling thread.
pub fn set_enabled(on: bool) {
    ON.with(|f| f.set(on));
}

/// Runs `f`; when recording is on, logs its wall time under `label()` with `flops`.
#[inline]
pub fn time<R>(label: impl FnOnce() -> (String, f64), f: impl FnOnce() -> R) -> R {
    if !ON.with(Cell::get) {
        return f();
    }
    let t = Instant::now();
    let r = f();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let (label, flops) = label();
    LOG.with(|l| l.borrow_mut().push(OpTime { label, flops, ms }));
    r
}

/// Everything the calling thread logged since the last call, in order.
pub fn take() -> Vec<OpTime> {
    LOG.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

/// Sums a log of `forwards` forwards by label, in first-seen order: (label, ops per forward, FLOPs
/// per forward, ms per forward).
pub fn per_forward(log: &[OpTime], forwards: usize) -> Vec<(String, usize, f64, f64)> {
    let mut rows: Vec<(String, usize, f64, f64)> = Vec::new();
    for op in log {
        match rows.iter_mut().find(|r| r.0 == op.label) {
            Some(r) => {
                r.1 += 1;
                r.2 += op.flops;
                r.3 += op.ms;
            }
            None => rows.push((op.label.clone(), 1, op.flops, op.ms)),
        }
    }
    let f = forwards.max(1);
    rows.into_iter().map(|(l, c, fl, ms)| (l, c / f, fl / f as f64, ms / f as f64)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_when_on_and_sums_per_forward() {
        // (Thread-local: the other tests' forwards, in parallel, do not log here.)
        set_enabled(false);
        time(|| ("off".into(), 1.0), || ());
        set_enabled(true);
        for _ in 0..2 {
            time(|| ("a".into(), 10.0), || std::thread::sleep(std::time::Duration::from_millis(2)));
            time(|| ("b".into(), 0.0), || ());
            time(|| ("a".into(), 10.0), || ());
        }
        set_enabled(false);
        time(|| ("off".into(), 1.0), || ());
        let log = take();
        assert_eq!(log.len(), 6, "{log:?}");
        assert!(take().is_empty());
        let rows = per_forward(&log, 2);
        assert_eq!(
            rows.iter().map(|r| (r.0.as_str(), r.1, r.2)).collect::<Vec<_>>(),
            [("a", 2, 20.0), ("b", 1, 0.0)]
        );
        assert!(rows[0].3 >= 2.0, "the sleep is timed: {rows:?}");
    }
}
