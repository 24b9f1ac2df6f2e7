//! `capgen evaluate --model M --features F --captions C [--split S] [--beam K] [--out PREDS.json]
//! [--json]`: captions the test images (every captioned image when no split is given) from their
//! features, writes the predictions in the COCO results format (atomically), and scores them
//! against the references with `metrics::score` (COCO BLEU, CIDEr-D, ROUGE-L).
//!
//! A model with a fine-tuned encoder inside (`capgen train --fine-tune-encoder`) is evaluated with
//! `--images DIR` instead of `--features`: that encoder runs on the images, preprocessed as the model
//! records (`features_from_images`).

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;

use crate::cli::progress::bar;
use crate::cli::EvaluateArgs;
use crate::data::captions::read_captions;
use crate::data::split::{read_split, Part};
use crate::error::{Error, Result};
use crate::metrics::{self, BleuMode};
use crate::model::checkpoint::{Captioner, DecoderParams};
use crate::model::search::{generate, DecoderRef, SearchConfig};
use crate::weights::{write_atomic, TensorFile};

/// Images captioned per decoder call (bounds memory: beams x images rows).
const CHUNK: usize = 64;

/// The borrowed decoder of a captioner.
pub fn decoder_ref(m: &Captioner) -> DecoderRef<'_> {
    match &m.params {
        DecoderParams::ShowTell(p) => DecoderRef::ShowTell(p),
        DecoderParams::Attention(p) => DecoderRef::Attention(p),
    }
}

/// The search settings for a captioner: `max_len` words plus `<end>`.
pub fn search_config(m: &Captioner, beam: usize) -> SearchConfig {
    SearchConfig { beam, max_len: m.max_len.max(1) + 1, ..SearchConfig::default() }
}

/// The per-image feature shape a captioner reads: (D) or (L, D).
pub fn feature_dims(m: &Captioner) -> Vec<usize> {
    match m.params {
        DecoderParams::ShowTell(_) => vec![m.dims.feat],
        DecoderParams::Attention(_) => vec![m.dims.regions, m.dims.feat],
    }
}

/// Checks that a features file suits the model (encoder recorded by both, per-image shape) and
/// gathers the features of `names` (N, per-image) in order. Errors name the features file.
pub fn gather_features(
    m: &Captioner,
    model_path: &Path,
    feats: &TensorFile,
    names: &[String],
) -> Result<Vec<f32>> {
    let src = &feats.path;
    if let Some(enc) = feats.metadata.get("encoder") {
        if !m.encoder.is_empty() && !enc.is_empty() && *enc != m.encoder {
            return Err(Error::format(
                src,
                format!(
                    "features come from encoder `{enc}` but {} was trained on `{}`",
                    model_path.display(),
                    m.encoder
                ),
            ));
        }
    }
    let want = feature_dims(m);
    let missing: Vec<&String> = names.iter().filter(|n| feats.get(n).is_none()).collect();
    if let Some(first) = missing.first() {
        return Err(Error::format(
            src,
            format!("{} of {} images have no features (first: `{first}`)", missing.len(), names.len()),
        ));
    }
    let mut out = Vec::with_capacity(names.len() * want.iter().product::<usize>());
    for n in names {
        let t = feats.get(n).expect("checked above");
        if t.dims() != want.as_slice() {
            return Err(Error::format(
                src,
                format!(
                    "features of `{n}` have shape {:?} but the {} model {} expects {:?} ({} features)",
                    t.dims(),
                    m.kind().name(),
                    model_path.display(),
                    want,
                    m.kind().layer()
                ),
            ));
        }
        out.extend(t.to_f32_vec());
    }
    Ok(out)
}

/// Captions features (N, per-image) in chunks with a progress bar; returns the caption strings.
pub fn caption_all(m: &Captioner, feats: &[f32], n: usize, beam: usize) -> Result<Vec<String>> {
    let per = feats.len() / n.max(1);
    let cfg = search_config(m, beam);
    let pb = bar(n, "captioning");
    let mut out = Vec::with_capacity(n);
    for chunk in feats.chunks(CHUNK * per) {
        for g in generate(decoder_ref(m), &m.dims, chunk, &cfg)? {
            out.push(m.vocab.decode_string(&g.tokens));
        }
        pb.inc((chunk.len() / per) as u64);
    }
    pb.finish_and_clear();
    Ok(out)
}

