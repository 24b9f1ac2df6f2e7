//! Single layers held to torch's float64 results (tools/make_encoder_golden.py writes
//! tests/data/conv_layers.safetensors: inputs, weights and outputs of small random cases).
//!
//! Tolerance: relative L2 error at most 1e-5. Each output is one dot product of at most
//! K = C*R*S = 147 f32 products (the 7x7 case); its rounding error is ~sqrt(K) * 2^-24 ~ 1e-6 relative,
//! ~1e-7 typically, so 1e-5 leaves a 10x margin while a wrong padding, stride or bias gives > 1e-2.

mod common;
use common::rel_l2;

use std::path::PathBuf;

use capgen::cpu::conv::{conv2d_forward, conv2d_reference, ConvParams, ConvWeights};
use capgen::cpu::pool::{adaptive_avg_pool2d, global_avg_pool, max_pool2d, PoolParams};
use capgen::nn::conv::{BatchNorm, Conv2d};
use capgen::weights::TensorFile;
use capgen::Tensor;

const TOL: f64 = 1e-5;

fn golden() -> TensorFile {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/conv_layers.safetensors");
    TensorFile::load(&path).unwrap_or_else(|e| panic!("loading golden file: {e}"))
}

fn get<'a>(tf: &'a TensorFile, name: &str) -> &'a Tensor {
    tf.tensors.get(name).unwrap_or_else(|| panic!("{}: no tensor {name}", tf.path))
}

/// The geometry of `case` from the file's `cases` metadata (JSON).
fn geometry(tf: &TensorFile, case: &str) -> serde_json::Value {
    let cases: serde_json::Value = serde_json::from_str(&tf.metadata["cases"]).expect("cases JSON");
    cases[case].clone()
}

/// Runs conv `case` (x (N,C,H,W), w (K,C,R,S), optional b) with both our kernels; returns their
/// errors against torch's `{case}.y`.
fn conv_case(tf: &TensorFile, case: &str) -> (f64, f64) {
    let g = geometry(tf, case);
    let (stride, pad) = (g["stride"].as_u64().unwrap() as usize, g["pad"].as_u64().unwrap() as usize);
    let x = get(tf, &format!("{case}.x"));
    let w = get(tf, &format!("{case}.w"));
    let (n, h, wd) = (x.dims()[0], x.dims()[2], x.dims()[3]);
    let (k, c, r, s) = (w.dims()[0], w.dims()[1], w.dims()[2], w.dims()[3]);
    let bias = tf.tensors.get(&format!("{case}.b")).map(|b| b.to_f32_vec());
    assert_eq!(bias.is_some(), g["bias"].as_bool().unwrap(), "{case}: bias flag");
    let wt = ConvWeights::new(w.to_f32_vec(), bias, k, c, r, s);
    let p = ConvParams::new(stride, pad);
    let want = get(tf, &format!("{case}.y"));
    let (oh, ow) = p.out_hw(h, wd, r, s).unwrap();
    assert_eq!(want.dims(), &[n, k, oh, ow], "{case}: output shape");
    let xv = x.to_f32_vec();
    let mut fast = vec![f32::NAN; n * k * oh * ow];
    conv2d_forward(&xv, n, h, wd, &wt, &p, None, false, &mut fast);
    let mut slow = vec![f32::NAN; n * k * oh * ow];
    conv2d_reference(&xv, n, h, wd, &wt, &p, None, false, &mut slow);
    let want = want.to_f32_vec();
    (rel_l2(&fast, &want), rel_l2(&slow, &want))
}

#[test]
fn conv2d_matches_torch() {
    let tf = golden();
    let mut failures = Vec::new();
    for case in ["conv1x1_s1", "conv1x1_s2", "conv3x3_s1", "conv3x3_s2", "conv7x7_s2"] {
        let (fast, slow) = conv_case(&tf, case);
        eprintln!("{case}: conv2d_forward rel L2 {fast:.2e}, conv2d_reference {slow:.2e}");
        if !(fast <= TOL && slow <= TOL) {
            failures.push(format!("{case}: forward {fast:.2e}, reference {slow:.2e}"));
        }
    }
    assert!(failures.is_empty(), "conv2d vs torch above {TOL:e}: {failures:?}");
}

