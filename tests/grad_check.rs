//! Every backward of the decoder layers against f64 central finite differences.
//!
//! Method: each op has a straightforward f64 re-implementation of its forward here (plain loops, no
//! shared code with `src/`), fed with the same f32-rounded inputs cast to f64. The scalar loss is
//! L = sum(out * r) for a fixed random r (or the op's own loss), so the analytic backward is run with
//! dout = r. The f64 gradient is the central difference (L(p + h e_k) - L(p - h e_k)) / 2h with
//! h = 1e-5: truncation error ~h^2 = 1e-10 and rounding ~1e-16 / h = 1e-11, so the FD gradient is
//! exact to ~1e-9 and the comparison measures only our f32 backward's error.
//!
//! Tolerance: relative L2 error ||g_ours - g_fd|| / ||g_fd|| <= 1e-4 (the issue's bound). f32 has a
//! 6e-8 unit roundoff; sums over at most a few hundred terms stay around 1e-6, so 1e-4 leaves margin
//! yet catches any wrong term (a missing or wrong term is an O(1) relative error). The f32 forwards
//! are also checked against the f64 forwards at 1e-5 relative L2.

mod common;
use common::fd::*;

use capgen::cpu::adam::{adam_update, clip_grad_norm, global_norm, Adam, AdamConfig};
use capgen::cpu::attention::{
    attention_encode_backward, attention_encode_forward, attention_step_backward, attention_step_forward,
    init_state_backward, init_state_forward, AttnCache, AttnGrads, AttnParams, AttnSize,
};
use capgen::cpu::dropout::{dropout_backward, dropout_forward};
use capgen::cpu::embedding::{embedding_backward, embedding_forward};
use capgen::cpu::linear::{linear_backward, linear_forward};
use capgen::cpu::loss::{attention_reg, cross_entropy_forward, cross_entropy_fused};
use capgen::cpu::lstm::{
    active_from_lengths, lstm_backward, lstm_cell_backward, lstm_cell_forward, lstm_forward, LstmCache,
    LstmCellCache, LstmGrads, LstmParams, LstmSize,
};
use capgen::rng::{uniform_vec, Rng};

const GRAD_TOL: f64 = 1e-4;
const FWD_TOL: f64 = 1e-5;

