//! Joint (end-to-end) training of a small trainable ResNet encoder and the attention decoder from
//! scratch, on images held in memory (`capgen demo`).
//!
//! One step, for a batch of B images each with its K captions (R = B*K decoder rows):
//! ```text
//! x (B,3,S,S) -> TrainResNet::forward_train (batch-norm in training mode) -> feats (B,L,C)
//! feats repeated per caption row (R,L,C), rows sorted longest first
//!   -> attention_forward / attention_backward (feats_grad) -> dL/dfeats (R,L,C)
//! dL/dfeats summed back over each image's rows (B,L,C) -> TrainResNet::backward
//! one global-norm clip and one Adam step over the decoder's and the encoder's parameters together
//! ```
//! The loss is the decoder's mean cross-entropy per target token (plus the doubly stochastic
//! attention regulariser), so the encoder sees exactly the gradient of that same loss.

use std::collections::BTreeMap;
use std::time::Instant;

use rayon::prelude::*;

use crate::cpu::adam::{clip_grad_norm, Adam, AdamConfig};
use crate::cpu::loss::cross_entropy_forward;
use crate::data::captions::CaptionMap;
use crate::data::image::RgbImage;
use crate::data::vocab::{Vocab, PAD, START};
use crate::error::{Error, Result};
use crate::metrics::{score, BleuMode};
use crate::model::checkpoint::{Captioner, DecoderKind, DecoderParams};
use crate::model::decoder::{attention_backward, attention_forward, Batch, DecoderDims};
use crate::model::search::{generate, DecoderRef, Generated, SearchConfig};
use crate::nn::resnet::ResNetConfig;
use crate::nn::train_resnet::TrainResNet;
use crate::nn::FeatureLayer;
use crate::rng::Rng;
use crate::train::EpochRecord;

/// Normalisation the demo trains with (ImageNet's, as elsewhere in capgen; recorded in the model).
pub const MEAN: [f32; 3] = crate::data::image::MEAN;
pub const STD: [f32; 3] = crate::data::image::STD;

/// The learning rate at the end of the cosine schedule, as a share of the peak.
pub const LR_FLOOR: f32 = 0.05;

/// Cosine learning-rate schedule: `lr` at step 0, `lr * LR_FLOOR` at the last of `total` steps.
pub fn cosine_lr(lr: f32, step: usize, total: usize) -> f32 {
    let f = if total <= 1 { 0.0 } else { step as f32 / (total - 1) as f32 };
    let c = 0.5 * (1.0 + (std::f32::consts::PI * f).cos());
    lr * (LR_FLOOR + (1.0 - LR_FLOOR) * c)
}

/// Settings of one joint training run.
#[derive(Clone, Debug)]
pub struct E2eConfig {
    pub encoder: ResNetConfig,
    /// Side of the (square) training images.
    pub image_size: usize,
    pub epochs: usize,
    /// Images per step (each brings all its captions).
    pub batch: usize,
    /// Peak learning rate; it follows a cosine from `lr` down to `lr * LR_FLOOR` over the run.
    pub lr: f32,
    pub clip: f32,
    pub alpha_c: f32,
    pub embed: usize,
    pub hidden: usize,
    pub att: usize,
    pub max_len: usize,
    pub seed: u64,
    pub progress: bool,
}

/// The trained pair and what happened.
pub struct E2eResult {
    pub encoder: TrainResNet,
    pub model: Captioner,
    pub history: Vec<EpochRecord>,
    /// Entropy (nats) of the unigram distribution of the training target tokens (words and `<end>`):
    /// the loss of the best model that ignores both image and context.
    pub unigram_entropy: f64,
}