#[test]
fn conv_then_eval_batchnorm_folds_exactly() {
    // conv 3x3 s1 p1 without bias, then BN (eps 1e-5) with running statistics, folded into the conv
    // by `Conv2d::with_batchnorm` and run through the fast path (`Conv2d::forward`), with and without
    // the fused ReLU. Folding adds one f32 rounding per weight (~6e-8), well inside 1e-5.
    let tf = golden();
    let case = "conv_bn";
    let g = geometry(&tf, case);
    assert_eq!(g["eps"].as_f64(), Some(1e-5));
    let v = |name: &str| get(&tf, &format!("{case}.{name}")).to_f32_vec();
    let bn = BatchNorm {
        gamma: v("bn_weight"),
        beta: v("bn_bias"),
        mean: v("bn_running_mean"),
        var: v("bn_running_var"),
        eps: 1e-5,
    };
    let w = get(&tf, &format!("{case}.w"));
    let dims: [usize; 4] = w.dims().try_into().unwrap();
    let conv = Conv2d::with_batchnorm(&w.to_f32_vec(), None, &bn, dims, ConvParams::new(1, 1));
    let x = get(&tf, &format!("{case}.x"));
    for (relu, key) in [(false, "y"), (true, "y_relu")] {
        let y = conv.forward(x, None, relu).unwrap_or_else(|e| panic!("{case}: {e}"));
        let want = get(&tf, &format!("{case}.{key}"));
        assert_eq!(y.dims(), want.dims(), "{case}.{key}: shape");
        let err = rel_l2(&y.to_f32_vec(), &want.to_f32_vec());
        eprintln!("{case}.{key}: rel L2 {err:.2e}");
        assert!(err <= TOL, "{case}.{key}: rel L2 {err:.3e} > {TOL:e}");
    }
}

#[test]
fn max_pool_matches_torch() {
    // Mostly negative input (U(-2, 0.5)): a border padded with 0 instead of -inf would win windows.
    let tf = golden();
    let case = "maxpool3x3_s2";
    let g = geometry(&tf, case);
    let k = g["kernel"].as_u64().unwrap() as usize;
    let p = PoolParams::new(k, g["stride"].as_u64().unwrap() as usize, g["pad"].as_u64().unwrap() as usize);
    let x = get(&tf, &format!("{case}.x"));
    let want = get(&tf, &format!("{case}.y")).to_f32_vec();
    assert!(want.iter().any(|&v| v < 0.0), "golden has no all-negative window: the case tests nothing");
    let [n, c, h, w]: [usize; 4] = x.dims().try_into().unwrap();
    let mut y = vec![f32::NAN; want.len()];
    max_pool2d(&x.to_f32_vec(), n, c, h, w, &p, &mut y);
    // A max selects an input value: exact, not merely close.
    let err = rel_l2(&y, &want);
    assert_eq!(err, 0.0, "{case}: rel L2 {err:.3e}, expected exact");
}

#[test]
fn adaptive_avg_pool_matches_torch() {
    // 5x7 -> 3x3 (overlapping bins of unequal size), 2x3 -> 7x7 (up-sampling: what VGG16 meets below
    // 224 input), 5x7 -> 1x1 (global, also through `global_avg_pool`). Sums of <= 35 values: ~1e-7.
    let tf = golden();
    for case in ["adaptive_avg_3x3", "adaptive_avg_7x7", "adaptive_avg_1x1"] {
        let x = get(&tf, &format!("{case}.x"));
        let want = get(&tf, &format!("{case}.y"));
        let [n, c, h, w]: [usize; 4] = x.dims().try_into().unwrap();
        let (oh, ow) = (want.dims()[2], want.dims()[3]);
        let xv = x.to_f32_vec();
        let mut y = vec![f32::NAN; want.numel()];
        adaptive_avg_pool2d(&xv, n, c, h, w, oh, ow, &mut y);
        let err = rel_l2(&y, &want.to_f32_vec());
        eprintln!("{case}: rel L2 {err:.2e}");
        assert!(err <= TOL, "{case}: rel L2 {err:.3e} > {TOL:e}");
        if (oh, ow) == (1, 1) {
            let mut g = vec![f32::NAN; n * c];
            global_avg_pool(&xv, n, c, h, w, &mut g);
            let err = rel_l2(&g, &want.to_f32_vec());
            assert!(err <= TOL, "{case} via global_avg_pool: rel L2 {err:.3e} > {TOL:e}");
        }
    }
}
