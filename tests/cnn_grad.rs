//! Every CNN backward (conv2d, batch-norm in training mode, max-pool, average pools, ReLU, and a whole
//! residual network) against f64 central finite differences.
//!
//! Method (as tests/grad_check.rs): each op has a plain-loop f64 forward here, sharing no code with
//! `src/`, fed the same f32-rounded inputs. The loss is L = sum(out * r) for a fixed random r, so the
//! analytic backward runs with dout = r. FD gradients use h = 1e-5 in f64: truncation ~h^2 = 1e-10,
//! rounding ~1e-16/h = 1e-11, so they are exact to ~1e-9 and the comparison measures only our f32
//! backward's error.
//!
//! Tolerance: relative L2 ||g_ours - g_fd|| / ||g_fd|| <= 1e-4. f32's unit roundoff is 6e-8 and the
//! sums here have at most a few thousand terms, so honest errors stay near 1e-6; a missing or wrong
//! term is an O(1) relative error.

mod common;
use common::fd::*;

use capgen::cpu::batchnorm::{batchnorm_backward, batchnorm_train_forward, relu_backward, BnShape};
use capgen::cpu::conv::{conv2d_backward, conv2d_backward_reference, ConvParams, ConvShape};
use capgen::cpu::pool::{
    adaptive_avg_pool2d, adaptive_avg_pool2d_backward, global_avg_pool_backward, max_pool2d_backward,
    max_pool2d_with_argmax, PoolParams,
};
use capgen::nn::resnet::{BlockKind, ResNetConfig};
use capgen::nn::train_resnet::TrainResNet;
use capgen::nn::FeatureLayer;

const GRAD_TOL: f64 = 1e-4;

// ----- f64 reference forwards -----

/// y (N,K,P,Q) = conv(x (N,C,H,W), w (K,C,R,S)), cross-correlation with stride/pad/dilation.
fn conv64(x: &[f64], w: &[f64], g: &ConvShape, p: &ConvParams) -> Vec<f64> {
    let (oh, ow) = g.out_hw(p);
    let mut y = vec![0.0; g.n * g.k * oh * ow];
    for b in 0..g.n {
        for k in 0..g.k {
            for i in 0..oh {
                for j in 0..ow {
                    let mut acc = 0.0;
                    for c in 0..g.c {
                        for r in 0..g.r {
                            for s in 0..g.s {
                                let iy = (i * p.stride.0 + r * p.dilation.0) as isize - p.pad.0 as isize;
                                let ix = (j * p.stride.1 + s * p.dilation.1) as isize - p.pad.1 as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                                    acc += w[((k * g.c + c) * g.r + r) * g.s + s]
                                        * x[((b * g.c + c) * g.h + iy as usize) * g.w + ix as usize];
                                }
                            }
                        }
                    }
                    y[((b * g.k + k) * oh + i) * ow + j] = acc;
                }
            }
        }
    }
    y
}

/// Training-mode BN over (N, C, HW): biased batch variance, eps 1e-5.
fn bn64(x: &[f64], n: usize, c: usize, hw: usize, gamma: &[f64], beta: &[f64]) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    let m = (n * hw) as f64;
    for ch in 0..c {
        let idx = |b: usize, i: usize| (b * c + ch) * hw + i;
        let mut mean = 0.0;
        for b in 0..n {
            for i in 0..hw {
                mean += x[idx(b, i)];
            }
        }
        mean /= m;
        let mut var = 0.0;
        for b in 0..n {
            for i in 0..hw {
                var += (x[idx(b, i)] - mean).powi(2);
            }
        }
        var /= m;
        for b in 0..n {
            for i in 0..hw {
                y[idx(b, i)] = gamma[ch] * (x[idx(b, i)] - mean) / (var + 1e-5).sqrt() + beta[ch];
            }
        }
    }
    y
}