fn sig(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// y = x W^T + b in f64.
fn lin64(x: &[f64], w: &[f64], b: Option<&[f64]>, n: usize, i: usize, o: usize) -> Vec<f64> {
    let mut y = vec![0.0; n * o];
    for r in 0..n {
        for c in 0..o {
            let mut s = b.map_or(0.0, |b| b[c]);
            for k in 0..i {
                s += x[r * i + k] * w[c * i + k];
            }
            y[r * o + c] = s;
        }
    }
    y
}

#[test]
fn linear_grads() {
    let (n, i, o) = (5, 7, 4);
    let names = ["x", "w", "b"];
    let p32 = [rnd("x", n * i, 1.0), rnd("w", o * i, 0.5), rnd("b", o, 0.5)];
    let r = rnd("r", n * o, 1.0);
    let r64 = to64(&r);
    let f = |p: &[Vec<f64>]| dot(&lin64(&p[0], &p[1], Some(&p[2]), n, i, o), &r64);
    let mut y = vec![0.0; n * o];
    linear_forward(&mut y, &p32[0], &p32[1], Some(&p32[2]), n, i, o);
    let p64: Vec<Vec<f64>> = p32.iter().map(|v| to64(v)).collect();
    check("linear forward", &y, &lin64(&p64[0], &p64[1], Some(&p64[2]), n, i, o), FWD_TOL);
    let mut g: Vec<Vec<f32>> = p32.iter().map(|v| vec![0.0; v.len()]).collect();
    let (gx, rest) = g.split_at_mut(1);
    let (gw, gb) = rest.split_at_mut(1);
    linear_backward(Some(&mut gx[0]), &mut gw[0], Some(&mut gb[0]), &r, &p32[0], &p32[1], n, i, o);
    for k in 0..3 {
        check(&format!("linear d{}", names[k]), &g[k], &fd_grad(&p64, k, &f), GRAD_TOL);
    }
    // Accumulation: a second backward doubles every gradient.
    let before = g.clone();
    let (gx, rest) = g.split_at_mut(1);
    let (gw, gb) = rest.split_at_mut(1);
    linear_backward(Some(&mut gx[0]), &mut gw[0], Some(&mut gb[0]), &r, &p32[0], &p32[1], n, i, o);
    for k in 0..3 {
        let twice: Vec<f64> = before[k].iter().map(|&x| 2.0 * x as f64).collect();
        check("linear accumulates", &g[k], &twice, 1e-6);
    }
}

#[test]
fn embedding_grads_and_pad() {
    let (v, c) = (6, 4);
    let tok: Vec<u32> = vec![1, 0, 3, 1, 5, 0, 2];
    let table = rnd("table", v * c, 1.0);
    let r = rnd("r", tok.len() * c, 1.0);
    let r64 = to64(&r);
    let f = |p: &[Vec<f64>]| {
        let mut s = 0.0;
        for (n, &t) in tok.iter().enumerate() {
            for k in 0..c {
                s += p[0][t as usize * c + k] * r64[n * c + k];
            }
        }
        s
    };
    let mut y = vec![0.0; tok.len() * c];
    embedding_forward(&mut y, &tok, &table, v, c);
    assert_eq!(&y[2 * c..3 * c], &table[3 * c..4 * c]);
    let fd = fd_grad(&[to64(&table)], 0, &f);
    let mut g = vec![0.0; v * c];
    embedding_backward(&mut g, &r, &tok, None, v, c);
    check("embedding dtable", &g, &fd, GRAD_TOL);
    // With <pad> = 0 skipped: row 0 gets nothing, every other row is unchanged.
    let mut gs = vec![0.0; v * c];
    embedding_backward(&mut gs, &r, &tok, Some(0), v, c);
    assert!(gs[..c].iter().all(|&x| x == 0.0));
    assert!(fd[..c].iter().any(|&x| x.abs() > 1e-3), "pad row must be used so the skip is tested");
    check("embedding dtable (pad skipped)", &gs[c..], &fd[c..], GRAD_TOL);
}

/// f64 LSTM over a sequence with per-row lengths; returns hs (B,T,H), zero past each length.
#[allow(clippy::too_many_arguments)]
fn lstm_seq64(p: &[Vec<f64>], lengths: &[usize], b: usize, t: usize, i: usize, h: usize) -> Vec<f64> {
    let (x, h0, c0, w_ih, w_hh, b_ih, b_hh) = (&p[0], &p[1], &p[2], &p[3], &p[4], &p[5], &p[6]);
    let mut hs = vec![0.0; b * t * h];
    for bi in 0..b {
        let mut hc = h0[bi * h..(bi + 1) * h].to_vec();
        let mut cc = c0[bi * h..(bi + 1) * h].to_vec();
        for s in 0..lengths[bi] {
            let xs = &x[(bi * t + s) * i..(bi * t + s + 1) * i];
            let (hn, cn) = cell64(xs, &hc, &cc, w_ih, w_hh, b_ih, b_hh, i, h);
            hs[(bi * t + s) * h..(bi * t + s + 1) * h].copy_from_slice(&hn);
            hc = hn;
            cc = cn;
        }
    }
    hs
}

/// One f64 LSTM cell step for one row: returns (h, c).
#[allow(clippy::too_many_arguments)]
fn cell64(
    x: &[f64],
    hp: &[f64],
    cp: &[f64],
    w_ih: &[f64],
    w_hh: &[f64],
    b_ih: &[f64],
    b_hh: &[f64],
    i: usize,
    h: usize,
) -> (Vec<f64>, Vec<f64>) {
    let z: Vec<f64> = (0..4 * h)
        .map(|k| {
            let mut s = b_ih[k] + b_hh[k];
            for j in 0..i {
                s += w_ih[k * i + j] * x[j];
            }
            for j in 0..h {
                s += w_hh[k * h + j] * hp[j];
            }
            s
        })
        .collect();
    let mut hn = vec![0.0; h];
    let mut cn = vec![0.0; h];
    for k in 0..h {
        let (ig, fg, gg, og) = (sig(z[k]), sig(z[h + k]), z[2 * h + k].tanh(), sig(z[3 * h + k]));
        cn[k] = fg * cp[k] + ig * gg;
        hn[k] = og * cn[k].tanh();
    }
    (hn, cn)
}

#[test]
fn lstm_sequence_grads_variable_lengths() {
    let (b, t, i, h) = (4, 5, 3, 6);
    let lengths = [5, 3, 3, 1];
    let sz = LstmSize { b, t, i, h };
    let names = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"];
    let sizes = [b * t * i, b * h, b * h, 4 * h * i, 4 * h * h, 4 * h, 4 * h];
    let scales = [1.0, 0.5, 0.5, 0.6, 0.6, 0.3, 0.3];
    let p32: Vec<Vec<f32>> = (0..7).map(|k| rnd(names[k], sizes[k], scales[k])).collect();
    let p64: Vec<Vec<f64>> = p32.iter().map(|v| to64(v)).collect();
    let r = rnd("r", b * t * h, 1.0);
    let r64 = to64(&r);
    let f = |p: &[Vec<f64>]| dot(&lstm_seq64(p, &lengths, b, t, i, h), &r64);

    let active = active_from_lengths(&lengths, t).unwrap();
    assert_eq!(active, vec![4, 3, 3, 1, 1]);
    let params = LstmParams { w_ih: &p32[3], w_hh: &p32[4], b_ih: &p32[5], b_hh: &p32[6] };
    let mut hs = vec![0.0; b * t * h];
    let mut cache = LstmCache::default();
    lstm_forward(&mut hs, &mut cache, &p32[0], &p32[1], &p32[2], &params, &active, sz);
    check("lstm forward", &hs, &lstm_seq64(&p64, &lengths, b, t, i, h), FWD_TOL);

    let mut g: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    {
        let [gx, gh0, gc0, gwi, gwh, gbi, gbh] = &mut g[..] else { unreachable!() };
        let mut grads = LstmGrads { w_ih: gwi, w_hh: gwh, b_ih: gbi, b_hh: gbh };
        lstm_backward(
            Some(gx),
            Some(gh0),
            Some(gc0),
            &mut grads,
            &r,
            &hs,
            &cache,
            &p32[0],
            &p32[1],
            &p32[2],
            &params,
            &active,
            sz,
        );
    }
    for k in 0..7 {
        check(&format!("lstm d{}", names[k]), &g[k], &fd_grad(&p64, k, &f), GRAD_TOL);
    }
}

#[test]
fn lstm_lengths_must_be_sorted() {
    assert!(active_from_lengths(&[2, 3], 4).is_err());
    assert!(active_from_lengths(&[5, 3], 4).is_err());
    assert_eq!(active_from_lengths(&[4, 0], 4).unwrap(), vec![1, 1, 1, 1]);
}

#[test]
fn lstm_cell_grads() {
    let (b, i, h) = (3, 4, 5);
    let names = ["x", "h_prev", "c_prev", "w_ih", "w_hh", "b_ih", "b_hh"];
    let sizes = [b * i, b * h, b * h, 4 * h * i, 4 * h * h, 4 * h, 4 * h];
    let scales = [1.0, 0.8, 0.8, 0.6, 0.6, 0.3, 0.3];
    let p32: Vec<Vec<f32>> = (0..7).map(|k| rnd(names[k], sizes[k], scales[k])).collect();
    let p64: Vec<Vec<f64>> = p32.iter().map(|v| to64(v)).collect();
    let (rh, rc) = (rnd("rh", b * h, 1.0), rnd("rc", b * h, 1.0));
    let (rh64, rc64) = (to64(&rh), to64(&rc));
    // L = sum(h * rh) + sum(c * rc): exercises both the dh and the dc inputs.
    let f = |p: &[Vec<f64>]| {
        let mut s = 0.0;
        for bi in 0..b {
            let (hn, cn) = cell64(
                &p[0][bi * i..(bi + 1) * i],
                &p[1][bi * h..(bi + 1) * h],
                &p[2][bi * h..(bi + 1) * h],
                &p[3],
                &p[4],
                &p[5],
                &p[6],
                i,
                h,
            );
            s += dot(&hn, &rh64[bi * h..(bi + 1) * h]) + dot(&cn, &rc64[bi * h..(bi + 1) * h]);
        }
        s
    };
    let params = LstmParams { w_ih: &p32[3], w_hh: &p32[4], b_ih: &p32[5], b_hh: &p32[6] };
    let mut hn = vec![0.0; b * h];
    let mut cache = LstmCellCache::default();
    lstm_cell_forward(&mut hn, &mut cache, &p32[0], &p32[1], &p32[2], &params, b, i, h);
    let (h_ref, _) =
        cell64(&p64[0][..i], &p64[1][..h], &p64[2][..h], &p64[3], &p64[4], &p64[5], &p64[6], i, h);
    check("lstm cell forward", &hn[..h], &h_ref, FWD_TOL);
    let mut g: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    {
        let [gx, gh, gc, gwi, gwh, gbi, gbh] = &mut g[..] else { unreachable!() };
        let mut grads = LstmGrads { w_ih: gwi, w_hh: gwh, b_ih: gbi, b_hh: gbh };
        lstm_cell_backward(
            Some(gx),
            Some(gh),
            Some(gc),
            &mut grads,
            &rh,
            &rc,
            &cache,
            &p32[0],
            &p32[1],
            &p32[2],
            &params,
            b,
            i,
            h,
        );
    }
    for k in 0..7 {
        check(&format!("lstm cell d{}", names[k]), &g[k], &fd_grad(&p64, k, &f), GRAD_TOL);
    }
}

const ATT_NAMES: [&str; 10] =
    ["feats", "h", "w_enc", "b_enc", "w_dec", "b_dec", "w_full", "b_full", "w_beta", "b_beta"];

/// f64 attention step (encode included): returns (ctx (B,D), alpha (B,L)).
fn attn64(p: &[Vec<f64>], sz: AttnSize) -> (Vec<f64>, Vec<f64>) {
    let AttnSize { b, l, d, h, a } = sz;
    let (feats, hh) = (&p[0], &p[1]);
    let att1 = lin64(feats, &p[2], Some(&p[3]), b * l, d, a);
    let att2 = lin64(hh, &p[4], Some(&p[5]), b, h, a);
    let mut ctx = vec![0.0; b * d];
    let mut alpha = vec![0.0; b * l];
    let gate_pre = lin64(hh, &p[8], Some(&p[9]), b, h, d);
    for bi in 0..b {
        let e: Vec<f64> = (0..l)
            .map(|li| {
                let mut s = p[7][0];
                for k in 0..a {
                    s += p[6][k] * (att1[(bi * l + li) * a + k] + att2[bi * a + k]).max(0.0);
                }
                s
            })
            .collect();
        let m = e.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = e.iter().map(|x| (x - m).exp()).sum();
        for li in 0..l {
            alpha[bi * l + li] = (e[li] - m).exp() / z;
        }
        for k in 0..d {
            let mut s = 0.0;
            for li in 0..l {
                s += alpha[bi * l + li] * feats[(bi * l + li) * d + k];
            }
            ctx[bi * d + k] = sig(gate_pre[bi * d + k]) * s;
        }
    }
    (ctx, alpha)
}

#[test]
fn attention_step_grads() {
    let sz = AttnSize { b: 2, l: 5, d: 4, h: 3, a: 6 };
    let AttnSize { b, l, d, h, a } = sz;
    let sizes = [b * l * d, b * h, a * d, a, a * h, a, a, 1, d * h, d];
    let p32: Vec<Vec<f32>> = (0..10).map(|k| rnd(ATT_NAMES[k], sizes[k], 1.0)).collect();
    let p64: Vec<Vec<f64>> = p32.iter().map(|v| to64(v)).collect();
    let (rc, ra) = (rnd("rctx", b * d, 1.0), rnd("ralpha", b * l, 1.0));
    let (rc64, ra64) = (to64(&rc), to64(&ra));
    // L = sum(ctx * rc) + sum(alpha * ra): the second term feeds the dalpha input (as the regulariser does).
    let f = |p: &[Vec<f64>]| {
        let (ctx, alpha) = attn64(p, sz);
        dot(&ctx, &rc64) + dot(&alpha, &ra64)
    };
    let params = AttnParams {
        w_enc: &p32[2],
        b_enc: &p32[3],
        w_dec: &p32[4],
        b_dec: &p32[5],
        w_full: &p32[6],
        b_full: &p32[7],
        w_beta: &p32[8],
        b_beta: &p32[9],
    };
    let mut att1 = vec![0.0; b * l * a];
    attention_encode_forward(&mut att1, &p32[0], &params, sz);
    let mut ctx = vec![0.0; b * d];
    let mut cache = AttnCache::default();
    attention_step_forward(&mut ctx, &mut cache, &att1, &p32[0], &p32[1], &params, sz);
    let (ctx64, alpha64) = attn64(&p64, sz);
    check("attention forward ctx", &ctx, &ctx64, FWD_TOL);
    check("attention forward alpha", &cache.alpha, &alpha64, FWD_TOL);
    assert!(cache.r.contains(&0.0) && cache.r.iter().any(|&x| x > 0.0), "relu both ways");

    let mut g: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    {
        let [gf, gh, gwe, gbe, gwd, gbd, gwf, gbf, gwb, gbb] = &mut g[..] else { unreachable!() };
        let mut grads = AttnGrads {
            w_enc: gwe,
            b_enc: gbe,
            w_dec: gwd,
            b_dec: gbd,
            w_full: gwf,
            b_full: gbf,
            w_beta: gwb,
            b_beta: gbb,
        };
        let mut datt1 = vec![0.0; b * l * a];
        attention_step_backward(
            Some(gf),
            &mut datt1,
            Some(gh),
            &mut grads,
            &rc,
            Some(&ra),
            &cache,
            &p32[0],
            &p32[1],
            &params,
            sz,
        );
        attention_encode_backward(Some(gf), &mut grads, &datt1, &p32[0], &params, sz);
    }
    for k in 0..10 {
        let fd = fd_grad(&p64, k, &f);
        if ATT_NAMES[k] == "b_full" {
            // Softmax ignores a shift of all scores, so dL/db_full is exactly 0 (FD: ~1e-10).
            assert!(fd[0].abs() < 1e-8 && g[k][0].abs() < 1e-5, "db_full {} (fd {})", g[k][0], fd[0]);
            continue;
        }
        check(&format!("attention d{}", ATT_NAMES[k]), &g[k], &fd, GRAD_TOL);
    }
}

#[test]
fn init_state_grads() {
    let (b, l, d, h) = (2, 5, 4, 3);
    let names = ["feats", "w_h", "b_h", "w_c", "b_c"];
    let sizes = [b * l * d, h * d, h, h * d, h];
    let p32: Vec<Vec<f32>> = (0..5).map(|k| rnd(names[k], sizes[k], 1.0)).collect();
    let p64: Vec<Vec<f64>> = p32.iter().map(|v| to64(v)).collect();
    let (rh, rc) = (rnd("rh", b * h, 1.0), rnd("rc", b * h, 1.0));
    let (rh64, rc64) = (to64(&rh), to64(&rc));
    let f = |p: &[Vec<f64>]| {
        let mut mean = vec![0.0; b * d];
        for bi in 0..b {
            for li in 0..l {
                for k in 0..d {
                    mean[bi * d + k] += p[0][(bi * l + li) * d + k] / l as f64;
                }
            }
        }
        dot(&lin64(&mean, &p[1], Some(&p[2]), b, d, h), &rh64)
            + dot(&lin64(&mean, &p[3], Some(&p[4]), b, d, h), &rc64)
    };
    let (mut mean, mut h0, mut c0) = (vec![0.0; b * d], vec![0.0; b * h], vec![0.0; b * h]);
    init_state_forward(&mut mean, &mut h0, &mut c0, &p32[0], &p32[1], &p32[2], &p32[3], &p32[4], b, l, d, h);
    let mut g: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    {
        let [gf, gwh, gbh, gwc, gbc] = &mut g[..] else { unreachable!() };
        init_state_backward(Some(gf), gwh, gbh, gwc, gbc, &rh, &rc, &mean, &p32[1], &p32[3], b, l, d, h);
    }
    for k in 0..5 {
        check(&format!("init_state d{}", names[k]), &g[k], &fd_grad(&p64, k, &f), GRAD_TOL);
    }
}

/// f64 cross-entropy with label smoothing, pad ignored, mean over non-pad rows.
fn ce64(x: &[f64], tgt: &[u32], v: usize, eps: f64, pad: u32) -> f64 {
    let (mut total, mut count) = (0.0, 0);
    for (n, &y) in tgt.iter().enumerate() {
        if y == pad {
            continue;
        }
        let row = &x[n * v..(n + 1) * v];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|z| (z - m).exp()).sum::<f64>().ln();
        for (k, &z) in row.iter().enumerate() {
            let q = (1.0 - eps) * if k == y as usize { 1.0 } else { 0.0 } + eps / v as f64;
            total -= q * (z - lse);
        }
        count += 1;
    }
    total / count as f64
}

