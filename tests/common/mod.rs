//! Helpers shared by the tests that run the `capgen` binary.
#![allow(dead_code)] // each test crate uses a different subset

pub mod fd;

use std::path::{Path, PathBuf};
use std::process::Command;

pub const BIN: &str = env!("CARGO_BIN_EXE_capgen");

/// A path for one test's files under the temp dir, removed if left over; `create` makes it.
pub fn tmp_path(test: &str, create: bool) -> PathBuf {
    let d = std::env::temp_dir().join(format!("capgen-test-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    if create {
        std::fs::create_dir_all(&d).unwrap();
    }
    d
}

/// A fresh empty directory for one test.
pub fn tmp(test: &str) -> PathBuf {
    tmp_path(test, true)
}

/// Runs the binary: (exit code, stdout, stderr).
pub fn capgen(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run capgen");
    let s = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.code().unwrap_or(-1), s(out.stdout), s(out.stderr))
}

/// The run failed with exactly one stderr line that mentions every `needles` and no panic.
pub fn assert_one_line_error(args: &[&str], needles: &[&str]) {
    let (code, _, err) = capgen(args);
    assert_ne!(code, 0, "{args:?} succeeded; stderr: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: expected one line, got:\n{err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr {err:?} does not mention {n:?}");
    }
}

/// Relative L2 error ||ours - reference|| / ||reference||, accumulated in f64, against an f32 or
/// f64 reference. A NaN or infinity in `ours` counts as an infinite error (it must fail, not vanish
/// in a `max` or a `<=`); an all-zero reference is refused, since the check would be vacuous.
pub fn rel_l2<R: Copy + Into<f64>>(ours: &[f32], reference: &[R]) -> f64 {
    assert_eq!(ours.len(), reference.len(), "length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &b) in ours.iter().zip(reference) {
        let b: f64 = b.into();
        num += (a as f64 - b).powi(2);
        den += b * b;
    }
    assert!(den > 0.0, "reference is all zeros: the check would be vacuous");
    let e = (num / den).sqrt();
    if e.is_finite() {
        e
    } else {
        f64::INFINITY
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