/// Max-pool over (N*C planes, H, W) with -inf padding.
fn maxpool64(x: &[f64], planes: usize, h: usize, w: usize, p: &PoolParams) -> Vec<f64> {
    let (oh, ow) = p.out_hw(h, w).unwrap();
    let mut y = vec![0.0; planes * oh * ow];
    for b in 0..planes {
        for i in 0..oh {
            for j in 0..ow {
                let mut m = f64::NEG_INFINITY;
                for r in 0..p.kernel.0 {
                    for s in 0..p.kernel.1 {
                        let iy = (i * p.stride.0 + r) as isize - p.pad.0 as isize;
                        let ix = (j * p.stride.1 + s) as isize - p.pad.1 as isize;
                        if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                            m = m.max(x[(b * h + iy as usize) * w + ix as usize]);
                        }
                    }
                }
                y[(b * oh + i) * ow + j] = m;
            }
        }
    }
    y
}

/// Adaptive average pool over (planes, H, W): bin i covers rows floor(i*H/OH) .. ceil((i+1)*H/OH).
fn adaptive64(x: &[f64], planes: usize, h: usize, w: usize, oh: usize, ow: usize) -> Vec<f64> {
    let mut y = vec![0.0; planes * oh * ow];
    for pl in 0..planes {
        for i in 0..oh {
            let (h0, h1) = ((i * h) / oh, ((i + 1) * h).div_ceil(oh));
            for j in 0..ow {
                let (w0, w1) = ((j * w) / ow, ((j + 1) * w).div_ceil(ow));
                let mut s = 0.0;
                for a in h0..h1 {
                    for b in w0..w1 {
                        s += x[(pl * h + a) * w + b];
                    }
                }
                y[(pl * oh + i) * ow + j] = s / ((h1 - h0) * (w1 - w0)) as f64;
            }
        }
    }
    y
}

fn relu64(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| x.max(0.0)).collect()
}

// ----- conv -----

type Geo = (usize, usize, usize, usize, usize, usize, usize, usize, usize, usize);

fn conv_case(geo: Geo) {
    let (n, c, h, w, k, r, s, st, pd, dil) = geo;
    let g = ConvShape { n, c, h, w, k, r, s };
    let p = ConvParams { stride: (st, st), pad: (pd, pd), dilation: (dil, dil) };
    let (oh, ow) = g.out_hw(&p);
    let x = rnd("cx", n * c * h * w, 1.0);
    let wt = rnd("cw", k * c * r * s, 0.5);
    let dy = rnd("cr", n * k * oh * ow, 1.0);
    // Ours, accumulating onto nonzero buffers (checks `+=`): start from a known offset, subtract it.
    let off = 0.25f32;
    let mut dx = vec![off; x.len()];
    let mut dw = vec![off; wt.len()];
    let mut db = vec![off; k];
    conv2d_backward(&x, &wt, &g, &p, &dy, Some(&mut dx), &mut dw, Some(&mut db));
    for v in dx.iter_mut().chain(dw.iter_mut()).chain(db.iter_mut()) {
        *v -= off;
    }
    let r64 = to64(&dy);
    let f = |v: &[Vec<f64>]| {
        let y = conv64(&v[0], &v[1], &g, &p);
        // + bias: sum_k b[k] * sum r over channel k
        let mut l = dot(&y, &r64);
        for (kk, b) in v[2].iter().enumerate() {
            for bi in 0..n {
                l += b * r64[(bi * k + kk) * oh * ow..(bi * k + kk + 1) * oh * ow].iter().sum::<f64>();
            }
        }
        l
    };
    let inputs = vec![to64(&x), to64(&wt), to64(&rnd("cb", k, 0.1))];
    check(&format!("conv {geo:?} dx"), &dx, &fd_grad(&inputs, 0, &f), GRAD_TOL);
    check(&format!("conv {geo:?} dw"), &dw, &fd_grad(&inputs, 1, &f), GRAD_TOL);
    check(&format!("conv {geo:?} db"), &db, &fd_grad(&inputs, 2, &f), GRAD_TOL);
}

