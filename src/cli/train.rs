//! `capgen train`: arguments to a `train::TrainConfig`, then the training loop (`crate::train`).

use crate::cli::TrainArgs;
use crate::data::captions::CaptionFormat;
use crate::error::Result;
use crate::model::checkpoint::DecoderKind;
use crate::train::{train, TrainConfig};

pub fn run(a: &TrainArgs) -> Result<()> {
    let mut cfg = TrainConfig::new(a.captions.clone(), a.features.clone(), a.out.clone());
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
