//! Training loop, checkpoints and resume (`capgen train`).
//!
//! Files written next to `--out MODEL.safetensors` (each atomically: temp file + rename):
//! - `MODEL.safetensors`        the best model so far by validation BLEU-4 (a `model::checkpoint`);
//! - `MODEL.last.safetensors`   the model after the latest finished epoch;
//! - `MODEL.state.safetensors`  the resume state after the latest finished epoch: parameters
//!   (`param.NAME`), Adam moments (`adam_m.NAME`, `adam_v.NAME`) and in the metadata the Adam step,
//!   epochs done, seed, best score, epochs without improvement, history, data fingerprint and dims;
//! - `MODEL.curve.png`          train loss, validation loss and validation BLEU-4 per epoch.
//!
//! One epoch: the batches of `data::loader` (a pure function of (seed, epoch)), each a teacher-forced
//! forward/backward, gradient clipping by global norm, one Adam step; then validation loss (teacher
//! forced), greedy captions of every validation image scored with BLEU-4, history, files. Since the
//! state is written at epoch boundaries and nothing else carries randomness, a run stopped at any
//! point (even kill -9 mid-epoch) and resumed with `--resume` gives the same weights as a run that
//! never stopped. A non-finite loss stops training with an error naming the epoch and step; the files
//! of the last finished epoch are left untouched.
//!
//! Options on top: `dropout` (on the LSTM output; its mask stream `drop_rng` is in the state as
//! `dropout_rng`, so resume stays exact); `init` (start the decoder, vocabulary and sizes from a
//! model); `fine_tune` (`finetune`: features come from a trainable ResNet run on the images, whose
//! last blocks train with their own Adam; the state then also holds `enc.NAME` weights and
//! `enc_adam_{m,v}.NAME` moments, and each model file the encoder as `encoder.NAME`).

pub mod e2e;
pub mod finetune;
pub mod plot;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use crate::cpu::adam::{clip_grad_norm, Adam, AdamConfig};
use crate::cpu::loss::cross_entropy_forward;
use crate::data::captions::{read_captions, CaptionFormat, CaptionMap};
use crate::data::loader::{BatchLoader, LoaderConfig};
use crate::data::split::resolve_split;
use crate::data::vocab::{Vocab, END, PAD, START};
use crate::error::{Error, Result};
use crate::metrics::{score, BleuMode};
use crate::model::checkpoint::{param_shapes, Captioner, DecoderKind, DecoderParams};
use crate::model::decoder::{
    attention_backward, attention_forward, attention_init, attention_step, show_tell_backward,
    show_tell_forward, show_tell_init, show_tell_step, Batch, DecoderDims,
};
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::train::finetune::{distinct, FineTuneConfig, ImageEncoder};
use crate::weights::{save_safetensors, TensorFile};

/// The `format` metadata of a resume state file.
pub const STATE_FORMAT: &str = "capgen-train-state";

/// Everything `capgen train` needs.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub captions: PathBuf,
    pub caption_format: Option<CaptionFormat>,
    pub features: PathBuf,
    pub split: Option<PathBuf>,
    pub out: PathBuf,
    pub decoder: DecoderKind,
    /// Total epochs (a resumed run continues up to this many).
    pub epochs: usize,
    pub batch: usize,
    pub lr: f32,
    pub seed: u64,
    pub resume: bool,
    /// Longest caption in words (training truncates, generation stops there).
    pub max_len: usize,
    pub min_count: usize,
    /// Stop after this many epochs without a better validation BLEU-4 (0: never).
    pub patience: usize,
    /// Gradient clipping by global norm (0: off).
    pub clip: f32,
    /// Weight of the doubly stochastic attention regulariser (attention decoder only).
    pub alpha_c: f32,
    pub embed: usize,
    pub hidden: usize,
    pub att: usize,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Abort (as if killed, writing nothing) after this many optimiser steps of this run; for tests.
    pub abort_after_steps: Option<u64>,
    /// Dropout probability on the LSTM output before the output layer (0: off).
    pub dropout: f32,
    /// Start the decoder (and take its vocabulary and sizes) from this model checkpoint.
    pub init: Option<PathBuf>,
    /// Train the encoder's last blocks too, from images (`features` is then unused).
    pub fine_tune: Option<FineTuneConfig>,
}

impl TrainConfig {
    /// Defaults as Show, Attend and Tell (lr 4e-4, alpha_c 1, 512-wide layers), batch 64, 10 epochs.
    pub fn new(captions: PathBuf, features: PathBuf, out: PathBuf) -> Self {
        TrainConfig {
            captions,
            caption_format: None,
            features,
            split: None,
            out,
            decoder: DecoderKind::Attention,
            epochs: 10,
            batch: 64,
            lr: 4e-4,
            seed: 0,
            resume: false,
            max_len: 30,
            min_count: 5,
            patience: 5,
            clip: 5.0,
            alpha_c: 1.0,
            embed: 512,
            hidden: 512,
            att: 512,
            progress: false,
            abort_after_steps: None,
            dropout: 0.0,
            init: None,
            fine_tune: None,
        }
    }
}

/// The paths written next to the model (see the module docs).
pub fn last_path(out: &Path) -> PathBuf {
    sibling(out, "last.safetensors")
}
pub fn state_path(out: &Path) -> PathBuf {
    sibling(out, "state.safetensors")
}
pub fn curve_path(out: &Path) -> PathBuf {
    sibling(out, "curve.png")
}