#[test]
fn cross_entropy_grads() {
    let v = 7;
    let tgt: Vec<u32> = vec![3, 0, 6, 1, 0, 2];
    for eps in [0.0f32, 0.1] {
        let x = rnd("logits", tgt.len() * v, 3.0);
        let x64 = to64(&x);
        let f = |p: &[Vec<f64>]| ce64(&p[0], &tgt, v, eps as f64, 0);
        let fwd = cross_entropy_forward(&x, &tgt, v, eps, Some(0));
        let mut dx = x.clone();
        let out = cross_entropy_fused(&mut dx, &tgt, v, eps, Some(0), 1.0);
        assert_eq!(out.count, 4);
        let l64 = ce64(&x64, &tgt, v, eps as f64, 0);
        assert!(((out.loss as f64 - l64) / l64).abs() < FWD_TOL, "ce loss {} vs {l64}", out.loss);
        assert_eq!(fwd, out);
        check(&format!("cross-entropy dlogits eps={eps}"), &dx, &fd_grad(&[x64], 0, &f), GRAD_TOL);
        assert!(dx[v..2 * v].iter().all(|&g| g == 0.0), "pad row has no gradient");
    }
    // All rows padding: loss 0, no gradient, no NaN.
    let mut x = rnd("logits", 2 * v, 3.0);
    let out = cross_entropy_fused(&mut x, &[0, 0], v, 0.0, Some(0), 1.0);
    assert_eq!((out.loss, out.count), (0.0, 0));
    assert!(x.iter().all(|&g| g == 0.0));
}

