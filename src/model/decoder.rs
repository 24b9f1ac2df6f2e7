//! The two caption decoders composed from the CPU layers, and one teacher-forced training step each
//! (forward, loss, backward). Parameters are plain named `Vec<f32>`s in PyTorch layouts; gradients use
//! the same struct, accumulated into (`+=`), so a caller zeroes them between steps.
//!
//! Batch layout: tokens and targets (B,T) row-major, `lengths` (B) sorted longest first (the LSTM's
//! per-step active batch size, see `cpu::lstm`); tokens/targets past a row's length are `<pad>` = 0.
//! `tokens[b,t]` is the input at step t (`<start>` first), `targets[b,t]` the word to predict.
//!
//! `show-tell`: pooled feature f (B,D); h0 = tanh(f W_h^T + b_h), c0 = tanh(f W_c^T + b_c) (B,H);
//!   x = embedding(tokens) (B,T,E); hs = LSTM(x, h0, c0) (B,T,H); logits = hs fc_w^T + fc_b (B,T,V).
//! `attention`: grid features (B,L,D); h0, c0 from the mean feature (`cpu::attention`); each step t on
//!   the live rows: ctx, alpha = attention(feats, h_{t-1}); (h_t, c_t) = LSTMCell([emb_t, ctx]);
//!   logits_t = h_t fc_w^T + fc_b.
//! Loss: cross-entropy over the vocabulary, `<pad>` ignored, mean over tokens, optional label
//! smoothing; the attention decoder adds alpha_c * mean_b sum_l (1 - sum_t alpha[b,t,l])^2.
//! Dropout (training only, optional): on the LSTM output h right before the output layer, as in the
//! common Show-Attend-Tell implementation; a seeded inverted-dropout mask (`cpu::dropout`).

use crate::cpu::attention::{
    attention_core_backward, attention_core_forward, attention_encode_backward, attention_encode_forward,
    attention_step_forward, init_state_backward, init_state_forward, AttnCache, AttnGrads, AttnParams,
    AttnRelu, AttnSize,
};
use crate::cpu::dropout::{dropout_backward, dropout_forward};
use crate::cpu::embedding::{embedding_backward, embedding_forward};
use crate::cpu::gemm::{pack_a, sgemm, sgemm_packed_a, Epilogue, MatRef};
use crate::cpu::linear::colsum_acc;
use crate::cpu::linear::{linear_backward, linear_forward, transpose_into, weight_grad_acc};
use crate::cpu::loss::{attention_reg, cross_entropy_fused};
use crate::cpu::lstm::{
    active_from_lengths, lstm_backward, lstm_cell_forward, lstm_forward, lstm_gates_backward,
    lstm_gates_forward, LstmCache, LstmCellCache, LstmGrads, LstmParams, LstmSize,
};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// The index of `<pad>` in every vocabulary.
pub const PAD: u32 = 0;

/// Sizes of a decoder. `regions` is 1 (unused) for show-tell; `att` is unused for show-tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderDims {
    pub vocab: usize,
    pub embed: usize,
    pub feat: usize,
    pub regions: usize,
    pub hidden: usize,
    pub att: usize,
}

/// A teacher-forced batch.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    /// (B,D) pooled features (show-tell) or (B,L,D) grid features (attention).
    pub feats: &'a [f32],
    /// (B,T) input token ids.
    pub tokens: &'a [u32],
    /// (B,T) target token ids (`<pad>` past each length).
    pub targets: &'a [u32],
    /// (B) lengths, longest first.
    pub lengths: &'a [usize],
    /// T, the padded number of steps.
    pub steps: usize,
}

/// Loss of one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepLoss {
    /// Mean cross-entropy over the non-pad tokens.
    pub ce: f32,
    /// Attention regulariser (0 for show-tell).
    pub reg: f32,
    /// Number of non-pad target tokens.
    pub tokens: usize,
}

macro_rules! param_struct {
    ($(#[$m:meta])* $name:ident { $($field:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Debug, Default, PartialEq)]
        pub struct $name {
            $(pub $field: Vec<f32>,)*
        }
        impl $name {
            /// (name, values) of every parameter, in a fixed order (checkpoints, Adam).
            pub fn named(&self) -> Vec<(&'static str, &[f32])> {
                vec![$((stringify!($field), &self.$field[..]),)*]
            }
            /// Mutable views in the same order as `named`.
            pub fn named_mut(&mut self) -> Vec<(&'static str, &mut [f32])> {
                vec![$((stringify!($field), &mut self.$field[..]),)*]
            }
            /// A copy with every value 0 (a gradient buffer).
            pub fn zeros_like(&self) -> Self {
                $name { $($field: vec![0.0; self.$field.len()],)* }
            }
            /// Sets every value to 0 (in parallel: a gradient buffer is tens of MB).
            pub fn zero(&mut self) {
                use rayon::prelude::*;
                $(self.$field.par_chunks_mut(1 << 15).for_each(|c| c.fill(0.0));)*
            }
        }
    };
}

param_struct!(
    /// Show-and-tell parameters: emb (V,E), w_h/w_c (H,D), b_h/b_c (H), LSTM (I = E), fc_w (V,H), fc_b (V).
    ShowTellParams { emb, w_h, b_h, w_c, b_c, w_ih, w_hh, b_ih, b_hh, fc_w, fc_b }
);

param_struct!(
    /// Show-attend-tell parameters: emb (V,E), init w_h/w_c (H,D) b_h/b_c (H), attention (see
    /// `cpu::attention::AttnParams`), LSTM cell with input [emb, ctx] (I = E + D), fc_w (V,H), fc_b (V).
    AttentionParams {
        emb, w_h, b_h, w_c, b_c, w_enc, b_enc, w_dec, b_dec, w_full, b_full, w_beta, b_beta,
        w_ih, w_hh, b_ih, b_hh, fc_w, fc_b,
    }
);

impl ShowTellParams {
    /// Zero-filled parameters of the right shapes.
    pub fn zeros(d: &DecoderDims) -> Self {
        let (v, e, f, h) = (d.vocab, d.embed, d.feat, d.hidden);
        ShowTellParams {
            emb: vec![0.0; v * e],
            w_h: vec![0.0; h * f],
            b_h: vec![0.0; h],
            w_c: vec![0.0; h * f],
            b_c: vec![0.0; h],
            w_ih: vec![0.0; 4 * h * e],
            w_hh: vec![0.0; 4 * h * h],
            b_ih: vec![0.0; 4 * h],
            b_hh: vec![0.0; 4 * h],
            fc_w: vec![0.0; v * h],
            fc_b: vec![0.0; v],
        }
    }
}

impl AttentionParams {
    /// Zero-filled parameters of the right shapes.
    pub fn zeros(d: &DecoderDims) -> Self {
        let (v, e, f, h, a) = (d.vocab, d.embed, d.feat, d.hidden, d.att);
        AttentionParams {
            emb: vec![0.0; v * e],
            w_h: vec![0.0; h * f],
            b_h: vec![0.0; h],
            w_c: vec![0.0; h * f],
            b_c: vec![0.0; h],
            w_enc: vec![0.0; a * f],
            b_enc: vec![0.0; a],
            w_dec: vec![0.0; a * h],
            b_dec: vec![0.0; a],
            w_full: vec![0.0; a],
            b_full: vec![0.0; 1],
            w_beta: vec![0.0; f * h],
            b_beta: vec![0.0; f],
            w_ih: vec![0.0; 4 * h * (e + f)],
            w_hh: vec![0.0; 4 * h * h],
            b_ih: vec![0.0; 4 * h],
            b_hh: vec![0.0; 4 * h],
            fc_w: vec![0.0; v * h],
            fc_b: vec![0.0; v],
        }
    }

    fn attn(&self) -> AttnParams<'_> {
        AttnParams {
            w_enc: &self.w_enc,
            b_enc: &self.b_enc,
            w_dec: &self.w_dec,
            b_dec: &self.b_dec,
            w_full: &self.w_full,
            b_full: &self.b_full,
            w_beta: &self.w_beta,
            b_beta: &self.b_beta,
        }
    }
}