#[test]
fn conv_backward_vs_finite_differences() {
    let cases: &[Geo] = &[
        (2, 3, 7, 6, 4, 3, 3, 2, 1, 1),   // 3x3 stride 2 pad 1
        (2, 4, 6, 7, 5, 1, 1, 2, 0, 1),   // 1x1 stride 2 (downsample)
        (2, 5, 4, 5, 3, 1, 1, 1, 0, 1),   // 1x1 stride 1: the no-im2col path
        (1, 2, 11, 10, 3, 7, 7, 2, 3, 1), // 7x7 s2 p3 (a tiny stem)
        (1, 3, 8, 9, 2, 3, 3, 1, 2, 2),   // dilation 2
        (2, 2, 5, 6, 3, 2, 3, 1, 0, 1),   // non-square kernel, no padding
    ];
    for &g in cases {
        conv_case(g);
    }
}

#[test]
fn conv_backward_matches_direct_reference_at_scale() {
    // Bigger than FD allows: the GEMM path (parallel images, per-worker dW) vs the direct loops.
    for (i, &(n, c, h, w, k, r, st, pd)) in [
        (4, 16, 20, 18, 24, 3, 1, 1),
        (3, 12, 21, 21, 20, 3, 2, 1),
        (4, 32, 9, 9, 16, 1, 1, 0),
        (5, 8, 9, 9, 6, 3, 1, 1),
    ]
    .iter()
    .enumerate()
    {
        let g = ConvShape { n, c, h, w, k, r, s: r };
        let p = ConvParams::new(st, pd);
        let (oh, ow) = g.out_hw(&p);
        let x = rnd(&format!("x{i}"), n * c * h * w, 1.0);
        let wt = rnd(&format!("w{i}"), k * c * r * r, 0.5);
        let dy = rnd(&format!("dy{i}"), n * k * oh * ow, 1.0);
        let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; wt.len()], vec![0.0; k]);
        conv2d_backward(&x, &wt, &g, &p, &dy, Some(&mut dx), &mut dw, Some(&mut db));
        let (mut rx, mut rw, mut rb) = (vec![0.0; x.len()], vec![0.0; wt.len()], vec![0.0; k]);
        conv2d_backward_reference(&x, &wt, &g, &p, &dy, &mut rx, &mut rw, &mut rb);
        // f32 sums of up to n*P*Q = 1600 terms in different orders: ~6e-8 * sqrt(1600) ~ 2e-6.
        check(&format!("conv ref {i} dx"), &dx, &to64(&rx), 1e-5);
        check(&format!("conv ref {i} dw"), &dw, &to64(&rw), 1e-5);
        check(&format!("conv ref {i} db"), &db, &to64(&rb), 1e-5);
    }
}

// ----- batch-norm -----

#[test]
fn batchnorm_train_backward_vs_finite_differences() {
    let (n, c, hw) = (3, 4, 10);
    let g = BnShape { n, c, hw };
    // A non-zero mean and non-unit scale per channel, so mean and var terms matter.
    let x: Vec<f32> =
        rnd("bx", n * c * hw, 1.0).iter().enumerate().map(|(i, v)| v * 2.0 + (i / hw % c) as f32).collect();
    let gamma: Vec<f32> = rnd("bg", c, 0.5).iter().map(|v| v + 1.0).collect();
    let beta = rnd("bb", c, 0.5);
    let r = rnd("br", x.len(), 1.0);
    let (mut rm, mut rv) =
        (rnd("brm", c, 0.1), rnd("brv", c, 0.2).iter().map(|v| v + 1.0).collect::<Vec<_>>());
    let (rm0, rv0) = (rm.clone(), rv.clone());
    let mut y = vec![0.0; x.len()];
    let (mut mean, mut rstd) = (vec![0.0; c], vec![0.0; c]);
    batchnorm_train_forward(&x, &g, &gamma, &beta, &mut rm, &mut rv, 0.1, 1e-5, &mut y, &mut mean, &mut rstd);
    let y64 = bn64(&to64(&x), n, c, hw, &to64(&gamma), &to64(&beta));
    check("bn forward", &y, &y64, 1e-5);
    // Running stats: momentum 0.1, unbiased variance (PyTorch).
    let m = (n * hw) as f64;
    for ch in 0..c {
        let vals: Vec<f64> =
            (0..n).flat_map(|b| (0..hw).map(move |i| (b * c + ch) * hw + i)).map(|i| x[i] as f64).collect();
        let mu = vals.iter().sum::<f64>() / m;
        let var_u = vals.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / (m - 1.0);
        let want_m = 0.9 * rm0[ch] as f64 + 0.1 * mu;
        let want_v = 0.9 * rv0[ch] as f64 + 0.1 * var_u;
        assert!((rm[ch] as f64 - want_m).abs() <= 1e-6 * want_m.abs().max(1.0), "running mean {ch}");
        assert!((rv[ch] as f64 - want_v).abs() <= 1e-6 * want_v.abs().max(1.0), "running var {ch}");
    }
    let off = 0.5f32;
    let (mut dx, mut dg, mut db) = (vec![off; x.len()], vec![off; c], vec![off; c]);
    batchnorm_backward(&x, &g, &gamma, &mean, &rstd, &r, &mut dx, &mut dg, &mut db);
    for v in dx.iter_mut().chain(dg.iter_mut()).chain(db.iter_mut()) {
        *v -= off;
    }
    let r64 = to64(&r);
    let f = |v: &[Vec<f64>]| dot(&bn64(&v[0], n, c, hw, &v[1], &v[2]), &r64);
    let inputs = vec![to64(&x), to64(&gamma), to64(&beta)];
    check("bn dx", &dx, &fd_grad(&inputs, 0, &f), GRAD_TOL);
    check("bn dgamma", &dg, &fd_grad(&inputs, 1, &f), GRAD_TOL);
    check("bn dbeta", &db, &fd_grad(&inputs, 2, &f), GRAD_TOL);
}

