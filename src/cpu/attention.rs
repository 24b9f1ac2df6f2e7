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
use crate::cpu::loss::exp_f32;

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

/// sigmoid(x) = 1 / (1 + e^-x), with the call-free `exp_f32` so the gate loop vectorises.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

/// Lanes of the independent accumulators in the dot products below: f32 addition is not
/// associative, so a plain `sum()` is one serial chain of dependent adds (~4 cycles each); 16
/// chains let the compiler keep them in vector registers (whatever the target's vector width).
const LANES: usize = 16;

/// sum_k a[k] b[k], accumulated in LANES interleaved partial sums.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    for (ca, cb) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for j in 0..LANES {
            acc[j] += ca[j] * cb[j];
        }
    }
    let tail = n - n % LANES;
    let mut s: f32 = acc.iter().sum();
    for k in tail..n {
        s += a[k] * b[k];
    }
    s
}

/// sum_k relu(x[k] + y[k]) w[k], as `dot`; also writes r[k] = relu(x[k] + y[k]) if `r` is given.
#[inline]
fn relu_sum_dot(x: &[f32], y: &[f32], w: &[f32], r: Option<&mut [f32]>) -> f32 {
    let n = x.len();
    let (y, w) = (&y[..n], &w[..n]);
    let mut acc = [0.0f32; LANES];
    match r {
        Some(r) => {
            let r = &mut r[..n];
            for (((cx, cy), cw), cr) in x
                .chunks_exact(LANES)
                .zip(y.chunks_exact(LANES))
                .zip(w.chunks_exact(LANES))
                .zip(r.chunks_exact_mut(LANES))
            {
                for j in 0..LANES {
                    let v = (cx[j] + cy[j]).max(0.0);
                    cr[j] = v;
                    acc[j] += v * cw[j];
                }
            }
            for k in n - n % LANES..n {
                let v = (x[k] + y[k]).max(0.0);
                r[k] = v;
                acc[0] += v * w[k];
            }
        }
        None => {
            for ((cx, cy), cw) in x.chunks_exact(LANES).zip(y.chunks_exact(LANES)).zip(w.chunks_exact(LANES))
            {
                for j in 0..LANES {
                    acc[j] += (cx[j] + cy[j]).max(0.0) * cw[j];
                }
            }
            for k in n - n % LANES..n {
                acc[0] += (x[k] + y[k]).max(0.0) * w[k];
            }
        }
    }
    acc.iter().sum()
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
    assert_eq!(h.len(), b * hd, "attention: h is not (B,H)");
    let mut att2 = vec![0.0f32; b * a]; // (B,A)
    linear_forward(&mut att2, h, p.w_dec, Some(p.b_dec), b, hd, a);
    cache.gate.resize(b * d, 0.0);
    linear_forward(&mut cache.gate, h, p.w_beta, Some(p.b_beta), b, hd, d);
    cache.r.resize(b * l * a, 0.0);
    cache.alpha.resize(b * l, 0.0);
    cache.z.resize(b * d, 0.0);
    let AttnCache { r, alpha, z, gate } = cache;
    attention_core_forward(ctx, alpha, z, gate, Some(r), att1, &att2, feats, p.w_full, p.b_full[0], sz);
}

