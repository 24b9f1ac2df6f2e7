//! LSTM (PyTorch conventions), forward and backward through time, plus a single-step cell.
//!
//! Math, per step t with input x_t (B,I), previous state h_{t-1}, c_{t-1} (B,H), weights
//! W_ih (4H,I), W_hh (4H,H), biases b_ih, b_hh (4H), gates in the order i, f, g, o:
//!
//! ```text
//! z_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh          // (B,4H) pre-activations
//! i = sigmoid(z_i)  f = sigmoid(z_f)  g = tanh(z_g)  o = sigmoid(z_o)
//! c_t = f * c_{t-1} + i * g                                // (B,H)
//! h_t = o * tanh(c_t)                                      // (B,H)
//! ```
//!
//! Backward, given dh_t (from the output and from step t+1) and dc_t (from step t+1):
//!
//! ```text
//! do = dh_t * tanh(c_t)              dc = dc_t + dh_t * o * (1 - tanh(c_t)^2)
//! di = dc * g   df = dc * c_{t-1}    dg = dc * i          dc_{t-1} = dc * f
//! dz = [di*i(1-i), df*f(1-f), dg*(1-g^2), do*o(1-o)]       // (B,4H)
//! dh_{t-1} = dz W_hh     dW_hh += dz^T h_{t-1}   dx_t = dz W_ih   dW_ih += dz^T x_t   db += sum_b dz
//! ```
//!
//! Structure of the sequence version (batch-first tensors, (B,T,*)):
//! forward: the input projections of all T steps are ONE GEMM (B*T,I) x (I,4H) written straight into
//! the gate buffer; then per step one GEMM for the recurrent part and a fused elementwise gate/cell
//! update that adds it and leaves the gate activations in place for backward. The per-step GEMM has
//! only B rows, so it is computed transposed, W_hh h_{t-1}^T (4H,B), with W_hh packed ONCE per pass as
//! the GEMM's A operand (packing it per step cost as much as the product). Backward: per step the
//! fused elementwise gate backward and one GEMM for dh_{t-1} (W_hh^T packed once likewise); dW_hh,
//! dW_ih, dx and the biases are single GEMMs / sums over all steps at the end (dW_hh uses a copy of h
//! shifted by one step).
//!
//! Variable lengths: a per-step ACTIVE BATCH SIZE (as PyTorch's packed sequences). The batch must be
//! sorted by length, longest first; at step t rows 0..active[t] are live. Rows past their length
//! output h = 0 (and c = 0 in the cache) and receive no gradient; their state is not carried further
//! (the final state of a short row is its h at step len-1, which the caller can read from `hs`).

use rayon::prelude::*;

use crate::cpu::gemm::{pack_a, sgemm, sgemm_packed_a, Epilogue, MatRef};
use crate::cpu::linear::{colsum_acc, transpose_into, weight_grad_acc};
use crate::cpu::loss::exp_f32;
use crate::error::{Error, Result};

/// Sizes of an LSTM sequence: batch, steps, input features, hidden size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LstmSize {
    pub b: usize,
    pub t: usize,
    pub i: usize,
    pub h: usize,
}

/// The parameters, PyTorch layout.
#[derive(Clone, Copy, Debug)]
pub struct LstmParams<'a> {
    pub w_ih: &'a [f32], // (4H,I)
    pub w_hh: &'a [f32], // (4H,H)
    pub b_ih: &'a [f32], // (4H)
    pub b_hh: &'a [f32], // (4H)
}

/// Gradient buffers of the parameters (accumulated into).
#[derive(Debug)]
pub struct LstmGrads<'a> {
    pub w_ih: &'a mut [f32],
    pub w_hh: &'a mut [f32],
    pub b_ih: &'a mut [f32],
    pub b_hh: &'a mut [f32],
}

/// What the sequence forward saves for backward.
#[derive(Clone, Debug, Default)]
pub struct LstmCache {
    /// (B,T,4H) gate activations i, f, g, o (after sigmoid / tanh).
    pub acts: Vec<f32>,
    /// (B,T,H) cell states c_t.
    pub c: Vec<f32>,
}