// ----- pools and ReLU -----

#[test]
fn max_pool_backward_vs_finite_differences() {
    let (n, c, h, w) = (2, 3, 9, 8);
    let x = rnd("mx", n * c * h * w, 1.0);
    for p in [PoolParams::new(3, 2, 1), PoolParams::new(2, 2, 0), PoolParams::new(3, 1, 1)] {
        let (oh, ow) = p.out_hw(h, w).unwrap();
        let mut y = vec![0.0; n * c * oh * ow];
        let mut am = vec![0u32; y.len()];
        max_pool2d_with_argmax(&x, n, c, h, w, &p, &mut y, &mut am);
        check(&format!("maxpool {p:?} forward"), &y, &maxpool64(&to64(&x), n * c, h, w, &p), 0.0);
        let r = rnd("mr", y.len(), 1.0);
        let mut dx = vec![0.0; x.len()];
        max_pool2d_backward(&r, &am, n, c, h, w, &mut dx);
        let r64 = to64(&r);
        let f = |v: &[Vec<f64>]| dot(&maxpool64(&v[0], n * c, h, w, &p), &r64);
        check(&format!("maxpool {p:?} dx"), &dx, &fd_grad(&[to64(&x)], 0, &f), GRAD_TOL);
    }
}

#[test]
fn max_pool_ties_go_to_the_first_element() {
    // A constant plane: every window ties; PyTorch sends the gradient to the first (row-major) pixel
    // of the window that lies inside the image.
    let (h, w) = (4, 4);
    let x = vec![1.0f32; h * w];
    let p = PoolParams::new(3, 2, 1);
    let mut y = vec![0.0; 4];
    let mut am = vec![0u32; 4];
    max_pool2d_with_argmax(&x, 1, 1, h, w, &p, &mut y, &mut am);
    // Windows start at rows/cols -1 and 1, clipped to 0 and 1.
    assert_eq!(am, [0, 1, 4, 5]);
    let mut dx = vec![0.0; h * w];
    max_pool2d_backward(&[1.0, 2.0, 3.0, 4.0], &am, 1, 1, h, w, &mut dx);
    assert_eq!(&dx[..6], &[1.0, 2.0, 0.0, 0.0, 3.0, 4.0]);
}

