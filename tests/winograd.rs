//! Winograd F(2x2, 3x3) and F(4x4, 3x3) against direct convolution: an independent f64 direct convolution and the
//! crate's f32 `conv2d_reference`, on fresh seeded random inputs, every ISA path, odd sizes, batch
//! 1 and 3, with and without residual / ReLU, NCHW and (C, N, H, W) layouts.
//!
//! Error bound. Every output is y = bias + a sum of 9C products w*x. With independent, zero-mean
//! rounding errors, a length-L f32 dot product summed in order has a relative error of about
//! u * sqrt(L / 6) (u = 2^-24 = 6e-8; the partial sums grow like sqrt(j), each rounding is
//! ~u/sqrt(3) of one): 0.4 u sqrt(9C) for direct convolution. Winograd's 16 GEMMs sum only C
//! products each, but (1) the output transform adds 9 of them with signs (A has entries +-1), so
//! the error is that of the transformed products, ||m|| / ||y|| = kappa <= 4 times larger relative
//! to y (the 1-norm of a row of Aᵀ is 3, G's rows have 1-norm <= 1.5), and (2) the transforms add
//! a handful of roundings per value. Taking kappa = 4, the 0.4 above, and a factor 3 for a
//! three-sigma tail (and for the transforms' extra roundings) gives 4.8; we use
//!
//!     rel_l2(winograd, exact) <= BOUND_FACTOR * u * sqrt(9C),   BOUND_FACTOR = 8,
//!
//! i.e. 4.6e-6 at C = 3 .. 3.3e-5 at C = 512 (below the 1e-4 per layer). Measured on the
//! ResNet-50 shapes (test `measured_errors`): 1.9e-7 .. 5.0e-7, about 0.12 u sqrt(9C), a ~65x
//! margin, and about as large as `conv2d_forward`'s own error (2.4e-7 .. 2.9e-7). The comparison
//! with the f32 `conv2d_reference` (itself in error by up to ~0.4 u sqrt(9C)) allows twice the bound.
//!
//! F(4x4, 3x3) is held to the same bound. Its transforms have larger entries (Aᵀ has rows of
//! 1-norm up to 19, Bᵀ up to 10, while G's entries shrink to 1/24), so the kappa above grows by
//! roughly 4-5x; measured (`measured_errors`) 8e-7 .. 3e-6, 0.6-1.2 u sqrt(9C), still a >6x margin.

mod common;
use capgen::cpu::blocked::blocked_index;
use capgen::cpu::conv::{conv2d_reference, ConvParams, ConvWeights};
use capgen::cpu::gemm::{available_isas, Isa};
use capgen::cpu::winograd::{
    transform_filter, winograd_applicable, winograd_forward, winograd_forward_nchw, workspace_len, ActLayout,
    WinoTile, WinogradWeights,
};
use capgen::rng::Rng;
use common::rel_l2;

const U: f64 = 5.960_464_5e-8; // 2^-24, f32 unit roundoff
const BOUND_FACTOR: f64 = 8.0;
const TILES: [WinoTile; 2] = [WinoTile::F2, WinoTile::F4];

/// The model bound above for C input channels.
fn bound(c: usize) -> f64 {
    BOUND_FACTOR * U * ((9 * c) as f64).sqrt()
}

fn rand(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.uniform(lo, hi)).collect()
}