/// Checks a batch against the dims; returns (B, T, active sizes).
fn check_smoothing(smoothing: f32) -> Result<()> {
    if !(0.0..1.0).contains(&smoothing) {
        return Err(Error::msg(format!("label smoothing {smoothing} is not in [0, 1)")));
    }
    Ok(())
}

fn check_batch(batch: &Batch, d: &DecoderDims, feat_len: usize) -> Result<(usize, usize, Vec<usize>)> {
    let b = batch.lengths.len();
    let t = batch.steps;
    if batch.tokens.len() != b * t || batch.targets.len() != b * t {
        return Err(Error::shape(format!(
            "decoder batch: tokens {} / targets {} are not B*T = {}*{}",
            batch.tokens.len(),
            batch.targets.len(),
            b,
            t
        )));
    }
    if batch.feats.len() != b * feat_len {
        return Err(Error::shape(format!(
            "decoder batch: features {} are not B*{feat_len}",
            batch.feats.len()
        )));
    }
    if let Some(&bad) = batch.tokens.iter().chain(batch.targets).find(|&&x| x as usize >= d.vocab) {
        return Err(Error::shape(format!("decoder batch: token id {bad} >= vocabulary size {}", d.vocab)));
    }
    let active = active_from_lengths(batch.lengths, t)?;
    Ok((b, t, active))
}

/// Applies dropout to `h` (N,H) if asked: returns the layer input the output layer sees (a copy
/// with the mask applied) and keeps the mask in `mask`; with no dropout, returns None.
fn maybe_dropout(
    h: &[f32],
    mask: &mut Vec<f32>,
    dropout: Option<(f32, &mut Rng)>,
) -> Result<Option<Vec<f32>>> {
    match dropout {
        Some((p, rng)) if p > 0.0 => {
            let mut y = vec![0.0; h.len()];
            dropout_forward(&mut y, mask, h, p, rng)?;
            Ok(Some(y))
        }
        Some((p, _)) if p < 0.0 => Err(Error::msg(format!("dropout probability {p} is not in [0, 1)"))),
        _ => Ok(None),
    }
}

/// Output-layer backward through the optional dropout: dh (N,H) += mask * (dlogits W_fc), and the fc
/// gradients with the dropped input.
#[allow(clippy::too_many_arguments)]
fn output_backward(
    dh: &mut [f32],
    g_fc_w: &mut [f32],
    g_fc_b: &mut [f32],
    dlogits: &[f32],
    h: &[f32],
    h_drop: &Option<Vec<f32>>,
    mask: &[f32],
    fc_w: &[f32],
    n: usize,
    hd: usize,
    v: usize,
) {
    match h_drop {
        Some(hd_in) => {
            let mut dy = vec![0.0; n * hd];
            linear_backward(Some(&mut dy), g_fc_w, Some(g_fc_b), dlogits, hd_in, fc_w, n, hd, v);
            dropout_backward(dh, &dy, mask);
        }
        None => linear_backward(Some(dh), g_fc_w, Some(g_fc_b), dlogits, h, fc_w, n, hd, v),
    }
}

/// What the show-tell forward keeps for backward.
#[derive(Clone, Debug, Default)]
pub struct ShowTellForward {
    /// (B*T,V) logits; the backward turns them into dlogits in place.
    pub logits: Vec<f32>,
    /// (B,T,H) LSTM outputs.
    pub hs: Vec<f32>,
    h_drop: Option<Vec<f32>>,
    mask: Vec<f32>,
    h0: Vec<f32>,
    c0: Vec<f32>,
    x: Vec<f32>,
    lstm: LstmCache,
    active: Vec<usize>,
}