/// Per-step active batch sizes from per-row lengths (which must be sorted longest first and at
/// most `t`). The error names the offending row.
pub fn active_from_lengths(lengths: &[usize], t: usize) -> Result<Vec<usize>> {
    for (r, w) in lengths.windows(2).enumerate() {
        if w[1] > w[0] {
            return Err(Error::shape(format!(
                "lstm: lengths must be sorted longest first, row {} has {} after {}",
                r + 1,
                w[1],
                w[0]
            )));
        }
    }
    if let Some(&l) = lengths.first() {
        if l > t {
            return Err(Error::shape(format!("lstm: length {l} exceeds the {t} steps")));
        }
    }
    Ok((0..t).map(|s| lengths.iter().filter(|&&l| l > s).count()).collect())
}

fn check_params(p: &LstmParams, i: usize, h: usize) {
    assert_eq!(p.w_ih.len(), 4 * h * i, "lstm: W_ih is not (4H,I)");
    assert_eq!(p.w_hh.len(), 4 * h * h, "lstm: W_hh is not (4H,H)");
    assert_eq!(p.b_ih.len(), 4 * h, "lstm: b_ih is not (4H)");
    assert_eq!(p.b_hh.len(), 4 * h, "lstm: b_hh is not (4H)");
}

fn check_grads(g: &LstmGrads, i: usize, h: usize) {
    assert_eq!(g.w_ih.len(), 4 * h * i, "lstm: dW_ih is not (4H,I)");
    assert_eq!(g.w_hh.len(), 4 * h * h, "lstm: dW_hh is not (4H,H)");
    assert_eq!(g.b_ih.len(), 4 * h, "lstm: db_ih is not (4H)");
    assert_eq!(g.b_hh.len(), 4 * h, "lstm: db_hh is not (4H)");
}

/// sigmoid(x) = 1 / (1 + e^-x), with the call-free `exp_f32` so the gate loops vectorise.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

/// tanh(x) = 1 - 2 / (1 + e^{2x}) (saturates cleanly to +-1 for large |x|). Near 0 the subtraction
/// cancels, so the error is absolute, ~1e-7 (a few ulp of 1), not relative: the same size as the
/// rounding of the values it is combined with in the cell update.
#[inline(always)]
fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (1.0 + exp_f32(2.0 * x))
}

/// Rows per rayon task so that each task has a few thousand gate elements.
fn min_rows(h: usize) -> usize {
    (8192 / (4 * h).max(1)).max(1)
}

/// Fused gate/cell update of one row: `a` (4H) holds z on entry and i,f,g,o on exit;
/// c_t = f c_prev + i g, h_t = o tanh(c_t).
#[inline]
fn gates_row_forward(a: &mut [f32], c_prev: &[f32], c: &mut [f32], h: &mut [f32]) {
    let hs = c.len();
    let (ai, rest) = a.split_at_mut(hs);
    let (af, rest) = rest.split_at_mut(hs);
    let (ag, ao) = rest.split_at_mut(hs);
    let gates = ai.iter_mut().zip(af.iter_mut()).zip(ag.iter_mut()).zip(ao.iter_mut());
    for ((((zi, zf), zg), zo), ((cp, ct), ht)) in gates.zip(c_prev.iter().zip(c.iter_mut()).zip(h.iter_mut()))
    {
        let i = sigmoid(*zi);
        let f = sigmoid(*zf);
        let g = tanh(*zg);
        let o = sigmoid(*zo);
        (*zi, *zf, *zg, *zo) = (i, f, g, o);
        let cn = f * cp + i * g;
        *ct = cn;
        *ht = o * tanh(cn);
    }
}