#[test]
fn attention_regulariser_grads() {
    let (t, l) = (4, 5);
    let lengths = [4, 2, 3];
    let b = lengths.len();
    let alpha_c = 0.7f32;
    let mut alphas = uniform_vec(42, "alphas", b * t * l, 0.0, 0.5);
    // Past a row's length the decoder writes zeros; the regulariser must ignore those steps anyway.
    for (bi, &len) in lengths.iter().enumerate() {
        for s in len..t {
            alphas[(bi * t + s) * l..(bi * t + s + 1) * l].fill(0.3);
        }
    }
    let f = |p: &[Vec<f64>]| {
        let mut total = 0.0;
        for (bi, &len) in lengths.iter().enumerate() {
            for k in 0..l {
                let s: f64 = (0..len).map(|s| p[0][(bi * t + s) * l + k]).sum();
                total += (1.0 - s).powi(2);
            }
        }
        alpha_c as f64 * total / b as f64
    };
    let a64 = to64(&alphas);
    let mut d = vec![0.0; b * t * l];
    let r = attention_reg(Some(&mut d), &alphas, &lengths, alpha_c, t, l);
    let r64 = f(std::slice::from_ref(&a64));
    assert!(((r as f64 - r64) / r64).abs() < FWD_TOL, "regulariser {r} vs {r64}");
    check("attention regulariser dalpha", &d, &fd_grad(&[a64], 0, &f), GRAD_TOL);
}