/// `v` resized to `n` zeros, keeping its allocation (see `show_tell_forward_into`).
fn zeroed(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

/// `v` resized to `n`, old contents kept: only for outputs the caller overwrites entirely.
fn sized(v: &mut Vec<f32>, n: usize) {
    v.resize(n, 0.0);
}

/// Show-tell forward (teacher forcing); `dropout` = (probability, mask stream) for training.
pub fn show_tell_forward(
    p: &ShowTellParams,
    d: &DecoderDims,
    batch: &Batch,
    dropout: Option<(f32, &mut Rng)>,
) -> Result<ShowTellForward> {
    let mut fw = ShowTellForward::default();
    show_tell_forward_into(&mut fw, p, d, batch, dropout)?;
    Ok(fw)
}

/// `show_tell_forward` into the buffers of a previous step's `fw` (same result): a training loop
/// that keeps one `ShowTellForward` does not allocate, fault in and free ~60 MB per step (the logits
/// alone are B*T*V floats; freeing a multi-threaded process's large mappings costs a TLB shootdown
/// on every core).
pub fn show_tell_forward_into(
    fw: &mut ShowTellForward,
    p: &ShowTellParams,
    d: &DecoderDims,
    batch: &Batch,
    dropout: Option<(f32, &mut Rng)>,
) -> Result<()> {
    let (b, t, active) = check_batch(batch, d, d.feat)?;
    let (v, e, f, h) = (d.vocab, d.embed, d.feat, d.hidden);
    fw.active = active;
    zeroed(&mut fw.h0, b * h);
    zeroed(&mut fw.c0, b * h);
    linear_forward(&mut fw.h0, batch.feats, &p.w_h, Some(&p.b_h), b, f, h);
    linear_forward(&mut fw.c0, batch.feats, &p.w_c, Some(&p.b_c), b, f, h);
    fw.h0.iter_mut().chain(fw.c0.iter_mut()).for_each(|x| *x = x.tanh());
    zeroed(&mut fw.x, b * t * e);
    embedding_forward(&mut fw.x, batch.tokens, &p.emb, v, e);
    zeroed(&mut fw.hs, b * t * h);
    let lp = LstmParams { w_ih: &p.w_ih, w_hh: &p.w_hh, b_ih: &p.b_ih, b_hh: &p.b_hh };
    lstm_forward(
        &mut fw.hs,
        &mut fw.lstm,
        &fw.x,
        &fw.h0,
        &fw.c0,
        &lp,
        &fw.active,
        LstmSize { b, t, i: e, h },
    );
    sized(&mut fw.logits, b * t * v);
    fw.h_drop = maybe_dropout(&fw.hs, &mut fw.mask, dropout)?;
    let h_in = fw.h_drop.as_deref().unwrap_or(&fw.hs);
    linear_forward(&mut fw.logits, h_in, &p.fc_w, Some(&p.fc_b), b * t, h, v);
    Ok(())
}

/// Show-tell loss and backward: consumes `fw.logits` (turned into dlogits), accumulates into `g`.
pub fn show_tell_backward(
    p: &ShowTellParams,
    g: &mut ShowTellParams,
    d: &DecoderDims,
    batch: &Batch,
    fw: &mut ShowTellForward,
    smoothing: f32,
) -> Result<StepLoss> {
    let (b, t, _) = check_batch(batch, d, d.feat)?;
    check_smoothing(smoothing)?;
    let (v, e, f, h) = (d.vocab, d.embed, d.feat, d.hidden);
    let ce = cross_entropy_fused(&mut fw.logits, batch.targets, v, smoothing, Some(PAD), 1.0);
    let mut dhs = vec![0.0; b * t * h];
    output_backward(
        &mut dhs,
        &mut g.fc_w,
        &mut g.fc_b,
        &fw.logits,
        &fw.hs,
        &fw.h_drop,
        &fw.mask,
        &p.fc_w,
        b * t,
        h,
        v,
    );
    let (mut dx, mut dh0, mut dc0) = (vec![0.0; b * t * e], vec![0.0; b * h], vec![0.0; b * h]);
    let lp = LstmParams { w_ih: &p.w_ih, w_hh: &p.w_hh, b_ih: &p.b_ih, b_hh: &p.b_hh };
    let mut lg = LstmGrads { w_ih: &mut g.w_ih, w_hh: &mut g.w_hh, b_ih: &mut g.b_ih, b_hh: &mut g.b_hh };
    lstm_backward(
        Some(&mut dx),
        Some(&mut dh0),
        Some(&mut dc0),
        &mut lg,
        &dhs,
        &fw.hs,
        &fw.lstm,
        &fw.x,
        &fw.h0,
        &fw.c0,
        &lp,
        &fw.active,
        LstmSize { b, t, i: e, h },
    );
    embedding_backward(&mut g.emb, &dx, batch.tokens, Some(PAD), v, e);
    // Through tanh: d(pre) = d(out) * (1 - out^2).
    dh0.iter_mut().zip(&fw.h0).for_each(|(d, y)| *d *= 1.0 - y * y);
    dc0.iter_mut().zip(&fw.c0).for_each(|(d, y)| *d *= 1.0 - y * y);
    linear_backward(None, &mut g.w_h, Some(&mut g.b_h), &dh0, batch.feats, &p.w_h, b, f, h);
    linear_backward(None, &mut g.w_c, Some(&mut g.b_c), &dc0, batch.feats, &p.w_c, b, f, h);
    Ok(StepLoss { ce: ce.loss, reg: 0.0, tokens: ce.count })
}

/// What the attention forward keeps for backward.
///
/// Per-step rows are STACKED step-major ("packed"): step s owns rows offs[s]..offs[s] + active[s],
/// row r of the step being batch row r. N = total live tokens. The output layer and the LSTM weight
/// gradients do not feed the recurrence, so they run as single GEMMs over all N rows.
#[derive(Clone, Debug, Default)]
pub struct AttentionForward {
    /// (N,V) logits in packed order (see `logits_padded` for (B,T,V)); the backward turns them
    /// into dlogits in place.
    pub logits: Vec<f32>,
    /// (B,T,L) attention weights, 0 past each row's length.
    pub alphas: Vec<f32>,
    /// (B,L,D) dL/dfeats, filled by the backward when asked (`feats_grad`; encoder fine-tuning and
    /// tests), else empty. Skipping it saves a (B*L,A)x(A,D) GEMM and a pass over (B,L,D) per step.
    pub dfeats: Vec<f32>,
    active: Vec<usize>,
    offs: Vec<usize>,
    mean: Vec<f32>,
    h0: Vec<f32>,
    c0: Vec<f32>,
    att1: Vec<f32>,
    tok: Vec<u32>,      // (N) input tokens, packed
    emb: Vec<f32>,      // (N,E) their embeddings
    ctx_all: Vec<f32>,  // (N,D) attention contexts
    h_all: Vec<f32>,    // (N,H)
    c_all: Vec<f32>,    // (N,H)
    acts_all: Vec<f32>, // (N,4H)
    // The attention steps' saves (r = relu(att1 + att2) is recomputed by the backward).
    att2_all: Vec<f32>,  // (N,A)
    alpha_all: Vec<f32>, // (N,L)
    z_all: Vec<f32>,     // (N,D) raw contexts before the gate
    gate_all: Vec<f32>,  // (N,D) sigmoid gates
    h_drop: Option<Vec<f32>>,
    mask: Vec<f32>,
}

impl AttentionForward {
    /// The logits as (B,T,V), 0 past each row's length (call before the backward).
    pub fn logits_padded(&self, b: usize, t: usize, v: usize) -> Vec<f32> {
        let mut out = vec![0.0; b * t * v];
        for s in 0..self.active.len() {
            for r in 0..self.active[s] {
                let src = (self.offs[s] + r) * v;
                out[(r * t + s) * v..(r * t + s + 1) * v].copy_from_slice(&self.logits[src..src + v]);
            }
        }
        out
    }
}

/// Views of the LSTM weights of the attention decoder: W_ih[:, :E] (4H,E) and W_ih[:, E:] (4H,D), both
/// with leading dimension E+D, and W_hh (4H,H).
fn lstm_input_views(
    p: &AttentionParams,
    e: usize,
    f: usize,
    h: usize,
) -> (MatRef<'_>, MatRef<'_>, MatRef<'_>) {
    (
        MatRef::row_major_ld(&p.w_ih, 4 * h, e, e + f),
        MatRef::row_major_ld(&p.w_ih[e..], 4 * h, f, e + f),
        MatRef::row_major(&p.w_hh, 4 * h, h),
    )
}

/// Row offsets of each step in the packed order, and the total N.
fn packed_offsets(active: &[usize]) -> (Vec<usize>, usize) {
    let mut offs = Vec::with_capacity(active.len());
    let mut n = 0;
    for &a in active {
        offs.push(n);
        n += a;
    }
    (offs, n)
}

/// Attention decoder forward (teacher forcing); `dropout` = (probability, mask stream) for training.
pub fn attention_forward(
    p: &AttentionParams,
    d: &DecoderDims,
    batch: &Batch,
    dropout: Option<(f32, &mut Rng)>,
) -> Result<AttentionForward> {
    let mut fw = AttentionForward::default();
    attention_forward_into(&mut fw, p, d, batch, dropout)?;
    Ok(fw)
}

/// `attention_forward` into the buffers of a previous step's `fw` (same result; see
/// `show_tell_forward_into`).
pub fn attention_forward_into(
    fw: &mut AttentionForward,
    p: &AttentionParams,
    d: &DecoderDims,
    batch: &Batch,
    dropout: Option<(f32, &mut Rng)>,
) -> Result<()> {
    let (l, f) = (d.regions, d.feat);
    let (b, t, active) = check_batch(batch, d, l * f)?;
    let (v, e, h, a) = (d.vocab, d.embed, d.hidden, d.att);
    let feats = batch.feats;
    let (offs, n) = packed_offsets(&active);
    fw.active = active;
    fw.offs = offs;
    fw.dfeats.clear();
    zeroed(&mut fw.mean, b * f);
    zeroed(&mut fw.h0, b * h);
    zeroed(&mut fw.c0, b * h);
    init_state_forward(
        &mut fw.mean,
        &mut fw.h0,
        &mut fw.c0,
        feats,
        &p.w_h,
        &p.b_h,
        &p.w_c,
        &p.b_c,
        b,
        l,
        f,
        h,
    );
    fw.tok.clear();
    fw.tok.resize(n, PAD);
    for s in 0..t {
        for r in 0..fw.active[s] {
            fw.tok[fw.offs[s] + r] = batch.tokens[r * t + s];
        }
    }
    zeroed(&mut fw.emb, n * e);
    embedding_forward(&mut fw.emb, &fw.tok, &p.emb, v, e);
    zeroed(&mut fw.att1, b * l * a);
    let ap = p.attn();
    attention_encode_forward(&mut fw.att1, feats, &ap, AttnSize { b, l, d: f, h, a });
    zeroed(&mut fw.alphas, b * t * l);
    zeroed(&mut fw.ctx_all, n * f);
    zeroed(&mut fw.h_all, n * h);
    zeroed(&mut fw.c_all, n * h);
    // The LSTM input is [emb, ctx], so z = emb W_ih[:, :E]^T + ctx W_ih[:, E:]^T + h W_hh^T + b.
    // The embedding part is known for all steps under teacher forcing: one GEMM (N,E) x (E,4H).
    let (w_emb, w_ctx, w_hh) = lstm_input_views(p, e, f, h);
    let bias: Vec<f32> = p.b_ih.iter().zip(&p.b_hh).map(|(x, y)| x + y).collect();
    zeroed(&mut fw.acts_all, n * 4 * h);
    if n > 0 {
        let epi = Epilogue { col_bias: Some(&bias), ..Default::default() };
        sgemm(MatRef::row_major(&fw.emb, n, e), w_emb.t(), &mut fw.acts_all, 4 * h, &epi);
    }
    // Per step, every product with a fixed weight has only bs <= B rows of activations, so it is
    // computed transposed, y^T = W x^T, with W packed ONCE per forward as the GEMM's A operand
    // (packing the weight per step would cost as much as the product); `transpose_into` brings
    // y^T (O,bs) back into row layout.
    // (Packing is serial inside pack_a: the four run side by side, W_ctx being as big as the rest.)
    let (pk_ctx, (pk_hh, (pk_dec, pk_beta))) = rayon::join(
        || pack_a(w_ctx), // (4H,D)
        || {
            rayon::join(
                || pack_a(w_hh), // (4H,H)
                || {
                    rayon::join(
                        || pack_a(MatRef::row_major(&p.w_dec, a, h)),  // (A,H)
                        || pack_a(MatRef::row_major(&p.w_beta, f, h)), // (D,H)
                    )
                },
            )
        },
    );
    zeroed(&mut fw.att2_all, n * a);
    zeroed(&mut fw.alpha_all, n * l);
    zeroed(&mut fw.z_all, n * f);
    zeroed(&mut fw.gate_all, n * f);
    let (mut att2t, mut gatet, mut zt) = (vec![0.0; a * b], vec![0.0; f * b], vec![0.0; 4 * h * b]);
    let acc = Epilogue { beta: 1.0, ..Default::default() };
    for s in 0..t {
        let (bs, o) = (fw.active[s], fw.offs[s]);
        if bs == 0 {
            continue;
        }
        let sz = AttnSize { b: bs, l, d: f, h, a };
        let (h_before, h_out) = fw.h_all.split_at_mut(o * h);
        let (c_before, c_out) = fw.c_all.split_at_mut(o * h);
        let (h_prev, c_prev) = if s == 0 {
            (&fw.h0[..bs * h], &fw.c0[..bs * h])
        } else {
            let po = fw.offs[s - 1] * h;
            (&h_before[po..po + bs * h], &c_before[po..po + bs * h])
        };
        // att2^T (A,bs) = W_dec h^T + b_dec; gate pre-activation^T (D,bs) = W_beta h^T + b_beta;
        // z^T (4H,bs) = W_hh h^T (+ W_ctx ctx^T below).
        let hb = MatRef::row_major(h_prev, bs, h).t(); // (H,bs)
        sgemm_packed_a(
            &pk_dec,
            hb,
            &mut att2t,
            bs,
            &Epilogue { row_bias: Some(&p.b_dec), ..Default::default() },
        );
        sgemm_packed_a(
            &pk_beta,
            hb,
            &mut gatet,
            bs,
            &Epilogue { row_bias: Some(&p.b_beta), ..Default::default() },
        );
        sgemm_packed_a(&pk_hh, hb, &mut zt, bs, &Epilogue::default());
        let att2 = &mut fw.att2_all[o * a..(o + bs) * a];
        transpose_into(att2, a, &att2t, a, bs, false);
        let gate = &mut fw.gate_all[o * f..(o + bs) * f];
        transpose_into(gate, f, &gatet, f, bs, false);
        let ctx = &mut fw.ctx_all[o * f..(o + bs) * f];
        let alpha = &mut fw.alpha_all[o * l..(o + bs) * l];
        attention_core_forward(
            ctx,
            alpha,
            &mut fw.z_all[o * f..(o + bs) * f],
            gate,
            None,
            &fw.att1[..bs * l * a],
            att2,
            &feats[..bs * l * f],
            &p.w_full,
            p.b_full[0],
            sz,
        );
        for r in 0..bs {
            fw.alphas[(r * t + s) * l..(r * t + s + 1) * l].copy_from_slice(&alpha[r * l..(r + 1) * l]);
        }
        // z (bs,4H) += (W_ctx ctx^T + W_hh h^T)^T, then the fused gate/cell update.
        sgemm_packed_a(&pk_ctx, MatRef::row_major(ctx, bs, f).t(), &mut zt, bs, &acc);
        let z = &mut fw.acts_all[o * 4 * h..(o + bs) * 4 * h];
        transpose_into(z, 4 * h, &zt, 4 * h, bs, true);
        lstm_gates_forward(z, c_prev, &mut c_out[..bs * h], &mut h_out[..bs * h], bs, h);
    }
    // Output layer over all live rows at once: (N,H) x (H,V).
    sized(&mut fw.logits, n * v);
    fw.h_drop = maybe_dropout(&fw.h_all, &mut fw.mask, dropout)?;
    let h_in = fw.h_drop.as_deref().unwrap_or(&fw.h_all);
    linear_forward(&mut fw.logits, h_in, &p.fc_w, Some(&p.fc_b), n, h, v);
    Ok(())
}

/// Attention decoder loss and backward: consumes `fw.logits` (turned into dlogits), accumulates into
/// `g`; with `feats_grad`, also leaves dL/dfeats in `fw.dfeats`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    p: &AttentionParams,
    g: &mut AttentionParams,
    d: &DecoderDims,
    batch: &Batch,
    fw: &mut AttentionForward,
    alpha_c: f32,
    smoothing: f32,
    feats_grad: bool,
) -> Result<StepLoss> {
    let (l, f) = (d.regions, d.feat);
    let (b, t, _) = check_batch(batch, d, l * f)?;
    check_smoothing(smoothing)?;
    let (v, e, h, a) = (d.vocab, d.embed, d.hidden, d.att);
    let xi = e + f;
    let feats = batch.feats;
    let n = fw.h_all.len() / h;
    // Targets in the packed order of the logits.
    let mut tp = vec![PAD; n];
    for s in 0..t {
        for r in 0..fw.active[s] {
            tp[fw.offs[s] + r] = batch.targets[r * t + s];
        }
    }
    let ce = cross_entropy_fused(&mut fw.logits, &tp, v, smoothing, Some(PAD), 1.0);
    let mut dalphas = vec![0.0; b * t * l];
    let reg = attention_reg(Some(&mut dalphas), &fw.alphas, batch.lengths, alpha_c, t, l);
    let ap = p.attn();
    let (w_emb, w_ctx, w_hh_v) = lstm_input_views(p, e, f, h);
    let AttentionParams {
        emb: g_emb,
        w_h: g_w_h,
        b_h: g_b_h,
        w_c: g_w_c,
        b_c: g_b_c,
        w_enc,
        b_enc,
        w_dec,
        b_dec,
        w_full,
        b_full,
        w_beta,
        b_beta,
        w_ih,
        w_hh,
        b_ih,
        b_hh,
        fc_w: g_fc_w,
        fc_b: g_fc_b,
    } = g;
    // Output layer over all rows: dH (N,H) = dlogits W_fc; dW_fc += dlogits^T H; db_fc += sum.
    let mut dh_all = vec![0.0; n * h];
    output_backward(
        &mut dh_all,
        g_fc_w,
        g_fc_b,
        &fw.logits,
        &fw.h_all,
        &fw.h_drop,
        &fw.mask,
        &p.fc_w,
        n,
        h,
        v,
    );
    let mut dh_next = vec![0.0; b * h]; // (B,H) dL/dh_{s} from step s+1
    let mut dc_next = vec![0.0; b * h]; // (B,H) dL/dc_{s} from step s+1
    let mut datt1 = vec![0.0; b * l * a];
    let mut dfeats = if feats_grad { vec![0.0; b * l * f] } else { Vec::new() }; // (B,L,D)
    let mut dalpha = vec![0.0; b * l];
    let mut dz_all = vec![0.0; n * 4 * h]; // (N,4H)
    let mut dpre_all = vec![0.0; n * f]; // (N,D) dL/d(gate pre-activation)
    let mut datt2_all = vec![0.0; n * a]; // (N,A)
                                          // The transposed weights, packed once (see the forward): dctx^T = W_ctx^T dz^T and
                                          // dh_prev^T = W_hh^T dz^T + W_beta^T dpre^T + W_dec^T datt2^T per step.
    let (pk_ctx_t, (pk_hh_t, (pk_beta_t, pk_dec_t))) = rayon::join(
        || pack_a(w_ctx.t()), // (D,4H)
        || {
            rayon::join(
                || pack_a(w_hh_v.t()), // (H,4H)
                || {
                    rayon::join(
                        || pack_a(MatRef::row_major(&p.w_beta, f, h).t()), // (H,D)
                        || pack_a(MatRef::row_major(&p.w_dec, a, h).t()),  // (H,A)
                    )
                },
            )
        },
    );
    let (mut dctxt, mut dht, mut dctx) = (vec![0.0; f * b], vec![0.0; h * b], vec![0.0; b * f]);
    let acc = Epilogue { beta: 1.0, ..Default::default() };
    for s in (0..t).rev() {
        let (bs, o) = (fw.active[s], fw.offs[s]);
        if bs == 0 {
            continue;
        }
        let sz = AttnSize { b: bs, l, d: f, h, a };
        let c_prev = if s == 0 {
            &fw.c0[..bs * h]
        } else {
            let po = fw.offs[s - 1] * h;
            &fw.c_all[po..po + bs * h]
        };
        for r in 0..bs {
            dalpha[r * l..(r + 1) * l].copy_from_slice(&dalphas[(r * t + s) * l..(r * t + s + 1) * l]);
        }
        // dh_s = dh_next + the output layer's share
        let dh = &mut dh_next[..bs * h];
        dh.iter_mut().zip(&dh_all[o * h..(o + bs) * h]).for_each(|(x, y)| *x += y);
        // Gate backward: dz (bs,4H); dc becomes dc_prev = dc * f (in place). Then dctx = dz W_ih[:, E:]
        // (the embedding part of dx is one GEMM after the loop).
        let dz = &mut dz_all[o * 4 * h..(o + bs) * 4 * h];
        let (acts, cs) = (&fw.acts_all[o * 4 * h..(o + bs) * 4 * h], &fw.c_all[o * h..(o + bs) * h]);
        lstm_gates_backward(dz, &mut dc_next[..bs * h], dh, acts, cs, c_prev, bs, h);
        let dzt = MatRef::row_major(dz, bs, 4 * h).t(); // (4H,bs)
        sgemm_packed_a(&pk_ctx_t, dzt, &mut dctxt, bs, &Epilogue::default());
        transpose_into(&mut dctx, f, &dctxt, f, bs, false);
        let dpre = &mut dpre_all[o * f..(o + bs) * f];
        let datt2 = &mut datt2_all[o * a..(o + bs) * a];
        attention_core_backward(
            if feats_grad { Some(&mut dfeats[..bs * l * f]) } else { None },
            &mut datt1[..bs * l * a],
            dpre,
            datt2,
            w_full,
            b_full,
            &dctx[..bs * f],
            Some(&dalpha[..bs * l]),
            &fw.alpha_all[o * l..(o + bs) * l],
            &fw.z_all[o * f..(o + bs) * f],
            &fw.gate_all[o * f..(o + bs) * f],
            AttnRelu::Recompute(&fw.att1[..bs * l * a], &fw.att2_all[o * a..(o + bs) * a]),
            &feats[..bs * l * f],
            &p.w_full,
            sz,
        );
        // dh_{s-1}^T (H,bs) = W_hh^T dz^T + W_beta^T dpre^T + W_dec^T datt2^T
        sgemm_packed_a(&pk_hh_t, dzt, &mut dht, bs, &Epilogue::default());
        sgemm_packed_a(&pk_beta_t, MatRef::row_major(dpre, bs, f).t(), &mut dht, bs, &acc);
        sgemm_packed_a(&pk_dec_t, MatRef::row_major(datt2, bs, a).t(), &mut dht, bs, &acc);
        transpose_into(&mut dh_next[..bs * h], h, &dht, h, bs, false);
    }
    // LSTM weight gradients over all rows at once; h_prev stacked in the same packed order.
    let mut hprev_all = vec![0.0; n * h];
    for s in 0..t {
        let (bs, o) = (fw.active[s], fw.offs[s]);
        let src =
            if s == 0 { &fw.h0[..bs * h] } else { &fw.h_all[fw.offs[s - 1] * h..(fw.offs[s - 1] + bs) * h] };
        hprev_all[o * h..(o + bs) * h].copy_from_slice(src);
    }
    // LSTM weight gradients as single GEMMs over the N stacked rows: dW_ih[:, :E] += dz^T emb,
    // dW_ih[:, E:] += dz^T ctx (column blocks of the (4H, E+D) matrix, ldc = E+D), dW_hh += dz^T h_prev.
    let mut demb = vec![0.0; n * e]; // (N,E)
    if n > 0 {
        let dza = MatRef::row_major(&dz_all, n, 4 * h);
        weight_grad_acc(&mut w_ih[..], xi, &dz_all, &fw.emb, n, 4 * h, e);
        weight_grad_acc(&mut w_ih[e..], xi, &dz_all, &fw.ctx_all, n, 4 * h, f);
        weight_grad_acc(w_hh, h, &dz_all, &hprev_all, n, 4 * h, h);
        colsum_acc(b_ih, &dz_all, n, 4 * h);
        colsum_acc(b_hh, &dz_all, n, 4 * h);
        sgemm(dza, w_emb, &mut demb, e, &Epilogue::default());
        // The h projections of the attention, also over all N rows: dW_beta (D,H) += dpre^T h_prev,
        // dW_dec (A,H) += datt2^T h_prev, and their biases.
        weight_grad_acc(&mut w_beta[..], h, &dpre_all, &hprev_all, n, f, h);
        weight_grad_acc(&mut w_dec[..], h, &datt2_all, &hprev_all, n, a, h);
        colsum_acc(b_beta, &dpre_all, n, f);
        colsum_acc(b_dec, &datt2_all, n, a);
    }
    let mut ag = AttnGrads { w_enc, b_enc, w_dec, b_dec, w_full, b_full, w_beta, b_beta };
    attention_encode_backward(
        feats_grad.then_some(&mut dfeats[..]),
        &mut ag,
        &datt1,
        feats,
        &ap,
        AttnSize { b, l, d: f, h, a },
    );
    init_state_backward(
        feats_grad.then_some(&mut dfeats[..]),
        g_w_h,
        g_b_h,
        g_w_c,
        g_b_c,
        &dh_next,
        &dc_next,
        &fw.mean,
        &p.w_h,
        &p.w_c,
        b,
        l,
        f,
        h,
    );
    embedding_backward(g_emb, &demb, &fw.tok, Some(PAD), v, e);
    fw.dfeats = dfeats;
    Ok(StepLoss { ce: ce.loss, reg, tokens: ce.count })
}

