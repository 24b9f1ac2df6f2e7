//! `capgen evaluate` and `capgen caption` end to end on tiny checkpoints made here with the checkpoint
//! API (seeded random decoders) and tiny generated features / committed images; and their bad inputs
//! (one stderr line, non-zero exit, no panic).

mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use capgen::data::vocab::Vocab;
use capgen::model::checkpoint::{Captioner, DecoderKind};
use capgen::model::decoder::DecoderDims;
use capgen::model::search::{generate, SearchConfig};
use capgen::rng::Rng;
use capgen::tensor::Tensor;
use capgen::weights::save_safetensors;

const IMAGES: [&str; 4] = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"];
const CAPTIONS: [&str; 4] =
    ["a dog runs on the grass", "a man rides a bike", "two dogs play", "a girl in red"];

/// A Flickr8k token file with two captions per image; returns its path and the vocabulary.
fn write_captions(dir: &Path) -> (PathBuf, Vocab) {
    let mut text = String::new();
    for (i, name) in IMAGES.iter().enumerate() {
        text.push_str(&format!("{name}#0\t{}\n{name}#1\t{} .\n", CAPTIONS[i], CAPTIONS[(i + 1) % 4]));
    }
    let p = dir.join("Flickr8k.token.txt");
    std::fs::write(&p, text).unwrap();
    (p, Vocab::from_captions(CAPTIONS.iter().copied(), 1))
}

fn model(kind: DecoderKind, vocab: Vocab, feat: usize, regions: usize, encoder: &str) -> Captioner {
    let dims = DecoderDims { vocab: vocab.len(), embed: 8, feat, regions, hidden: 8, att: 6 };
    let mut m = Captioner::init(kind, dims, vocab, 6, 7).unwrap();
    m.encoder = encoder.to_string();
    // Larger weights than the init so different images get different captions.
    m.params.named_mut().into_iter().for_each(|(n, p)| Rng::for_name(3, n).fill_uniform(p, -1.0, 1.0));
    m
}

/// A features file with one (dims) tensor per name; returns the features in name order too.
fn write_features(path: &Path, names: &[&str], dims: &[usize], encoder: &str) -> Vec<f32> {
    let n: usize = dims.iter().product();
    let mut all = Vec::new();
    let tensors: Vec<(String, Tensor)> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut v = vec![0.0; n];
            Rng::new(100 + i as u64).fill_uniform(&mut v, 0.0, 1.0);
            all.extend_from_slice(&v);
            (name.to_string(), Tensor::from_vec(v, dims).unwrap())
        })
        .collect();
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let meta = BTreeMap::from([("encoder".to_string(), encoder.to_string())]);
    save_safetensors(path, &refs, &meta).unwrap();
    all
}

#[test]
fn evaluate_writes_predictions_and_scores_them() {
    let dir = tmp("evaluate");
    let (caps, vocab) = write_captions(&dir);
    for (kind, dims, beam) in [(DecoderKind::ShowTell, vec![5], 1), (DecoderKind::Attention, vec![4, 5], 3)] {
        let regions = if dims.len() == 2 { dims[0] } else { 1 };
        let m = model(kind, vocab.clone(), 5, regions, "resnet50");
        let mp = dir.join(format!("{}.safetensors", kind.name()));
        m.save(&mp).unwrap();
        let fp = dir.join(format!("feats-{}.safetensors", kind.name()));
        let feats = write_features(&fp, &IMAGES, &dims, "resnet50");
        let preds = dir.join(format!("preds-{}.json", kind.name()));
        let beam_s = beam.to_string();
        let (code, out, err) = capgen(&[
            "evaluate",
            "--model",
            s(&mp),
            "--features",
            s(&fp),
            "--captions",
            s(&caps),
            "--beam",
            &beam_s,
            "--out",
            s(&preds),
            "--json",
        ]);
        assert_eq!(code, 0, "{err}");
        // The predictions are the library's captions for the same features, in the COCO results format.
        let cfg = SearchConfig { beam, max_len: 7, ..SearchConfig::default() };
        let want: Vec<String> = generate(capgen::cli::evaluate::decoder_ref(&m), &m.dims, &feats, &cfg)
            .unwrap()
            .iter()
            .map(|g| m.vocab.decode_string(&g.tokens))
            .collect();
        let got: serde_json::Value = serde_json::from_slice(&std::fs::read(&preds).unwrap()).unwrap();
        let got = got.as_array().unwrap();
        assert_eq!(got.len(), 4);
        for (i, p) in got.iter().enumerate() {
            assert_eq!(p["image_id"], IMAGES[i]);
            assert_eq!(p["caption"], want[i].as_str());
        }
        // The last stdout line is the scores JSON, equal to `capgen score` on the written predictions.
        let last: serde_json::Value = serde_json::from_str(out.trim_end().lines().last().unwrap()).unwrap();
        let refs = dir.join("refs.json");
        let mut r = BTreeMap::<&str, Vec<String>>::new();
        for (i, name) in IMAGES.iter().enumerate() {
            r.insert(name, vec![CAPTIONS[i].to_string(), format!("{} .", CAPTIONS[(i + 1) % 4])]);
        }
        std::fs::write(&refs, serde_json::to_string(&r).unwrap()).unwrap();
        let (code, sout, err) = capgen(&["score", "--refs", s(&refs), "--hyps", s(&preds), "--json"]);
        assert_eq!(code, 0, "{err}");
        let scored: serde_json::Value = serde_json::from_str(sout.trim()).unwrap();
        for k in ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D", "ROUGE-L"] {
            assert!(last[k].is_number(), "{k} missing in {last}");
            assert_eq!(last[k], scored[k], "{k}");
        }
    }
}

