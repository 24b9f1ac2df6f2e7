//! Batch normalisation over NCHW activations: training mode (batch statistics, running averages)
//! with its backward, and eval mode (running statistics). Inference networks fold BN into the
//! preceding conv instead (`crate::nn::conv::fold_batchnorm`); this file is for training.
//!
//! Math (PyTorch `BatchNorm2d` semantics), per channel c over the M = N*H*W values x[:, c, :, :]:
//!
//! ```text
//! mean = sum x / M                      var = sum (x - mean)^2 / M      (biased: used to normalise)
//! rstd = 1 / sqrt(var + eps)            xhat = (x - mean) * rstd
//! y    = gamma * xhat + beta
//! running_mean = (1 - momentum) * running_mean + momentum * mean
//! running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)   (unbiased)
//! ```
//!
//! Backward (the standard closed form, from differentiating through mean and var):
//!
//! ```text
//! dbeta  = sum dy                        dgamma = sum dy * xhat
//! dx     = gamma * rstd / M * (M * dy - dbeta - xhat * dgamma)
//! ```
//!
//! Eval mode: y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta.
//! Channels are independent, so they are the unit of parallel work; per-channel sums are in f64
//! (M is N*H*W, up to ~10^5 terms at the demo's batch and image size).

use rayon::prelude::*;

/// PyTorch's defaults.
pub const BN_EPS: f32 = 1e-5;
pub const BN_MOMENTUM: f32 = 0.1;

/// Sizes of a BN call: x is (N, C, HW).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BnShape {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
}

impl BnShape {
    fn len(&self) -> usize {
        self.n * self.c * self.hw
    }
    /// The values of channel `ch`: N runs of HW, stride C*HW.
    fn planes(&self, ch: usize) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        (0..self.n).map(move |b| (b * self.c + ch) * self.hw..(b * self.c + ch + 1) * self.hw)
    }
}

/// Training-mode forward. x, y (N, C, HW); gamma, beta, running_mean, running_var (C). Writes y and
/// the per-channel batch `mean` and `rstd` (C) that the backward needs; updates the running stats.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_forward(
    x: &[f32],
    g: &BnShape,
    gamma: &[f32],
    beta: &[f32],
    running_mean: &mut [f32],
    running_var: &mut [f32],
    momentum: f32,
    eps: f32,
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    let c = g.c;
    assert_eq!(x.len(), g.len(), "batchnorm input size");
    assert_eq!(y.len(), g.len(), "batchnorm output size");
    for v in [gamma, beta, &*running_mean, &*running_var, &*mean, &*rstd] {
        assert_eq!(v.len(), c, "batchnorm per-channel size");
    }
    let m = (g.n * g.hw) as f64;
    assert!(g.n * g.hw > 1, "batchnorm training needs more than one value per channel");
    // Per channel: two-pass mean and variance in f64.
    let stats: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let s: f64 = g.planes(ch).map(|r| x[r].iter().map(|&v| v as f64).sum::<f64>()).sum();
            let mu = s / m;
            let ss: f64 =
                g.planes(ch).map(|r| x[r].iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>()).sum();
            (mu, ss / m)
        })
        .collect();
    for (ch, &(mu, var)) in stats.iter().enumerate() {
        mean[ch] = mu as f32;
        rstd[ch] = (1.0 / (var + eps as f64).sqrt()) as f32;
        let mom = momentum as f64;
        running_mean[ch] = ((1.0 - mom) * running_mean[ch] as f64 + mom * mu) as f32;
        running_var[ch] = ((1.0 - mom) * running_var[ch] as f64 + mom * var * m / (m - 1.0)) as f32;
    }
    let (mean, rstd) = (&*mean, &*rstd);
    y.par_chunks_mut(g.hw).zip(x.par_chunks(g.hw)).enumerate().for_each(|(i, (yp, xp))| {
        let ch = i % c;
        let (sc, mu) = (gamma[ch] * rstd[ch], mean[ch]);
        for (o, &v) in yp.iter_mut().zip(xp) {
            *o = (v - mu) * sc + beta[ch];
        }
    });
}

/// Eval-mode forward with the running statistics. x, y (N, C, HW).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_eval_forward(
    x: &[f32],
    g: &BnShape,
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
    y: &mut [f32],
) {
    assert_eq!(x.len(), g.len(), "batchnorm input size");
    assert_eq!(y.len(), g.len(), "batchnorm output size");
    let c = g.c;
    y.par_chunks_mut(g.hw).zip(x.par_chunks(g.hw)).enumerate().for_each(|(i, (yp, xp))| {
        let ch = i % c;
        let sc = gamma[ch] / (running_var[ch] + eps).sqrt();
        let sh = beta[ch] - running_mean[ch] * sc;
        for (o, &v) in yp.iter_mut().zip(xp) {
            *o = v * sc + sh;
        }
    });
}

/// Training-mode backward (see the module comment). x, dy (N, C, HW); mean, rstd (C) from the
/// forward. Accumulates dx (N, C, HW), dgamma and dbeta (C).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_backward(
    x: &[f32],
    g: &BnShape,
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let c = g.c;
    assert_eq!(x.len(), g.len(), "batchnorm backward input size");
    assert_eq!(dy.len(), g.len(), "batchnorm backward dy size");
    assert_eq!(dx.len(), g.len(), "batchnorm backward dx size");
    let m = (g.n * g.hw) as f64;
    // Per channel: sum dy and sum dy * xhat.
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mu, rs) = (mean[ch] as f64, rstd[ch] as f64);
            let (mut sdy, mut sdyx) = (0.0f64, 0.0f64);
            for r in g.planes(ch) {
                for (&d, &v) in dy[r.clone()].iter().zip(&x[r]) {
                    sdy += d as f64;
                    sdyx += d as f64 * (v as f64 - mu) * rs;
                }
            }
            (sdy, sdyx)
        })
        .collect();
    for (ch, &(sdy, sdyx)) in sums.iter().enumerate() {
        dbeta[ch] += sdy as f32;
        dgamma[ch] += sdyx as f32;
    }
    let sums = &sums;
    dx.par_chunks_mut(g.hw).enumerate().for_each(|(i, dxp)| {
        // Plane i is (image i / c, channel i % c), at offset i * hw in x and dy.
        let ch = i % c;
        let off = i * g.hw;
        let (sdy, sdyx) = sums[ch];
        let (mu, rs) = (mean[ch], rstd[ch]);
        let k = gamma[ch] * rs;
        let (mdy, mdyx) = ((sdy / m) as f32, (sdyx / m) as f32);
        for ((o, &d), &v) in dxp.iter_mut().zip(&dy[off..off + g.hw]).zip(&x[off..off + g.hw]) {
            let xhat = (v - mu) * rs;
            *o += k * (d - mdy - xhat * mdyx);
        }
    });
}

/// ReLU backward given the forward's output: dx += dy where y > 0.
pub fn relu_backward(y: &[f32], dy: &[f32], dx: &mut [f32]) {
    assert!(y.len() == dy.len() && dy.len() == dx.len(), "relu backward sizes");
    dx.par_chunks_mut(4096).zip(y.par_chunks(4096).zip(dy.par_chunks(4096))).for_each(|(o, (yc, dc))| {
        for ((o, &yv), &d) in o.iter_mut().zip(yc).zip(dc) {
            if yv > 0.0 {
                *o += d;
            }
        }
    });
}