/// The recurrent state of a decoder during generation: h, c (B,H), one row per hypothesis.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DecodeState {
    pub h: Vec<f32>,
    pub c: Vec<f32>,
}

impl DecodeState {
    /// Keeps rows `rows` (in that order, repeats allowed): reorders hypotheses in beam search.
    pub fn gather(&self, rows: &[usize], hidden: usize) -> DecodeState {
        let pick =
            |v: &[f32]| rows.iter().flat_map(|&r| v[r * hidden..(r + 1) * hidden].iter().copied()).collect();
        DecodeState { h: pick(&self.h), c: pick(&self.c) }
    }
}

/// Show-tell initial state from pooled features (B,D): h0 = tanh(f W_h^T + b_h), c0 likewise.
pub fn show_tell_init(p: &ShowTellParams, d: &DecoderDims, feats: &[f32]) -> Result<DecodeState> {
    if feats.is_empty() || !feats.len().is_multiple_of(d.feat) {
        return Err(Error::shape(format!(
            "show-tell: features of length {} are not (B,{})",
            feats.len(),
            d.feat
        )));
    }
    let b = feats.len() / d.feat;
    let mut st = DecodeState { h: vec![0.0; b * d.hidden], c: vec![0.0; b * d.hidden] };
    linear_forward(&mut st.h, feats, &p.w_h, Some(&p.b_h), b, d.feat, d.hidden);
    linear_forward(&mut st.c, feats, &p.w_c, Some(&p.b_c), b, d.feat, d.hidden);
    st.h.iter_mut().chain(st.c.iter_mut()).for_each(|x| *x = x.tanh());
    Ok(st)
}