#[test]
fn dropout_mask_and_backward() {
    let n = 20_000;
    let x = rnd("x", n, 1.0);
    let p = 0.3;
    let (mut y, mut mask) = (vec![0.0; n], Vec::new());
    dropout_forward(&mut y, &mut mask, &x, p, &mut Rng::new(9)).unwrap();
    let kept = mask.iter().filter(|&&m| m != 0.0).count() as f64 / n as f64;
    // Binomial std of the kept fraction: sqrt(0.21 / 20000) = 0.0032; 5 sigma = 0.016.
    assert!((kept - 0.7).abs() < 0.016, "kept fraction {kept}");
    assert!(mask.iter().all(|&m| m == 0.0 || (m - 1.0 / 0.7).abs() < 1e-6));
    for k in 0..n {
        assert_eq!(y[k], x[k] * mask[k]);
    }
    // Same seed, same mask; another seed, another mask.
    let (mut y2, mut m2) = (vec![0.0; n], Vec::new());
    dropout_forward(&mut y2, &mut m2, &x, p, &mut Rng::new(9)).unwrap();
    assert_eq!(mask, m2);
    dropout_forward(&mut y2, &mut m2, &x, p, &mut Rng::new(10)).unwrap();
    assert_ne!(mask, m2);
    // Backward: y is linear in x with the fixed mask, so dx = dy * mask exactly (and accumulates).
    let dy = rnd("dy", n, 1.0);
    let mut dx = vec![1.0; n];
    dropout_backward(&mut dx, &dy, &mask);
    for k in 0..n {
        assert_eq!(dx[k], 1.0 + dy[k] * mask[k]);
    }
    assert!(dropout_forward(&mut y2, &mut m2, &x, 1.0, &mut Rng::new(1)).is_err());
}

