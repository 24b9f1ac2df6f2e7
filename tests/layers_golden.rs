//! Single layers held to torch's float64 results (tools/make_encoder_golden.py writes
//! tests/data/conv_layers.safetensors: inputs, weights and outputs of small random cases).
//!
//! Tolerance: relative L2 error at most 1e-5. Each output is one dot product of at most
//! K = C*R*S = 147 f32 products (the 7x7 case); its rounding error is ~sqrt(K) * 2^-24 ~ 1e-6 relative,
//! ~1e-7 typically, so 1e-5 leaves a 10x margin while a wrong padding, stride or bias gives > 1e-2.

use std::path::PathBuf;

use capgen::cpu::conv::{conv2d_forward, conv2d_reference, ConvParams, ConvWeights};
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

fn rel_l2(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len(), "length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &b) in ours.iter().zip(reference) {
        num += (a as f64 - b as f64).powi(2);
        den += (b as f64).powi(2);
    }
    assert!(den > 0.0, "reference is all zeros: the comparison would be meaningless");
    (num / den).sqrt()
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