fn check_tokens(tokens: &[u32], b: usize, d: &DecoderDims) -> Result<()> {
    if tokens.len() != b {
        return Err(Error::shape(format!("decoder step: {} tokens for {b} states", tokens.len())));
    }
    if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= d.vocab) {
        return Err(Error::shape(format!("decoder step: token id {bad} >= vocabulary size {}", d.vocab)));
    }
    Ok(())
}

/// One show-tell generation step: feeds `tokens` (B), advances `state`, returns logits (B,V).
pub fn show_tell_step(
    p: &ShowTellParams,
    d: &DecoderDims,
    state: &mut DecodeState,
    tokens: &[u32],
) -> Result<Vec<f32>> {
    let (v, e, h) = (d.vocab, d.embed, d.hidden);
    let b = state.h.len() / h;
    check_tokens(tokens, b, d)?;
    let mut x = vec![0.0; b * e];
    embedding_forward(&mut x, tokens, &p.emb, v, e);
    let lp = LstmParams { w_ih: &p.w_ih, w_hh: &p.w_hh, b_ih: &p.b_ih, b_hh: &p.b_hh };
    let mut hn = vec![0.0; b * h];
    let mut cc = LstmCellCache::default();
    lstm_cell_forward(&mut hn, &mut cc, &x, &state.h, &state.c, &lp, b, e, h);
    state.h = hn;
    state.c = cc.c;
    let mut logits = vec![0.0; b * v];
    linear_forward(&mut logits, &state.h, &p.fc_w, Some(&p.fc_b), b, h, v);
    Ok(logits)
}