#[test]
fn adam_two_steps_by_hand() {
    // One parameter p = 1, lr = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-8, gradients 0.5 then -0.25.
    // Plain Adam:
    //   t=1: m = 0.05, v = 0.00025; mhat = 0.05/0.1 = 0.5, vhat = 0.00025/0.001 = 0.25
    //        p = 1 - 0.1 * 0.5 / (0.5 + 1e-8) = 0.9 (+2e-9)
    //   t=2: m = 0.045 - 0.025 = 0.02, v = 0.00024975 + 0.0000625 = 0.00031225
    //        mhat = 0.02 / 0.19 = 0.10526316, vhat = 0.00031225 / 0.001999 = 0.15620310, sqrt = 0.39522538
    //        p = 0.9 - 0.1 * 0.10526316 / 0.39522538 = 0.9 - 0.02663371 = 0.87336629
    // AdamW, wd = 0.1: each step first p *= 1 - lr*wd = 0.99, then the same Adam move:
    //   t=1: p = 0.99 - 0.1 = 0.89;  t=2: p = 0.89 * 0.99 - 0.02663371 = 0.85446629
    // Adam with L2, wd = 0.1: gradient += 0.1 p
    //   t=1: g = 0.6, m = 0.06, v = 0.00036, mhat = 0.6, vhat = 0.36 → p = 1 - 0.1 = 0.9
    //   t=2: g = -0.25 + 0.09 = -0.16, m = 0.054 - 0.016 = 0.038, v = 0.00035964 + 0.0000256 = 0.00038524
    //        mhat = 0.2, vhat = 0.19271636, sqrt = 0.43899472 → p = 0.9 - 0.1 * 0.2 / 0.43899472 = 0.85444137
    let cases: [(f32, bool, f64, f64); 3] =
        [(0.0, false, 0.9, 0.87336629), (0.1, true, 0.89, 0.85446629), (0.1, false, 0.9, 0.85444137)];
    for (wd, decoupled, p1, p2) in cases {
        let cfg = AdamConfig { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: wd, decoupled };
        let mut opt = Adam::new(cfg, &[1]);
        let mut p = [1.0f32];
        opt.step(&mut [&mut p[..]], &[&[0.5]]);
        // f32 roundoff near 0.9 is 6e-8 per operation; a dozen operations stay well under 5e-7.
        assert!((p[0] as f64 - p1).abs() < 5e-7, "wd {wd} decoupled {decoupled}: step 1 p = {}", p[0]);
        opt.step(&mut [&mut p[..]], &[&[-0.25]]);
        assert!((p[0] as f64 - p2).abs() < 5e-7, "wd {wd} decoupled {decoupled}: step 2 p = {}", p[0]);
        assert_eq!(opt.t, 2);
    }
    // The free function equals the struct (elementwise, many elements so the parallel split is used).
    let n = 10_000;
    let g = rnd("g", n, 1.0);
    let mut p = rnd("p", n, 1.0);
    let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
    let cfg = AdamConfig::default();
    adam_update(&mut p, &g, &mut m, &mut v, &cfg, 1);
    let p0 = rnd("p", n, 1.0);
    for k in 0..n {
        // At t=1 the Adam move is lr * g / (|g| + eps') = lr * sign(g) up to eps.
        assert!((p0[k] - p[k] - 1e-3 * g[k].signum()).abs() < 1e-6);
    }
}

