//! `capgen extract`: run an encoder over images and write one feature tensor per image, named by the
//! image's file name, to a safetensors file (DESIGN.md section 3, "Features file").
//!
//! Images are collected (directories: their image files, sorted), decoded and preprocessed in
//! parallel a batch at a time, encoded, and written atomically at the end. A bad image aborts the run
//! with its one-line error before anything is written, unless `--skip-bad`, which skips it and lists
//! every skipped file on stderr at the end.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::cli::{progress, ExtractArgs};
use crate::data::image::{collect_images, preprocess_batch, stack};
use crate::error::{Error, Result};
use crate::nn::{load_encoder, EncoderKind, FeatureLayer};
use crate::tensor::{Device, Tensor};
use crate::weights::save_safetensors;

/// The tensor name for an image: its file name. Two inputs with the same file name are an error.
pub fn feature_names(paths: &[PathBuf]) -> Result<Vec<String>> {
    let mut seen: HashMap<String, &Path> = HashMap::new();
    let mut names = Vec::with_capacity(paths.len());
    for p in paths {
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::format(p, "file name is not valid UTF-8 (features are keyed by it)"))?
            .to_string();
        if let Some(first) = seen.insert(name.clone(), p) {
            return Err(Error::format(
                p,
                format!("same file name as {} (features are keyed by file name)", first.display()),
            ));
        }
        names.push(name);
    }
    Ok(names)
}

/// Splits a batch of features (N, ...) into N tensors of shape (...).
pub fn split_batch(y: &Tensor) -> Result<Vec<Tensor>> {
    let dims = y.dims().to_vec();
    let n = *dims.first().ok_or_else(|| Error::shape("encoder returned a scalar"))?;
    let data = y.to_f32_vec();
    let per = data.len().checked_div(n).unwrap_or(0);
    (0..n).map(|i| Tensor::from_vec(data[i * per..(i + 1) * per].to_vec(), &dims[1..])).collect()
}

pub fn run(args: &ExtractArgs) -> Result<()> {
    let kind = EncoderKind::parse(&args.encoder)?;
    let layer = FeatureLayer::parse(&args.layer)?;
    let _device: Device = Device::parse(&args.device)?;
    if args.batch == 0 {
        return Err(Error::msg("--batch 0: the batch size must be at least 1"));
    }
    let paths = collect_images(&args.images)?;
    let names = feature_names(&paths)?;
    // Fail now, not after an hour of encoding, if the output cannot be written where asked.
    if args.out.is_dir() {
        return Err(Error::format(&args.out, "is a directory; --out takes a file name"));
    }
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(Error::format(&args.out, "the output's directory does not exist"));
        }
    }
    let encoder = load_encoder(kind, &args.weights, 0)?;

    let pb = progress::bar(paths.len(), "extract");
    let mut features: Vec<(String, Tensor)> = Vec::with_capacity(paths.len());
    let mut bad: Vec<String> = Vec::new();
    for (chunk, chunk_names) in paths.chunks(args.batch).zip(names.chunks(args.batch)) {
        let mut images = Vec::with_capacity(chunk.len());
        let mut good = Vec::with_capacity(chunk.len());
        for (result, name) in preprocess_batch(chunk).into_iter().zip(chunk_names) {
            match result {
                Ok(x) => {
                    images.push(x);
                    good.push(name.clone());
                }
                Err(e) if args.skip_bad => bad.push(e.to_string()),
                Err(e) => {
                    pb.finish_and_clear();
                    return Err(e);
                }
            }
        }
        if !images.is_empty() {
            let y = encoder.features(&stack(&images)?, layer)?;
            features.extend(good.into_iter().zip(split_batch(&y)?));
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();

    let list_bad = |bad: &[String]| {
        eprintln!("skipped {} bad image(s):", bad.len());
        for b in bad {
            eprintln!("  {b}");
        }
    };
    if features.is_empty() {
        list_bad(&bad);
        return Err(Error::msg(format!("no image could be read ({} bad); nothing written", bad.len())));
    }
    let mut metadata = BTreeMap::new();
    metadata.insert("encoder".to_string(), args.encoder.clone());
    metadata.insert("layer".to_string(), args.layer.clone());
    metadata.insert("weights".to_string(), args.weights.clone());
    let refs: Vec<(&str, &Tensor)> = features.iter().map(|(n, t)| (n.as_str(), t)).collect();
    save_safetensors(&args.out, &refs, &metadata)?;
    eprintln!(
        "wrote {} feature tensors of shape {:?} to {}",
        features.len(),
        features[0].1.dims(),
        args.out.display()
    );
    if !bad.is_empty() {
        list_bad(&bad);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_file_names_are_refused() {
        let ok = feature_names(&[PathBuf::from("a/x.jpg"), PathBuf::from("a/y.jpg")]).unwrap();
        assert_eq!(ok, ["x.jpg", "y.jpg"]);
        let e = feature_names(&[PathBuf::from("a/x.jpg"), PathBuf::from("b/x.jpg")]).unwrap_err();
        assert!(e.to_string().contains("b/x.jpg") && e.to_string().contains("a/x.jpg"), "{e}");
    }

    #[test]
    fn split_batch_keeps_rows() {
        let y = Tensor::from_vec((0..12).map(|v| v as f32).collect(), &[2, 3, 2]).unwrap();
        let parts = split_batch(&y).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1].dims(), &[3, 2]);
        assert_eq!(parts[1].to_f32_vec(), [6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
    }
}