/// Attention decoder before generation: the initial state and att1 (B,L,A) from grid features (B,L,D).
pub fn attention_init(
    p: &AttentionParams,
    d: &DecoderDims,
    feats: &[f32],
) -> Result<(DecodeState, Vec<f32>)> {
    let (l, f, h, a) = (d.regions, d.feat, d.hidden, d.att);
    if feats.is_empty() || !feats.len().is_multiple_of(l * f) {
        return Err(Error::shape(format!(
            "attention: features of length {} are not (B,{l},{f})",
            feats.len()
        )));
    }
    let b = feats.len() / (l * f);
    let mut st = DecodeState { h: vec![0.0; b * h], c: vec![0.0; b * h] };
    let mut mean = vec![0.0; b * f];
    init_state_forward(&mut mean, &mut st.h, &mut st.c, feats, &p.w_h, &p.b_h, &p.w_c, &p.b_c, b, l, f, h);
    let mut att1 = vec![0.0; b * l * a];
    attention_encode_forward(&mut att1, feats, &p.attn(), AttnSize { b, l, d: f, h, a });
    Ok((st, att1))
}

/// One attention generation step: feeds `tokens` (B), advances `state`; returns logits (B,V) and
/// alpha (B,L). `feats` (B,L,D) and `att1` (B,L,A) are per hypothesis (from `attention_init`,
/// rows gathered like the state in beam search).
pub fn attention_step(
    p: &AttentionParams,
    d: &DecoderDims,
    feats: &[f32],
    att1: &[f32],
    state: &mut DecodeState,
    tokens: &[u32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (v, e, l, f, h, a) = (d.vocab, d.embed, d.regions, d.feat, d.hidden, d.att);
    let b = state.h.len() / h;
    check_tokens(tokens, b, d)?;
    if feats.len() != b * l * f || att1.len() != b * l * a {
        return Err(Error::shape(format!("attention step: features/att1 do not match {b} states")));
    }
    let mut ctx = vec![0.0; b * f];
    let mut ac = AttnCache::default();
    attention_step_forward(
        &mut ctx,
        &mut ac,
        att1,
        feats,
        &state.h,
        &p.attn(),
        AttnSize { b, l, d: f, h, a },
    );
    let mut x = vec![0.0; b * (e + f)];
    for r in 0..b {
        let row = &mut x[r * (e + f)..(r + 1) * (e + f)];
        let t = tokens[r] as usize;
        row[..e].copy_from_slice(&p.emb[t * e..(t + 1) * e]);
        row[e..].copy_from_slice(&ctx[r * f..(r + 1) * f]);
    }
    let lp = LstmParams { w_ih: &p.w_ih, w_hh: &p.w_hh, b_ih: &p.b_ih, b_hh: &p.b_hh };
    let mut hn = vec![0.0; b * h];
    let mut cc = LstmCellCache::default();
    lstm_cell_forward(&mut hn, &mut cc, &x, &state.h, &state.c, &lp, b, e + f, h);
    state.h = hn;
    state.c = cc.c;
    let mut logits = vec![0.0; b * v];
    linear_forward(&mut logits, &state.h, &p.fc_w, Some(&p.fc_b), b, h, v);
    Ok((logits, ac.alpha))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `_into` forwards reuse a previous step's buffers: after a step on a bigger batch with
    /// other lengths, a second step must give exactly (bitwise) what a fresh forward gives, and so
    /// must the backward from it.
    #[test]
    fn forward_into_reuse_matches_fresh() {
        let d = DecoderDims { vocab: 11, embed: 4, feat: 6, regions: 3, hidden: 5, att: 7 };
        let mut rng = Rng::new(31);
        let mut pa = AttentionParams::zeros(&d);
        pa.named_mut().into_iter().for_each(|(_, v)| rng.fill_uniform(v, -0.3, 0.3));
        let mut ps = ShowTellParams::zeros(&d);
        ps.named_mut().into_iter().for_each(|(_, v)| rng.fill_uniform(v, -0.3, 0.3));
        let mut make = |b: usize, t: usize, lengths: Vec<usize>, feat_len: usize| {
            let mut feats = vec![0.0; b * feat_len];
            rng.fill_uniform(&mut feats, 0.0, 1.0);
            let mut tokens = vec![PAD; b * t];
            let mut targets = vec![PAD; b * t];
            for r in 0..b {
                for s in 0..lengths[r] {
                    tokens[r * t + s] = 1 + rng.below(10) as u32;
                    targets[r * t + s] = 1 + rng.below(10) as u32;
                }
            }
            (feats, tokens, targets, lengths, t)
        };
        type Owned = (Vec<f32>, Vec<u32>, Vec<u32>, Vec<usize>, usize);
        fn batch(x: &Owned) -> Batch<'_> {
            Batch { feats: &x.0, tokens: &x.1, targets: &x.2, lengths: &x.3, steps: x.4 }
        }
        let fl = d.regions * d.feat;
        let (big, small) = (make(4, 5, vec![5, 5, 3, 2], fl), make(3, 4, vec![4, 2, 1], fl));
        let mut reused = AttentionForward::default();
        attention_forward_into(&mut reused, &pa, &d, &batch(&big), None).unwrap();
        attention_forward_into(&mut reused, &pa, &d, &batch(&small), None).unwrap();
        let mut fresh = attention_forward(&pa, &d, &batch(&small), None).unwrap();
        assert_eq!(reused.logits, fresh.logits);
        assert_eq!(reused.alphas, fresh.alphas);
        let (mut g1, mut g2) = (pa.zeros_like(), pa.zeros_like());
        let l1 = attention_backward(&pa, &mut g1, &d, &batch(&small), &mut reused, 1.0, 0.1, true).unwrap();
        let l2 = attention_backward(&pa, &mut g2, &d, &batch(&small), &mut fresh, 1.0, 0.1, true).unwrap();
        assert_eq!((l1, &g1, &reused.dfeats), (l2, &g2, &fresh.dfeats));

        let (big, small) = (make(4, 5, vec![5, 4, 4, 1], d.feat), make(2, 3, vec![3, 2], d.feat));
        let mut reused = ShowTellForward::default();
        show_tell_forward_into(&mut reused, &ps, &d, &batch(&big), None).unwrap();
        show_tell_forward_into(&mut reused, &ps, &d, &batch(&small), None).unwrap();
        let mut fresh = show_tell_forward(&ps, &d, &batch(&small), None).unwrap();
        assert_eq!((&reused.logits, &reused.hs), (&fresh.logits, &fresh.hs));
        let (mut g1, mut g2) = (ps.zeros_like(), ps.zeros_like());
        let l1 = show_tell_backward(&ps, &mut g1, &d, &batch(&small), &mut reused, 0.1).unwrap();
        let l2 = show_tell_backward(&ps, &mut g2, &d, &batch(&small), &mut fresh, 0.1).unwrap();
        assert_eq!((l1, &g1), (l2, &g2));
    }
}