/// Grid or pooled features (N, per-image) of the images `names` under `dir` from the fine-tuned
/// encoder inside the model file, preprocessed as its `hyper` records; images without a file are
/// skipped with a warning (count). Returns the names kept and their features.
pub fn features_from_images(
    m: &Captioner,
    model_path: &Path,
    model_file: &TensorFile,
    dir: &Path,
    names: &[String],
) -> Result<(Vec<String>, Vec<f32>)> {
    use crate::cli::demo::Preprocess;
    use crate::data::image::{load_rgb, resize_center_crop};
    use crate::nn::{Encoder, FeatureLayer};
    let (Some(pp), Some(enc)) =
        (Preprocess::from_hyper(&m.hyper, model_path)?, Captioner::embedded_encoder(model_file))
    else {
        return Err(Error::format(
            model_path,
            "holds no fine-tuned encoder: evaluate it with --features (extracted features)",
        ));
    };
    let net = crate::nn::resnet::ResNet::from_tensor_file(&pp.encoder, &enc)?;
    let s = pp.image_size;
    let resize = m.hyper["preprocess"]["resize"].as_u64().map_or(s, |r| (r as usize).max(s));
    let kept: Vec<String> = names.iter().filter(|n| dir.join(n).is_file()).cloned().collect();
    if kept.len() < names.len() {
        eprintln!(
            "warning: {}: {} of {} images have no file (skipped)",
            dir.display(),
            names.len() - kept.len(),
            names.len()
        );
    }
    if kept.is_empty() {
        return Err(Error::format(dir, format!("none of the {} images to evaluate is there", names.len())));
    }
    let layer = match m.params {
        DecoderParams::ShowTell(_) => FeatureLayer::Pooled,
        DecoderParams::Attention(_) => FeatureLayer::Grid,
    };
    let want = feature_dims(m);
    let pb = bar(kept.len(), "encoding");
    let mut out = Vec::with_capacity(kept.len() * want.iter().product::<usize>());
    for chunk in kept.chunks(16) {
        let imgs: Vec<Vec<f32>> = chunk
            .par_iter()
            .map(|n| {
                let img = load_rgb(&dir.join(n))?;
                Ok(crate::train::e2e::normalize(&resize_center_crop(&img, resize, s), pp.mean, pp.std))
            })
            .collect::<Result<_>>()?;
        let x = crate::tensor::Tensor::from_vec(imgs.concat(), &[chunk.len(), 3, s, s])?;
        let f = net.features(&x, layer)?;
        if f.dims()[1..] != want[..] {
            return Err(Error::format(
                model_path,
                format!("the decoder expects features {want:?} but its encoder gives {:?}", &f.dims()[1..]),
            ));
        }
        out.extend(f.to_f32_vec());
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok((kept, out))
}

pub fn run(args: &EvaluateArgs) -> Result<()> {
    if args.beam == 0 {
        return Err(Error::msg("--beam 0: use a beam width of at least 1"));
    }
    let model_file = TensorFile::load(&args.model)?;
    let model = Captioner::from_file(&model_file)?;
    match (&args.features, &args.images) {
        (Some(_), Some(_)) => return Err(Error::msg("give --features or --images, not both")),
        (None, None) => return Err(Error::msg("--features FEATS.safetensors is required (or --images DIR for a model with a fine-tuned encoder)")),
        (Some(_), None) if model.hyper.get("fine_tuned_encoder").is_some() => eprintln!(
            "warning: {} has a fine-tuned encoder: --features must come from that encoder; \
             --images DIR runs it directly",
            args.model.display()
        ),
        _ => {}
    }
    let (captions, report) = read_captions(&args.captions, None)?;
    for w in report.warnings() {
        eprintln!("warning: {w}");
    }
    let mut names: Vec<String> = match &args.split {
        Some(p) => {
            let split = read_split(p)?;
            let test = split.part(Part::Test);
            if test.is_empty() {
                return Err(Error::format(p, "the split has no test images"));
            }
            let without: Vec<&String> = test.iter().filter(|n| !captions.contains_key(*n)).collect();
            if !without.is_empty() {
                eprintln!(
                    "warning: {}: {} test images have no captions in {} and are skipped",
                    p.display(),
                    without.len(),
                    args.captions.display()
                );
            }
            test.iter().filter(|n| captions.contains_key(*n)).cloned().collect()
        }
        None => captions.keys().cloned().collect(),
    };
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(Error::msg("no image to evaluate (no test image has captions)"));
    }
    let feats = match (&args.features, &args.images) {
        (Some(f), _) => {
            let feats_file = TensorFile::load(f)?;
            gather_features(&model, &args.model, &feats_file, &names)?
        }
        (None, Some(dir)) => {
            let (kept, feats) = features_from_images(&model, &args.model, &model_file, dir, &names)?;
            names = kept;
            feats
        }
        (None, None) => unreachable!("checked above"),
    };
    drop(model_file);
    let preds = caption_all(&model, &feats, names.len(), args.beam)?;

    let hyps: BTreeMap<String, String> = names.iter().cloned().zip(preds.iter().cloned()).collect();
    if let Some(out) = &args.out {
        let json: Vec<serde_json::Value> =
            names.iter().zip(&preds).map(|(n, c)| serde_json::json!({"image_id": n, "caption": c})).collect();
        let text = serde_json::to_string_pretty(&json).map_err(|e| Error::msg(format!("JSON: {e}")))?;
        write_atomic(out, text.as_bytes())?;
    }
    let refs: BTreeMap<String, Vec<String>> =
        names.iter().map(|n| (n.clone(), captions[n].clone())).collect();
    let scores = metrics::score(&refs, &hyps, BleuMode::Coco)?;
    if !args.json {
        println!("{} images, beam {}", names.len(), args.beam);
        for line in scores.lines() {
            println!("{line}");
        }
    } else {
        println!("{}", scores.to_json());
    }
    Ok(())
}