/// `dir/MODEL.safetensors` -> `dir/MODEL.<suffix>`.
fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = name.strip_suffix(".safetensors").unwrap_or(&name);
    out.with_file_name(format!("{stem}.{suffix}"))
}

/// One finished epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    /// Mean cross-entropy per target token over the epoch's batches (nats; the attention
    /// regulariser is trained on but not included).
    pub train_loss: f64,
    /// Mean teacher-forced cross-entropy per target token on the validation captions.
    pub val_loss: f64,
    /// Validation BLEU-4 (COCO definition) of greedy captions, a fraction in [0, 1].
    pub bleu4: f64,
    pub seconds: f64,
}

impl EpochRecord {
    fn to_json(&self) -> Value {
        json!({"epoch": self.epoch, "train_loss": self.train_loss, "val_loss": self.val_loss,
               "bleu4": self.bleu4, "seconds": self.seconds})
    }
    fn from_json(v: &Value) -> Option<EpochRecord> {
        Some(EpochRecord {
            epoch: v.get("epoch")?.as_u64()? as usize,
            train_loss: v.get("train_loss")?.as_f64()?,
            val_loss: v.get("val_loss")?.as_f64()?,
            bleu4: v.get("bleu4")?.as_f64()?,
            seconds: v.get("seconds")?.as_f64()?,
        })
    }
}

/// What a training run did.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    pub history: Vec<EpochRecord>,
    pub best_epoch: usize,
    pub best_bleu4: f64,
    pub stopped_early: bool,
    /// Messages printed (warnings and per-epoch lines), for tests.
    pub log: Vec<String>,
}

/// Features of a set of images, widened to f32 and packed: image i owns `data[i*n..(i+1)*n]`.
struct Features {
    index: BTreeMap<String, usize>,
    data: Vec<f32>,
    /// Values per image: D (pooled) or L*D (grid).
    per_image: usize,
    regions: usize,
    feat: usize,
    encoder: String,
}

impl Features {
    fn get(&self, name: &str) -> Option<&[f32]> {
        self.index.get(name).map(|&i| &self.data[i * self.per_image..(i + 1) * self.per_image])
    }

    /// Rows of `names` stacked: (B,D) or (B,L,D).
    fn gather(&self, names: &[String]) -> Vec<f32> {
        let mut out = Vec::with_capacity(names.len() * self.per_image);
        for n in names {
            out.extend_from_slice(self.get(n).expect("images without features were filtered out"));
        }
        out
    }
}

/// Reads the features file: every tensor must have the same shape, (D) for show-tell (pooled) or
/// (L,D) for attention (grid); the wrong kind is refused with a line saying what to extract.
fn load_features(path: &Path, kind: DecoderKind) -> Result<Features> {
    let file = TensorFile::load(path)?;
    let Some((first_name, first)) = file.tensors.iter().next() else {
        return Err(Error::format(path, "holds no feature tensors"));
    };
    let dims = first.dims().to_vec();
    let (regions, feat) = match (kind, dims.as_slice()) {
        (DecoderKind::ShowTell, &[d]) => (1, d),
        (DecoderKind::Attention, &[l, d]) => (l, d),
        (DecoderKind::ShowTell, _) => {
            return Err(Error::format(
                path,
                format!(
                    "holds grid features {dims:?} (e.g. `{first_name}`); the show-tell decoder needs pooled \
                     features (D): run `capgen extract --layer pooled`, or train with --decoder attention"
                ),
            ))
        }
        (DecoderKind::Attention, _) => {
            return Err(Error::format(
                path,
                format!(
                    "holds pooled features {dims:?} (e.g. `{first_name}`); the attention decoder needs grid \
                     features (L, D): run `capgen extract --layer grid`, or train with --decoder show-tell"
                ),
            ))
        }
    };
    if regions * feat == 0 {
        return Err(Error::format(path, format!("feature tensor `{first_name}` is empty {dims:?}")));
    }
    let per_image = regions * feat;
    let first_name = first_name.clone();
    let encoder = file.metadata.get("encoder").cloned().unwrap_or_default();
    let mut index = BTreeMap::new();
    let mut data = Vec::with_capacity(file.tensors.len() * per_image);
    // Consumed tensor by tensor, so the file's copy is freed as the f32 copy grows.
    for (name, t) in file.tensors {
        if t.dims() != dims.as_slice() {
            return Err(Error::format(
                path,
                format!("feature `{name}` has shape {:?} but `{first_name}` has {dims:?}", t.dims()),
            ));
        }
        data.extend(t.to_f32_vec());
        index.insert(name, index.len());
    }
    Ok(Features { index, data, per_image, regions, feat, encoder })
}

/// A decoder batch built from a loader batch: inputs are `<start> w1 .. wn`, targets `w1 .. wn <end>`
/// (T-1 steps), `<pad>` past each row's length.
struct StepBatch {
    feats: Vec<f32>,
    tokens: Vec<u32>,
    targets: Vec<u32>,
    lengths: Vec<usize>,
    steps: usize,
}

impl StepBatch {
    fn new(b: &crate::data::loader::Batch, features: &Features) -> StepBatch {
        StepBatch::with_feats(b, features.gather(&b.images))
    }

