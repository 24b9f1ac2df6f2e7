//! Soft (additive) attention of Show, Attend and Tell, with the sigmoid gate f_beta, and the initial
//! LSTM state from the mean feature. Forward and backward.
//!
//! Math, for region features feats (B,L,D) and the decoder state h (B,H), attention size A:
//!
//! ```text
//! att1  = feats W_enc^T + b_enc                 // (B,L,A)  once per sequence (encode)
//! att2  = h W_dec^T + b_dec                     // (B,A)    every step
//! r     = relu(att1 + att2[:,None,:])           // (B,L,A)
//! e     = r w_full^T + b_full                   // (B,L)    w_full (1,A), b_full (1)
//! alpha = softmax over l of e                   // (B,L)
//! z     = sum_l alpha[:,l] feats[:,l,:]         // (B,D)    the raw context
//! gate  = sigmoid(h W_beta^T + b_beta)          // (B,D)
//! ctx   = gate * z                              // (B,D)
//! ```
//!
//! Backward, given dctx (and optionally dalpha from a regulariser on alpha):
//!
//! ```text
//! dgate = dctx * z;  dpre_beta = dgate * gate (1 - gate)  → h, W_beta, b_beta by the linear rule
//! dz = dctx * gate
//! dalpha[b,l] += feats[b,l,:] . dz[b,:]          dfeats[b,l,:] += alpha[b,l] dz[b,:]
//! de = alpha * (dalpha - sum_l alpha dalpha)     (softmax backward)
//! dr = de w_full;  dw_full += de^T r;  db_full += sum de
//! ds = dr * [r > 0];  datt1 += ds;  datt2 = sum_l ds  → h, W_dec, b_dec by the linear rule
//! ```
//!
//! datt1 is accumulated over all steps and pushed through the encode linear layer once at the end.
//!
//! Initial state (our choice, as in the widely used PyTorch implementation of the paper: linear, no
//! tanh): mean = (1/L) sum_l feats[:,l,:] (B,D); h0 = mean W_h^T + b_h; c0 = mean W_c^T + b_c (B,H).
//!
//! Variable lengths: the caller passes the live prefix of the batch (`b` = active rows); all buffers
//! are batch-major so a prefix of rows is a prefix of the slice.

use rayon::prelude::*;

use crate::cpu::linear::{linear_backward, linear_forward};

/// Sizes: batch, regions, feature size, decoder hidden size, attention size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnSize {
    pub b: usize,
    pub l: usize,
    pub d: usize,
    pub h: usize,
    pub a: usize,
}

/// Attention parameters (PyTorch `nn.Linear` layouts).
#[derive(Clone, Copy, Debug)]
pub struct AttnParams<'a> {
    pub w_enc: &'a [f32],  // (A,D)
    pub b_enc: &'a [f32],  // (A)
    pub w_dec: &'a [f32],  // (A,H)
    pub b_dec: &'a [f32],  // (A)
    pub w_full: &'a [f32], // (1,A)
    pub b_full: &'a [f32], // (1)
    pub w_beta: &'a [f32], // (D,H)
    pub b_beta: &'a [f32], // (D)
}

/// Gradient buffers, same shapes as `AttnParams` (accumulated into).
#[derive(Debug)]
pub struct AttnGrads<'a> {
    pub w_enc: &'a mut [f32],
    pub b_enc: &'a mut [f32],
    pub w_dec: &'a mut [f32],
    pub b_dec: &'a mut [f32],
    pub w_full: &'a mut [f32],
    pub b_full: &'a mut [f32],
    pub w_beta: &'a mut [f32],
    pub b_beta: &'a mut [f32],
}

/// What one attention step saves for backward.
#[derive(Clone, Debug, Default)]
pub struct AttnCache {
    /// (B,L,A) relu(att1 + att2)
    pub r: Vec<f32>,
    /// (B,L) attention weights
    pub alpha: Vec<f32>,
    /// (B,D) raw context before the gate
    pub z: Vec<f32>,
    /// (B,D) sigmoid gate
    pub gate: Vec<f32>,
}