#[test]
fn clip_by_global_norm() {
    let mut a = vec![3.0f32, 4.0];
    let mut b = vec![12.0f32];
    assert!((global_norm(&[&a, &b]) - 13.0).abs() < 1e-6);
    let n = clip_grad_norm(&mut [&mut a[..], &mut b[..]], 20.0);
    assert!((n - 13.0).abs() < 1e-6);
    assert_eq!((a.clone(), b.clone()), (vec![3.0, 4.0], vec![12.0]));
    let n = clip_grad_norm(&mut [&mut a[..], &mut b[..]], 6.5);
    assert!((n - 13.0).abs() < 1e-6);
    for (x, y) in a.iter().chain(&b).zip([1.5f32, 2.0, 6.0]) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
}

/// Whole decoders, dropout on: the directional derivative of the loss along a random direction u
/// over ALL parameters, by f32 central differences, against sum(grad * u). This checks the wiring of
/// the composed step (every layer above is checked exactly on its own); f32 forward passes limit the
/// precision: with step 1e-3, rounding of a loss ~2 is ~2e-7 / 2e-3 = 1e-4 absolute against a
/// directional derivative of order 1, and relu kinks crossed within the step add a little more, so
/// the bound is 1e-2 relative -- a wrong or missing term (e.g. the dropout mask ignored in backward)
/// is an O(1) error. The same seed gives the same mask in every evaluation.
#[test]
fn decoders_directional_derivative_with_dropout() {
    use capgen::model::decoder::{
        attention_backward, attention_forward, show_tell_backward, show_tell_forward, AttentionParams, Batch,
        DecoderDims, ShowTellParams,
    };
    let (b, t) = (3, 4);
    let lengths = [4, 3, 1];
    let mut tokens = vec![0u32; b * t];
    let mut targets = vec![0u32; b * t];
    let mut rng = Rng::new(5);
    for r in 0..b {
        for s in 0..lengths[r] {
            tokens[r * t + s] = 1 + rng.below(8) as u32;
            targets[r * t + s] = 1 + rng.below(8) as u32;
        }
    }
    let d = DecoderDims { vocab: 9, embed: 5, feat: 6, regions: 4, hidden: 7, att: 5 };
    let (p_drop, eps) = (0.3f32, 1e-3f32);

    // Attention decoder.
    let feats = rnd("feats", b * d.regions * d.feat, 1.0);
    let batch = Batch { feats: &feats, tokens: &tokens, targets: &targets, lengths: &lengths, steps: t };
    let mut p = AttentionParams::zeros(&d);
    for (name, v) in p.named_mut() {
        v.copy_from_slice(&rnd(name, v.len(), 0.5));
    }
    let loss = |p: &AttentionParams, g: &mut AttentionParams| -> f64 {
        let mut fw = attention_forward(p, &d, &batch, Some((p_drop, &mut Rng::new(77)))).unwrap();
        let l = attention_backward(p, g, &d, &batch, &mut fw, 0.8, 0.1, false).unwrap();
        l.ce as f64 + l.reg as f64
    };
    let mut g = p.zeros_like();
    loss(&p, &mut g);
    let u: Vec<Vec<f32>> = p.named().iter().map(|(n, v)| rnd(&format!("u.{n}"), v.len(), 1.0)).collect();
    let gu: f64 = g.named().iter().zip(&u).map(|((_, gv), uv)| dot(&to64(gv), &to64(uv))).sum();
    let shifted = |sign: f32| {
        let mut q = p.clone();
        for ((_, v), uv) in q.named_mut().into_iter().zip(&u) {
            v.iter_mut().zip(uv).for_each(|(x, du)| *x += sign * eps * du);
        }
        q
    };
    let mut scratch = p.zeros_like();
    let fd = (loss(&shifted(1.0), &mut scratch) - loss(&shifted(-1.0), &mut scratch)) / (2.0 * eps as f64);
    eprintln!("attention decoder: directional derivative {gu:.6} vs FD {fd:.6}");
    assert!(((gu - fd) / fd).abs() < 1e-2, "attention decoder: {gu} vs FD {fd}");

    // Show-tell decoder.
    let d = DecoderDims { regions: 1, ..d };
    let feats = rnd("pooled", b * d.feat, 1.0);
    let batch = Batch { feats: &feats, tokens: &tokens, targets: &targets, lengths: &lengths, steps: t };
    let mut p = ShowTellParams::zeros(&d);
    for (name, v) in p.named_mut() {
        v.copy_from_slice(&rnd(name, v.len(), 0.5));
    }
    let loss = |p: &ShowTellParams, g: &mut ShowTellParams| -> f64 {
        let mut fw = show_tell_forward(p, &d, &batch, Some((p_drop, &mut Rng::new(78)))).unwrap();
        show_tell_backward(p, g, &d, &batch, &mut fw, 0.1).unwrap().ce as f64
    };
    let mut g = p.zeros_like();
    loss(&p, &mut g);
    let u: Vec<Vec<f32>> = p.named().iter().map(|(n, v)| rnd(&format!("u.{n}"), v.len(), 1.0)).collect();
    let gu: f64 = g.named().iter().zip(&u).map(|((_, gv), uv)| dot(&to64(gv), &to64(uv))).sum();
    let shifted = |sign: f32| {
        let mut q = p.clone();
        for ((_, v), uv) in q.named_mut().into_iter().zip(&u) {
            v.iter_mut().zip(uv).for_each(|(x, du)| *x += sign * eps * du);
        }
        q
    };
    let mut scratch = p.zeros_like();
    let fd = (loss(&shifted(1.0), &mut scratch) - loss(&shifted(-1.0), &mut scratch)) / (2.0 * eps as f64);
    eprintln!("show-tell decoder: directional derivative {gu:.6} vs FD {fd:.6}");
    assert!(((gu - fd) / fd).abs() < 1e-2, "show-tell decoder: {gu} vs FD {fd}");
}
