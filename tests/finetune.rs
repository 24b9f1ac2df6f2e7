//! `capgen train --fine-tune-encoder` end to end on a tiny synthetic set (64x64 scenes, one object
//! each) with a narrow ResNet (Basic [1,1,1,1], width 8) whose starting weights are written by our own
//! exporter (`TrainResNet::save`, torchvision names): the loss falls; frozen encoder tensors are
//! bit-identical afterwards and the trained ones moved; an interrupted run resumed with `--resume`
//! ends with the same weights as an uninterrupted one (dropout on, so its RNG state is exercised);
//! `capgen caption` uses the fine-tuned encoder stored in the model; bad input gives one-line errors
//! or warnings with counts.
//!
//! Plus the finite-difference check of the joint chain (`joint_chain_gradients_vs_f64_fd`): see its
//! comment for the method and tolerance.

mod common;
use common::fd::{check, rnd, to64};
use common::*;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use capgen::data::synth::{self, SynthOptions};
use capgen::model::checkpoint::Captioner;
use capgen::nn::resnet::{BlockKind, ResNetConfig};
use capgen::nn::train_resnet::TrainResNet;
use capgen::train::finetune::FineTuneConfig;
use capgen::train::{state_path, train, TrainConfig};
use capgen::weights::TensorFile;

const ENCODER: &str = "basic:1,1,1,1:8";
const SIZE: usize = 64;

fn encoder_cfg() -> ResNetConfig {
    ResNetConfig { block: BlockKind::Basic, layers: [1, 1, 1, 1], width: 8, num_classes: 10 }
}

/// The synthetic set and the starting weights, made once per test process.
struct Fixture {
    data: PathBuf,
    weights: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tmp("finetune-fixture");
        let data = dir.join("data");
        let mut opts = SynthOptions::new(&data, 100, 7, false);
        opts.image_size = SIZE as u32;
        opts.max_objects = 1;
        synth::generate_with(&opts, &|| {}).unwrap();
        let weights = dir.join("start.safetensors");
        TrainResNet::random(&encoder_cfg(), 11).save(&weights).unwrap();
        Fixture { data, weights }
    })
}

fn config(out: &Path) -> TrainConfig {
    let f = fixture();
    let mut cfg = TrainConfig::new(f.data.join(synth::CAPTIONS_FILE), PathBuf::new(), out.to_path_buf());
    cfg.split = Some(f.data.join(synth::SPLIT_FILE));
    let mut ft = FineTuneConfig::new(f.data.join(synth::IMAGES_DIR), f.weights.clone());
    ft.encoder = ENCODER.into();
    ft.image_size = SIZE;
    ft.lr = 1e-3;
    cfg.fine_tune = Some(ft);
    cfg.epochs = 3;
    cfg.batch = 32;
    cfg.lr = 4e-3;
    cfg.min_count = 1;
    cfg.max_len = 12;
    cfg.embed = 16;
    cfg.hidden = 32;
    cfg.att = 16;
    cfg.patience = 0;
    cfg
}

fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let f = TensorFile::load(path).unwrap();
    f.tensors.iter().map(|(n, t)| (n.clone(), t.to_f32_vec())).collect()
}