    /// `feats`: the rows' features, (B,D) or (B,L,D).
    fn with_feats(b: &crate::data::loader::Batch, feats: Vec<f32>) -> StepBatch {
        let steps = b.time.saturating_sub(1);
        let mut tokens = vec![PAD; b.batch * steps];
        let mut targets = vec![PAD; b.batch * steps];
        let lengths: Vec<usize> = b.lengths.iter().map(|&n| n.saturating_sub(1)).collect();
        for r in 0..b.batch {
            let row = b.row(r);
            for t in 0..lengths[r] {
                tokens[r * steps + t] = row[t];
                targets[r * steps + t] = row[t + 1];
            }
        }
        StepBatch { feats, tokens, targets, lengths, steps }
    }

    fn view(&self) -> Batch<'_> {
        Batch {
            feats: &self.feats,
            tokens: &self.tokens,
            targets: &self.targets,
            lengths: &self.lengths,
            steps: self.steps,
        }
    }
}

/// One teacher-forced forward + backward; gradients accumulate into `grads` (zeroed by the caller).
/// Returns the cross-entropy, the attention regulariser and the number of target tokens.
/// With `dropout` = (p, mask stream) the decoder drops its LSTM output. With `enc`, the rows'
/// features come from the trainable encoder (forward on the batch's distinct images) and the
/// encoder's gradients are computed too (its `zero_grad` is done here).
fn train_step(
    model: &Captioner,
    grads: &mut DecoderParams,
    b: &crate::data::loader::Batch,
    features: Option<&Features>,
    enc: Option<&mut ImageEncoder>,
    alpha_c: f32,
    dropout: Option<(f32, &mut Rng)>,
) -> Result<(f32, f32, usize)> {
    let d = &model.dims;
    let Some(enc) = enc else {
        let sb = StepBatch::new(b, features.expect("features without an encoder"));
        let batch = sb.view();
        let loss = match (&model.params, grads) {
            (DecoderParams::ShowTell(p), DecoderParams::ShowTell(g)) => {
                let mut fw = show_tell_forward(p, d, &batch, dropout)?;
                show_tell_backward(p, g, d, &batch, &mut fw, 0.0)?
            }
            (DecoderParams::Attention(p), DecoderParams::Attention(g)) => {
                let mut fw = attention_forward(p, d, &batch, dropout)?;
                attention_backward(p, g, d, &batch, &mut fw, alpha_c, 0.0, false)?
            }
            _ => unreachable!("gradients are built with zeros_like of the parameters"),
        };
        return Ok((loss.ce, loss.reg, loss.tokens));
    };
    let (DecoderParams::Attention(p), DecoderParams::Attention(g)) = (&model.params, grads) else {
        unreachable!("fine-tuning is refused for show-tell before training starts")
    };
    // Each distinct image once through the encoder: (U,L*C); rows repeat their image's features.
    let (names, of_row) = distinct(&b.images);
    let (f, cache) = enc.forward_train(&names)?;
    let per = d.regions * d.feat;
    let mut rows = Vec::with_capacity(of_row.len() * per);
    for &i in &of_row {
        rows.extend_from_slice(&f[i * per..(i + 1) * per]);
    }
    let sb = StepBatch::with_feats(b, rows);
    let batch = sb.view();
    let mut fw = attention_forward(p, d, &batch, dropout)?;
    let loss = attention_backward(p, g, d, &batch, &mut fw, alpha_c, 0.0, true)?;
    // dL/dfeats of the rows (R,L,C) summed into their images (U,L,C).
    let mut df = vec![0.0f32; f.len()];
    for (r, &i) in of_row.iter().enumerate() {
        let src = &fw.dfeats[r * per..(r + 1) * per];
        df[i * per..(i + 1) * per].iter_mut().zip(src).for_each(|(a, &v)| *a += v);
    }
    enc.net.zero_grad();
    enc.net.backward(&cache, &df)?;
    Ok((loss.ce, loss.reg, loss.tokens))
}

/// Grid features of `names` from the encoder in eval mode, as a `Features` (for validation).
fn encode_features(enc: &ImageEncoder, names: &[String], regions: usize, feat: usize) -> Result<Features> {
    let mut data = Vec::with_capacity(names.len() * regions * feat);
    let mut index = BTreeMap::new();
    for chunk in names.chunks(32) {
        data.extend(enc.features_eval(chunk)?);
        for n in chunk {
            index.insert(n.clone(), index.len());
        }
    }
    Ok(Features { index, data, per_image: regions * feat, regions, feat, encoder: enc.net.cfg.name() })
}

/// Teacher-forced cross-entropy without backward (validation): (loss, tokens). The attention
/// regulariser is left out so the number compares across decoders and alpha_c.
fn eval_loss(model: &Captioner, batch: &Batch) -> Result<(f32, usize)> {
    let d = &model.dims;
    let (b, t, v) = (batch.lengths.len(), batch.steps, d.vocab);
    match &model.params {
        DecoderParams::ShowTell(p) => {
            let fw = show_tell_forward(p, d, batch, None)?;
            let ce = cross_entropy_forward(&fw.logits, batch.targets, v, 0.0, Some(PAD));
            Ok((ce.loss, ce.count))
        }
        DecoderParams::Attention(p) => {
            let fw = attention_forward(p, d, batch, None)?;
            let logits = fw.logits_padded(b, t, v);
            let ce = cross_entropy_forward(&logits, batch.targets, v, 0.0, Some(PAD));
            Ok((ce.loss, ce.count))
        }
    }
}