#[test]
fn caption_prints_one_line_per_image_and_draws_attention_maps() {
    let dir = tmp("caption");
    let (_, vocab) = write_captions(&dir);
    let img = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/preprocess/colour.jpg");
    let st = dir.join("st.safetensors");
    model(DecoderKind::ShowTell, vocab.clone(), 2048, 1, "resnet50").save(&st).unwrap();
    let (code, out, err) = capgen(&["caption", "--model", s(&st), "--weights", "random", "--image", s(&img)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with(&format!("{}: ", img.display())), "{out}");

    let at = dir.join("at.safetensors");
    model(DecoderKind::Attention, vocab, 2048, 49, "resnet50").save(&at).unwrap();
    let map = dir.join("map.png");
    let (code, out, err) = capgen(&[
        "caption",
        "--model",
        s(&at),
        "--weights",
        "random",
        "--image",
        s(&img),
        s(&img),
        "--beam",
        "2",
        "--attention-map",
        s(&map),
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    for (k, line) in lines.iter().enumerate() {
        let words = line.split(": ").nth(1).unwrap().split_whitespace().count();
        let png = dir.join(format!("map-{}.png", k + 1));
        let im = image::open(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        // One panel per word plus <end>: the search runs max_len + 1 = 7 steps, so fewer than 7 words
        // means it ended. Panels are 224 + 4 px wide and 224 + 22 + 4 px tall, 5 per row, 4 px margin.
        let panels = (words + 1).min(7) as u32;
        assert_eq!(im.width(), panels.min(5) * 228 + 4);
        assert_eq!(im.height(), panels.div_ceil(5) * 250 + 4);
    }
}

#[test]
fn bad_inputs_give_one_line() {
    let dir = tmp("bad");
    let (caps, vocab) = write_captions(&dir);
    let st = dir.join("st.safetensors");
    model(DecoderKind::ShowTell, vocab.clone(), 5, 1, "resnet50").save(&st).unwrap();
    let at = dir.join("at.safetensors");
    model(DecoderKind::Attention, vocab, 5, 4, "resnet50").save(&at).unwrap();
    let pooled = dir.join("pooled.safetensors");
    write_features(&pooled, &IMAGES, &[5], "resnet50");
    let partial = dir.join("partial.safetensors");
    write_features(&partial, &IMAGES[..3], &[5], "resnet50");
    let vgg = dir.join("vgg.safetensors");
    write_features(&vgg, &IMAGES, &[5], "vgg16");
    let missing = dir.join("nope.safetensors");
    let eval = |m: &Path, f: &Path| -> Vec<String> {
        ["evaluate", "--model", s(m), "--features", s(f), "--captions", s(&caps)].map(String::from).to_vec()
    };
    let run = |a: Vec<String>, needles: &[&str]| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        assert_one_line_error(&a, needles);
    };
    run(eval(&missing, &pooled), &[s(&missing)]);
    // The features file is a safetensors file but no checkpoint.
    run(eval(&pooled, &pooled), &[s(&pooled), "not a capgen model checkpoint"]);
    run(eval(&st, &partial), &[s(&partial), "1 of 4 images have no features", "d.jpg"]);
    run(eval(&at, &pooled), &[s(&pooled), "expects [4, 5]"]);
    run(eval(&st, &vgg), &[s(&vgg), "vgg16"]);
    let mut b0 = eval(&st, &pooled);
    b0.extend(["--beam".into(), "0".into()]);
    run(b0, &["--beam 0"]);
    let img = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/preprocess/colour.jpg");
    let cap = |m: &Path| -> Vec<String> {
        ["caption", "--model", s(m), "--weights", "random", "--image", s(&img), "--attention-map", "x.png"]
            .map(String::from)
            .to_vec()
    };
    run(cap(&st), &["--attention-map", "show-tell", s(&st)]);
    run(cap(&missing), &[s(&missing)]);
}
