//! `capgen demo --quick` end to end: it learns (final training loss well below the unigram baseline,
//! which this test recomputes from the written captions), writes its files, is deterministic, reuses
//! or rebuilds an interrupted data directory, and its model captions a demo image with `capgen caption`.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::Path;

use capgen::data::split::read_karpathy;
use capgen::data::tokenize::tokenize;
use serde_json::Value;

/// Runs the quick demo into `dir` and returns its final JSON line.
fn quick(dir: &Path) -> Value {
    let (rc, out, err) = capgen(&["demo", "--quick", "--json", "--out", dir.to_str().unwrap()]);
    assert_eq!(rc, 0, "demo failed: {err}");
    let last = out.lines().last().expect("a JSON line");
    assert_eq!(out.lines().count(), 1, "with --json stdout is the JSON line only: {out}");
    serde_json::from_str(last).expect("valid JSON")
}

/// Entropy (nats) of the unigram distribution of the training targets: every word of every training
/// caption plus one `<end>` per caption, counted directly from the written split file.
fn unigram_entropy(data: &Path) -> f64 {
    let kf = read_karpathy(data.join("dataset_synth.json")).unwrap();
    let mut counts: BTreeMap<String, f64> = BTreeMap::new();
    for img in &kf.split.train {
        for c in &kf.captions[img] {
            for w in tokenize(c) {
                *counts.entry(w).or_default() += 1.0;
            }
            *counts.entry("<end>".into()).or_default() += 1.0;
        }
    }
    let total: f64 = counts.values().sum();
    counts.values().map(|&c| -(c / total) * (c / total).ln()).sum()
}

#[test]
fn quick_demo_learns_writes_files_and_captions() {
    let dir = tmp_path("quick", false);
    let j = quick(&dir);
    for k in ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D", "ROUGE-L", "attribute_accuracy", "seconds"] {
        assert!(j[k].as_f64().is_some_and(f64::is_finite), "missing or non-finite {k}: {j}");
    }
    let h = unigram_entropy(&dir.join("data"));
    // The demo's own figure must agree with the independent count (same tokens, f64 sums).
    let reported = j["unigram_entropy"].as_f64().unwrap();
    assert!((reported - h).abs() < 1e-9 * h, "unigram entropy {reported} vs recount {h}");
    // Learning: a model that ignored the image and the context could not beat the unigram
    // entropy; "well below" = under 60% of it (the quick run reaches about a third).
    let loss = j["final_train_loss"].as_f64().unwrap();
    assert!(loss < 0.6 * h, "final training loss {loss} is not well below the unigram baseline {h}");
    for f in ["model.safetensors", "encoder.safetensors", "attention.png", "curve.png"] {
        let p = dir.join(f);
        assert!(p.metadata().is_ok_and(|m| m.len() > 0), "{} missing or empty", p.display());
    }

    // `capgen caption` with the saved model on a demo test image.
    let kf = read_karpathy(dir.join("data/dataset_synth.json")).unwrap();
    let image = dir.join("data/Images").join(&kf.split.test[0]);
    let (rc, out, err) = capgen(&[
        "caption",
        "--model",
        dir.join("model.safetensors").to_str().unwrap(),
        "--weights",
        dir.join("encoder.safetensors").to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "caption failed: {err}");
    let line = out.lines().next().unwrap_or_default();
    let caption = line.strip_prefix(&format!("{}: ", image.display())).expect("`file: caption`");
    assert!(!caption.trim().is_empty(), "empty caption: {line}");

    // Interrupted earlier run: the data marker and the captions file gone (as if killed while
    // synthesising), a stray temp file left. The rerun rebuilds the set and, being deterministic,
    // reproduces the same figures and the same model bytes.
    let model_before = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::remove_file(dir.join("data/demo-data.json")).unwrap();
    std::fs::remove_file(dir.join("data/captions.txt")).unwrap();
    std::fs::write(dir.join("model.safetensors.tmp"), b"half").unwrap();
    let j2 = quick(&dir);
    for k in ["BLEU-4", "CIDEr-D", "attribute_accuracy", "final_train_loss"] {
        assert_eq!(j[k], j2[k], "{k} differs between identical runs");
    }
    assert_eq!(model_before, std::fs::read(dir.join("model.safetensors")).unwrap());
    // And a third run reuses the complete set as it is.
    let j3 = quick(&dir);
    assert_eq!(j["BLEU-4"], j3["BLEU-4"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_out_is_a_file_is_one_line_error() {
    let dir = tmp_path("file", false);
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("not-a-dir");
    std::fs::write(&f, b"x").unwrap();
    let (rc, out, err) = capgen(&["demo", "--quick", "--out", f.to_str().unwrap()]);
    assert_ne!(rc, 0);
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("not-a-dir") && err.contains("not a directory"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let (rc, _, err) = capgen(&["demo", "--quick", "--device", "cuda", "--out", f.to_str().unwrap()]);
    assert_ne!(rc, 0);
    assert!(err.contains("--device cuda"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
