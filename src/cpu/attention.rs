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

use crate::cpu::gemm::{sgemm, Epilogue, MatRef};
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
    cache.r.resize(b * l * a, 0.0);
    cache.r.par_chunks_mut(l * a).zip(att1.par_chunks(l * a)).zip(att2.par_chunks(a)).for_each(
        |((r, a1), a2)| {
            for (rr, x1) in r.chunks_exact_mut(a).zip(a1.chunks_exact(a)) {
                for k in 0..a {
                    rr[k] = (x1[k] + a2[k]).max(0.0);
                }
            }
        },
    );
    // e (B*L,1) = r (B*L,A) w_full^T + b_full, then softmax over L in place.
    cache.alpha.resize(b * l, 0.0);
    linear_forward(&mut cache.alpha, &cache.r, p.w_full, Some(p.b_full), b * l, a, 1);
    for row in cache.alpha.chunks_exact_mut(l) {
        let m = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut s = 0.0f32;
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            s += *v;
        }
        let inv = 1.0 / s;
        row.iter_mut().for_each(|v| *v *= inv);
    }
    // z[b] (1,D) = alpha[b] (1,L) x feats[b] (L,D)
    cache.z.resize(b * d, 0.0);
    for bi in 0..b {
        sgemm(
            MatRef::row_major(&cache.alpha[bi * l..(bi + 1) * l], 1, l),
            MatRef::row_major(&feats[bi * l * d..(bi + 1) * l * d], l, d),
            &mut cache.z[bi * d..(bi + 1) * d],
            d,
            &Epilogue::default(),
        );
    }
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
    // dalpha[b] (L,1) = feats[b] (L,D) x dz[b] (D,1) (+ extra); dfeats[b] (L,D) += alpha[b]^T dz[b].
    let mut de = match dalpha_extra {
        Some(x) => {
            assert_eq!(x.len(), b * l, "attention backward: dalpha is not (B,L)");
            x.to_vec()
        }
        None => vec![0.0f32; b * l],
    };
    let acc = Epilogue { beta: 1.0, ..Default::default() };
    for bi in 0..b {
        let fb = MatRef::row_major(&feats[bi * l * d..(bi + 1) * l * d], l, d);
        let dzb = MatRef::row_major(&dz[bi * d..(bi + 1) * d], 1, d);
        sgemm(fb, dzb.t(), &mut de[bi * l..(bi + 1) * l], 1, &acc);
    }
    if let Some(df) = dfeats {
        assert_eq!(df.len(), b * l * d, "attention backward: dfeats is not (B,L,D)");
        for bi in 0..b {
            let al = MatRef::row_major(&cache.alpha[bi * l..(bi + 1) * l], 1, l).t(); // (L,1)
            let dzb = MatRef::row_major(&dz[bi * d..(bi + 1) * d], 1, d);
            sgemm(al, dzb, &mut df[bi * l * d..(bi + 1) * l * d], d, &acc);
        }
    }
    // Softmax backward in place: de = alpha * (dalpha - sum_l alpha dalpha).
    for (dr, ar) in de.chunks_exact_mut(l).zip(cache.alpha.chunks_exact(l)) {
        let dot: f32 = dr.iter().zip(ar).map(|(x, y)| x * y).sum();
        dr.iter_mut().zip(ar).for_each(|(x, &y)| *x = y * (*x - dot));
    }
    // Score layer: dr (B*L,A) = de w_full, dw_full += de^T r, db_full += sum de.
    let mut dr = vec![0.0f32; b * l * a];
    linear_backward(Some(&mut dr), g.w_full, Some(g.b_full), &de, &cache.r, p.w_full, b * l, a, 1);
    // Through the relu: datt1 += ds, datt2 = sum_l ds.
    let mut datt2 = vec![0.0f32; b * a]; // (B,A)
    datt1
        .par_chunks_mut(l * a)
        .zip(dr.par_chunks_mut(l * a))
        .zip(cache.r.par_chunks(l * a))
        .zip(datt2.par_chunks_mut(a))
        .for_each(|(((d1, drb), rb), d2)| {
            for k in 0..l * a {
                let ds = if rb[k] > 0.0 { drb[k] } else { 0.0 };
                d1[k] += ds;
                d2[k % a] += ds;
            }
        });
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