/// att1 (B,L,A) = feats (B,L,D) W_enc^T + b_enc. Overwrites att1.
pub fn attention_encode_forward(att1: &mut [f32], feats: &[f32], p: &AttnParams, sz: AttnSize) {
    linear_forward(att1, feats, p.w_enc, Some(p.b_enc), sz.b * sz.l, sz.d, sz.a);
}

/// Pushes the accumulated datt1 (B,L,A) through the encode layer: dfeats (B,L,D) +=, dW_enc, db_enc +=.
pub fn attention_encode_backward(
    dfeats: Option<&mut [f32]>,
    g: &mut AttnGrads,
    datt1: &[f32],
    feats: &[f32],
    p: &AttnParams,
    sz: AttnSize,
) {
    linear_backward(dfeats, g.w_enc, Some(g.b_enc), datt1, feats, p.w_enc, sz.b * sz.l, sz.d, sz.a);
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// One attention step: ctx (B,D) from att1 (B,L,A), feats (B,L,D), h (B,H). Alpha is `cache.alpha`.
pub fn attention_step_forward(
    ctx: &mut [f32],
    cache: &mut AttnCache,
    att1: &[f32],
    feats: &[f32],
    h: &[f32],
    p: &AttnParams,
    sz: AttnSize,
) {
    let AttnSize { b, l, d, h: hd, a } = sz;
    assert_eq!(att1.len(), b * l * a, "attention: att1 is not (B,L,A)");
    assert_eq!(feats.len(), b * l * d, "attention: feats is not (B,L,D)");
    assert_eq!(h.len(), b * hd, "attention: h is not (B,H)");
    assert_eq!(ctx.len(), b * d, "attention: ctx is not (B,D)");
    let mut att2 = vec![0.0f32; b * a]; // (B,A)
    linear_forward(&mut att2, h, p.w_dec, Some(p.b_dec), b, hd, a);
    // r, e, alpha and z per batch row, in parallel over b. The score (B*L,A)x(A,1) and the context
    // (1,L)x(L,D) per row are matrix-VECTOR products: memory-bound, so plain loops beat sgemm, whose
    // packing would read and write the whole (L,D) / (L,A) operand once more for no reuse.
    cache.r.resize(b * l * a, 0.0);
    cache.alpha.resize(b * l, 0.0);
    cache.z.resize(b * d, 0.0);
    let (wf, bf) = (p.w_full, p.b_full[0]);
    cache
        .r
        .par_chunks_mut(l * a)
        .zip(cache.alpha.par_chunks_mut(l))
        .zip(cache.z.par_chunks_mut(d))
        .zip(att1.par_chunks(l * a))
        .zip(att2.par_chunks(a))
        .zip(feats.par_chunks(l * d))
        .for_each(|(((((r, al), z), a1), a2), fb)| {
            // r = relu(att1 + att2) (L,A); e = r w_full^T + b_full (L)
            for ((rr, x1), e) in r.chunks_exact_mut(a).zip(a1.chunks_exact(a)).zip(al.iter_mut()) {
                let mut acc = bf;
                for k in 0..a {
                    let v = (x1[k] + a2[k]).max(0.0);
                    rr[k] = v;
                    acc += v * wf[k];
                }
                *e = acc;
            }
            // alpha = softmax(e) over L
            let m = al.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0.0f32;
            for v in al.iter_mut() {
                *v = (*v - m).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            al.iter_mut().for_each(|v| *v *= inv);
            // z = sum_l alpha_l feats_l (D)
            z.fill(0.0);
            for (&w, fl) in al.iter().zip(fb.chunks_exact(d)) {
                z.iter_mut().zip(fl).for_each(|(zz, &x)| *zz += w * x);
            }
        });
    cache.gate.resize(b * d, 0.0);
    linear_forward(&mut cache.gate, h, p.w_beta, Some(p.b_beta), b, hd, d);
    for ((c, g), z) in ctx.iter_mut().zip(cache.gate.iter_mut()).zip(&cache.z) {
        *g = sigmoid(*g);
        *c = *g * z;
    }
}

/// One attention step backward. dctx (B,D), optional extra dalpha (B,L). Accumulates into dfeats
/// (B,L,D), datt1 (B,L,A), dh (B,H) and the step's parameter gradients (W_dec, b_dec, w_full,
/// b_full, W_beta, b_beta; W_enc/b_enc come from `attention_encode_backward`).
#[allow(clippy::too_many_arguments)]
pub fn attention_step_backward(
    dfeats: Option<&mut [f32]>,
    datt1: &mut [f32],
    dh: Option<&mut [f32]>,
    g: &mut AttnGrads,
    dctx: &[f32],
    dalpha_extra: Option<&[f32]>,
    cache: &AttnCache,
    feats: &[f32],
    h: &[f32],
    p: &AttnParams,
    sz: AttnSize,
) {
    let AttnSize { b, l, d, h: hd, a } = sz;
    assert_eq!(dctx.len(), b * d, "attention backward: dctx is not (B,D)");
    assert_eq!(datt1.len(), b * l * a, "attention backward: datt1 is not (B,L,A)");
    let mut dh = dh;
    // Gate branch.
    let mut dpre = vec![0.0f32; b * d]; // (B,D)
    let mut dz = vec![0.0f32; b * d]; // (B,D)
    for k in 0..b * d {
        let gt = cache.gate[k];
        dpre[k] = dctx[k] * cache.z[k] * gt * (1.0 - gt);
        dz[k] = dctx[k] * gt;
    }
    linear_backward(dh.as_deref_mut(), g.w_beta, Some(g.b_beta), &dpre, h, p.w_beta, b, hd, d);
    // de (B,L): dalpha = feats[b] dz[b] (+ extra), then the softmax backward
    // de = alpha * (dalpha - sum_l alpha dalpha). Matrix-vector per row: plain loops (see forward).
    let mut de = vec![0.0f32; b * l];
    if let Some(x) = dalpha_extra {
        assert_eq!(x.len(), b * l, "attention backward: dalpha is not (B,L)");
        de.copy_from_slice(x);
    }
    de.par_chunks_mut(l)
        .zip(cache.alpha.par_chunks(l))
        .zip(feats.par_chunks(l * d))
        .zip(dz.par_chunks(d))
        .for_each(|(((dr, al), fb), dzb)| {
            for (x, fl) in dr.iter_mut().zip(fb.chunks_exact(d)) {
                *x += fl.iter().zip(dzb).map(|(u, v)| u * v).sum::<f32>();
            }
            let dot: f32 = dr.iter().zip(al).map(|(x, y)| x * y).sum();
            dr.iter_mut().zip(al).for_each(|(x, &y)| *x = y * (*x - dot));
        });
    // dfeats[b,l,:] += alpha[b,l] dz[b,:]
    if let Some(df) = dfeats {
        assert_eq!(df.len(), b * l * d, "attention backward: dfeats is not (B,L,D)");
        df.par_chunks_mut(l * d).zip(cache.alpha.par_chunks(l)).zip(dz.par_chunks(d)).for_each(
            |((fb, al), dzb)| {
                for (fl, &w) in fb.chunks_exact_mut(d).zip(al) {
                    fl.iter_mut().zip(dzb).for_each(|(x, &v)| *x += w * v);
                }
            },
        );
    }
    // Score layer and relu, per row b: dw_full += sum_l de r; ds = de w_full [r > 0];
    // datt1 += ds; datt2 = sum_l ds. Per-row partial dw_full (B,A) summed afterwards.
    let mut datt2 = vec![0.0f32; b * a]; // (B,A)
    let mut dwf = vec![0.0f32; b * a]; // (B,A) per-row partial dw_full
    let wf = p.w_full;
    datt1
        .par_chunks_mut(l * a)
        .zip(cache.r.par_chunks(l * a))
        .zip(de.par_chunks(l))
        .zip(datt2.par_chunks_mut(a))
        .zip(dwf.par_chunks_mut(a))
        .for_each(|((((d1, rb), deb), d2), dw)| {
            for ((d1l, rl), &e) in d1.chunks_exact_mut(a).zip(rb.chunks_exact(a)).zip(deb) {
                for k in 0..a {
                    dw[k] += e * rl[k];
                    let ds = if rl[k] > 0.0 { e * wf[k] } else { 0.0 };
                    d1l[k] += ds;
                    d2[k] += ds;
                }
            }
        });
    for row in dwf.chunks_exact(a) {
        g.w_full.iter_mut().zip(row).for_each(|(x, y)| *x += y);
    }
    g.b_full[0] += de.iter().sum::<f32>();
    linear_backward(dh, g.w_dec, Some(g.b_dec), &datt2, h, p.w_dec, b, hd, a);
}

/// Initial state: mean (B,D) = mean over L of feats (B,L,D); h0 = mean W_h^T + b_h, c0 = mean W_c^T + b_c
/// (B,H), with W_h, W_c (H,D).
#[allow(clippy::too_many_arguments)]
pub fn init_state_forward(
    mean: &mut [f32],
    h0: &mut [f32],
    c0: &mut [f32],
    feats: &[f32],
    w_h: &[f32],
    b_h: &[f32],
    w_c: &[f32],
    b_c: &[f32],
    b: usize,
    l: usize,
    d: usize,
    h: usize,
) {
    assert_eq!(feats.len(), b * l * d, "init_state: feats is not (B,L,D)");
    assert_eq!(mean.len(), b * d, "init_state: mean is not (B,D)");
    let inv = 1.0 / l as f32;
    for (m, fb) in mean.chunks_exact_mut(d).zip(feats.chunks_exact(l * d)) {
        m.fill(0.0);
        for row in fb.chunks_exact(d) {
            m.iter_mut().zip(row).for_each(|(x, y)| *x += y);
        }
        m.iter_mut().for_each(|x| *x *= inv);
    }
    linear_forward(h0, mean, w_h, Some(b_h), b, d, h);
    linear_forward(c0, mean, w_c, Some(b_c), b, d, h);
}

/// Backward of `init_state_forward`: accumulates dfeats (B,L,D) (optional), dW_h, db_h, dW_c, db_c.
#[allow(clippy::too_many_arguments)]
pub fn init_state_backward(
    dfeats: Option<&mut [f32]>,
    dw_h: &mut [f32],
    db_h: &mut [f32],
    dw_c: &mut [f32],
    db_c: &mut [f32],
    dh0: &[f32],
    dc0: &[f32],
    mean: &[f32],
    w_h: &[f32],
    w_c: &[f32],
    b: usize,
    l: usize,
    d: usize,
    h: usize,
) {
    let mut dmean = vec![0.0f32; b * d]; // (B,D)
    linear_backward(Some(&mut dmean), dw_h, Some(db_h), dh0, mean, w_h, b, d, h);
    linear_backward(Some(&mut dmean), dw_c, Some(db_c), dc0, mean, w_c, b, d, h);
    if let Some(df) = dfeats {
        assert_eq!(df.len(), b * l * d, "init_state backward: dfeats is not (B,L,D)");
        let inv = 1.0 / l as f32;
        for (fb, m) in df.chunks_exact_mut(l * d).zip(dmean.chunks_exact(d)) {
            for row in fb.chunks_exact_mut(d) {
                row.iter_mut().zip(m).for_each(|(x, y)| *x += y * inv);
            }
        }
    }
}