/// Greedy captions (token ids, `<end>` excluded) for `feats` (B,D) or (B,L,D), at most `max_len` words.
pub fn greedy(model: &Captioner, feats: &[f32]) -> Result<Vec<Vec<u32>>> {
    let d = &model.dims;
    let v = d.vocab;
    let argmax = |row: &[f32]| {
        let mut best = 0;
        for (k, &x) in row.iter().enumerate() {
            if x > row[best] {
                best = k;
            }
        }
        best as u32
    };
    let (mut state, att1) = match &model.params {
        DecoderParams::ShowTell(p) => (show_tell_init(p, d, feats)?, Vec::new()),
        DecoderParams::Attention(p) => attention_init(p, d, feats)?,
    };
    let b = state.h.len() / d.hidden;
    let mut out = vec![Vec::new(); b];
    let mut done = vec![false; b];
    let mut tokens = vec![START; b];
    for _ in 0..=model.max_len {
        let logits = match &model.params {
            DecoderParams::ShowTell(p) => show_tell_step(p, d, &mut state, &tokens)?,
            DecoderParams::Attention(p) => attention_step(p, d, feats, &att1, &mut state, &tokens)?.0,
        };
        for r in 0..b {
            let w = argmax(&logits[r * v..(r + 1) * v]);
            tokens[r] = w;
            if !done[r] {
                if w == END || out[r].len() == model.max_len {
                    done[r] = true;
                } else {
                    out[r].push(w);
                }
            }
        }
        if done.iter().all(|&x| x) {
            break;
        }
    }
    Ok(out)
}

/// Validation: teacher-forced loss over every caption, greedy BLEU-4 over every image.
fn validate(
    model: &Captioner,
    loader: &BatchLoader,
    captions: &CaptionMap,
    features: &Features,
) -> Result<(f64, f64)> {
    let (mut total, mut count) = (0.0f64, 0usize);
    for b in loader.batches_from(0, 0) {
        let sb = StepBatch::new(&b, features);
        let (l, n) = eval_loss(model, &sb.view())?;
        total += l as f64 * n as f64;
        count += n;
    }
    let val_loss = if count > 0 { total / count as f64 } else { 0.0 };
    let mut hyps = BTreeMap::new();
    let mut refs = BTreeMap::new();
    for chunk in loader.images().chunks(64) {
        let feats = features.gather(chunk);
        for (name, ids) in chunk.iter().zip(greedy(model, &feats)?) {
            hyps.insert(name.clone(), model.vocab.decode_string(&ids));
            refs.insert(name.clone(), captions[name].clone());
        }
    }
    let s = score(&refs, &hyps, BleuMode::Coco)?;
    Ok((val_loss, s.bleu[3]))
}