/// Direct 3x3 / stride 1 / pad 1 convolution in f64: x (N, C, H, W), w (K, C, 3, 3) -> (N, K, H, W).
fn direct_f64(cs: &Case, x: &[f32], wt: &[f32], bias: &[f32], res: Option<&[f32]>, relu: bool) -> Vec<f64> {
    let Case { n, c, k, h, w } = *cs;
    let mut y = vec![0.0f64; n * k * h * w];
    for b in 0..n {
        for ko in 0..k {
            for oy in 0..h {
                for ox in 0..w {
                    let mut acc = bias[ko] as f64;
                    for ci in 0..c {
                        for r in 0..3 {
                            let iy = oy as isize + r as isize - 1;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for s in 0..3 {
                                let ix = ox as isize + s as isize - 1;
                                if ix < 0 || ix >= w as isize {
                                    continue;
                                }
                                acc += wt[((ko * c + ci) * 3 + r) * 3 + s] as f64
                                    * x[((b * c + ci) * h + iy as usize) * w + ix as usize] as f64;
                            }
                        }
                    }
                    let o = ((b * k + ko) * h + oy) * w + ox;
                    if let Some(r) = res {
                        acc += r[o] as f64;
                    }
                    y[o] = if relu { acc.max(0.0) } else { acc };
                }
            }
        }
    }
    y
}

struct Case {
    n: usize,
    c: usize,
    k: usize,
    h: usize,
    w: usize,
}

/// Runs one case on one ISA in NCHW; returns (rel L2 vs f64 direct, rel L2 vs f32 conv2d_reference).
fn run_case(
    isa: Isa,
    tile: WinoTile,
    cs: &Case,
    seed: u64,
    residual: bool,
    relu: bool,
    x_lo: f32,
) -> (f64, f64) {
    let Case { n, c, k, h, w } = *cs;
    let mut rng = Rng::new(seed);
    let wt = rand(&mut rng, k * c * 9, -1.0, 1.0);
    let bias = rand(&mut rng, k, -1.0, 1.0);
    let x = rand(&mut rng, n * c * h * w, x_lo, 1.0);
    let res = residual.then(|| rand(&mut rng, n * k * h * w, -1.0, 1.0));
    let ww = WinogradWeights::new_with_isa(isa, tile, &wt, Some(&bias), k, c);
    let mut ws = Vec::new();
    let mut y = vec![f32::NAN; n * k * h * w];
    winograd_forward_nchw(&x, n, h, w, &ww, res.as_deref(), relu, &mut y, &mut ws);
    let exact = direct_f64(cs, &x, &wt, &bias, res.as_deref(), relu);
    let cw = ConvWeights::new(wt, Some(bias), k, c, 3, 3);
    let mut yr = vec![0.0f32; n * k * h * w];
    conv2d_reference(&x, n, h, w, &cw, &ConvParams::new(1, 1), res.as_deref(), relu, &mut yr);
    (rel_l2(&y, &exact), rel_l2(&y, &yr))
}

