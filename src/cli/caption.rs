//! `capgen caption --model M --weights W|random --image FILE... [--beam K] [--attention-map OUT.png]`:
//! runs the encoder the checkpoint was trained with (its `encoder` metadata; ResNet-50 when empty; for
//! a `capgen demo` model, the ResNet config and image preprocessing recorded in its `hyper`) at
//! the layer its decoder reads (pooled for show-tell, grid for attention), decodes, and prints
//! `file: caption` per image.
//!
//! A model trained with `capgen train --fine-tune-encoder` carries its fine-tuned encoder (the
//! checkpoint's `encoder.*` tensors, with config and preprocessing in `hyper`): that encoder is used
//! and `--weights` is not needed (if given, a note says it is not used).
//!
//! `--attention-map OUT.png` (attention decoder only) writes the panel grid of
//! `model::attention_map` for each image: OUT.png for one image; with several, OUT-1.png, OUT-2.png, ...
//! in the order of the images (the number before the extension).

use std::path::{Path, PathBuf};

use crate::cli::demo::Preprocess;
use crate::cli::evaluate::{decoder_ref, feature_dims, search_config};
use crate::cli::progress::bar;
use crate::cli::CaptionArgs;
use crate::data::image::{
    collect_images, load_rgb, normalize_chw, resize_center_crop, stack, CROP, RESIZE_SHORTER,
};
use crate::error::{Error, Result};
use crate::model::attention_map::{render, save_png};
use crate::model::checkpoint::{Captioner, DecoderKind};
use crate::model::search::generate;
use crate::nn::resnet::ResNet;
use crate::nn::{load_encoder, Encoder, EncoderKind, FeatureLayer};
use crate::tensor::Tensor;
use crate::train::e2e::normalize;
use crate::weights::TensorFile;

/// Images per encoder batch.
const BATCH: usize = 8;

/// The attention-map path of image `k` (0-based) of `n`: OUT itself for one image, else OUT-<k+1>.ext.
pub fn map_path(out: &Path, k: usize, n: usize) -> PathBuf {
    if n == 1 {
        return out.to_path_buf();
    }
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = match out.extension() {
        Some(ext) => format!("{stem}-{}.{}", k + 1, ext.to_string_lossy()),
        None => format!("{stem}-{}", k + 1),
    };
    out.with_file_name(name)
}

pub fn run(args: &CaptionArgs) -> Result<()> {
    if args.beam == 0 {
        return Err(Error::msg("--beam 0: use a beam width of at least 1"));
    }
    let file = TensorFile::load(&args.model)?;
    let model = Captioner::from_file(&file)?;
    let embedded = Captioner::embedded_encoder(&file);
    drop(file);
    if args.attention_map.is_some() && model.kind() != DecoderKind::Attention {
        return Err(Error::msg(format!(
            "--attention-map needs an attention model, but {} is a {} model",
            args.model.display(),
            model.kind().name()
        )));
    }
    // A model from `capgen demo` records its own encoder config and preprocessing.
    let demo = Preprocess::from_hyper(&model.hyper, &args.model)?;
    let kind = if model.encoder.is_empty() || demo.is_some() {
        EncoderKind::ResNet50
    } else {
        EncoderKind::parse(&model.encoder)?
    };
    let layer = match model.kind() {
        DecoderKind::ShowTell => FeatureLayer::Pooled,
        DecoderKind::Attention => FeatureLayer::Grid,
    };
    let paths = collect_images(&args.image)?;
    if paths.is_empty() {
        return Err(Error::msg("no image given"));
    }
    if embedded.is_some() && demo.is_none() {
        return Err(Error::format(&args.model, "holds encoder weights but no encoder config in `hyper`"));
    }
    if args.weights.is_empty() && embedded.is_none() {
        return Err(Error::msg(format!(
            "--weights W.safetensors is required: {} holds no fine-tuned encoder",
            args.model.display()
        )));
    }
    if embedded.is_some() && !args.weights.is_empty() {
        eprintln!(
            "note: using the fine-tuned encoder inside {} (--weights {} not used)",
            args.model.display(),
            args.weights
        );
    }
    let encoder: Box<dyn Encoder> = match &demo {
        Some(pp) if embedded.is_some() => {
            Box::new(ResNet::from_tensor_file(&pp.encoder, embedded.as_ref().expect("checked"))?)
        }
        Some(pp) if args.weights == "random" => Box::new(ResNet::random(&pp.encoder, 0)),
        Some(pp) => {
            Box::new(ResNet::from_tensor_file(&pp.encoder, &TensorFile::load(Path::new(&args.weights))?)?)
        }
        None => load_encoder(kind, &args.weights, 0)?,
    };
    let want = feature_dims(&model);
    // Shorter side before the centre crop: recorded by fine-tuning (e.g. 256 for 224); the demo's
    // models crop at the size they resize to.
    let resize = |s: usize| model.hyper["preprocess"]["resize"].as_u64().map_or(s, |r| (r as usize).max(s));
    let cfg = search_config(&model, args.beam);
    let pb = bar(paths.len(), "captioning");
    for (c, chunk) in paths.chunks(BATCH).enumerate() {
        let imgs = chunk.iter().map(|p| load_rgb(p)).collect::<Result<Vec<_>>>()?;
        let (crops, x) = match &demo {
            Some(pp) => {
                let s = pp.image_size;
                let crops: Vec<_> = imgs.iter().map(|i| resize_center_crop(i, resize(s), s)).collect();
                let data: Vec<f32> = crops.iter().flat_map(|c| normalize(c, pp.mean, pp.std)).collect();
                let x = Tensor::from_vec(data, &[crops.len(), 3, s, s])?;
                (crops, x)
            }
            None => {
                let crops: Vec<_> =
                    imgs.iter().map(|i| resize_center_crop(i, RESIZE_SHORTER, CROP)).collect();
                let x = stack(&crops.iter().map(normalize_chw).collect::<Vec<_>>())?;
                (crops, x)
            }
        };
        let f = encoder.features(&x, layer)?;
        if f.dims()[1..] != want[..] {
            return Err(Error::format(
                &args.model,
                format!(
                    "the {} model expects features {:?} but the {} encoder gives {:?}",
                    model.kind().name(),
                    want,
                    model.encoder,
                    &f.dims()[1..]
                ),
            ));
        }
        let gens = generate(decoder_ref(&model), &model.dims, &f.to_f32_vec(), &cfg)?;
        for (i, (p, g)) in chunk.iter().zip(&gens).enumerate() {
            pb.suspend(|| println!("{}: {}", p.display(), model.vocab.decode_string(&g.tokens)));
            if let Some(out) = &args.attention_map {
                let mut words: Vec<String> =
                    g.tokens.iter().map(|&t| model.vocab.decode_string(&[t])).collect();
                if g.finished {
                    words.push("<end>".into());
                }
                let panel = render(&crops[i], &words, &g.alphas, model.dims.regions)?;
                save_png(&panel, &map_path(out, c * BATCH + i, paths.len()))?;
            }
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(())
}
