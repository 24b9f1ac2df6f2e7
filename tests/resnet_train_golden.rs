//! Replays tools/make_resnet_train_golden.py: one training-mode forward/backward of a Basic [1,1,1,1]
//! width-8 ResNet on a seeded (2, 3, 48, 48) batch, L = sum(grid * R), against PyTorch (float64).
//!
//! Tolerance: relative L2 <= 1e-4 per tensor. Our pass is f32 throughout (f64 only inside BN's
//! per-channel sums); errors of ~1e-7 per op compound through ~12 conv/BN layers, and BN's division
//! by a batch std of small-variance channels amplifies them a little, which leaves us around 1e-6;
//! a wrong term anywhere gives an O(1) error.

mod common;
use common::rel_l2;

use capgen::nn::resnet::{BlockKind, ResNetConfig};
use capgen::nn::train_resnet::TrainResNet;
use capgen::nn::FeatureLayer;
use capgen::rng::uniform_vec;
use capgen::weights::TensorFile;
use std::path::Path;

const SEED: u64 = 7;
const TOL: f64 = 1e-4;

fn cfg() -> ResNetConfig {
    ResNetConfig { block: BlockKind::Basic, layers: [1, 1, 1, 1], width: 8, num_classes: 10 }
}

#[test]
fn train_step_matches_pytorch() {
    let gold = TensorFile::load(Path::new("tests/data/resnet_train_golden.safetensors")).unwrap();
    let get = |name: &str| gold.get(name).unwrap_or_else(|| panic!("golden lacks {name}")).to_f32_vec();
    let (n, h, w) = (2, 48, 48);
    let mut net = TrainResNet::random(&cfg(), SEED);
    let x = uniform_vec(SEED, "x", n * 3 * h * w, -2.0, 2.0);
    let (grid, cache) = net.forward_train(&x, n, h, w, FeatureLayer::Grid).unwrap();
    let mut worst = 0.0f64;
    let mut check = |what: &str, got: &[f32], want: &[f32]| {
        let e = rel_l2(got, want);
        eprintln!("{what}: rel L2 {e:.2e}");
        assert!(e <= TOL, "{what}: rel L2 {e:.3e} > {TOL:.0e}");
        worst = worst.max(e);
    };
    check("grid", &grid, &get("grid"));
    let r = uniform_vec(SEED, "r", grid.len(), -1.0, 1.0);
    let dx = net.backward_with_input_grad(&cache, &r).unwrap();
    check("grad.x", &dx, &get("grad.x"));
    let mut nparams = 0;
    for p in &net.params {
        check(&format!("grad.{}", p.name), &p.grad, &get(&format!("grad.{}", p.name)));
        nparams += 1;
    }
    for (name, v) in &net.stats {
        check(name, v, &get(name));
    }
    // Every parameter of the golden file was compared (conv weights, BN weight and bias).
    let golden_grads = gold.names().filter(|n| n.starts_with("grad.") && *n != "grad.x").count();
    assert_eq!(nparams, golden_grads);
    eprintln!("worst rel L2 {worst:.2e}");
}
