//! `capgen train` end to end on a tiny synthetic, learnable caption set: each image has a colour and
//! a shape; its features encode both (plus noise); its captions name them. Features are random
//! (seeded) and generated here, so the tests need no files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use capgen::model::checkpoint::{Captioner, DecoderKind};
use capgen::model::decoder::DecoderDims;
use capgen::rng::Rng;
use capgen::tensor::Tensor;
use capgen::train::{curve_path, last_path, state_path, train, TrainConfig};
use capgen::weights::save_safetensors;

const COLOURS: [&str; 4] = ["red", "blue", "green", "yellow"];
const SHAPES: [&str; 4] = ["ball", "box", "cone", "ring"];

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("capgen-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes `captions.txt` (Flickr8k token format) for `n` images and returns the attribute of each.
fn write_captions(dir: &Path, n: usize, extra_word: bool) -> PathBuf {
    let mut s = String::new();
    for i in 0..n {
        let (c, sh) = (COLOURS[i % 4], SHAPES[(i / 4) % 4]);
        let caps = [
            format!("a {c} {sh} on the table"),
            format!("a {c} {sh} is on the table"),
            format!("the {c} {sh} on the table"),
            format!("there is a {c} {sh} on the table"),
            if extra_word {
                format!("one {c} {sh} on the table")
            } else {
                format!("a {c} {sh} sitting on the table")
            },
        ];
        for (k, cap) in caps.iter().enumerate() {
            s.push_str(&format!("img{i}.jpg#{k}\t{cap}\n"));
        }
    }
    let p = dir.join(if extra_word { "captions2.token.txt" } else { "captions.token.txt" });
    std::fs::write(&p, s).unwrap();
    p
}

/// Features for images `img0..img{n}`: pooled (D=16) or grid (L=4, D=8). The colour sets one
/// coordinate block, the shape another, plus uniform noise in [-0.1, 0.1].
fn write_features(dir: &Path, n: usize, grid: bool, prefix: &str) -> PathBuf {
    let mut rng = Rng::new(7);
    let mut tensors = Vec::new();
    for i in 0..n {
        let (c, sh) = (i % 4, (i / 4) % 4);
        let (dims, len): (Vec<usize>, usize) = if grid { (vec![4, 8], 32) } else { (vec![16], 16) };
        let mut v: Vec<f32> = (0..len).map(|_| rng.uniform(-0.1, 0.1)).collect();
        if grid {
            // Region 0 holds the colour, region 1 the shape.
            v[c] += 1.0;
            v[8 + 4 + sh] += 1.0;
        } else {
            v[c] += 1.0;
            v[8 + sh] += 1.0;
        }
        tensors.push((format!("{prefix}img{i}.jpg"), Tensor::from_vec(v, &dims).unwrap()));
    }
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let p = dir.join(format!("{prefix}{}", if grid { "grid.safetensors" } else { "pooled.safetensors" }));
    let mut meta = BTreeMap::new();
    meta.insert("encoder".to_string(), "synthetic".to_string());
    save_safetensors(&p, &refs, &meta).unwrap();
    p
}

fn config(dir: &Path, grid: bool) -> TrainConfig {
    let caps = write_captions(dir, 96, false);
    let feats = write_features(dir, 96, grid, "");
    let mut cfg = TrainConfig::new(caps, feats, dir.join("model.safetensors"));
    cfg.decoder = if grid { DecoderKind::Attention } else { DecoderKind::ShowTell };
    cfg.epochs = 3;
    cfg.batch = 16;
    cfg.lr = 1e-2;
    cfg.min_count = 1;
    cfg.max_len = 8;
    cfg.embed = 16;
    cfg.hidden = 32;
    cfg.att = 16;
    cfg.patience = 0;
    cfg
}

fn params_of(path: &Path) -> Vec<(String, Vec<f32>)> {
    let m = Captioner::load(path).unwrap();
    m.params.named().into_iter().map(|(n, v)| (n.to_string(), v.to_vec())).collect()
}

#[test]
fn loss_falls_show_tell_and_files_are_written() {
    let dir = tmpdir("falls-st");
    let mut cfg = config(&dir, false);
    cfg.epochs = 12;
    let s = train(&cfg).unwrap();
    let m = Captioner::load(&cfg.out).unwrap();
    let ln_v = (m.vocab.len() as f64).ln();
    let last = s.history.last().unwrap();
    eprintln!("{:?} ln V {ln_v}", s.history);
    // A uniform guess costs ln V (~2.8 nats here). Given colour and shape, the only uncertainty left is
    // the caption template (a/the/on the table): about 0.6 nats per caption over ~4 words. Half of
    // ln V is far above that and far below chance.
    assert!(last.val_loss < 0.5 * ln_v, "val loss {} vs ln V {ln_v}", last.val_loss);
    assert!(last.train_loss < 0.5 * s.history[0].train_loss.max(ln_v));
    // Greedy captions name colour and shape, so BLEU-4 is high (a random model scores ~0).
    assert!(s.best_bleu4 > 0.3, "best BLEU-4 {}", s.best_bleu4);
    assert_eq!(m.kind(), DecoderKind::ShowTell);
    assert_eq!(m.encoder, "synthetic");
    assert!(last_path(&cfg.out).exists() && state_path(&cfg.out).exists());
    let png = image::open(curve_path(&cfg.out)).unwrap().to_rgb8();
    assert_eq!((png.width(), png.height()), (640, 400));
    for c in
        [capgen::train::plot::TRAIN_COLOUR, capgen::train::plot::VAL_COLOUR, capgen::train::plot::BLEU_COLOUR]
    {
        assert!(png.pixels().any(|p| *p == c), "curve lacks colour {c:?}");
    }
}

#[test]
fn loss_falls_attention() {
    let dir = tmpdir("falls-att");
    let mut cfg = config(&dir, true);
    cfg.epochs = 12;
    let s = train(&cfg).unwrap();
    let m = Captioner::load(&cfg.out).unwrap();
    let ln_v = (m.vocab.len() as f64).ln();
    let last = s.history.last().unwrap();
    eprintln!("{:?} ln V {ln_v}", s.history);
    // val loss includes the attention regulariser (alpha_c = 1), which is small once attention
    // spreads over the 4 regions; same bound as show-tell.
    assert!(last.val_loss < 0.5 * ln_v, "val loss {} vs ln V {ln_v}", last.val_loss);
    assert!(s.best_bleu4 > 0.3, "best BLEU-4 {}", s.best_bleu4);
    assert_eq!(m.kind(), DecoderKind::Attention);
    assert_eq!(m.dims.regions, 4);
}

#[test]
fn checkpoint_round_trip() {
    let dir = tmpdir("roundtrip");
    let caps: Vec<String> = (0..9).map(|i| format!("w{i} w{i}")).collect();
    let vocab = capgen::data::vocab::Vocab::from_captions(caps.iter().map(String::as_str), 2);
    for kind in [DecoderKind::ShowTell, DecoderKind::Attention] {
        let dims = DecoderDims { vocab: vocab.len(), embed: 5, feat: 6, regions: 3, hidden: 7, att: 4 };
        let mut c = Captioner::init(kind, dims, vocab.clone(), 12, 42).unwrap();
        c.encoder = "resnet50".into();
        c.hyper = serde_json::json!({"lr": 0.001, "epochs": 3});
        let p = dir.join(format!("{}.safetensors", kind.name()));
        c.save(&p).unwrap();
        let back = Captioner::load(&p).unwrap();
        assert_eq!(back, c, "{}", kind.name());
        // Save is deterministic: the same model gives the same bytes.
        let p2 = dir.join("again.safetensors");
        back.save(&p2).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(&p2).unwrap());
    }
}