/// A short hash (FNV-1a 64) of the training data as the model sees it: vocabulary, dims, the train
/// and validation images and their captions. A resume must find the same.
fn fingerprint(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.as_bytes().iter().chain(&[0xff]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// The mutable state a resume restores.
struct RunState {
    adam: Adam,
    epochs_done: usize,
    best_bleu4: f64,
    best_epoch: usize,
    bad_epochs: usize,
    history: Vec<EpochRecord>,
    /// The dropout mask stream (advanced only when dropout is on).
    drop_rng: Rng,
}

/// The dropout stream a fresh run starts from.
fn dropout_rng(seed: u64) -> Rng {
    Rng::for_name(seed, "train/dropout")
}

/// Writes the resume state; with an encoder (fine-tuning), also its weights, running statistics
/// and Adam moments (`finetune::ImageEncoder::state_tensors`) and its setup (`finetune` metadata).
fn save_state(
    path: &Path,
    model: &Captioner,
    st: &RunState,
    seed: u64,
    data_fp: &str,
    enc: Option<&mut ImageEncoder>,
) -> Result<()> {
    let shapes = param_shapes(model.kind(), &model.dims);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (k, ((name, p), (_, shape))) in model.params.named().into_iter().zip(&shapes).enumerate() {
        tensors.push((format!("param.{name}"), Tensor::from_vec(p.to_vec(), shape)?));
        tensors.push((format!("adam_m.{name}"), Tensor::from_vec(st.adam.m[k].clone(), shape)?));
        tensors.push((format!("adam_v.{name}"), Tensor::from_vec(st.adam.v[k].clone(), shape)?));
    }
    let mut m = BTreeMap::new();
    if let Some(enc) = enc {
        tensors.extend(enc.state_tensors()?);
        m.insert("finetune".to_string(), enc.describe());
    }
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let d = &model.dims;
    m.insert("format".to_string(), STATE_FORMAT.to_string());
    m.insert("decoder".into(), model.kind().name().into());
    m.insert("dims".into(), json!([d.vocab, d.embed, d.feat, d.regions, d.hidden, d.att]).to_string());
    m.insert("vocab".into(), model.vocab.to_json_string());
    m.insert("data".into(), data_fp.to_string());
    m.insert("seed".into(), seed.to_string());
    m.insert("adam_step".into(), st.adam.t.to_string());
    m.insert("epochs_done".into(), st.epochs_done.to_string());
    // f64 -> JSON number round-trips exactly (serde_json prints the shortest exact form).
    m.insert("best_bleu4".into(), json!(st.best_bleu4).to_string());
    m.insert("best_epoch".into(), st.best_epoch.to_string());
    m.insert("bad_epochs".into(), st.bad_epochs.to_string());
    m.insert("dropout_rng".into(), st.drop_rng.state().to_string());
    m.insert(
        "history".into(),
        Value::Array(st.history.iter().map(EpochRecord::to_json).collect()).to_string(),
    );
    save_safetensors(path, &refs, &m)
}

/// Restores the state into `model` (whose dims, decoder and vocab must match) and returns it.
fn load_state(
    path: &Path,
    model: &mut Captioner,
    adam_cfg: AdamConfig,
    seed: u64,
    data_fp: &str,
    enc: Option<&mut ImageEncoder>,
) -> Result<RunState> {
    let file = TensorFile::load(path)?;
    let src = &file.path;
    let meta = |k: &str| -> Result<&str> {
        file.metadata.get(k).map(String::as_str).ok_or_else(|| {
            Error::format(src, format!("not a capgen resume state (no `{k}` in its metadata)"))
        })
    };
    if meta("format")? != STATE_FORMAT {
        return Err(Error::format(src, "not a capgen resume state"));
    }
    let mismatch = |what: &str, theirs: &str, ours: &str| {
        Error::format(
            src,
            format!(
                "cannot resume: the saved run has {what} {theirs} but this run has {ours} \
                 (same captions, split, features and model options needed; or train afresh without --resume)"
            ),
        )
    };
    if meta("decoder")? != model.kind().name() {
        return Err(mismatch("decoder", meta("decoder")?, model.kind().name()));
    }
    let d = &model.dims;
    let dims = json!([d.vocab, d.embed, d.feat, d.regions, d.hidden, d.att]).to_string();
    let saved_vocab = Vocab::from_json_str(src, meta("vocab")?)?;
    if saved_vocab != model.vocab {
        return Err(mismatch(
            "a different vocabulary:",
            &format!("{} words", saved_vocab.len()),
            &format!("{} words (or the same count, different words)", model.vocab.len()),
        ));
    }
    if meta("dims")? != dims {
        return Err(mismatch("dims [vocab,embed,feat,regions,hidden,att]", meta("dims")?, &dims));
    }
    if meta("data")? != data_fp {
        return Err(mismatch("data fingerprint", meta("data")?, data_fp));
    }
    if meta("seed")? != seed.to_string() {
        return Err(mismatch("seed", meta("seed")?, &seed.to_string()));
    }
    let int = |k: &str| -> Result<u64> {
        meta(k)?.parse::<u64>().map_err(|_| Error::format(src, format!("`{k}` is not an integer")))
    };
    let theirs = file.metadata.get("finetune").map(String::as_str).unwrap_or("none");
    let ours = enc.as_ref().map(|e| e.describe()).unwrap_or_else(|| "none".into());
    if theirs != ours {
        return Err(mismatch("encoder fine-tuning setup", theirs, &ours));
    }
    let shapes = param_shapes(model.kind(), &model.dims);
    let mut expected = Vec::new();
    for (name, shape) in &shapes {
        for pre in ["param", "adam_m", "adam_v"] {
            expected.push((format!("{pre}.{name}"), shape.clone()));
        }
    }
    let mut enc = enc;
    if let Some(e) = enc.as_deref_mut() {
        expected.extend(e.state_shapes());
    }
    file.check_exact(&expected, "this run's model (resume state)")?;
    if let Some(e) = enc {
        e.restore(&file, int("adam_step")?)?;
    }
    // States written before dropout existed carry no stream: they were trained without dropout.
    let drop_rng = match file.metadata.get("dropout_rng") {
        Some(v) => {
            Rng::new(v.parse::<u64>().map_err(|_| Error::format(src, "`dropout_rng` is not an integer"))?)
        }
        None => dropout_rng(seed),
    };
    let mut adam = Adam::new(adam_cfg, &shapes.iter().map(|(_, s)| s.iter().product()).collect::<Vec<_>>());
    for (k, ((name, p), (_, shape))) in model.params.named_mut().into_iter().zip(&shapes).enumerate() {
        p.copy_from_slice(&file.require_f32(&format!("param.{name}"), shape)?);
        adam.m[k] = file.require_f32(&format!("adam_m.{name}"), shape)?;
        adam.v[k] = file.require_f32(&format!("adam_v.{name}"), shape)?;
    }
    adam.t = int("adam_step")?;
    let history: Value = serde_json::from_str(meta("history")?)
        .map_err(|e| Error::format(src, format!("`history` is not valid JSON: {e}")))?;
    let history = history
        .as_array()
        .and_then(|a| a.iter().map(EpochRecord::from_json).collect::<Option<Vec<_>>>())
        .ok_or_else(|| Error::format(src, "`history` is not a list of epoch records"))?;
    let best_bleu4 =
        meta("best_bleu4")?.parse::<f64>().map_err(|_| Error::format(src, "`best_bleu4` is not a number"))?;
    Ok(RunState {
        adam,
        epochs_done: int("epochs_done")? as usize,
        best_bleu4,
        best_epoch: int("best_epoch")? as usize,
        bad_epochs: int("bad_epochs")? as usize,
        history,
        drop_rng,
    })
}

/// Runs `capgen train` (see the module docs).
pub fn train(cfg: &TrainConfig) -> Result<TrainSummary> {
    let mut log = Vec::new();
    let mut say = |s: String| {
        eprintln!("{s}");
        log.push(s);
    };
    if cfg.batch == 0 || cfg.epochs == 0 || cfg.max_len == 0 {
        return Err(Error::msg("--batch, --epochs and --max-len must be at least 1"));
    }
    let finite_nonneg = |x: f32| x.is_finite() && x >= 0.0;
    if !(finite_nonneg(cfg.lr) && cfg.lr > 0.0 && finite_nonneg(cfg.clip) && finite_nonneg(cfg.alpha_c)) {
        return Err(Error::msg("--lr must be positive, --clip and --alpha-c non-negative"));
    }
    if cfg.embed == 0 || cfg.hidden == 0 || cfg.att == 0 {
        return Err(Error::msg("--embed, --hidden and --att-dim must be at least 1"));
    }
    if !(cfg.dropout.is_finite() && (0.0..1.0).contains(&cfg.dropout)) {
        return Err(Error::msg(format!("--dropout {}: must be in [0, 1)", cfg.dropout)));
    }
    // A decoder to start from: its kind, sizes and vocabulary win over the options.
    let init = cfg.init.as_deref().map(Captioner::load).transpose()?;
    let kind = init.as_ref().map_or(cfg.decoder, |m| m.kind());
    if cfg.fine_tune.is_some() && kind != DecoderKind::Attention {
        return Err(Error::msg(
            "--fine-tune-encoder trains through the attention decoder's feature gradient: use              --decoder attention (or an attention model with --init)",
        ));
    }
    // Captions, split, features.
    let (captions, report) = read_captions(&cfg.captions, cfg.caption_format)?;
    for w in report.warnings() {
        say(format!("warning: {w}"));
    }
    let (split, warnings) = resolve_split(cfg.split.as_deref(), &captions, cfg.seed)?;
    for w in warnings {
        say(format!("warning: {w}"));
    }
    // Where each image's features come from: the features file, or the encoder fine-tuned on images.
    let (features, mut enc) = match &cfg.fine_tune {
        None => (Some(load_features(&cfg.features, kind)?), None),
        Some(ft) => {
            let names: std::collections::BTreeSet<String> =
                split.train.iter().chain(&split.val).cloned().collect();
            (None, Some(ImageEncoder::new(ft, &names)?))
        }
    };
    let source = match &cfg.fine_tune {
        None => cfg.features.clone(),
        Some(ft) => ft.images.clone(),
    };
    let fname = source.display().to_string();
    let has = |n: &String| match (&features, &enc) {
        (Some(f), _) => f.get(n).is_some(),
        (None, Some(e)) => e.available.contains(n),
        (None, None) => unreachable!("one source"),
    };
    let keep = |part: &[String], what: &str, say: &mut dyn FnMut(String)| -> Vec<String> {
        let kept: Vec<String> =
            part.iter().filter(|n| has(n) && captions.contains_key(*n)).cloned().collect();
        let missing = part.iter().filter(|n| !has(n)).count();
        if missing > 0 {
            let lacks = if enc.is_some() { "have no image file" } else { "have no features" };
            say(format!("warning: {fname}: {missing} of {} {what} images {lacks} (skipped)", part.len()));
        }
        kept
    };
    let train_imgs = keep(&split.train, "training", &mut say);
    let val_imgs = keep(&split.val, "validation", &mut say);
    let what = if enc.is_some() { "an image file" } else { "features" };
    if train_imgs.is_empty() {
        return Err(Error::format(
            &source,
            format!(
                "none of the {} training images has both {what} and captions: {}",
                split.train.len(),
                if enc.is_some() {
                    "are these the caption file's images?"
                } else {
                    "was it extracted from these images?"
                }
            ),
        ));
    }
    if val_imgs.is_empty() {
        return Err(Error::format(
            &source,
            format!("none of the {} validation images has both {what} and captions", split.val.len()),
        ));
    }
    let vocab = match &init {
        Some(m) => m.vocab.clone(),
        None => Vocab::from_caption_map(&captions, &train_imgs, cfg.min_count),
    };
    let lcfg = LoaderConfig::new(cfg.batch, cfg.seed, cfg.max_len);
    let (loader, lrep) = BatchLoader::new(&captions, &train_imgs, &vocab, lcfg)?;
    let (val_loader, _) = BatchLoader::new(&captions, &val_imgs, &vocab, lcfg)?;
    say(format!(
        "train: {} images, {} captions ({} truncated to {} words, {:.1}% words <unk>); val: {} images; \
         vocabulary {} words (min count {})",
        train_imgs.len(),
        loader.num_pairs(),
        lrep.encode.truncated,
        cfg.max_len,
        100.0 * lrep.encode.unk_words as f64 / lrep.encode.words.max(1) as f64,
        val_imgs.len(),
        vocab.len(),
        cfg.min_count
    ));
    let (regions, feat) = match (&features, &enc) {
        (Some(f), _) => (f.regions, f.feat),
        (None, Some(e)) => e.grid_dims()?,
        (None, None) => unreachable!("one source"),
    };
    let dims = match &init {
        Some(m) => {
            if (m.dims.regions, m.dims.feat) != (regions, feat) {
                return Err(Error::format(
                    cfg.init.as_deref().expect("init"),
                    format!(
                        "was trained on features ({}, {}) but {fname} gives ({regions}, {feat}) \
                         (regions, channels): another encoder or image size",
                        m.dims.regions, m.dims.feat
                    ),
                ));
            }
            m.dims
        }
        None => DecoderDims {
            vocab: vocab.len(),
            embed: cfg.embed,
            feat,
            regions,
            hidden: cfg.hidden,
            att: cfg.att,
        },
    };
    let data_fp = fingerprint(&[
        &vocab.to_json_string(),
        &train_imgs.join("\n"),
        &val_imgs.join("\n"),
        &format!("{} {} {}", loader.num_pairs(), cfg.max_len, cfg.batch),
    ]);
    let mut model = match init {
        Some(mut m) => {
            m.max_len = cfg.max_len;
            m
        }
        None => Captioner::init(kind, dims, vocab, cfg.max_len, cfg.seed)?,
    };
    model.encoder = match (&features, &enc) {
        (Some(f), _) => f.encoder.clone(),
        (_, Some(e)) => e.net.cfg.name(),
        (None, None) => unreachable!("one source"),
    };
    let adam_cfg = AdamConfig { lr: cfg.lr, ..AdamConfig::default() };
    let sizes: Vec<usize> = model.params.named().iter().map(|(_, p)| p.len()).collect();
    let sp = state_path(&cfg.out);
    let mut st = if cfg.resume {
        if !sp.exists() {
            return Err(Error::msg(format!(
                "{}: no resume state to continue from (train without --resume first)",
                sp.display()
            )));
        }
        let st = load_state(&sp, &mut model, adam_cfg, cfg.seed, &data_fp, enc.as_mut())?;
        say(format!("resuming after epoch {} (step {})", st.epochs_done, st.adam.t));
        st
    } else {
        RunState {
            adam: Adam::new(adam_cfg, &sizes),
            epochs_done: 0,
            best_bleu4: f64::NEG_INFINITY,
            best_epoch: 0,
            bad_epochs: 0,
            history: Vec::new(),
            drop_rng: dropout_rng(cfg.seed),
        }
    };
    if let Some(e) = &enc {
        say(format!(
            "fine-tuning {}: the last {} of {} pieces (stem + blocks) trained, batch-norm statistics \
             frozen, encoder lr {}, images {}x{}",
            e.net.cfg.name(),
            e.blocks,
            e.net.num_pieces(),
            e.adam.cfg.lr,
            e.size,
            e.size
        ));
    }
    let mut grads = model.params.zeros_like();
    let mut steps_this_run = 0u64;
    let mut stopped_early = cfg.patience > 0 && st.bad_epochs >= cfg.patience;
    while st.epochs_done < cfg.epochs && !stopped_early {
        let epoch = st.epochs_done + 1;
        let t0 = Instant::now();
        let pb = if cfg.progress {
            crate::cli::progress::bar(loader.num_batches(), &format!("epoch {epoch}"))
        } else {
            indicatif::ProgressBar::hidden()
        };
        let (mut loss_sum, mut tok_sum) = (0.0f64, 0usize);
        for (k, b) in loader.batches_from(st.epochs_done as u64, 0).enumerate() {
            if cfg.abort_after_steps.is_some_and(|n| steps_this_run >= n) {
                pb.finish_and_clear();
                return Err(Error::msg(format!(
                    "aborted after {steps_this_run} steps (--abort-after-steps)"
                )));
            }
            grads.zero();
            let drop = (cfg.dropout > 0.0).then_some((cfg.dropout, &mut st.drop_rng));
            let (ce, reg, ntok) =
                train_step(&model, &mut grads, &b, features.as_ref(), enc.as_mut(), cfg.alpha_c, drop)?;
            let loss = ce + reg;
            let mut gviews: Vec<&mut [f32]> = grads.named_mut().into_iter().map(|(_, g)| g).collect();
            // One global norm over the decoder's and the encoder's gradients; each has its own Adam.
            let n_dec = gviews.len();
            let mut enc_params: Vec<&mut [f32]> = Vec::new();
            let mut enc_adam = None;
            if let Some(e) = enc.as_mut() {
                for (_, p, g) in e.net.trainable_params_mut() {
                    enc_params.push(p);
                    gviews.push(g);
                }
                enc_adam = Some(&mut e.adam);
            }
            let norm = if cfg.clip > 0.0 {
                clip_grad_norm(&mut gviews, cfg.clip)
            } else {
                crate::cpu::adam::global_norm(&gviews.iter().map(|g| &**g).collect::<Vec<_>>())
            };
            if !loss.is_finite() || !norm.is_finite() {
                pb.finish_and_clear();
                return Err(Error::msg(format!(
                    "non-finite {} ({}) at epoch {epoch}, step {} (batch {} of the epoch): stopping; {}",
                    if loss.is_finite() { "gradient norm" } else { "loss" },
                    if loss.is_finite() { norm } else { loss },
                    st.adam.t + 1,
                    k + 1,
                    if st.epochs_done > 0 {
                        format!(
                            "the checkpoint of epoch {} ({}) is untouched",
                            st.epochs_done,
                            cfg.out.display()
                        )
                    } else {
                        "no checkpoint was written".to_string()
                    }
                )));
            }
            let gref: Vec<&[f32]> = gviews.iter().map(|g| &**g).collect();
            let mut pviews: Vec<&mut [f32]> = model.params.named_mut().into_iter().map(|(_, p)| p).collect();
            st.adam.step(&mut pviews, &gref[..n_dec]);
            if let Some(a) = enc_adam {
                a.step(&mut enc_params, &gref[n_dec..]);
            }
            steps_this_run += 1;
            loss_sum += ce as f64 * ntok as f64;
            tok_sum += ntok;
            let secs = t0.elapsed().as_secs_f64().max(1e-9);
            pb.set_message(format!(
                "epoch {epoch} loss {:.3} {:.0} tok/s",
                loss_sum / tok_sum.max(1) as f64,
                tok_sum as f64 / secs
            ));
            pb.inc(1);
        }
        pb.finish_and_clear();
        let train_loss = loss_sum / tok_sum.max(1) as f64;
        let train_secs = t0.elapsed().as_secs_f64();
        let (val_loss, bleu4) = match (&features, &enc) {
            (Some(f), _) => validate(&model, &val_loader, &captions, f)?,
            (None, Some(e)) => {
                let vf = encode_features(e, val_loader.images(), model.dims.regions, model.dims.feat)?;
                validate(&model, &val_loader, &captions, &vf)?
            }
            (None, None) => unreachable!("one source"),
        };
        if !val_loss.is_finite() {
            return Err(Error::msg(format!(
                "non-finite validation loss after epoch {epoch} (step {}): stopping; {}",
                st.adam.t,
                if st.epochs_done > 0 {
                    format!("the checkpoint of epoch {} ({}) is untouched", st.epochs_done, cfg.out.display())
                } else {
                    "no checkpoint was written".to_string()
                }
            )));
        }
        let rec = EpochRecord { epoch, train_loss, val_loss, bleu4, seconds: t0.elapsed().as_secs_f64() };
        st.history.push(rec);
        st.epochs_done = epoch;
        let improved = bleu4 > st.best_bleu4;
        if improved {
            st.best_bleu4 = bleu4;
            st.best_epoch = epoch;
            st.bad_epochs = 0;
        } else {
            st.bad_epochs += 1;
        }
        model.hyper = json!({
            "decoder": kind.name(), "epochs": epoch, "batch": cfg.batch, "lr": cfg.lr,
            "seed": cfg.seed, "max_len": cfg.max_len, "min_count": cfg.min_count, "clip": cfg.clip,
            "alpha_c": cfg.alpha_c, "epoch": epoch, "val_bleu4": bleu4, "val_loss": val_loss,
            "dropout": cfg.dropout, "captions": cfg.captions.display().to_string(),
        });
        match &enc {
            None => model.hyper["features"] = json!(cfg.features.display().to_string()),
            Some(e) => {
                model.hyper["images"] = json!(fname);
                // The encoder config and preprocessing `capgen caption` honours (as for the demo).
                if let Value::Object(extra) = e.hyper() {
                    for (k, v) in extra {
                        model.hyper[k] = v;
                    }
                }
            }
        }
        if let Some(p) = &cfg.init {
            model.hyper["init"] = json!(p.display().to_string());
        }
        // Order: last model, then (if better) the best, then the resume state, then the curve. A kill
        // between them leaves an older but consistent state: resume redoes this epoch identically.
        // A fine-tuned model carries its encoder's weights (`model::checkpoint::ENCODER_PREFIX`).
        let enc_sd = enc.as_ref().map(|e| e.net.state_dict());
        let save_model = |path: &Path| match &enc_sd {
            Some(sd) => model.save_with_encoder(path, sd),
            None => model.save(path),
        };
        save_model(&last_path(&cfg.out))?;
        if improved {
            save_model(&cfg.out)?;
        }
        save_state(&sp, &model, &st, cfg.seed, &data_fp, enc.as_mut())?;
        plot::write_curve(&curve_path(&cfg.out), &st.history)?;
        say(format!(
            "epoch {epoch}: train loss {train_loss:.4}, val loss {val_loss:.4}, val BLEU-4 {:.2}{} \
             ({:.1}s: training {:.0} tokens/s, validation {:.1}s)",
            100.0 * bleu4,
            if improved { " (best)" } else { "" },
            t0.elapsed().as_secs_f64(),
            tok_sum as f64 / train_secs.max(1e-9),
            t0.elapsed().as_secs_f64() - train_secs
        ));
        if cfg.patience > 0 && st.bad_epochs >= cfg.patience {
            say(format!(
                "early stop: no better val BLEU-4 for {} epochs (best {:.2} at epoch {})",
                st.bad_epochs,
                100.0 * st.best_bleu4,
                st.best_epoch
            ));
            stopped_early = true;
        }
    }
    Ok(TrainSummary {
        history: st.history,
        best_epoch: st.best_epoch,
        best_bleu4: st.best_bleu4,
        stopped_early,
        log,
    })
}