/// One element of `gates_row_backward`: ((dz_i, dz_f, dz_g, dz_o), (i, f, g, o)), ((c_t, c_{t-1}),
/// dh_t), dc (nested as the zipped iterators produce them).
type GateBwd<'a> = (
    ((((&'a mut f32, &'a mut f32), &'a mut f32), &'a mut f32), (((&'a f32, &'a f32), &'a f32), &'a f32)),
    (((&'a f32, &'a f32), f32), &'a mut f32),
);

/// Gate backward of one row. `dh` (+ `dh2` if given) is dL/dh_t; `dc` holds dL/dc_t from the
/// future on entry and dL/dc_{t-1} on exit; `dz` (4H) receives the pre-activation gradient.
#[inline]
fn gates_row_backward(
    dz: &mut [f32],
    a: &[f32],
    c: &[f32],
    c_prev: &[f32],
    dh: &[f32],
    dh2: Option<&[f32]>,
    dc: &mut [f32],
) {
    let hs = c.len();
    let (dzi, rest) = dz.split_at_mut(hs);
    let (dzf, rest) = rest.split_at_mut(hs);
    let (dzg, dzo) = rest.split_at_mut(hs);
    let (ai, rest) = a.split_at(hs);
    let (af, rest) = rest.split_at(hs);
    let (ag, ao) = rest.split_at(hs);
    let body = |(((((dzi, dzf), dzg), dzo), (((&i, &f), &g), &o)), (((&ct, &cp), dht), dc)): GateBwd| {
        let tc = tanh(ct);
        let dct = *dc + dht * o * (1.0 - tc * tc);
        *dzi = dct * g * i * (1.0 - i);
        *dzf = dct * cp * f * (1.0 - f);
        *dzg = dct * i * (1.0 - g * g);
        *dzo = dht * tc * o * (1.0 - o);
        *dc = dct * f;
    };
    let d = dzi.iter_mut().zip(dzf.iter_mut()).zip(dzg.iter_mut()).zip(dzo.iter_mut());
    let acts = ai.iter().zip(af).zip(ag).zip(ao);
    let st = c.iter().zip(c_prev);
    match dh2 {
        Some(d2) => {
            d.zip(acts).zip(st.zip(dh.iter().zip(d2).map(|(x, y)| x + y)).zip(dc.iter_mut())).for_each(body)
        }
        None => d.zip(acts).zip(st.zip(dh.iter().copied()).zip(dc.iter_mut())).for_each(body),
    }
}

/// Sequence forward. x (B,T,I), h0 c0 (B,H) → hs (B,T,H); fills `cache`. `active` (T) are the
/// per-step live batch sizes (see the module comment; `vec![B; T]` for equal lengths).
#[allow(clippy::too_many_arguments)]
pub fn lstm_forward(
    hs: &mut [f32],
    cache: &mut LstmCache,
    x: &[f32],
    h0: &[f32],
    c0: &[f32],
    p: &LstmParams,
    active: &[usize],
    sz: LstmSize,
) {
    let LstmSize { b, t, i, h } = sz;
    check_params(p, i, h);
    assert_eq!(x.len(), b * t * i, "lstm_forward: x is not (B,T,I)");
    assert_eq!(hs.len(), b * t * h, "lstm_forward: hs is not (B,T,H)");
    assert!(h0.len() == b * h && c0.len() == b * h, "lstm_forward: h0/c0 are not (B,H)");
    assert!(active.len() == t && active.iter().all(|&a| a <= b), "lstm_forward: bad active sizes");
    let g4 = 4 * h;
    cache.acts.clear();
    cache.acts.resize(b * t * g4, 0.0);
    cache.c.clear();
    cache.c.resize(b * t * h, 0.0);
    hs.fill(0.0);
    if b * t == 0 {
        return;
    }
    let bias: Vec<f32> = p.b_ih.iter().zip(p.b_hh).map(|(a, c)| a + c).collect();
    // All input projections at once: (B*T,I) x (I,4H) + b → acts (B*T,4H).
    sgemm(
        MatRef::row_major(x, b * t, i),
        MatRef::row_major(p.w_ih, g4, i).t(),
        &mut cache.acts,
        g4,
        &Epilogue { col_bias: Some(&bias), ..Default::default() },
    );
    // The per-step product has only bs <= B rows, so it is computed transposed, W_hh h^T (4H,bs),
    // with W_hh packed once as the GEMM's A operand instead of once per step.
    let pk_hh = pack_a(MatRef::row_major(p.w_hh, g4, h)); // (4H,H)
    let mut zt = vec![0.0f32; g4 * b]; // (4H,bs)
    let mut zr = vec![0.0f32; b * g4]; // (bs,4H) the same, in rows
    for s in 0..t {
        let bs = active[s];
        if bs == 0 {
            continue;
        }
        // acts[:bs, s, :] += (W_hh (4H,H) x h_{s-1}^T (H,bs))^T
        let hprev = if s == 0 {
            MatRef::row_major(h0, bs, h)
        } else {
            MatRef::row_major_ld(&hs[(s - 1) * h..], bs, h, t * h)
        };
        sgemm_packed_a(&pk_hh, hprev.t(), &mut zt, bs, &Epilogue::default());
        // Transposed into a small contiguous (bs,4H) buffer (stays in cache) and added to the gate
        // rows by the fused update, which reads those rows anyway: the rows are T*4H floats apart,
        // so a separate read-modify-write pass over them would miss the cache twice.
        transpose_into(&mut zr, g4, &zt, g4, bs, false);
        // Fused elementwise update of the live rows.
        cache.acts[..bs * t * g4]
            .par_chunks_mut(t * g4)
            .zip(cache.c[..bs * t * h].par_chunks_mut(t * h))
            .zip(hs[..bs * t * h].par_chunks_mut(t * h))
            .zip(c0.par_chunks(h))
            .zip(zr.par_chunks(g4))
            .with_min_len(min_rows(h))
            .for_each(|((((a, c), hrow), c0row), zrow)| {
                let (c_before, c_now) = c.split_at_mut(s * h);
                let c_prev = if s == 0 { c0row } else { &c_before[(s - 1) * h..] };
                let a = &mut a[s * g4..(s + 1) * g4];
                a.iter_mut().zip(zrow).for_each(|(x, y)| *x += y);
                gates_row_forward(a, c_prev, &mut c_now[..h], &mut hrow[s * h..(s + 1) * h]);
            });
        // Rows past their length: the projection GEMM filled their gates; clear them so the cache
        // holds no stale values (backward never reads them, but a reader of the cache might).
        for r in bs..b {
            cache.acts[(r * t + s) * g4..(r * t + s + 1) * g4].fill(0.0);
        }
    }
}

/// Sequence backward (through time). dhs (B,T,H) is dL/dhs. Accumulates into dx (B,T,I), dh0 and dc0
/// (B,H) (each optional) and the parameter gradients. `hs`, `cache`, `x`, `h0`, `c0` are the forward's.
#[allow(clippy::too_many_arguments)]
pub fn lstm_backward(
    dx: Option<&mut [f32]>,
    dh0: Option<&mut [f32]>,
    dc0: Option<&mut [f32]>,
    grads: &mut LstmGrads,
    dhs: &[f32],
    hs: &[f32],
    cache: &LstmCache,
    x: &[f32],
    h0: &[f32],
    c0: &[f32],
    p: &LstmParams,
    active: &[usize],
    sz: LstmSize,
) {
    let LstmSize { b, t, i, h } = sz;
    check_params(p, i, h);
    check_grads(grads, i, h);
    assert_eq!(dhs.len(), b * t * h, "lstm_backward: dhs is not (B,T,H)");
    assert_eq!(cache.acts.len(), b * t * 4 * h, "lstm_backward: cache does not match");
    let g4 = 4 * h;
    let mut dz = vec![0.0f32; b * t * g4]; // (B,T,4H) pre-activation gradients
    let mut dh_next = vec![0.0f32; b * h]; // (B,H) dL/dh_{s} from step s+1
    let mut dc_next = vec![0.0f32; b * h]; // (B,H) dL/dc_{s} from step s+1
                                           // dh_{s-1}^T = W_hh^T dz_s^T with W_hh^T packed once (see the forward).
    let pk_hh_t = pack_a(MatRef::row_major(p.w_hh, g4, h).t()); // (H,4H)
    let mut dht = vec![0.0f32; h * b]; // (H,bs)
    for s in (0..t).rev() {
        let bs = active[s];
        if bs == 0 {
            continue;
        }
        dz[..bs * t * g4]
            .par_chunks_mut(t * g4)
            .zip(cache.acts[..bs * t * g4].par_chunks(t * g4))
            .zip(cache.c[..bs * t * h].par_chunks(t * h))
            .zip(dhs[..bs * t * h].par_chunks(t * h))
            .zip(dh_next[..bs * h].par_chunks(h))
            .zip(dc_next[..bs * h].par_chunks_mut(h))
            .zip(c0.par_chunks(h))
            .with_min_len(min_rows(h))
            .for_each(|((((((dzr, a), c), dhr), dhn), dcn), c0row)| {
                let c_prev = if s == 0 { c0row } else { &c[(s - 1) * h..s * h] };
                gates_row_backward(
                    &mut dzr[s * g4..(s + 1) * g4],
                    &a[s * g4..(s + 1) * g4],
                    &c[s * h..(s + 1) * h],
                    c_prev,
                    &dhr[s * h..(s + 1) * h],
                    Some(dhn),
                    dcn,
                );
            });
        // dh_{s-1} (bs,H) = dz_s (bs,4H) x W_hh (4H,H). Rows >= bs stay 0: they start at their last step.
        let dzt = MatRef::row_major_ld(&dz[s * g4..], bs, g4, t * g4).t(); // (4H,bs)
        sgemm_packed_a(&pk_hh_t, dzt, &mut dht, bs, &Epilogue::default());
        transpose_into(&mut dh_next, h, &dht, h, bs, false);
    }
    if let Some(d) = dh0 {
        assert_eq!(d.len(), b * h, "lstm_backward: dh0 is not (B,H)");
        d.iter_mut().zip(&dh_next).for_each(|(a, g)| *a += g);
    }
    if let Some(d) = dc0 {
        assert_eq!(d.len(), b * h, "lstm_backward: dc0 is not (B,H)");
        d.iter_mut().zip(&dc_next).for_each(|(a, g)| *a += g);
    }
    if b * t == 0 {
        return;
    }
    let acc = Epilogue { beta: 1.0, ..Default::default() };
    let dza = MatRef::row_major(&dz, b * t, g4);
    // h shifted by one step: hprev[:,0] = h0, hprev[:,s] = hs[:,s-1]   (B,T,H)
    let mut hprev = vec![0.0f32; b * t * h];
    for r in 0..b {
        let row = &mut hprev[r * t * h..(r + 1) * t * h];
        row[..h].copy_from_slice(&h0[r * h..(r + 1) * h]);
        row[h..].copy_from_slice(&hs[r * t * h..(r * t + t - 1) * h]);
    }
    // dW_hh (4H,H) += dz^T (4H,B*T) x hprev (B*T,H)
    weight_grad_acc(grads.w_hh, h, &dz, &hprev, b * t, g4, h);
    // dW_ih (4H,I) += dz^T (4H,B*T) x x (B*T,I)
    weight_grad_acc(grads.w_ih, i, &dz, x, b * t, g4, i);
    if let Some(dx) = dx {
        assert_eq!(dx.len(), b * t * i, "lstm_backward: dx is not (B,T,I)");
        // dx (B*T,I) += dz (B*T,4H) x W_ih (4H,I)
        sgemm(dza, MatRef::row_major(p.w_ih, g4, i), dx, i, &acc);
    }
    colsum_acc(grads.b_ih, &dz, b * t, g4);
    colsum_acc(grads.b_hh, &dz, b * t, g4);
}

/// What one cell step saves for backward: (B,4H) gate activations and (B,H) new cell state.
#[derive(Clone, Debug, Default)]
pub struct LstmCellCache {
    pub acts: Vec<f32>,
    pub c: Vec<f32>,
}

/// One step (LSTMCell). x (B,I), h_prev c_prev (B,H) → h (B,H); the new c is `cache.c`.
#[allow(clippy::too_many_arguments)]
pub fn lstm_cell_forward(
    h_out: &mut [f32],
    cache: &mut LstmCellCache,
    x: &[f32],
    h_prev: &[f32],
    c_prev: &[f32],
    p: &LstmParams,
    b: usize,
    i: usize,
    h: usize,
) {
    cache.acts.clear();
    cache.acts.resize(b * 4 * h, 0.0);
    cache.c.clear();
    cache.c.resize(b * h, 0.0);
    lstm_cell_forward_into(h_out, &mut cache.acts, &mut cache.c, x, h_prev, c_prev, p, b, i, h);
}

/// `lstm_cell_forward` writing into caller-owned buffers: acts (B,4H) and c (B,H) (e.g. rows of a
/// stacked per-sequence buffer).
#[allow(clippy::too_many_arguments)]
pub fn lstm_cell_forward_into(
    h_out: &mut [f32],
    acts: &mut [f32],
    c: &mut [f32],
    x: &[f32],
    h_prev: &[f32],
    c_prev: &[f32],
    p: &LstmParams,
    b: usize,
    i: usize,
    h: usize,
) {
    check_params(p, i, h);
    let g4 = 4 * h;
    assert_eq!(x.len(), b * i, "lstm_cell_forward: x is not (B,I)");
    assert!(h_prev.len() == b * h && c_prev.len() == b * h, "lstm_cell_forward: state is not (B,H)");
    assert!(h_out.len() == b * h && c.len() == b * h, "lstm_cell_forward: h/c are not (B,H)");
    assert_eq!(acts.len(), b * g4, "lstm_cell_forward: acts are not (B,4H)");
    let bias: Vec<f32> = p.b_ih.iter().zip(p.b_hh).map(|(a, c)| a + c).collect();
    // z (B,4H) = x W_ih^T + b ; z += h_prev W_hh^T
    sgemm(
        MatRef::row_major(x, b, i),
        MatRef::row_major(p.w_ih, g4, i).t(),
        acts,
        g4,
        &Epilogue { col_bias: Some(&bias), ..Default::default() },
    );
    sgemm(
        MatRef::row_major(h_prev, b, h),
        MatRef::row_major(p.w_hh, g4, h).t(),
        acts,
        g4,
        &Epilogue { beta: 1.0, ..Default::default() },
    );
    acts.par_chunks_mut(g4)
        .zip(c.par_chunks_mut(h))
        .zip(h_out.par_chunks_mut(h))
        .zip(c_prev.par_chunks(h))
        .with_min_len(min_rows(h))
        .for_each(|(((a, c), hr), cp)| gates_row_forward(a, cp, c, hr));
}

/// One step backward. dh, dc (B,H) are dL/dh_t and dL/dc_t. Accumulates into dx (B,I), dh_prev,
/// dc_prev (B,H) (each optional) and the parameter gradients.
#[allow(clippy::too_many_arguments)]
pub fn lstm_cell_backward(
    dx: Option<&mut [f32]>,
    dh_prev: Option<&mut [f32]>,
    dc_prev: Option<&mut [f32]>,
    grads: &mut LstmGrads,
    dh: &[f32],
    dc: &[f32],
    cache: &LstmCellCache,
    x: &[f32],
    h_prev: &[f32],
    c_prev: &[f32],
    p: &LstmParams,
    b: usize,
    i: usize,
    h: usize,
) {
    check_grads(grads, i, h);
    let g4 = 4 * h;
    let mut dz = vec![0.0f32; b * g4]; // (B,4H)
    lstm_cell_backward_dz(&mut dz, dx, dh_prev, dc_prev, dh, dc, &cache.acts, &cache.c, c_prev, p, b, i, h);
    lstm_cell_weight_grads(grads, &dz, x, h_prev, b, i, h);
}

/// The part of the cell backward that the recurrence needs at once: dz (B,4H) (overwritten), and
/// accumulated dx (B,I), dh_prev, dc_prev (B,H). The weight gradients follow from dz by
/// `lstm_cell_weight_grads`, which a sequence can run ONCE over all steps' stacked rows.
#[allow(clippy::too_many_arguments)]
pub fn lstm_cell_backward_dz(
    dz: &mut [f32],
    dx: Option<&mut [f32]>,
    dh_prev: Option<&mut [f32]>,
    dc_prev: Option<&mut [f32]>,
    dh: &[f32],
    dc: &[f32],
    acts: &[f32],
    c: &[f32],
    c_prev: &[f32],
    p: &LstmParams,
    b: usize,
    i: usize,
    h: usize,
) {
    check_params(p, i, h);
    let g4 = 4 * h;
    assert!(dh.len() == b * h && dc.len() == b * h, "lstm_cell_backward: dh/dc are not (B,H)");
    assert!(dz.len() == b * g4 && acts.len() == b * g4, "lstm_cell_backward: dz/acts are not (B,4H)");
    let mut dcp = dc.to_vec(); // (B,H): dL/dc_t in, dL/dc_{t-1} out
    dz.par_chunks_mut(g4)
        .zip(acts.par_chunks(g4))
        .zip(c.par_chunks(h))
        .zip(c_prev.par_chunks(h))
        .zip(dh.par_chunks(h))
        .zip(dcp.par_chunks_mut(h))
        .with_min_len(min_rows(h))
        .for_each(|(((((dzr, a), c), cp), dhr), dcr)| gates_row_backward(dzr, a, c, cp, dhr, None, dcr));
    if let Some(d) = dc_prev {
        assert_eq!(d.len(), b * h, "lstm_cell_backward: dc_prev is not (B,H)");
        d.iter_mut().zip(&dcp).for_each(|(a, g)| *a += g);
    }
    let acc = Epilogue { beta: 1.0, ..Default::default() };
    let dza = MatRef::row_major(dz, b, g4);
    if let Some(d) = dh_prev {
        assert_eq!(d.len(), b * h, "lstm_cell_backward: dh_prev is not (B,H)");
        sgemm(dza, MatRef::row_major(p.w_hh, g4, h), d, h, &acc);
    }
    if let Some(d) = dx {
        assert_eq!(d.len(), b * i, "lstm_cell_backward: dx is not (B,I)");
        sgemm(dza, MatRef::row_major(p.w_ih, g4, i), d, i, &acc);
    }
}

/// dW_ih (4H,I) += dz^T x, dW_hh (4H,H) += dz^T h_prev, db_ih = db_hh += sum dz, over N rows of
/// dz (N,4H), x (N,I), h_prev (N,H) (one step's batch, or all steps' rows stacked).
pub fn lstm_cell_weight_grads(
    grads: &mut LstmGrads,
    dz: &[f32],
    x: &[f32],
    h_prev: &[f32],
    n: usize,
    i: usize,
    h: usize,
) {
    check_grads(grads, i, h);
    let g4 = 4 * h;
    assert!(dz.len() == n * g4 && x.len() == n * i && h_prev.len() == n * h, "lstm_cell_weight_grads: sizes");
    weight_grad_acc(grads.w_hh, h, dz, h_prev, n, g4, h);
    weight_grad_acc(grads.w_ih, i, dz, x, n, g4, i);
    colsum_acc(grads.b_ih, dz, n, g4);
    colsum_acc(grads.b_hh, dz, n, g4);
}

/// The fused elementwise part of a cell step alone, for callers that build the pre-activations
/// themselves (e.g. with part of the input projection precomputed for all steps): `acts` (B,4H)
/// holds z on entry and the gate activations on exit; writes c (B,H) and h (B,H).
pub fn lstm_gates_forward(
    acts: &mut [f32],
    c_prev: &[f32],
    c: &mut [f32],
    h_out: &mut [f32],
    b: usize,
    h: usize,
) {
    let g4 = 4 * h;
    assert!(acts.len() == b * g4, "lstm_gates_forward: acts are not (B,4H)");
    assert!(c_prev.len() == b * h && c.len() == b * h && h_out.len() == b * h, "lstm_gates_forward: (B,H)");
    acts.par_chunks_mut(g4)
        .zip(c.par_chunks_mut(h))
        .zip(h_out.par_chunks_mut(h))
        .zip(c_prev.par_chunks(h))
        .with_min_len(min_rows(h))
        .for_each(|(((a, c), hr), cp)| gates_row_forward(a, cp, c, hr));
}

/// The fused elementwise gate backward alone: dz (B,4H) (overwritten) from dh (B,H) and `dc`
/// (B,H), which holds dL/dc_t on entry and dL/dc_{t-1} on exit.
#[allow(clippy::too_many_arguments)]
pub fn lstm_gates_backward(
    dz: &mut [f32],
    dc: &mut [f32],
    dh: &[f32],
    acts: &[f32],
    c: &[f32],
    c_prev: &[f32],
    b: usize,
    h: usize,
) {
    let g4 = 4 * h;
    assert!(dz.len() == b * g4 && acts.len() == b * g4, "lstm_gates_backward: dz/acts are not (B,4H)");
    assert!(dc.len() == b * h && dh.len() == b * h && c.len() == b * h && c_prev.len() == b * h);
    dz.par_chunks_mut(g4)
        .zip(acts.par_chunks(g4))
        .zip(c.par_chunks(h))
        .zip(c_prev.par_chunks(h))
        .zip(dh.par_chunks(h))
        .zip(dc.par_chunks_mut(h))
        .with_min_len(min_rows(h))
        .for_each(|(((((dzr, a), c), cp), dhr), dcr)| gates_row_backward(dzr, a, c, cp, dhr, None, dcr));
}