#[test]
fn checkpoint_load_errors_name_the_problem() {
    let dir = tmpdir("ckpt-errors");
    // A features file is a safetensors file but not a checkpoint.
    let feats = write_features(&dir, 2, false, "");
    let e = Captioner::load(&feats).unwrap_err().to_string();
    assert!(e.contains("not a capgen model checkpoint") && e.contains("pooled.safetensors"), "{e}");
    // A checkpoint with one tensor of the wrong shape.
    let caps = ["a b c"];
    let vocab = capgen::data::vocab::Vocab::from_captions(caps, 1);
    let dims = DecoderDims { vocab: vocab.len(), embed: 3, feat: 4, regions: 1, hidden: 5, att: 2 };
    let c = Captioner::init(DecoderKind::ShowTell, dims, vocab, 5, 1).unwrap();
    let good = dir.join("good.safetensors");
    c.save(&good).unwrap();
    let f = capgen::weights::TensorFile::load(&good).unwrap();
    let mut tensors: Vec<(String, Tensor)> =
        f.tensors.iter().map(|(n, t)| (n.clone(), t.to_dtype(t.dtype()))).collect();
    for (n, t) in tensors.iter_mut() {
        if n == "fc_b" {
            *t = Tensor::from_vec(vec![0.0; 3], &[3]).unwrap();
        }
    }
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let bad = dir.join("bad.safetensors");
    save_safetensors(&bad, &refs, &f.metadata).unwrap();
    let e = Captioner::load(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.safetensors") && e.contains("fc_b"), "{e}");
    // Broken vocabulary JSON.
    let mut meta = f.metadata.clone();
    meta.insert("vocab".into(), "{\"words\": [1, 2]".into());
    let refs: Vec<(&str, &Tensor)> = f.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    save_safetensors(&bad, &refs, &meta).unwrap();
    let e = Captioner::load(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.safetensors") && e.contains("vocabulary"), "{e}");
}

/// Three epochs straight vs two epochs, a run killed mid-epoch 3 (writing nothing), then a resume:
/// the final weights must be identical (the state is saved exactly and the batch order is a pure
/// function of (seed, epoch)). Tolerance: bit-identical is expected; 1e-6 relative L2 is allowed for
/// any order-dependent parallel reduction (the loss sum and gradient norm are summed with rayon).
#[test]
fn resume_gives_the_same_weights() {
    let dir_a = tmpdir("resume-a");
    let cfg_a = config(&dir_a, true);
    train(&cfg_a).unwrap();

    let dir_b = tmpdir("resume-b");
    let mut cfg_b = config(&dir_b, true);
    cfg_b.epochs = 2;
    train(&cfg_b).unwrap();
    let state_after_2 = std::fs::read(state_path(&cfg_b.out)).unwrap();
    cfg_b.epochs = 3;
    cfg_b.resume = true;
    cfg_b.abort_after_steps = Some(2);
    let e = train(&cfg_b).unwrap_err().to_string();
    assert!(e.contains("aborted"), "{e}");
    assert_eq!(std::fs::read(state_path(&cfg_b.out)).unwrap(), state_after_2, "abort must not write");
    cfg_b.abort_after_steps = None;
    let s = train(&cfg_b).unwrap();
    assert_eq!(s.history.len(), 3);

    let (pa, pb) = (params_of(&last_path(&cfg_a.out)), params_of(&last_path(&cfg_b.out)));
    for ((na, a), (nb, b)) in pa.iter().zip(&pb) {
        assert_eq!(na, nb);
        let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt().max(1e-30);
        assert!(diff / norm <= 1e-6, "{na}: rel L2 {}", diff / norm);
    }
    eprintln!("bit-identical: {}", pa == pb);
}

#[test]
fn nan_loss_stops_and_keeps_the_last_checkpoint() {
    let dir = tmpdir("nan");
    let mut cfg = config(&dir, false);
    cfg.epochs = 1;
    train(&cfg).unwrap();
    let files = [cfg.out.clone(), last_path(&cfg.out), state_path(&cfg.out)];
    let before: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    cfg.epochs = 2;
    cfg.resume = true;
    // Every image's features now hold a NaN: the first step of epoch 2 must stop training.
    let nan_dir = dir.join("nan");
    std::fs::create_dir_all(&nan_dir).unwrap();
    cfg.features = write_features(&nan_dir, 96, false, "");
    let f = capgen::weights::TensorFile::load(&cfg.features).unwrap();
    let poisoned: Vec<(String, Tensor)> = f
        .tensors
        .iter()
        .map(|(n, t)| {
            let mut v = t.to_f32_vec();
            v[3] = f32::NAN;
            (n.clone(), Tensor::from_vec(v, t.dims()).unwrap())
        })
        .collect();
    let refs: Vec<(&str, &Tensor)> = poisoned.iter().map(|(n, t)| (n.as_str(), t)).collect();
    save_safetensors(&cfg.features, &refs, &f.metadata).unwrap();
    let e = train(&cfg).unwrap_err().to_string();
    assert!(e.contains("non-finite loss") && e.contains("epoch 2, step"), "{e}");
    assert!(e.contains("untouched"), "{e}");
    for (p, b) in files.iter().zip(&before) {
        assert_eq!(&std::fs::read(p).unwrap(), b, "{} changed", p.display());
    }
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = tmpdir("bad");
    let base = config(&dir, false);
    // Features of other images only.
    let mut cfg = base.clone();
    cfg.features = write_features(&dir, 96, false, "other_");
    let e = train(&cfg).unwrap_err().to_string();
    assert!(e.contains("other_pooled.safetensors") && e.contains("none of the"), "{e}");
    // Pooled features for the attention decoder, and grid features for show-tell.
    let mut cfg = base.clone();
    cfg.decoder = DecoderKind::Attention;
    let e = train(&cfg).unwrap_err().to_string();
    assert!(e.contains("pooled features") && e.contains("--layer grid"), "{e}");
    let mut cfg = base.clone();
    cfg.features = write_features(&dir, 96, true, "");
    let e = train(&cfg).unwrap_err().to_string();
    assert!(e.contains("grid features") && e.contains("--layer pooled"), "{e}");
    // Resume without a state.
    let mut cfg = base.clone();
    cfg.resume = true;
    let e = train(&cfg).unwrap_err().to_string();
    assert!(e.contains("state.safetensors") && e.contains("no resume state"), "{e}");
    // Resume with captions that give another vocabulary.
    let mut cfg = base.clone();
    cfg.epochs = 1;
    train(&cfg).unwrap();
    cfg.captions = write_captions(&dir, 96, true);
    cfg.resume = true;
    cfg.epochs = 2;
    let e = train(&cfg).unwrap_err().to_string();
    assert!(e.contains("cannot resume") && e.contains("vocabulary"), "{e}");
    // Resume with other model dims.
    let mut cfg = base.clone();
    cfg.resume = true;
    cfg.epochs = 2;
    cfg.hidden = 24;
    let e = train(&cfg).unwrap_err().to_string();
    assert!(e.contains("cannot resume") && e.contains("dims"), "{e}");
}

/// The binary: a successful tiny run prints the best score; the wrong feature kind is one line on
/// stderr and a non-zero exit.
#[test]
fn cli_train_runs_and_fails_cleanly() {
    let dir = tmpdir("cli");
    let cfg = config(&dir, false);
    let run = |extra: &[&str]| {
        let mut args: Vec<String> = vec![
            "train".into(),
            "--captions".into(),
            cfg.captions.display().to_string(),
            "--features".into(),
            cfg.features.display().to_string(),
            "--out".into(),
            cfg.out.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        std::process::Command::new(env!("CARGO_BIN_EXE_capgen")).args(&args).output().unwrap()
    };
    let small = ["--epochs", "2", "--batch", "16", "--min-count", "1", "--embed", "8", "--hidden", "8"];
    let mut ok_args = small.to_vec();
    ok_args.extend(["--decoder", "show-tell", "--lr", "0.01"]);
    let out = run(&ok_args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("best val BLEU-4"));
    assert!(Captioner::load(&cfg.out).is_ok());
    let mut bad_args = small.to_vec();
    bad_args.extend(["--decoder", "attention"]);
    let out = run(&bad_args);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or("");
    assert!(last.starts_with("error:") && last.contains("pooled features"), "{err}");
}