/// The part of a step after the two projections of h (which a caller with pre-packed weights
/// computes itself): from att2 (B,A) and the gate pre-activation `gate` (B,D, overwritten with
/// sigmoid of itself), writes ctx (B,D), alpha (B,L), the raw context z (B,D), and, if given,
/// r = relu(att1 + att2) (B,L,A) (the backward can recompute it from att1 and att2 instead).
#[allow(clippy::too_many_arguments)]
pub fn attention_core_forward(
    ctx: &mut [f32],
    alpha: &mut [f32],
    z: &mut [f32],
    gate: &mut [f32],
    r: Option<&mut [f32]>,
    att1: &[f32],
    att2: &[f32],
    feats: &[f32],
    w_full: &[f32],
    b_full: f32,
    sz: AttnSize,
) {
    let AttnSize { b, l, d, a, .. } = sz;
    assert_eq!(att1.len(), b * l * a, "attention: att1 is not (B,L,A)");
    assert_eq!(att2.len(), b * a, "attention: att2 is not (B,A)");
    assert_eq!(feats.len(), b * l * d, "attention: feats is not (B,L,D)");
    assert_eq!(ctx.len(), b * d, "attention: ctx is not (B,D)");
    assert!(alpha.len() == b * l && z.len() == b * d && gate.len() == b * d, "attention: cache sizes");
    assert_eq!(w_full.len(), a, "attention: w_full is not (1,A)");
    // r, e, alpha and z per batch row, in parallel over b. The score (B*L,A)x(A,1) and the context
    // (1,L)x(L,D) per row are matrix-VECTOR products: memory-bound, so plain loops beat sgemm, whose
    // packing would read and write the whole (L,D) / (L,A) operand once more for no reuse.
    let row = |((((al, zr), a1), a2), fb): CoreRow, rb: Option<&mut [f32]>| {
        // r = relu(att1 + att2) (L,A); e = r w_full^T + b_full (L)
        match rb {
            Some(rb) => {
                for ((rr, x1), e) in rb.chunks_exact_mut(a).zip(a1.chunks_exact(a)).zip(al.iter_mut()) {
                    *e = b_full + relu_sum_dot(x1, a2, w_full, Some(rr));
                }
            }
            None => {
                for (x1, e) in a1.chunks_exact(a).zip(al.iter_mut()) {
                    *e = b_full + relu_sum_dot(x1, a2, w_full, None);
                }
            }
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
        zr.fill(0.0);
        for (&w, fl) in al.iter().zip(fb.chunks_exact(d)) {
            zr.iter_mut().zip(fl).for_each(|(zz, &x)| *zz += w * x);
        }
    };
    let rows = alpha
        .par_chunks_mut(l)
        .zip(z.par_chunks_mut(d))
        .zip(att1.par_chunks(l * a))
        .zip(att2.par_chunks(a))
        .zip(feats.par_chunks(l * d));
    match r {
        Some(r) => {
            assert_eq!(r.len(), b * l * a, "attention: r is not (B,L,A)");
            rows.zip(r.par_chunks_mut(l * a)).for_each(|(x, rb)| row(x, Some(rb)));
        }
        None => rows.for_each(|x| row(x, None)),
    }
    ctx.par_chunks_mut(d).zip(gate.par_chunks_mut(d)).zip(z.par_chunks(d)).with_min_len(8).for_each(
        |((c, g), z)| {
            for ((c, g), zz) in c.iter_mut().zip(g.iter_mut()).zip(z) {
                *g = sigmoid(*g);
                *c = *g * zz;
            }
        },
    );
}

/// One batch row of `attention_core_forward`: (((alpha (L), z (D)), att1 (L,A)), att2 (A)), feats (L,D).
type CoreRow<'a> = ((((&'a mut [f32], &'a mut [f32]), &'a [f32]), &'a [f32]), &'a [f32]);

/// Where the backward finds r = relu(att1 + att2) (B,L,A): saved by the forward, or recomputed.
#[derive(Clone, Copy, Debug)]
pub enum AttnRelu<'a> {
    Saved(&'a [f32]),
    /// att1 (B,L,A) and att2 (B,A).
    Recompute(&'a [f32], &'a [f32]),
}

