//! `capgen train`: arguments to a `train::TrainConfig`, then the training loop (`crate::train`).

use crate::cli::TrainArgs;
use crate::data::captions::CaptionFormat;
use crate::error::{Error, Result};
use crate::model::checkpoint::DecoderKind;
use crate::train::finetune::FineTuneConfig;
use crate::train::{train, TrainConfig};

pub fn run(a: &TrainArgs) -> Result<()> {
    let fine_tune = if a.fine_tune_encoder {
        let (Some(images), Some(weights)) = (&a.images, &a.weights) else {
            return Err(Error::msg(
                "--fine-tune-encoder needs --images DIR (the caption file's images) and --weights W \
                 (torchvision-named encoder weights)",
            ));
        };
        if a.features.is_some() {
            return Err(Error::msg("--fine-tune-encoder reads --images, not --features: drop one"));
        }
        let mut ft = FineTuneConfig::new(images.clone(), weights.clone());
        ft.encoder = a.encoder.clone();
        ft.lr = a.encoder_lr;
        ft.blocks = a.fine_tune_blocks;
        ft.image_size = a.image_size;
        Some(ft)
    } else {
        if a.images.is_some() || a.weights.is_some() || a.fine_tune_blocks.is_some() {
            return Err(Error::msg("--images, --weights and --fine-tune-blocks go with --fine-tune-encoder"));
        }
        None
    };
    let features = match (&a.features, &fine_tune) {
        (Some(f), _) => f.clone(),
        (None, Some(_)) => Default::default(),
        (None, None) => return Err(Error::msg(
            "--features FEATS.safetensors is required (or --fine-tune-encoder with --images and --weights)",
        )),
    };
    let mut cfg = TrainConfig::new(a.captions.clone(), features, a.out.clone());
    cfg.fine_tune = fine_tune;
    cfg.dropout = a.dropout;
    cfg.init = a.init.clone();
    cfg.caption_format = a.caption_format.as_deref().map(str::parse::<CaptionFormat>).transpose()?;
    cfg.split = a.split.clone();
    cfg.decoder = DecoderKind::parse(&a.decoder)?;
    cfg.epochs = a.epochs;
    cfg.batch = a.batch;
    cfg.lr = a.lr;
    cfg.seed = a.seed;
    cfg.resume = a.resume;
    cfg.max_len = a.max_len;
    cfg.min_count = a.min_count;
    cfg.patience = a.patience;
    cfg.clip = a.clip;
    cfg.alpha_c = a.alpha_c;
    cfg.embed = a.embed;
    cfg.hidden = a.hidden;
    cfg.att = a.att_dim;
    cfg.progress = true;
    cfg.abort_after_steps = a.abort_after_steps;
    let s = train(&cfg)?;
    println!(
        "best val BLEU-4 {:.2} at epoch {} -> {}{}",
        100.0 * s.best_bleu4,
        s.best_epoch,
        a.out.display(),
        if s.stopped_early { " (stopped early)" } else { "" }
    );
    Ok(())
}