#[test]
fn average_pool_backwards_vs_finite_differences() {
    let (n, c, h, w) = (2, 2, 7, 5);
    let x = rnd("ax", n * c * h * w, 1.0);
    for (oh, ow) in [(3, 2), (2, 2), (7, 5), (1, 1), (9, 6)] {
        let r = rnd("ar", n * c * oh * ow, 1.0);
        let mut dx = vec![0.0; x.len()];
        adaptive_avg_pool2d_backward(&r, n, c, h, w, oh, ow, &mut dx);
        let r64 = to64(&r);
        let f = |v: &[Vec<f64>]| dot(&adaptive64(&v[0], n * c, h, w, oh, ow), &r64);
        check(&format!("adaptive avg {oh}x{ow} dx"), &dx, &fd_grad(&[to64(&x)], 0, &f), GRAD_TOL);
        let mut y = vec![0.0; r.len()];
        adaptive_avg_pool2d(&x, n, c, h, w, oh, ow, &mut y);
        check(
            &format!("adaptive avg {oh}x{ow} forward"),
            &y,
            &adaptive64(&to64(&x), n * c, h, w, oh, ow),
            1e-6,
        );
    }
    // Global pool = adaptive 1x1.
    let r = rnd("gr", n * c, 1.0);
    let (mut a, mut b) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    global_avg_pool_backward(&r, n, c, h, w, &mut a);
    adaptive_avg_pool2d_backward(&r, n, c, h, w, 1, 1, &mut b);
    check("global avg dx", &a, &to64(&b), 1e-7);
}

#[test]
fn relu_backward_masks_by_output() {
    let y = [0.0f32, 2.0, 0.0, 0.5];
    let dy = [1.0f32, 2.0, 3.0, 4.0];
    let mut dx = [10.0f32; 4];
    relu_backward(&y, &dy, &mut dx);
    assert_eq!(dx, [10.0, 12.0, 10.0, 14.0]);
}

// ----- a whole residual network -----

/// The f64 forward of a Bottleneck TrainResNet from its parameters (by torchvision name), grid
/// features (N, C, h*w) flattened as (N, hw, C), then L = sum(grid * r).
fn net64(
    cfg: &ResNetConfig,
    get: &dyn Fn(&str) -> Vec<f64>,
    x: &[f64],
    n: usize,
    h: usize,
    w: usize,
) -> (Vec<f64>, usize, usize) {
    let unit = |name: &str,
                bn: &str,
                x: &[f64],
                c: usize,
                hh: usize,
                ww: usize,
                k: usize,
                r: usize,
                st: usize,
                pd: usize| {
        let g = ConvShape { n, c, h: hh, w: ww, k, r, s: r };
        let p = ConvParams::new(st, pd);
        let (oh, ow) = g.out_hw(&p);
        let z = conv64(x, &get(&format!("{name}.weight")), &g, &p);
        (bn64(&z, n, k, oh * ow, &get(&format!("{bn}.weight")), &get(&format!("{bn}.bias"))), oh, ow)
    };
    let wd = cfg.width;
    let (y, sh, sw) = unit("conv1", "bn1", x, 3, h, w, wd, 7, 2, 3);
    let mp = PoolParams::new(3, 2, 1);
    let (mut hh, mut ww) = mp.out_hw(sh, sw).unwrap();
    let mut cur = maxpool64(&relu64(&y), n * wd, sh, sw, &mp);
    let mut inplanes = wd;
    for li in 0..4 {
        let planes = wd << li;
        for bi in 0..cfg.layers[li] {
            let st = if bi == 0 && li > 0 { 2 } else { 1 };
            let p = format!("layer{}.{bi}", li + 1);
            assert_eq!(cfg.block, BlockKind::Bottleneck);
            let (a1, h1, w1) =
                unit(&format!("{p}.conv1"), &format!("{p}.bn1"), &cur, inplanes, hh, ww, planes, 1, 1, 0);
            let (a2, h2, w2) = unit(
                &format!("{p}.conv2"),
                &format!("{p}.bn2"),
                &relu64(&a1),
                planes,
                h1,
                w1,
                planes,
                3,
                st,
                1,
            );
            let (a3, _, _) = unit(
                &format!("{p}.conv3"),
                &format!("{p}.bn3"),
                &relu64(&a2),
                planes,
                h2,
                w2,
                planes * 4,
                1,
                1,
                0,
            );
            let id = if bi == 0 {
                unit(
                    &format!("{p}.downsample.0"),
                    &format!("{p}.downsample.1"),
                    &cur,
                    inplanes,
                    hh,
                    ww,
                    planes * 4,
                    1,
                    st,
                    0,
                )
                .0
            } else {
                cur.clone()
            };
            cur = a3.iter().zip(&id).map(|(a, b)| (a + b).max(0.0)).collect();
            (hh, ww) = (h2, w2);
            inplanes = planes * 4;
        }
    }
    let c = inplanes;
    let hw = hh * ww;
    let mut grid = vec![0.0; cur.len()];
    for b in 0..n {
        for ch in 0..c {
            for p in 0..hw {
                grid[(b * hw + p) * c + ch] = cur[(b * c + ch) * hw + p];
            }
        }
    }
    (grid, hw, c)
}