/// One row of r for the score backward: saved, or the two terms of relu(att1 + att2).
#[derive(Clone, Copy)]
enum RowRelu<'a> {
    Saved(&'a [f32]),
    Sum(&'a [f32], &'a [f32]),
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
    let AttnSize { b, d, h: hd, a, .. } = sz;
    let mut dh = dh;
    let mut dpre = vec![0.0f32; b * d]; // (B,D)
    let mut datt2 = vec![0.0f32; b * a]; // (B,A)
    attention_core_backward(
        dfeats,
        datt1,
        &mut dpre,
        &mut datt2,
        g.w_full,
        g.b_full,
        dctx,
        dalpha_extra,
        &cache.alpha,
        &cache.z,
        &cache.gate,
        AttnRelu::Saved(&cache.r),
        feats,
        p.w_full,
        sz,
    );
    linear_backward(dh.as_deref_mut(), g.w_beta, Some(g.b_beta), &dpre, h, p.w_beta, b, hd, d);
    linear_backward(dh, g.w_dec, Some(g.b_dec), &datt2, h, p.w_dec, b, hd, a);
}

/// The step backward down to the two projections of h: from dctx (B,D) (and an extra dalpha
/// (B,L)), writes dpre (B,D) = dL/d(gate pre-activation) and datt2 (B,A), and accumulates into
/// datt1 (B,L,A), dfeats (B,L,D) (if given), dw_full (A) and db_full (1). The caller pushes dpre and
/// datt2 through the h projections (dh, dW_beta, dW_dec), e.g. for all steps at once.
#[allow(clippy::too_many_arguments)]
pub fn attention_core_backward(
    dfeats: Option<&mut [f32]>,
    datt1: &mut [f32],
    dpre: &mut [f32],
    datt2: &mut [f32],
    dw_full: &mut [f32],
    db_full: &mut [f32],
    dctx: &[f32],
    dalpha_extra: Option<&[f32]>,
    alpha: &[f32],
    z: &[f32],
    gate: &[f32],
    relu: AttnRelu,
    feats: &[f32],
    w_full: &[f32],
    sz: AttnSize,
) {
    let AttnSize { b, l, d, a, .. } = sz;
    assert_eq!(dctx.len(), b * d, "attention backward: dctx is not (B,D)");
    assert_eq!(datt1.len(), b * l * a, "attention backward: datt1 is not (B,L,A)");
    assert!(dpre.len() == b * d && datt2.len() == b * a, "attention backward: dpre/datt2 sizes");
    assert!(alpha.len() == b * l && z.len() == b * d && gate.len() == b * d, "attention backward: cache");
    // Gate branch: dpre = dctx * z * gate (1 - gate); dz = dctx * gate.
    let mut dz = vec![0.0f32; b * d]; // (B,D)
    let rows = dpre.par_chunks_mut(d).zip(dz.par_chunks_mut(d)).zip(dctx.par_chunks(d));
    rows.zip(z.par_chunks(d)).zip(gate.par_chunks(d)).with_min_len(8).for_each(
        |((((dp, dzr), dc), zr), gr)| {
            for ((((dp, dzz), &dc), &zz), &gt) in dp.iter_mut().zip(dzr.iter_mut()).zip(dc).zip(zr).zip(gr) {
                *dp = dc * zz * gt * (1.0 - gt);
                *dzz = dc * gt;
            }
        },
    );
    // de (B,L): dalpha = feats[b] dz[b] (+ extra), then the softmax backward
    // de = alpha * (dalpha - sum_l alpha dalpha). Matrix-vector per row: plain loops (see forward).
    let mut de = vec![0.0f32; b * l];
    if let Some(x) = dalpha_extra {
        assert_eq!(x.len(), b * l, "attention backward: dalpha is not (B,L)");
        de.copy_from_slice(x);
    }
    de.par_chunks_mut(l)
        .zip(alpha.par_chunks(l))
        .zip(feats.par_chunks(l * d))
        .zip(dz.par_chunks(d))
        .for_each(|(((dr, al), fb), dzb)| {
            for (x, fl) in dr.iter_mut().zip(fb.chunks_exact(d)) {
                *x += dot(fl, dzb);
            }
            let dot: f32 = dr.iter().zip(al).map(|(x, y)| x * y).sum();
            dr.iter_mut().zip(al).for_each(|(x, &y)| *x = y * (*x - dot));
        });
    // dfeats[b,l,:] += alpha[b,l] dz[b,:]
    if let Some(df) = dfeats {
        assert_eq!(df.len(), b * l * d, "attention backward: dfeats is not (B,L,D)");
        df.par_chunks_mut(l * d).zip(alpha.par_chunks(l)).zip(dz.par_chunks(d)).for_each(
            |((fb, al), dzb)| {
                for (fl, &w) in fb.chunks_exact_mut(d).zip(al) {
                    fl.iter_mut().zip(dzb).for_each(|(x, &v)| *x += w * v);
                }
            },
        );
    }
    // Score layer and relu, per row b: dw_full += sum_l de r; ds = de w_full [r > 0];
    // datt1 += ds; datt2 = sum_l ds. Per-row partial dw_full (B,A) summed afterwards.
    datt2.fill(0.0);
    let mut dwf = vec![0.0f32; b * a]; // (B,A) per-row partial dw_full
                                       // One (l) row of the score layer: r (A) given or recomputed as relu(x1 + a2) on the fly.
                                       // Plain zipped iterators, no indexing, so the loop vectorises (the branch becomes a select).
    let score_row = |d1l: &mut [f32], r: RowRelu, e: f32, d2: &mut [f32], dw: &mut [f32]| {
        let dsts = d1l.iter_mut().zip(d2.iter_mut()).zip(dw.iter_mut()).zip(w_full);
        match r {
            RowRelu::Saved(rl) => dsts.zip(rl).for_each(|((((x1, x2), xw), &w), &rv)| {
                *xw += e * rv;
                let ds = if rv > 0.0 { e * w } else { 0.0 };
                *x1 += ds;
                *x2 += ds;
            }),
            RowRelu::Sum(u, v) => dsts.zip(u.iter().zip(v)).for_each(|((((x1, x2), xw), &w), (&p, &q))| {
                let rv = (p + q).max(0.0);
                *xw += e * rv;
                let ds = if rv > 0.0 { e * w } else { 0.0 };
                *x1 += ds;
                *x2 += ds;
            }),
        }
    };
    let rows = datt1
        .par_chunks_mut(l * a)
        .zip(de.par_chunks(l))
        .zip(datt2.par_chunks_mut(a))
        .zip(dwf.par_chunks_mut(a));
    match relu {
        AttnRelu::Saved(r) => {
            assert_eq!(r.len(), b * l * a, "attention backward: r is not (B,L,A)");
            rows.zip(r.par_chunks(l * a)).for_each(|((((d1, deb), d2), dw), rb)| {
                for ((d1l, rl), &e) in d1.chunks_exact_mut(a).zip(rb.chunks_exact(a)).zip(deb) {
                    score_row(d1l, RowRelu::Saved(rl), e, d2, dw);
                }
            });
        }
        AttnRelu::Recompute(att1, att2) => {
            assert!(att1.len() == b * l * a && att2.len() == b * a, "attention backward: att1/att2 sizes");
            rows.zip(att1.par_chunks(l * a)).zip(att2.par_chunks(a)).for_each(
                |(((((d1, deb), d2), dw), a1), a2)| {
                    for ((d1l, x1), &e) in d1.chunks_exact_mut(a).zip(a1.chunks_exact(a)).zip(deb) {
                        score_row(d1l, RowRelu::Sum(x1, a2), e, d2, dw);
                    }
                },
            );
        }
    }
    for row in dwf.chunks_exact(a) {
        dw_full.iter_mut().zip(row).for_each(|(x, y)| *x += y);
    }
    db_full[0] += de.iter().sum::<f32>();
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
    mean.par_chunks_mut(d).zip(feats.par_chunks(l * d)).for_each(|(m, fb)| {
        m.fill(0.0);
        for row in fb.chunks_exact(d) {
            m.iter_mut().zip(row).for_each(|(x, y)| *x += y);
        }
        m.iter_mut().for_each(|x| *x *= inv);
    });
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
