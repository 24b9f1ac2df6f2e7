//! Finite-difference checking helpers shared by tests/grad_check.rs and tests/cnn_grad.rs (their
//! module comments state the method and the tolerances).

use capgen::rng::uniform_vec;

/// Central-difference step: truncation ~h^2 = 1e-10, rounding ~1e-16/h = 1e-11 in f64.
pub const FD_STEP: f64 = 1e-5;

/// `n` seeded values uniform in [-scale, scale) from the stream `name`.
pub fn rnd(name: &str, n: usize, scale: f32) -> Vec<f32> {
    uniform_vec(42, name, n, -scale, scale)
}

pub fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

pub use super::rel_l2;

pub fn check(what: &str, ours: &[f32], reference: &[f64], tol: f64) {
    let e = rel_l2(ours, reference);
    eprintln!("{what}: relative L2 error {e:.2e}");
    assert!(e <= tol, "{what}: relative L2 error {e:.3e} > {tol:.0e}");
}

/// Central-difference gradient of `f` w.r.t. every element of input `k`.
pub fn fd_grad(inputs: &[Vec<f64>], k: usize, f: &dyn Fn(&[Vec<f64>]) -> f64) -> Vec<f64> {
    let mut p = inputs.to_vec();
    (0..p[k].len())
        .map(|j| {
            let x0 = p[k][j];
            p[k][j] = x0 + FD_STEP;
            let up = f(&p);
            p[k][j] = x0 - FD_STEP;
            let down = f(&p);
            p[k][j] = x0;
            (up - down) / (2.0 * FD_STEP)
        })
        .collect()
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