#[test]
fn whole_bottleneck_net_directional_derivatives() {
    // Bottleneck [1,1,1,1] width 2 (channels up to 64) on a (2, 3, 64, 64) batch: final grid 2x2.
    // Directional derivatives: for random directions d over all parameters at once,
    // (L(p + h d) - L(p - h d)) / 2h (f64 forward) vs sum(grad * d) (our backward).
    // Step: moving every parameter at once makes L strongly curved along d (ReLU and max-pool kinks
    // are crossed, BN at layer4 normalises over only 8 values): measured FD values for one direction
    // were 294 (h=1e-3), 597 (1e-4), 619.107 (1e-5), 619.2313 (1e-6), 619.2312 (1e-7). So h = 1e-7
    // (f64 rounding error ~1e-16 * |L| / h ~ 1e-8 relative). The sum over ~22k terms cancels by ~30x
    // (sum |g d| / |sum g d|), which turns our ~1e-6 per-gradient error into ~3e-5 here; 1e-4 holds.
    const NET_STEP: f64 = 1e-7;
    let cfg = ResNetConfig { block: BlockKind::Bottleneck, layers: [1, 1, 1, 1], width: 2, num_classes: 3 };
    let (n, h, w) = (2, 64, 64);
    let mut net = TrainResNet::random(&cfg, 5);
    let x = rnd("netx", n * 3 * h * w, 2.0);
    let params: Vec<(String, Vec<f64>)> =
        net.params.iter().map(|p| (p.name.clone(), to64(&p.data))).collect();
    let (grid, cache) = net.forward_train(&x, n, h, w, FeatureLayer::Grid).unwrap();
    let r = rnd("netr", grid.len(), 1.0);
    net.backward(&cache, &r).unwrap();
    let r64 = to64(&r);
    let x64 = to64(&x);
    let loss = |ps: &[(String, Vec<f64>)]| {
        let get =
            |name: &str| ps.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name}")).1.clone();
        let (g, _, _) = net64(&cfg, &get, &x64, n, h, w);
        dot(&g, &r64)
    };
    // The f32 forward agrees with the f64 one.
    let get0 = |name: &str| params.iter().find(|(n, _)| n == name).unwrap().1.clone();
    check("net forward", &grid, &net64(&cfg, &get0, &x64, n, h, w).0, 1e-5);
    for dir in 0..3 {
        let d: Vec<Vec<f64>> =
            params.iter().map(|(name, v)| to64(&rnd(&format!("dir{dir}.{name}"), v.len(), 1.0))).collect();
        let shifted = |sign: f64| -> Vec<(String, Vec<f64>)> {
            params
                .iter()
                .zip(&d)
                .map(|((nm, v), dv)| {
                    (nm.clone(), v.iter().zip(dv).map(|(a, b)| a + sign * NET_STEP * b).collect())
                })
                .collect()
        };
        let fd = (loss(&shifted(1.0)) - loss(&shifted(-1.0))) / (2.0 * NET_STEP);

        let ours: f64 = net.params.iter().zip(&d).map(|(p, dv)| dot(&to64(&p.grad), dv)).sum();
        let e = (ours - fd).abs() / fd.abs();
        eprintln!("direction {dir}: ours {ours:.8e} fd {fd:.8e} rel {e:.2e}");
        assert!(e <= GRAD_TOL, "direction {dir}: rel error {e:.3e}");
    }
}