/// (3,S,S) f32 from an (S,S,3) u8 image: `(v/255 - mean[c]) / std[c]`.
pub fn normalize(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let hw = img.width * img.height;
    let mut out = vec![0.0f32; 3 * hw];
    for c in 0..3 {
        for (i, v) in out[c * hw..(c + 1) * hw].iter_mut().enumerate() {
            *v = (img.data[i * 3 + c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    out
}

/// (N,3,S,S) batch of `imgs` (all S x S, checked by the caller).
fn stack(imgs: &[&RgbImage]) -> Vec<f32> {
    let parts: Vec<Vec<f32>> = imgs.par_iter().map(|im| normalize(im, MEAN, STD)).collect();
    parts.concat()
}

/// Entropy (nats) of the unigram distribution of `seqs`' tokens.
pub fn unigram_entropy(seqs: &[Vec<u32>]) -> f64 {
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    let mut total = 0usize;
    for s in seqs {
        for &t in s {
            *counts.entry(t).or_default() += 1;
            total += 1;
        }
    }
    counts
        .values()
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum()
}

/// Decoder rows for some images: inputs `<start> w1..wn`, targets `w1..wn <end>`, sorted longest
/// first (the decoder's contract), with the image index of each row.
struct Rows {
    tokens: Vec<u32>,
    targets: Vec<u32>,
    lengths: Vec<usize>,
    steps: usize,
    image: Vec<usize>,
}

/// `caps[i]` are the encoded captions (`<start> .. <end>`) of image i of the batch.
fn make_rows(caps: &[&[Vec<u32>]]) -> Rows {
    let mut all: Vec<(usize, &Vec<u32>)> =
        caps.iter().enumerate().flat_map(|(i, cs)| cs.iter().map(move |c| (i, c))).collect();
    // Stable sort: equal lengths keep image order, so the batch is a pure function of its inputs.
    all.sort_by_key(|(_, c)| std::cmp::Reverse(c.len()));
    let steps = all.iter().map(|(_, c)| c.len().saturating_sub(1)).max().unwrap_or(0);
    let r = all.len();
    let mut rows = Rows {
        tokens: vec![PAD; r * steps],
        targets: vec![PAD; r * steps],
        lengths: Vec::with_capacity(r),
        steps,
        image: Vec::with_capacity(r),
    };
    for (k, (i, c)) in all.iter().enumerate() {
        let n = c.len() - 1;
        for t in 0..n {
            rows.tokens[k * steps + t] = c[t];
            rows.targets[k * steps + t] = c[t + 1];
        }
        rows.lengths.push(n);
        rows.image.push(*i);
    }
    rows
}

/// (R,L*C) features of each row from the (B,L*C) image features.
fn gather(feats: &[f32], per: usize, image: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(image.len() * per);
    for &i in image {
        out.extend_from_slice(&feats[i * per..(i + 1) * per]);
    }
    out
}

/// Encodes every caption of `names` (`<start> words <end>`, at most `max_len` words).
fn encode_all(captions: &CaptionMap, names: &[String], vocab: &Vocab, max_len: usize) -> Vec<Vec<Vec<u32>>> {
    names.iter().map(|n| captions[n].iter().map(|c| vocab.encode(c, max_len).0).collect()).collect()
}

/// Grid features (N,L,C) of `imgs` with the encoder in eval mode, in chunks of 64.
pub fn encode_eval(enc: &TrainResNet, imgs: &[&RgbImage]) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for chunk in imgs.chunks(64) {
        let s = chunk[0].width;
        let x = stack(chunk);
        out.extend(enc.forward_eval(&x, chunk.len(), s, s, FeatureLayer::Grid)?);
    }
    Ok(out)
}

/// Captions `imgs` (beam width `beam`).
pub fn caption_images(
    enc: &TrainResNet,
    model: &Captioner,
    imgs: &[&RgbImage],
    beam: usize,
) -> Result<Vec<Generated>> {
    let DecoderParams::Attention(p) = &model.params else {
        return Err(Error::msg("end-to-end training uses the attention decoder"));
    };
    let cfg = SearchConfig { beam, max_len: model.max_len + 1, ..SearchConfig::default() };
    let mut out = Vec::new();
    for chunk in imgs.chunks(64) {
        let f = encode_eval(enc, chunk)?;
        out.extend(generate(DecoderRef::Attention(p), &model.dims, &f, &cfg)?);
    }
    Ok(out)
}

/// Validation with the encoder in eval mode: teacher-forced cross-entropy per token, and BLEU-4
/// (COCO) of greedy captions against the raw references `refs` (in the order of `imgs`).
fn validate(
    enc: &TrainResNet,
    model: &Captioner,
    imgs: &[&RgbImage],
    caps: &[Vec<Vec<u32>>],
    refs: &[Vec<String>],
) -> Result<(f64, f64)> {
    let DecoderParams::Attention(p) = &model.params else { unreachable!("attention decoder") };
    let d = &model.dims;
    let per = d.regions * d.feat;
    let (mut sum, mut count) = (0.0f64, 0usize);
    let scfg = SearchConfig { beam: 1, max_len: model.max_len + 1, ..SearchConfig::default() };
    let (mut hyps, mut refmap) = (BTreeMap::new(), BTreeMap::new());
    for (ci, chunk) in imgs.chunks(32).enumerate() {
        let f = encode_eval(enc, chunk)?;
        for (k, g) in generate(DecoderRef::Attention(p), d, &f, &scfg)?.iter().enumerate() {
            let i = ci * 32 + k;
            hyps.insert(i.to_string(), model.vocab.decode_string(&g.tokens));
            refmap.insert(i.to_string(), refs[i].clone());
        }
        let cs: Vec<&[Vec<u32>]> = caps[ci * 32..ci * 32 + chunk.len()].iter().map(|c| &c[..]).collect();
        let rows = make_rows(&cs);
        let rf = gather(&f, per, &rows.image);
        let batch = Batch {
            feats: &rf,
            tokens: &rows.tokens,
            targets: &rows.targets,
            lengths: &rows.lengths,
            steps: rows.steps,
        };
        let fw = attention_forward(p, d, &batch, None)?;
        let logits = fw.logits_padded(rows.lengths.len(), rows.steps, d.vocab);
        let ce = cross_entropy_forward(&logits, &rows.targets, d.vocab, 0.0, Some(PAD));
        sum += ce.loss as f64 * ce.count as f64;
        count += ce.count;
    }
    let bleu4 = score(&refmap, &hyps, BleuMode::Coco)?.bleu[3];
    Ok((sum / count.max(1) as f64, bleu4))
}

/// Trains encoder and decoder jointly on `train` (name, image) pairs, reporting validation loss per
/// epoch on `val`. `vocab` is built by the caller from the training captions.
pub fn train_e2e(
    cfg: &E2eConfig,
    captions: &CaptionMap,
    vocab: Vocab,
    train: &[(String, RgbImage)],
    val: &[(String, RgbImage)],
) -> Result<E2eResult> {
    if train.is_empty() || val.is_empty() {
        return Err(Error::msg("end-to-end training needs training and validation images"));
    }
    if cfg.batch == 0 || cfg.epochs == 0 {
        return Err(Error::msg("batch and epochs must be at least 1"));
    }
    let s = cfg.image_size;
    if let Some((n, im)) = train.iter().chain(val).find(|(_, im)| im.width != s || im.height != s) {
        return Err(Error::msg(format!(
            "{n}: image is {}x{}, the demo trains on {s}x{s} images",
            im.width, im.height
        )));
    }
    let mut enc = TrainResNet::random(&cfg.encoder, cfg.seed);
    // Grid size: probe the encoder once with one image.
    let probe = enc.forward_eval(&stack(&[&train[0].1]), 1, s, s, FeatureLayer::Grid)?;
    let feat = cfg.encoder.feature_dim();
    let regions = probe.len() / feat;
    let dims =
        DecoderDims { vocab: vocab.len(), embed: cfg.embed, feat, regions, hidden: cfg.hidden, att: cfg.att };
    let mut model = Captioner::init(DecoderKind::Attention, dims, vocab, cfg.max_len, cfg.seed)?;
    let train_names: Vec<String> = train.iter().map(|(n, _)| n.clone()).collect();
    let val_names: Vec<String> = val.iter().map(|(n, _)| n.clone()).collect();
    let train_caps = encode_all(captions, &train_names, &model.vocab, cfg.max_len);
    let val_caps = encode_all(captions, &val_names, &model.vocab, cfg.max_len);
    // Targets are every token after <start>.
    let targets: Vec<Vec<u32>> = train_caps.iter().flatten().map(|c| c[1..].to_vec()).collect();
    debug_assert!(train_caps.iter().flatten().all(|c| c[0] == START));
    let unigram = unigram_entropy(&targets);
    let val_imgs: Vec<&RgbImage> = val.iter().map(|(_, im)| im).collect();
    let val_refs: Vec<Vec<String>> = val_names.iter().map(|n| captions[n].clone()).collect();

    let mut sizes: Vec<usize> = model.params.named().iter().map(|(_, p)| p.len()).collect();
    sizes.extend(enc.params.iter().map(|p| p.data.len()));
    let mut adam = Adam::new(AdamConfig { lr: cfg.lr, ..AdamConfig::default() }, &sizes);
    let mut grads = model.params.zeros_like();
    let per = regions * feat;
    let mut history = Vec::new();
    let steps_per_epoch = train.len().div_ceil(cfg.batch);
    let pb = if cfg.progress {
        crate::cli::progress::bar(steps_per_epoch * cfg.epochs, "training")
    } else {
        indicatif::ProgressBar::hidden()
    };
    for epoch in 1..=cfg.epochs {
        let t0 = Instant::now();
        let mut order: Vec<usize> = (0..train.len()).collect();
        Rng::for_name(cfg.seed, &format!("e2e/epoch/{epoch}")).shuffle(&mut order);
        let (mut loss_sum, mut tok_sum) = (0.0f64, 0usize);
        for idx in order.chunks(cfg.batch) {
            let imgs: Vec<&RgbImage> = idx.iter().map(|&i| &train[i].1).collect();
            let x = stack(&imgs);
            let (f, cache) = enc.forward_train(&x, idx.len(), s, s, FeatureLayer::Grid)?;
            let cs: Vec<&[Vec<u32>]> = idx.iter().map(|&i| &train_caps[i][..]).collect();
            let rows = make_rows(&cs);
            let rf = gather(&f, per, &rows.image);
            let batch = Batch {
                feats: &rf,
                tokens: &rows.tokens,
                targets: &rows.targets,
                lengths: &rows.lengths,
                steps: rows.steps,
            };
            let DecoderParams::Attention(p) = &model.params else { unreachable!("attention decoder") };
            let DecoderParams::Attention(g) = &mut grads else { unreachable!("attention decoder") };
            g.zero();
            let mut fw = attention_forward(p, &model.dims, &batch, None)?;
            let loss = attention_backward(p, g, &model.dims, &batch, &mut fw, cfg.alpha_c, 0.0, true)?;
            // dL/dfeats of the rows (R,L,C) summed into their images (B,L,C).
            let mut df = vec![0.0f32; f.len()];
            for (k, &i) in rows.image.iter().enumerate() {
                let src = &fw.dfeats[k * per..(k + 1) * per];
                for (a, b) in df[i * per..(i + 1) * per].iter_mut().zip(src) {
                    *a += b;
                }
            }
            enc.zero_grad();
            enc.backward(&cache, &df)?;
            let mut gviews: Vec<&mut [f32]> = grads.named_mut().into_iter().map(|(_, g)| g).collect();
            let mut pviews: Vec<&mut [f32]> = model.params.named_mut().into_iter().map(|(_, p)| p).collect();
            for prm in enc.params.iter_mut() {
                gviews.push(&mut prm.grad[..]);
                pviews.push(&mut prm.data[..]);
            }
            let norm = clip_grad_norm(&mut gviews, if cfg.clip > 0.0 { cfg.clip } else { f32::INFINITY });
            let total = loss.ce + loss.reg;
            if !total.is_finite() || !norm.is_finite() {
                pb.finish_and_clear();
                return Err(Error::msg(format!(
                    "non-finite loss or gradient at epoch {epoch}, step {}: stopping (try a lower learning rate)",
                    adam.t + 1
                )));
            }
            let gref: Vec<&[f32]> = gviews.iter().map(|g| &**g).collect();
            adam.cfg.lr = cosine_lr(cfg.lr, adam.t as usize, steps_per_epoch * cfg.epochs);
            adam.step(&mut pviews, &gref);
            loss_sum += loss.ce as f64 * loss.tokens as f64;
            tok_sum += loss.tokens;
            pb.set_message(format!(
                "epoch {epoch}/{} loss {:.3}",
                cfg.epochs,
                loss_sum / tok_sum.max(1) as f64
            ));
            pb.inc(1);
        }
        let train_loss = loss_sum / tok_sum.max(1) as f64;
        let (vl, bleu4) = validate(&enc, &model, &val_imgs, &val_caps, &val_refs)?;
        history.push(EpochRecord {
            epoch,
            train_loss,
            val_loss: vl,
            bleu4,
            seconds: t0.elapsed().as_secs_f64(),
        });
        pb.suspend(|| {
            if cfg.progress {
                eprintln!(
                    "epoch {epoch}: train loss {train_loss:.4}, val loss {vl:.4}, val BLEU-4 (greedy) {:.4} ({:.1}s)",
                    bleu4,
                    t0.elapsed().as_secs_f64()
                );
            }
        });
    }
    pb.finish_and_clear();
    Ok(E2eResult { encoder: enc, model, history, unigram_entropy: unigram })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unigram_entropy_of_known_distributions() {
        // Uniform over 4 tokens: ln 4; a single token: 0.
        let u = unigram_entropy(&[vec![1, 2], vec![3, 4]]);
        assert!((u - 4f64.ln()).abs() < 1e-12, "{u}");
        assert_eq!(unigram_entropy(&[vec![5, 5, 5]]), 0.0);
        // p = (3/4, 1/4): -(0.75 ln 0.75 + 0.25 ln 0.25).
        let h = unigram_entropy(&[vec![7, 7, 7, 9]]);
        let want = -(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln());
        assert!((h - want).abs() < 1e-12, "{h} vs {want}");
    }

    #[test]
    fn rows_are_sorted_longest_first_and_shifted() {
        let a = [vec![1, 10, 11, 2]];
        let b = [vec![1, 12, 2], vec![1, 13, 14, 15, 2]];
        let r = make_rows(&[&a[..], &b[..]]);
        assert_eq!(r.lengths, vec![4, 3, 2]);
        assert_eq!(r.image, vec![1, 0, 1]);
        assert_eq!(r.steps, 4);
        assert_eq!(&r.tokens[0..4], &[1, 13, 14, 15]);
        assert_eq!(&r.targets[0..4], &[13, 14, 15, 2]);
        assert_eq!(&r.tokens[8..12], &[1, 12, 0, 0]);
        assert_eq!(&r.targets[8..12], &[12, 2, 0, 0]);
    }
}