#[test]
fn filter_transform_matches_the_formula() {
    // U = G g Gᵀ written out for a filter with a single 1 at (r, s): U[i][j] = G[i][r] * G[j][s].
    // G of F(2x2) and of F(4x4) (points 0, 1, -1, 2, -2, infinity), from Lavin & Gray's paper.
    let g2: Vec<[f64; 3]> = vec![[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
    let s6 = 1.0 / 6.0;
    let g4: Vec<[f64; 3]> = vec![
        [0.25, 0.0, 0.0],
        [-s6, -s6, -s6],
        [-s6, s6, -s6],
        [1.0 / 24.0, 1.0 / 12.0, s6],
        [1.0 / 24.0, -1.0 / 12.0, s6],
        [0.0, 0.0, 1.0],
    ];
    for (tile, gm) in [(WinoTile::F2, g2), (WinoTile::F4, g4)] {
        let a = gm.len();
        for r in 0..3 {
            for s in 0..3 {
                let mut g = [0.0f32; 9];
                g[r * 3 + s] = 1.0;
                let u = transform_filter(tile, &g);
                assert_eq!(u.len(), a * a);
                for i in 0..a {
                    for j in 0..a {
                        let want = (gm[i][r] * gm[j][s]) as f32;
                        assert_eq!(u[i * a + j], want, "{tile:?} g[{r}][{s}] -> U[{i}][{j}]");
                    }
                }
            }
        }
    }
}

#[test]
fn small_and_odd_shapes_every_isa() {
    let cases = [
        Case { n: 1, c: 2, k: 8, h: 1, w: 1 },
        Case { n: 1, c: 3, k: 5, h: 7, w: 7 },
        Case { n: 3, c: 8, k: 6, h: 5, w: 9 },
        Case { n: 3, c: 4, k: 3, h: 1, w: 6 },
        Case { n: 1, c: 16, k: 20, h: 8, w: 8 },
        Case { n: 3, c: 17, k: 33, h: 11, w: 4 },
        Case { n: 1, c: 40, k: 30, h: 3, w: 2 },
        Case { n: 2, c: 3, k: 4, h: 5, w: 37 },
    ];
    let mut seed = 100;
    for (isa, tile) in available_isas().into_iter().flat_map(|i| TILES.map(|t| (i, t))) {
        for cs in &cases {
            for (residual, relu) in [(false, false), (false, true), (true, false), (true, true)] {
                seed += 1;
                let (e64, e32) = run_case(isa, tile, cs, seed, residual, relu, -1.0);
                let tag = format!(
                    "{} {} n{} c{} k{} {}x{} res {residual} relu {relu}",
                    isa.name(),
                    tile.name(),
                    cs.n,
                    cs.c,
                    cs.k,
                    cs.h,
                    cs.w
                );
                assert!(e64 <= bound(cs.c), "{tag}: rel L2 vs f64 {e64:.2e} > {:.2e}", bound(cs.c));
                // vs the f32 reference: its own error (~u sqrt(9C)) adds to ours.
                assert!(e32 <= 2.0 * bound(cs.c), "{tag}: rel L2 vs f32 reference {e32:.2e}");
            }
        }
    }
}

/// ResNet-50's four 3x3 stride-1 shapes. Batch 2 at 56 px and 3 at 14 / 7 px so the tiles span
/// several images and the larger ones split into more than one tile block.
fn resnet_cases() -> Vec<(&'static str, Case)> {
    vec![
        ("l1 64 @56", Case { n: 2, c: 64, k: 64, h: 56, w: 56 }),
        ("l2 128 @28", Case { n: 1, c: 128, k: 128, h: 28, w: 28 }),
        ("l3 256 @14", Case { n: 3, c: 256, k: 256, h: 14, w: 14 }),
        ("l4 512 @7", Case { n: 3, c: 512, k: 512, h: 7, w: 7 }),
    ]
}

#[test]
fn resnet50_shapes_within_bound() {
    let isa = available_isas()[0];
    for tile in TILES {
        for (i, (name, cs)) in resnet_cases().iter().enumerate() {
            // Post-ReLU-like inputs (>= 0) and signed inputs; the last conv of a block adds a residual.
            for (j, x_lo) in [0.0f32, -1.0].into_iter().enumerate() {
                let (e64, e32) = run_case(isa, tile, cs, 7000 + (i * 2 + j) as u64, j == 1, true, x_lo);
                let b = bound(cs.c);
                assert!(e64 <= b, "{name} {tile:?}: rel L2 vs f64 {e64:.2e} > {b:.2e}");
                assert!(e32 <= 2.0 * b, "{name} {tile:?}: rel L2 vs f32 reference {e32:.2e}");
            }
        }
    }
}

/// The (C, N, H, W) layout and padded (non-contiguous) layouts give the same values as NCHW, and
/// the gaps of a padded output are left untouched.
#[test]
fn layouts_agree() {
    // The second geometry has rows longer than a column block (37 > 32): blocked rows then span
    // up to three blocks.
    for (n, c, k, h, w) in [(3, 5, 7, 9, 6), (2, 3, 4, 5, 37)] {
        layouts_agree_for(n, c, k, h, w, &available_isas());
    }
    // Big enough for several blocks of tile rows (the scratch holds ~4 MB: 13 of F(2x2)'s 45 tile
    // rows, 22 of F(4x4)'s 24), whose windows of a blocked input and output start and end inside
    // column blocks and images; odd H. The widest ISA only (the layouts do not depend on it).
    layouts_agree_for(3, 64, 64, 29, 45, &available_isas()[..1]);
}

/// NCHW, (C, N, H, W), a padded channel-major layout and the column-blocked one (`cpu::blocked`)
/// for input, output and residual, in every combination: the same bits as NCHW, gaps (and the
/// blocked layout's padding columns) untouched.
fn layouts_agree_for(n: usize, c: usize, k: usize, h: usize, w: usize, isas: &[Isa]) {
    let mut rng = Rng::new(42);
    let wt = rand(&mut rng, k * c * 9, -1.0, 1.0);
    let bias = rand(&mut rng, k, -1.0, 1.0);
    let x = rand(&mut rng, n * c * h * w, -1.0, 1.0);
    let res = rand(&mut rng, n * k * h * w, -1.0, 1.0);
    for (isa, tile) in isas.iter().flat_map(|&i| TILES.map(|t| (i, t))) {
        let ww = WinogradWeights::new_with_isa(isa, tile, &wt, Some(&bias), k, c);
        let mut ws = Vec::new();
        let mut want = vec![0.0f32; n * k * h * w];
        winograd_forward_nchw(&x, n, h, w, &ww, Some(&res), true, &mut want, &mut ws);
        let exact = direct_f64(&Case { n, c, k, h, w }, &x, &wt, &bias, Some(&res), true);
        assert!(rel_l2(&want, &exact) <= bound(c));

        // Permute NCHW -> a given layout.
        let relayout = |v: &[f32], ch: usize, l: ActLayout, fill: f32| {
            let mut out = vec![fill; l.len(ch, n, h, w)];
            for b in 0..n {
                for q in 0..ch {
                    let src = &v[(b * ch + q) * h * w..(b * ch + q + 1) * h * w];
                    if l.block_stride > 0 {
                        for (i, &val) in src.iter().enumerate() {
                            out[blocked_index(ch, q, b * h * w + i)] = val;
                        }
                        continue;
                    }
                    let o = q * l.c_stride + b * l.n_stride;
                    out[o..o + h * w].copy_from_slice(src);
                }
            }
            out
        };
        let layouts = |ch: usize| {
            [
                ActLayout::cnhw(n, h, w),
                ActLayout::nchw(ch, h, w),
                // Padded: 3 spare floats after each plane, channel-major.
                ActLayout { c_stride: n * (h * w + 3), n_stride: h * w + 3, block_stride: 0 },
                ActLayout::blocked(ch, h, w),
            ]
        };
        for xl in layouts(c) {
            for yl in layouts(k) {
                // NaN in the gaps (and the blocked layout's padding): never to be read.
                let xs = relayout(&x, c, xl, f32::NAN);
                let rs = relayout(&res, k, yl, f32::NAN);
                let sentinel = 12345.0;
                let mut y = vec![sentinel; yl.len(k, n, h, w)];
                winograd_forward(&ww, &xs, xl, n, h, w, Some((&rs, yl)), true, &mut y, yl, &mut ws);
                let want_l = relayout(&want, k, yl, sentinel);
                // Same arithmetic in the same order whatever the layout: bit-identical, gaps kept.
                assert_eq!(y, want_l, "{} {tile:?} x {xl:?} y {yl:?}", isa.name());
            }
        }
    }
}

#[test]
fn workspace_is_reused_and_bounded() {
    let (n, c, k, h, w) = (2, 64, 64, 56, 56);
    let mut rng = Rng::new(9);
    let wt = rand(&mut rng, k * c * 9, -1.0, 1.0);
    let x = rand(&mut rng, n * c * h * w, -1.0, 1.0);
    for tile in TILES {
        let ww = WinogradWeights::new(tile, &wt, None, k, c);
        let mut y = vec![0.0; n * k * h * w];
        let mut ws = Vec::new();
        winograd_forward_nchw(&x, n, h, w, &ww, None, false, &mut y, &mut ws);
        let (len, ptr) = (ws.len(), ws.as_ptr());
        assert_eq!(len, workspace_len(&ww, n, h, w));
        // Blocked: less than the E * (C + K) * tiles a single block over the batch would need.
        let tiles = n * h.div_ceil(tile.m()) * w.div_ceil(tile.m());
        assert!(len < tile.positions() * (c + k) * tiles, "{tile:?}: workspace {len} not blocked");
        let first = y.clone();
        winograd_forward_nchw(&x, n, h, w, &ww, None, false, &mut y, &mut ws);
        assert_eq!((ws.len(), ws.as_ptr()), (len, ptr), "{tile:?}: second call reallocated the workspace");
        assert_eq!(y, first, "{tile:?}: second call differs");
    }
}

#[test]
fn applicability_and_errors() {
    let w3 = ConvWeights::new(vec![0.5; 2 * 3 * 9], None, 2, 3, 3, 3);
    assert!(winograd_applicable(&w3, &ConvParams::new(1, 1)));
    assert!(!winograd_applicable(&w3, &ConvParams::new(2, 1)));
    assert!(!winograd_applicable(&w3, &ConvParams::new(1, 0)));
    assert!(WinogradWeights::from_conv(&w3, WinoTile::F4).is_ok());
    let w1 = ConvWeights::new(vec![0.5; 2 * 3], None, 2, 3, 1, 1);
    assert!(!winograd_applicable(&w1, &ConvParams::new(1, 0)));
    let err = WinogradWeights::from_conv(&w1, WinoTile::F2).unwrap_err().to_string();
    assert!(err.contains("3x3") && err.contains("1x1"), "{err}");
}

#[test]
#[should_panic(expected = "overlaps itself")]
fn overlapping_output_layout_is_refused() {
    let ww = WinogradWeights::new(WinoTile::F2, &[0.1; 2 * 9], None, 2, 1);
    let x = vec![1.0; 16];
    let mut y = vec![0.0; 32];
    // c_stride 8 < H*W = 16: channels would overwrite each other.
    let yl = ActLayout { c_stride: 8, n_stride: 32, block_stride: 0 };
    winograd_forward(&ww, &x, ActLayout::nchw(1, 4, 4), 1, 4, 4, None, false, &mut y, yl, &mut Vec::new());
}

/// Prints the measured errors on every ResNet-50 3x3 stride-1 shape (batch 1) next to the direct
/// conv's (`conv2d_reference`, f32) own error and the bound:
/// `cargo test --release --test winograd measured_errors -- --ignored --nocapture`.
#[test]
#[ignore]
fn measured_errors() {
    for (name, cs) in resnet_cases() {
        let cs = Case { n: 1, ..cs };
        for x_lo in [0.0f32, -1.0] {
            let (e64, e32) = run_case(available_isas()[0], WinoTile::F2, &cs, 1, false, false, x_lo);
            let (f64_4, f32_4) = run_case(available_isas()[0], WinoTile::F4, &cs, 1, false, false, x_lo);
            // The direct f32 reference's own error, for scale.
            let mut rng = Rng::new(1);
            let (n, c, k, h, w) = (cs.n, cs.c, cs.k, cs.h, cs.w);
            let wt = rand(&mut rng, k * c * 9, -1.0, 1.0);
            let bias = rand(&mut rng, k, -1.0, 1.0);
            let x = rand(&mut rng, n * c * h * w, x_lo, 1.0);
            let exact = direct_f64(&cs, &x, &wt, &bias, None, false);
            let cw = ConvWeights::new(wt, Some(bias), k, c, 3, 3);
            let mut yd = vec![0.0f32; n * k * h * w];
            capgen::cpu::conv::conv2d_forward(&x, n, h, w, &cw, &ConvParams::new(1, 1), None, false, &mut yd);
            println!(
                "{name} x in [{x_lo}, 1): F2 vs f64 {e64:.2e}, vs f32 ref {e32:.2e}; \
                 F4 vs f64 {f64_4:.2e}, vs f32 ref {f32_4:.2e}; conv2d_forward vs f64 {:.2e}; bound {:.2e}",
                rel_l2(&yd, &exact),
                bound(c)
            );
        }
    }
}
