//! Losses: sparse softmax cross-entropy over the vocabulary (fused forward + backward, in place) and
//! the doubly stochastic attention regulariser.
//!
//! Cross-entropy math, for logits x (N,V), targets y (N), label smoothing eps, `<pad>` rows ignored:
//!
//! ```text
//! logp[n,k] = x[n,k] - logsumexp_k x[n,:]
//! q[n,k]    = (1 - eps) [k == y_n] + eps / V            (PyTorch's label smoothing)
//! loss      = (1 / M) sum_{n: y_n != pad} -sum_k q[n,k] logp[n,k]     M = number of non-pad rows
//! dx[n,k]   = dloss / M * (softmax(x[n,:])_k - q[n,k])   for non-pad rows, 0 for pad rows
//! ```
//!
//! The fused version overwrites the logits with dlogits, so the (N,V) buffer exists once.
//!
//! Doubly stochastic regulariser (Show, Attend and Tell), alphas (B,T,L), row b live for len_b steps:
//!
//! ```text
//! S[b,l] = sum_{t < len_b} alpha[b,t,l]
//! R      = alpha_c / B * sum_{b,l} (1 - S[b,l])^2
//! dR/dalpha[b,t,l] = alpha_c / B * 2 (S[b,l] - 1)   for t < len_b, 0 otherwise
//! ```

use rayon::prelude::*;

/// Loss value and the number of tokens it averages over.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CeOutput {
    /// Mean loss over the non-pad tokens (0 when there are none).
    pub loss: f32,
    /// Number of non-pad tokens.
    pub count: usize,
}

/// Row loss -sum_k q_k logp_k; when `grad_scale` is given, the row is overwritten with
/// grad_scale * (p - q).
fn ce_row(row: &mut [f32], y: usize, eps: f32, grad_scale: Option<f32>) -> f64 {
    let v = row.len();
    let m = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut s = 0.0f64;
    let mut sum_x = 0.0f64;
    for &x in row.iter() {
        s += ((x - m) as f64).exp();
        sum_x += x as f64;
    }
    let lse = m as f64 + s.ln();
    let nll = lse - row[y] as f64;
    // -mean_k logp_k = lse - mean_k x_k
    let smooth = lse - sum_x / v as f64;
    let loss = (1.0 - eps as f64) * nll + eps as f64 * smooth;
    if let Some(g) = grad_scale {
        let lse32 = lse as f32;
        let off = eps / v as f32;
        for x in row.iter_mut() {
            *x = g * ((*x - lse32).exp() - off);
        }
        row[y] -= g * (1.0 - eps);
    }
    loss
}

fn ce_impl(
    logits: &mut [f32],
    targets: &[u32],
    v: usize,
    eps: f32,
    pad: Option<u32>,
    dloss: Option<f32>,
) -> CeOutput {
    assert_eq!(logits.len(), targets.len() * v, "cross_entropy: logits are not (N,V)");
    assert!((0.0..1.0).contains(&eps), "cross_entropy: label smoothing {eps} not in [0,1)");
    let count = targets.iter().filter(|&&y| Some(y) != pad).count();
    let scale = dloss.map(|d| if count > 0 { d / count as f32 } else { 0.0 });
    let total: f64 = logits
        .par_chunks_mut(v)
        .zip(targets.par_iter())
        .with_min_len((16384 / v.max(1)).max(1))
        .map(|(row, &y)| {
            if Some(y) == pad {
                if scale.is_some() {
                    row.fill(0.0);
                }
                return 0.0;
            }
            assert!((y as usize) < v, "cross_entropy: target {y} >= vocabulary size {v}");
            ce_row(row, y as usize, eps, scale)
        })
        .sum();
    let loss = if count > 0 { (total / count as f64) as f32 } else { 0.0 };
    CeOutput { loss, count }
}

/// Fused forward + backward: returns the mean loss and overwrites `logits` (N,V) with
/// dloss * dL/dlogits (pad rows become 0). `eps` is the label smoothing in [0,1).
pub fn cross_entropy_fused(
    logits: &mut [f32],
    targets: &[u32],
    v: usize,
    eps: f32,
    pad: Option<u32>,
    dloss: f32,
) -> CeOutput {
    ce_impl(logits, targets, v, eps, pad, Some(dloss))
}

/// Forward only (validation): the logits are left untouched.
pub fn cross_entropy_forward(
    logits: &[f32],
    targets: &[u32],
    v: usize,
    eps: f32,
    pad: Option<u32>,
) -> CeOutput {
    assert_eq!(logits.len(), targets.len() * v, "cross_entropy: logits are not (N,V)");
    let count = targets.iter().filter(|&&y| Some(y) != pad).count();
    let total: f64 = logits
        .par_chunks(v)
        .zip(targets.par_iter())
        .filter(|(_, &y)| Some(y) != pad)
        .map(|(row, &y)| {
            assert!((y as usize) < v, "cross_entropy: target {y} >= vocabulary size {v}");
            let mut r = row.to_vec();
            ce_row(&mut r, y as usize, eps, None)
        })
        .sum();
    let loss = if count > 0 { (total / count as f64) as f32 } else { 0.0 };
    CeOutput { loss, count }
}

/// Doubly stochastic attention regulariser over alphas (B,T,L) with per-row lengths (B); returns R
/// and, if `dalpha` (B,T,L) is given, accumulates dR/dalpha into it.
pub fn attention_reg(
    dalpha: Option<&mut [f32]>,
    alphas: &[f32],
    lengths: &[usize],
    alpha_c: f32,
    t: usize,
    l: usize,
) -> f32 {
    let b = lengths.len();
    assert_eq!(alphas.len(), b * t * l, "attention_reg: alphas are not (B,T,L)");
    if b == 0 {
        return 0.0;
    }
    let mut total = 0.0f64;
    let mut coef = vec![0.0f32; b * l]; // (B,L) dR/dalpha for the live steps
    for (bi, &len) in lengths.iter().enumerate() {
        assert!(len <= t, "attention_reg: length {len} > {t} steps");
        for k in 0..l {
            let s: f64 = (0..len).map(|s| alphas[(bi * t + s) * l + k] as f64).sum();
            total += (1.0 - s) * (1.0 - s);
            coef[bi * l + k] = (alpha_c as f64 / b as f64 * 2.0 * (s - 1.0)) as f32;
        }
    }
    if let Some(d) = dalpha {
        assert_eq!(d.len(), b * t * l, "attention_reg: dalpha is not (B,T,L)");
        for (bi, &len) in lengths.iter().enumerate() {
            for s in 0..len {
                let row = &mut d[(bi * t + s) * l..(bi * t + s + 1) * l];
                row.iter_mut().zip(&coef[bi * l..(bi + 1) * l]).for_each(|(x, c)| *x += c);
            }
        }
    }
    (alpha_c as f64 * total / b as f64) as f32
}
