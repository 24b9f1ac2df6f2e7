//! Adam and AdamW, and gradient clipping by global norm.
//!
//! Math, at step t = 1, 2, ... with gradient g, learning rate lr, weight decay wd:
//!
//! ```text
//! Adam  (L2, as torch.optim.Adam):   g <- g + wd * p
//! AdamW (decoupled, torch.optim.AdamW): p <- p - lr * wd * p        (before the update)
//! m <- b1 m + (1 - b1) g            v <- b2 v + (1 - b2) g^2
//! p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
//! ```
//!
//! Clipping (as torch.nn.utils.clip_grad_norm_): n = sqrt(sum over all slices of g^2); if
//! max_norm / (n + 1e-6) < 1 every gradient is scaled by it.

use rayon::prelude::*;

/// Hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// true: AdamW (decoupled weight decay); false: Adam with L2 added to the gradient.
    pub decoupled: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled: false }
    }
}

/// One Adam(W) update of one parameter slice at step `t` (1-based), updating the moments m, v.
pub fn adam_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], cfg: &AdamConfig, t: u64) {
    assert!(t >= 1, "adam_update: steps count from 1");
    assert!(p.len() == g.len() && g.len() == m.len() && m.len() == v.len(), "adam_update: lengths differ");
    let AdamConfig { lr, beta1: b1, beta2: b2, eps, weight_decay: wd, decoupled } = *cfg;
    let bc1 = 1.0 - (b1 as f64).powi(t as i32);
    let bc2 = 1.0 - (b2 as f64).powi(t as i32);
    let (bc1, bc2) = (bc1 as f32, bc2 as f32);
    // Zipped iterators (no indexing, no branch inside): the loop vectorises. Same operations in the
    // same order as the formula above, so the result does not depend on the vector width.
    let (wd_g, wd_p) = if decoupled { (0.0, lr * wd) } else { (wd, 0.0) };
    p.par_chunks_mut(4096)
        .zip(g.par_chunks(4096))
        .zip(m.par_chunks_mut(4096))
        .zip(v.par_chunks_mut(4096))
        .for_each(|(((p, g), m), v)| {
            for (((pk, &gk), mk), vk) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let gk = gk + wd_g * *pk;
                *pk -= wd_p * *pk;
                *mk = b1 * *mk + (1.0 - b1) * gk;
                *vk = b2 * *vk + (1.0 - b2) * gk * gk;
                let mhat = *mk / bc1;
                let vhat = *vk / bc2;
                *pk -= lr * mhat / (vhat.sqrt() + eps);
            }
        });
}

/// Adam(W) over a list of parameters, with its moments and step counter (all public so a checkpoint
/// can save and restore them exactly).
#[derive(Clone, Debug)]
pub struct Adam {
    pub cfg: AdamConfig,
    /// Number of steps taken so far.
    pub t: u64,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl Adam {
    /// Zero moments for parameters of the given sizes.
    pub fn new(cfg: AdamConfig, sizes: &[usize]) -> Self {
        Adam {
            cfg,
            t: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One step over all parameters (same order and sizes as at construction).
    pub fn step(&mut self, params: &mut [&mut [f32]], grads: &[&[f32]]) {
        assert!(params.len() == self.m.len() && grads.len() == self.m.len(), "Adam::step: parameter count");
        self.t += 1;
        for (k, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            adam_update(p, g, &mut self.m[k], &mut self.v[k], &self.cfg, self.t);
        }
    }
}

/// Global L2 norm over several gradient slices (accumulated in f64).
pub fn global_norm(grads: &[&[f32]]) -> f32 {
    grads.iter().map(|g| g.par_iter().map(|&x| x as f64 * x as f64).sum::<f64>()).sum::<f64>().sqrt() as f32
}

/// Scales all gradients so their global norm is at most `max_norm`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> f32 {
    let views: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
    let norm = global_norm(&views);
    let s = max_norm / (norm + 1e-6);
    if s < 1.0 {
        for g in grads.iter_mut() {
            g.par_iter_mut().for_each(|x| *x *= s);
        }
    }
    norm
}