#[test]
fn fine_tuning_learns_freezes_the_rest_and_captions() {
    let dir = tmp("finetune-learns");
    let out = dir.join("model.safetensors");
    let mut cfg = config(&out);
    cfg.epochs = 6;
    cfg.batch = 16;
    cfg.lr = 6e-3;
    let sum = train(&cfg).unwrap();
    let h = &sum.history;
    assert_eq!(h.len(), 6);
    // Mean train loss per epoch (nats/token): it must fall clearly, not drift.
    assert!(
        h[5].train_loss < 0.7 * h[0].train_loss,
        "loss {:?}",
        h.iter().map(|r| r.train_loss).collect::<Vec<_>>()
    );
    assert!(h[5].val_loss < h[0].val_loss, "val loss did not fall");

    // The model carries the fine-tuned encoder; default K = the last stage = layer4's one block.
    let file = TensorFile::load(&cfg.out).unwrap();
    let model = Captioner::from_file(&file).unwrap();
    assert!(model.hyper["fine_tuned_encoder"].is_object(), "{}", model.hyper);
    let enc = Captioner::embedded_encoder(&file).expect("an embedded encoder");
    let tuned = TrainResNet::from_tensor_file(&encoder_cfg(), &enc).unwrap();
    let start = TrainResNet::from_tensor_file(&encoder_cfg(), &TensorFile::load(&fixture().weights).unwrap())
        .unwrap();
    let (mut moved, mut kept) = (0, 0);
    for (a, b) in tuned.params.iter().zip(&start.params) {
        if a.name.starts_with("layer4.") {
            assert_ne!(a.data, b.data, "{} should have been trained", a.name);
            moved += 1;
        } else {
            // Bit-identical: compare the bits, not approximate values.
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.data), bits(&b.data), "{} is frozen", a.name);
            kept += 1;
        }
    }
    assert!(moved >= 6 && kept >= 20, "moved {moved}, kept {kept}");
    // Frozen batch-norm statistics everywhere, the trained blocks included.
    assert_eq!(tuned.stats, start.stats);

    // `capgen caption` with no --weights uses the encoder inside the model.
    let imgs = fixture().data.join(synth::IMAGES_DIR);
    let mut names: Vec<_> = std::fs::read_dir(&imgs).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    let (a, b) = (s(&names[0]).to_string(), s(&names[1]).to_string());
    let (rc, stdout, err) = capgen(&["caption", "--model", s(&cfg.out), "--image", &a, &b, "--beam", "2"]);
    assert_eq!(rc, 0, "caption failed: {err}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for (l, p) in lines.iter().zip([&a, &b]) {
        let cap = l.strip_prefix(&format!("{p}: ")).unwrap_or_else(|| panic!("{l}"));
        assert!(!cap.trim().is_empty(), "empty caption: {l}");
    }
    // With --weights too, a note says which encoder is used; the captions are the same.
    let (rc, stdout2, err) = capgen(&[
        "caption",
        "--model",
        s(&cfg.out),
        "--weights",
        s(&fixture().weights),
        "--image",
        &a,
        &b,
        "--beam",
        "2",
    ]);
    assert_eq!(rc, 0, "{err}");
    assert!(err.contains("fine-tuned encoder"), "{err}");
    assert_eq!(stdout, stdout2);

    // `capgen evaluate --images` runs the same encoder over the test split.
    let (caps, split) = (fixture().data.join(synth::CAPTIONS_FILE), fixture().data.join(synth::SPLIT_FILE));
    let (rc, stdout, err) = capgen(&[
        "evaluate",
        "--model",
        s(&cfg.out),
        "--images",
        s(&imgs),
        "--captions",
        s(&caps),
        "--split",
        s(&split),
        "--json",
    ]);
    assert_eq!(rc, 0, "evaluate failed: {err}");
    let scores: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    let b1 = scores["BLEU-1"].as_f64().unwrap();
    assert!(b1 > 0.0 && b1 <= 1.0, "{scores}");

    // --init: a second stage starts from the trained decoder (its vocabulary and sizes), so its
    // first epoch is already far below the fresh run's first epoch.
    let mut second = config(&dir.join("second.safetensors"));
    second.epochs = 1;
    second.batch = 16;
    second.init = Some(cfg.out.clone());
    second.embed = 99; // ignored: the sizes come from the model
    let s2 = train(&second).unwrap();
    let m2 = Captioner::load(&second.out).unwrap();
    assert_eq!((m2.vocab.clone(), m2.dims), (model.vocab.clone(), model.dims));
    assert!(
        s2.history[0].train_loss < 0.8 * h[0].train_loss,
        "{} vs {}",
        s2.history[0].train_loss,
        h[0].train_loss
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn resume_after_interruption_gives_the_same_weights() {
    let dir = tmp("finetune-resume");
    // Dropout on: its mask stream must be restored exactly too. Three blocks trained: layer2's 8x8
    // grid makes the conv weight gradients span several chunks of images (the deterministic order).
    let setup = |name: &str| {
        let mut c = config(&dir.join(name));
        c.epochs = 2;
        c.dropout = 0.3;
        c.fine_tune.as_mut().unwrap().blocks = Some(3);
        c
    };
    let a = setup("a.safetensors");
    train(&a).unwrap();

    let mut b = setup("b.safetensors");
    // 400 training captions / 32 = 13 steps an epoch (the synth split has ~80 training images):
    // abort in the middle of epoch 2, after epoch 1's state was written.
    let per_epoch = train(&TrainConfig { epochs: 1, out: dir.join("probe.safetensors"), ..b.clone() })
        .map(|_| TensorFile::load(&state_path(&dir.join("probe.safetensors"))).unwrap())
        .unwrap()
        .metadata["adam_step"]
        .parse::<u64>()
        .unwrap();
    b.abort_after_steps = Some(per_epoch + per_epoch / 2);
    let e = train(&b).unwrap_err().to_string();
    assert!(e.contains("aborted"), "{e}");
    let mid = tensors(&state_path(&b.out));
    b.abort_after_steps = None;
    b.resume = true;
    train(&b).unwrap();

    let (ta, tb) = (tensors(&state_path(&a.out)), tensors(&state_path(&b.out)));
    assert_eq!(ta.len(), tb.len());
    assert!(ta.iter().any(|(n, _)| n.starts_with("enc_adam_m.layer4.")), "encoder moments in the state");
    for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert!(va == vb, "{na} differs after resume");
    }
    assert_ne!(mid, tb, "the resumed run must have trained on");
    assert_eq!(tensors(&a.out), tensors(&b.out), "best models differ");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cli_fine_tune_writes_every_file() {
    let f = fixture();
    let dir = tmp("finetune-cli");
    let out = dir.join("m.safetensors");
    let (caps, split) = (f.data.join(synth::CAPTIONS_FILE), f.data.join(synth::SPLIT_FILE));
    let imgs = f.data.join(synth::IMAGES_DIR);
    let (rc, stdout, err) = capgen(&[
        "train",
        "--fine-tune-encoder",
        "--images",
        s(&imgs),
        "--weights",
        s(&f.weights),
        "--encoder",
        ENCODER,
        "--image-size",
        "64",
        "--fine-tune-blocks",
        "2",
        "--encoder-lr",
        "3e-4",
        "--dropout",
        "0.2",
        "--captions",
        s(&caps),
        "--split",
        s(&split),
        "--out",
        s(&out),
        "--epochs",
        "1",
        "--batch",
        "32",
        "--embed",
        "8",
        "--hidden",
        "16",
        "--att-dim",
        "8",
        "--min-count",
        "1",
    ]);
    assert_eq!(rc, 0, "{err}");
    assert!(stdout.contains("best val BLEU-4"), "{stdout}");
    assert!(err.contains("the last 2 of 5 pieces"), "{err}");
    for p in [out.clone(), capgen::train::last_path(&out), state_path(&out), capgen::train::curve_path(&out)]
    {
        assert!(p.is_file(), "{} missing", p.display());
    }
    // K = 2: layer3.0 and layer4.0 moved, layer2 did not.
    let file = TensorFile::load(&out).unwrap();
    let tuned = Captioner::embedded_encoder(&file).unwrap();
    let start = TensorFile::load(&f.weights).unwrap();
    for (name, moved) in
        [("layer3.0.conv1.weight", true), ("layer4.0.bn2.bias", true), ("layer2.0.conv1.weight", false)]
    {
        let (a, b) = (tuned.get(name).unwrap().to_f32_vec(), start.get(name).unwrap().to_f32_vec());
        assert_eq!(a != b, moved, "{name}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn dropout_is_applied_and_seeded() {
    // Same seed: dropout 0.3 twice gives identical weights; dropout 0 differs from both.
    let dir = tmp("finetune-dropout");
    let run = |name: &str, p: f32| {
        let mut c = config(&dir.join(name));
        c.epochs = 1;
        c.dropout = p;
        train(&c).unwrap();
        tensors(&dir.join(name))
    };
    let (a, b, off) = (run("a.safetensors", 0.3), run("b.safetensors", 0.3), run("c.safetensors", 0.0));
    assert_eq!(a, b);
    assert_ne!(a, off);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_images_are_skipped_with_a_count() {
    let dir = tmp("finetune-missing");
    // A copy of the image directory without 5 of the images.
    let src = fixture().data.join(synth::IMAGES_DIR);
    let imgs = dir.join("Images");
    std::fs::create_dir_all(&imgs).unwrap();
    let mut names: Vec<_> = std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    for n in &names[5..] {
        std::fs::copy(src.join(n), imgs.join(n)).unwrap();
    }
    let mut cfg = config(&dir.join("m.safetensors"));
    cfg.epochs = 1;
    cfg.fine_tune.as_mut().unwrap().images = imgs;
    let sum = train(&cfg).unwrap();
    let warned: usize = sum
        .log
        .iter()
        .filter(|l| l.contains("have no image file"))
        .map(|l| l.split(": ").nth(2).unwrap().split(' ').next().unwrap().parse::<usize>().unwrap())
        .sum();
    // The 5 removed images are in the train or val part (or the unused test part).
    assert!(warned <= 5, "{:?}", sum.log);
    let test_part =
        capgen::data::split::read_karpathy(fixture().data.join(synth::SPLIT_FILE)).unwrap().split.test;
    let removed_used =
        names[..5].iter().filter(|n| !test_part.contains(&n.to_string_lossy().into_owned())).count();
    assert_eq!(warned, removed_used, "{:?}", sum.log);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_gives_one_line_errors() {
    let f = fixture();
    let dir = tmp("finetune-bad");
    let caps = f.data.join(synth::CAPTIONS_FILE);
    let split = f.data.join(synth::SPLIT_FILE);
    let imgs = f.data.join(synth::IMAGES_DIR);
    let out = dir.join("m.safetensors");
    let base = ["train", "--captions", s(&caps), "--split", s(&split), "--out", s(&out), "--epochs", "1"];
    let with = |extra: &[&str]| -> Vec<String> { base.iter().chain(extra).map(|x| x.to_string()).collect() };
    let run = |extra: &[&str], needles: &[&str]| {
        let args = with(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_one_line_error(&refs, needles);
    };
    run(&["--fine-tune-encoder", "--weights", s(&f.weights)], &["--images"]);
    run(&["--fine-tune-encoder", "--images", s(&imgs)], &["--weights"]);
    run(&["--images", s(&imgs), "--weights", s(&f.weights)], &["--fine-tune-encoder"]);
    // Weights of width 8 read as a width-16 net: names the file and what does not fit.
    run(
        &[
            "--fine-tune-encoder",
            "--images",
            s(&imgs),
            "--weights",
            s(&f.weights),
            "--encoder",
            "basic:1,1,1,1:16",
        ],
        &["start.safetensors", "wrong shape"],
    );
    run(
        &["--fine-tune-encoder", "--images", s(&imgs), "--weights", s(&f.weights), "--encoder", "resnet50"],
        &["start.safetensors"],
    );
    run(&["--fine-tune-encoder", "--images", s(&dir.join("nope")), "--weights", s(&f.weights)], &["nope"]);
    run(
        &[
            "--fine-tune-encoder",
            "--images",
            s(&imgs),
            "--weights",
            s(&f.weights),
            "--encoder",
            ENCODER,
            "--fine-tune-blocks",
            "9",
        ],
        &["--fine-tune-blocks 9"],
    );
    run(
        &[
            "--fine-tune-encoder",
            "--images",
            s(&imgs),
            "--weights",
            s(&f.weights),
            "--encoder",
            ENCODER,
            "--decoder",
            "show-tell",
        ],
        &["attention"],
    );
    run(&["--features", s(&f.weights), "--dropout", "1.5"], &["--dropout"]);
    // Images none of which exist under --images.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let args = with(&[
        "--fine-tune-encoder",
        "--images",
        s(&empty),
        "--weights",
        s(&f.weights),
        "--encoder",
        ENCODER,
    ]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (rc, _, err) = capgen(&refs);
    assert_ne!(rc, 0);
    assert!(!err.contains("panicked"), "{err}");
    // Warnings with counts for the training and validation parts, then the error.
    assert!(err.contains("training images have no image file"), "{err}");
    assert!(err.trim_end().lines().last().unwrap().contains("none of the"), "{err}");
    // caption without --weights for a model that holds no encoder.
    let plain = dir.join("plain.safetensors");
    let vocab = capgen::data::vocab::Vocab::from_captions(["a b"], 1);
    let d = capgen::model::decoder::DecoderDims {
        vocab: vocab.len(),
        embed: 2,
        feat: 4,
        regions: 1,
        hidden: 3,
        att: 2,
    };
    Captioner::init(capgen::model::checkpoint::DecoderKind::ShowTell, d, vocab, 5, 0)
        .unwrap()
        .save(&plain)
        .unwrap();
    let img = std::fs::read_dir(&imgs).unwrap().next().unwrap().unwrap().path();
    assert_one_line_error(&["caption", "--model", s(&plain), "--image", s(&img)], &["--weights"]);
    // evaluate --images needs an encoder inside the model; --features or --images, exactly one.
    let ev = ["evaluate", "--model", s(&plain), "--captions", s(&caps), "--split", s(&split)];
    let ev_with = |extra: &[&str]| -> Vec<String> { ev.iter().chain(extra).map(|x| x.to_string()).collect() };
    for (extra, needle) in [
        (vec!["--images", s(&imgs)], "no fine-tuned encoder"),
        (vec![], "--features"),
        (vec!["--images", s(&imgs), "--features", s(&f.weights)], "not both"),
    ] {
        let args = ev_with(&extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_one_line_error(&refs, &[needle]);
    }
    assert!(!out.exists(), "nothing written on bad input");
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------------------------------
// Finite-difference check of the joint chain.
//
// Method: a narrow ResNet (Basic [1,1,1,1], width 2, 48x48 images -> 2x2 grid of 16 channels) with
// everything but its last block frozen; the attention decoder's loss (cross-entropy + doubly
// stochastic regulariser) on the grid features of 2 images, 3 caption rows (image 0 twice). Ours:
// `TrainResNet::forward_train` -> rows -> `attention_forward` / `attention_backward` (feats_grad) ->
// dL/dfeats summed per image -> `TrainResNet::backward`. Reference: the same loss re-implemented
// here in f64 with plain loops (the last block — conv 3x3/2, BN, ReLU, conv 3x3, BN, downsample
// conv 1x1/2 + BN, add, ReLU — then mean-feature init, additive attention with the f_beta gate,
// LSTM cell, output layer, cross-entropy, regulariser), fed with the frozen part's f32 output (the
// last block's input, `trainable_input`) and the same f32 parameters cast to f64; its gradient by
// central differences with h = 1e-5 (truncation ~h^2, rounding ~1e-16/h: exact to ~1e-9). Checked:
// entries of the three conv weights of the trained block, every BN gamma/beta there, and all of the
// decoder's input-side weights w_enc (attention encode) and w_h (initial state) — the first decoder
// weights the features meet. Both BN modes: frozen statistics (what fine-tuning uses) and batch
// statistics (what the demo trains with).
//
// Tolerance: relative L2 <= 1e-4 over each checked tensor, as every gradient test here: f32 carries
// ~6e-8 relative rounding per operation and the chain is a few dozen operations deep over sums of at
// most ~150 terms, so the expected error is ~1e-6; any wrong or missing term is O(1). The f64 loss
// must also equal ours to 1e-5 (the forwards agree).

use capgen::data::vocab::Vocab;
use capgen::model::checkpoint::{DecoderKind, DecoderParams};
use capgen::model::decoder::{attention_backward, attention_forward, Batch, DecoderDims};
use capgen::nn::FeatureLayer;
use std::collections::BTreeMap;

type P64 = BTreeMap<String, Vec<f64>>;

/// x (N,C,H,W) conv w (K,C,R,S), stride st, pad pd -> (N,K,P,Q), in f64.
#[allow(clippy::too_many_arguments)]
fn conv64(
    x: &[f64],
    w: &[f64],
    n: usize,
    c: usize,
    h: usize,
    wd: usize,
    k: usize,
    r: usize,
    st: usize,
    pd: usize,
) -> (Vec<f64>, usize, usize) {
    let p = (h + 2 * pd - r) / st + 1;
    let q = (wd + 2 * pd - r) / st + 1;
    let mut y = vec![0.0; n * k * p * q];
    for b in 0..n {
        for kk in 0..k {
            for i in 0..p {
                for j in 0..q {
                    let mut acc = 0.0;
                    for cc in 0..c {
                        for u in 0..r {
                            for v in 0..r {
                                let (yy, xx) = (
                                    (i * st + u) as isize - pd as isize,
                                    (j * st + v) as isize - pd as isize,
                                );
                                if yy < 0 || xx < 0 || yy >= h as isize || xx >= wd as isize {
                                    continue;
                                }
                                acc += x[((b * c + cc) * h + yy as usize) * wd + xx as usize]
                                    * w[((kk * c + cc) * r + u) * r + v];
                            }
                        }
                    }
                    y[((b * k + kk) * p + i) * q + j] = acc;
                }
            }
        }
    }
    (y, p, q)
}

/// Batch-norm of (N,K,HW) in f64: with `running` = Some((mean, var)) eval mode, else batch statistics
/// (biased variance), eps 1e-5.
fn bn64(
    x: &[f64],
    n: usize,
    k: usize,
    hw: usize,
    gamma: &[f64],
    beta: &[f64],
    running: Option<(&[f64], &[f64])>,
) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for ch in 0..k {
        let vals: Vec<f64> =
            (0..n).flat_map(|b| x[(b * k + ch) * hw..(b * k + ch + 1) * hw].to_vec()).collect();
        let (mean, var) = match running {
            Some((m, v)) => (m[ch], v[ch]),
            None => {
                let m = vals.iter().sum::<f64>() / vals.len() as f64;
                (m, vals.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / vals.len() as f64)
            }
        };
        for b in 0..n {
            for i in 0..hw {
                let o = (b * k + ch) * hw + i;
                y[o] = gamma[ch] * (x[o] - mean) / (var + 1e-5).sqrt() + beta[ch];
            }
        }
    }
    y
}

fn sig(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// y (O) = W (O,I) x (I) + b.
fn lin(w: &[f64], b: &[f64], x: &[f64]) -> Vec<f64> {
    let i = x.len();
    b.iter().enumerate().map(|(o, &bo)| bo + (0..i).map(|k| w[o * i + k] * x[k]).sum::<f64>()).collect()
}

struct Chain {
    n: usize,
    cin: usize,
    hin: usize,
    k: usize,
    dims: DecoderDims,
    tokens: Vec<u32>,
    targets: Vec<u32>,
    lengths: Vec<usize>,
    steps: usize,
    image: Vec<usize>,
    alpha_c: f64,
    frozen_bn: bool,
}

impl Chain {
    /// The loss in f64 from the last block's input `xin` (N,Cin,Hin,Hin) and the parameters.
    fn loss(&self, xin: &[f64], p: &P64) -> f64 {
        let (n, c, h, k) = (self.n, self.cin, self.hin, self.k);
        let run = |name: &str| -> Option<(&[f64], &[f64])> {
            self.frozen_bn
                .then(|| (&p[&format!("{name}.running_mean")][..], &p[&format!("{name}.running_var")][..]))
        };
        let g = |s: &str| &p[s][..];
        let (z1, p1, q1) = conv64(xin, g("layer4.0.conv1.weight"), n, c, h, h, k, 3, 2, 1);
        let mut a1 =
            bn64(&z1, n, k, p1 * q1, g("layer4.0.bn1.weight"), g("layer4.0.bn1.bias"), run("layer4.0.bn1"));
        a1.iter_mut().for_each(|v| *v = v.max(0.0));
        let (z2, _, _) = conv64(&a1, g("layer4.0.conv2.weight"), n, k, p1, q1, k, 3, 1, 1);
        let y2 =
            bn64(&z2, n, k, p1 * q1, g("layer4.0.bn2.weight"), g("layer4.0.bn2.bias"), run("layer4.0.bn2"));
        let (zd, _, _) = conv64(xin, g("layer4.0.downsample.0.weight"), n, c, h, h, k, 1, 2, 0);
        let yd = bn64(
            &zd,
            n,
            k,
            p1 * q1,
            g("layer4.0.downsample.1.weight"),
            g("layer4.0.downsample.1.bias"),
            run("layer4.0.downsample.1"),
        );
        let out: Vec<f64> = y2.iter().zip(&yd).map(|(a, b)| (a + b).max(0.0)).collect();
        // Grid (N, L, C).
        let l = p1 * q1;
        let grid = |b: usize, li: usize, ch: usize| out[(b * k + ch) * l + li];
        let d = &self.dims;
        let (e, f, hd, a) = (d.embed, d.feat, d.hidden, d.att);
        assert_eq!((l, f), (d.regions, k));
        let (mut ce, mut count, mut reg) = (0.0, 0usize, 0.0);
        for (r, &img) in self.image.iter().enumerate() {
            let feats: Vec<Vec<f64>> =
                (0..l).map(|li| (0..f).map(|ch| grid(img, li, ch)).collect()).collect();
            let mean: Vec<f64> =
                (0..f).map(|ch| feats.iter().map(|v| v[ch]).sum::<f64>() / l as f64).collect();
            let mut hs = lin(g("w_h"), g("b_h"), &mean);
            let mut cs = lin(g("w_c"), g("b_c"), &mean);
            let att1: Vec<Vec<f64>> = feats.iter().map(|v| lin(g("w_enc"), g("b_enc"), v)).collect();
            let mut asum = vec![0.0; l];
            for t in 0..self.lengths[r] {
                let att2 = lin(g("w_dec"), g("b_dec"), &hs);
                let es: Vec<f64> = att1
                    .iter()
                    .map(|a1| {
                        (0..a).map(|j| g("w_full")[j] * (a1[j] + att2[j]).max(0.0)).sum::<f64>()
                            + g("b_full")[0]
                    })
                    .collect();
                let m = es.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let zs: f64 = es.iter().map(|x| (x - m).exp()).sum();
                let alpha: Vec<f64> = es.iter().map(|x| (x - m).exp() / zs).collect();
                alpha.iter().enumerate().for_each(|(li, x)| asum[li] += x);
                let gate: Vec<f64> = lin(g("w_beta"), g("b_beta"), &hs).into_iter().map(sig).collect();
                let ctx: Vec<f64> = (0..f)
                    .map(|ch| gate[ch] * (0..l).map(|li| alpha[li] * feats[li][ch]).sum::<f64>())
                    .collect();
                let tok = self.tokens[r * self.steps + t] as usize;
                let mut x: Vec<f64> = g("emb")[tok * e..(tok + 1) * e].to_vec();
                x.extend(&ctx);
                let zi = lin(g("w_ih"), g("b_ih"), &x);
                let zh = lin(g("w_hh"), g("b_hh"), &hs);
                let z: Vec<f64> = zi.iter().zip(&zh).map(|(u, v)| u + v).collect();
                for j in 0..hd {
                    let (ig, fg, gg, og) =
                        (sig(z[j]), sig(z[hd + j]), z[2 * hd + j].tanh(), sig(z[3 * hd + j]));
                    cs[j] = fg * cs[j] + ig * gg;
                    hs[j] = og * cs[j].tanh();
                }
                let logits = lin(g("fc_w"), g("fc_b"), &hs);
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + logits.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                ce += lse - logits[self.targets[r * self.steps + t] as usize];
                count += 1;
            }
            reg += asum.iter().map(|s| (1.0 - s) * (1.0 - s)).sum::<f64>();
        }
        ce / count as f64 + self.alpha_c * reg / self.image.len() as f64
    }
}

fn joint_case(frozen_bn: bool) {
    let cfg = ResNetConfig { block: BlockKind::Basic, layers: [1, 1, 1, 1], width: 2, num_classes: 3 };
    let mut net = TrainResNet::random(&cfg, 5);
    net.freeze_all_but_last(1);
    net.set_bn_frozen(frozen_bn);
    let (n, s) = (2, 48);
    let x = rnd("joint/x", n * 3 * s * s, 2.0);
    let before: P64 = net.stats.iter().map(|(k, v)| (k.clone(), to64(v))).collect();
    let (feats, cache) = net.forward_train(&x, n, s, s, FeatureLayer::Grid).unwrap();
    let (xin, (hin, _)) = net.trainable_input(&cache).expect("the stem is frozen");
    let xin64 = to64(xin);
    let cin = xin.len() / (n * hin * hin);
    let k = cfg.feature_dim();
    let l = feats.len() / (n * k);
    // Decoder: 7 words (4 specials + 3), rows sorted longest first, image 0 used twice.
    let vocab = Vocab::from_captions(["a b c"], 1);
    let dims = DecoderDims { vocab: vocab.len(), embed: 3, feat: k, regions: l, hidden: 5, att: 4 };
    let model = Captioner::init(DecoderKind::Attention, dims, vocab, 5, 3).unwrap();
    let (lengths, image, steps) = (vec![4usize, 3, 2], vec![0usize, 1, 0], 4usize);
    let mut tokens = vec![0u32; 3 * steps];
    let mut targets = vec![0u32; 3 * steps];
    let pick = rnd("joint/tok", 2 * 3 * steps, 1.0);
    for (r, &len) in lengths.iter().enumerate() {
        for t in 0..len {
            tokens[r * steps + t] = 1 + ((pick[r * steps + t].abs() * 6.0) as u32).min(5);
            targets[r * steps + t] = 2 + ((pick[3 * steps + r * steps + t].abs() * 5.0) as u32).min(4);
        }
    }
    let per = l * k;
    let rows: Vec<f32> = image.iter().flat_map(|&i| feats[i * per..(i + 1) * per].to_vec()).collect();
    let batch = Batch { feats: &rows, tokens: &tokens, targets: &targets, lengths: &lengths, steps };
    let DecoderParams::Attention(p) = &model.params else { unreachable!() };
    let mut grads = model.params.zeros_like();
    let DecoderParams::Attention(g) = &mut grads else { unreachable!() };
    let alpha_c = 0.7f32;
    let mut fw = attention_forward(p, &dims, &batch, None).unwrap();
    let loss = attention_backward(p, g, &dims, &batch, &mut fw, alpha_c, 0.0, true).unwrap();
    let mut df = vec![0.0f32; feats.len()];
    for (r, &i) in image.iter().enumerate() {
        for j in 0..per {
            df[i * per + j] += fw.dfeats[r * per + j];
        }
    }
    net.zero_grad();
    net.backward(&cache, &df).unwrap();

    // Parameters for the f64 chain (the running statistics as they were before the forward).
    let mut p64: P64 = before;
    for prm in &net.params {
        p64.insert(prm.name.clone(), to64(&prm.data));
    }
    for (name, v) in model.params.named() {
        p64.insert(name.to_string(), to64(v));
    }
    let chain = Chain {
        n,
        cin,
        hin,
        k,
        dims,
        tokens,
        targets,
        lengths,
        steps,
        image,
        alpha_c: alpha_c as f64,
        frozen_bn,
    };
    let l64 = chain.loss(&xin64, &p64);
    let ours = (loss.ce + loss.reg) as f64;
    assert!(((ours - l64) / l64).abs() < 1e-5, "loss {ours} vs f64 {l64}");

    let fd = |name: &str, idx: &[usize]| -> Vec<f64> {
        let mut q = p64.clone();
        idx.iter()
            .map(|&j| {
                let x0 = q[name][j];
                q.get_mut(name).unwrap()[j] = x0 + 1e-5;
                let up = chain.loss(&xin64, &q);
                q.get_mut(name).unwrap()[j] = x0 - 1e-5;
                let down = chain.loss(&xin64, &q);
                q.get_mut(name).unwrap()[j] = x0;
                (up - down) / 2e-5
            })
            .collect()
    };
    let mode = if frozen_bn { "frozen BN" } else { "batch-stat BN" };
    // A spread of entries of each conv weight (every 7th), all of each BN's gamma and beta.
    for name in ["layer4.0.conv1.weight", "layer4.0.conv2.weight", "layer4.0.downsample.0.weight"] {
        let prm = net.param(name).unwrap();
        let idx: Vec<usize> = (0..prm.data.len()).step_by(7).collect();
        let ours: Vec<f32> = idx.iter().map(|&j| prm.grad[j]).collect();
        check(&format!("{mode}: {name}"), &ours, &fd(name, &idx), 1e-4);
    }
    for bn in ["layer4.0.bn1", "layer4.0.bn2", "layer4.0.downsample.1"] {
        for t in ["weight", "bias"] {
            let name = format!("{bn}.{t}");
            let prm = net.param(&name).unwrap();
            let idx: Vec<usize> = (0..prm.data.len()).collect();
            check(&format!("{mode}: {name}"), &prm.grad, &fd(&name, &idx), 1e-4);
        }
    }
    for (name, gv) in g.named() {
        if name == "w_enc" || name == "w_h" {
            let idx: Vec<usize> = (0..gv.len()).collect();
            check(&format!("{mode}: decoder {name}"), gv, &fd(name, &idx), 1e-4);
        }
    }
    // The frozen part got no gradient at all.
    for prm in &net.params {
        if !prm.name.starts_with("layer4.") && !prm.name.starts_with("fc.") {
            assert!(prm.grad.iter().all(|&v| v == 0.0), "{} is frozen", prm.name);
        }
    }
}

#[test]
fn joint_chain_gradients_vs_f64_fd() {
    joint_case(true);
    joint_case(false);
}
