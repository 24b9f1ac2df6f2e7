//! The training batch loader over (image, caption) pairs.
//!
//! One epoch's order, a pure function of (seed, epoch):
//! 1. shuffle all pair indices with `Rng::for_name(seed, "loader/epoch/{epoch}")`;
//! 2. cut the shuffled list into buckets of `batch_size * bucket_batches` pairs and sort each bucket
//!    by decreasing caption length (stable, so ties keep the shuffled order);
//! 3. cut each bucket into batches of `batch_size` (only the very last batch can be short; it is
//!    dropped with `drop_last`);
//! 4. shuffle the order of the batches with the same stream.
//!
//! Sorting inside a bucket makes the captions of one batch nearly equal in length, so padding is
//! small, while the bucket shuffle keeps batches random. Rows of a batch come in decreasing length,
//! so a decoder can shrink its active batch at each time step. Because the order depends only on
//! (seed, epoch), training resumes exactly with `batches_from(epoch, next_batch)`.
//!
//! A batch's token matrix is `(B, T)` row-major `u32`: `<start> w1 .. wn <end>` then `<pad>` (0) up to
//! `T` = the longest caption in the batch; `lengths[b]` counts `<start>` and `<end>`.

use crate::data::captions::CaptionMap;
use crate::data::tokenize::tokenize;
use crate::data::vocab::{EncodeStats, Vocab, PAD};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Default number of batches per length bucket.
pub const DEFAULT_BUCKET_BATCHES: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub seed: u64,
    /// Batches per bucket; 1 sorts each batch alone (no padding saved), large values approach a
    /// global sort (little randomness left in batch composition).
    pub bucket_batches: usize,
    /// Drop the last batch when it is short.
    pub drop_last: bool,
    /// Longest caption, in words (longer ones are truncated and counted).
    pub max_words: usize,
}

impl LoaderConfig {
    pub fn new(batch_size: usize, seed: u64, max_words: usize) -> Self {
        LoaderConfig { batch_size, seed, bucket_batches: DEFAULT_BUCKET_BATCHES, drop_last: false, max_words }
    }
}

/// What building the loader found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoaderReport {
    pub encode: EncodeStats,
    /// Images of the part that have no caption (skipped).
    pub images_without_captions: usize,
}

/// One padded batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// (B, T) row-major, `<pad>`-filled.
    pub tokens: Vec<u32>,
    /// B
    pub batch: usize,
    /// T
    pub time: usize,
    /// (B) tokens in each row, `<start>` and `<end>` included; non-increasing.
    pub lengths: Vec<usize>,
    /// (B) index into [`BatchLoader::images`].
    pub image_ids: Vec<usize>,
    /// (B) image file names (the feature file's tensor names).
    pub images: Vec<String>,
    /// (B) which caption of that image (its position in the caption file).
    pub caption_ids: Vec<usize>,
}

impl Batch {
    /// Row `b` of the token matrix, padding included.
    pub fn row(&self, b: usize) -> &[u32] {
        &self.tokens[b * self.time..(b + 1) * self.time]
    }
}

pub struct BatchLoader {
    images: Vec<String>,
    /// (image id, caption index) per pair.
    pairs: Vec<(usize, usize)>,
    /// Encoded caption per pair.
    encoded: Vec<Vec<u32>>,
    cfg: LoaderConfig,
}

impl BatchLoader {
    /// A loader over every caption of `images` (e.g. the train part of a split), in that order.
    pub fn new(
        captions: &CaptionMap,
        images: &[String],
        vocab: &Vocab,
        cfg: LoaderConfig,
    ) -> Result<(Self, LoaderReport)> {
        if cfg.batch_size == 0 || cfg.bucket_batches == 0 {
            return Err(Error::msg("batch size and bucket size must be at least 1"));
        }
        let mut report = LoaderReport::default();
        let (mut names, mut pairs, mut encoded) = (Vec::new(), Vec::new(), Vec::new());
        for name in images {
            let Some(caps) = captions.get(name) else {
                report.images_without_captions += 1;
                continue;
            };
            let id = names.len();
            names.push(name.clone());
            for (k, c) in caps.iter().enumerate() {
                let (ids, s) = vocab.encode_tokens(&tokenize(c), cfg.max_words);
                report.encode.add(s);
                pairs.push((id, k));
                encoded.push(ids);
            }
        }
        if pairs.is_empty() {
            return Err(Error::msg(format!(
                "no caption for any of the {} images of this part: do the split and the caption file name the same images?",
                images.len()
            )));
        }
        Ok((BatchLoader { images: names, pairs, encoded, cfg }, report))
    }

    pub fn images(&self) -> &[String] {
        &self.images
    }

    pub fn num_pairs(&self) -> usize {
        self.pairs.len()
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// Batches per epoch.
    pub fn num_batches(&self) -> usize {
        let (n, b) = (self.pairs.len(), self.cfg.batch_size);
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The pair indices of every batch of `epoch`, in order.
    pub fn epoch_plan(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut rng = Rng::for_name(self.cfg.seed, &format!("loader/epoch/{epoch}"));
        let mut order: Vec<usize> = (0..self.pairs.len()).collect();
        rng.shuffle(&mut order);
        let b = self.cfg.batch_size;
        for bucket in order.chunks_mut(b * self.cfg.bucket_batches) {
            bucket.sort_by_key(|&i| std::cmp::Reverse(self.encoded[i].len()));
        }
        let mut batches: Vec<Vec<usize>> = order.chunks(b).map(<[usize]>::to_vec).collect();
        if self.cfg.drop_last && batches.last().is_some_and(|l| l.len() < b) {
            batches.pop();
        }
        rng.shuffle(&mut batches);
        batches
    }

    /// Pads the given pairs into a batch.
    pub fn make_batch(&self, pairs: &[usize]) -> Batch {
        let time = pairs.iter().map(|&i| self.encoded[i].len()).max().unwrap_or(0);
        let mut tokens = vec![PAD; pairs.len() * time];
        for (row, &i) in tokens.chunks_mut(time.max(1)).zip(pairs) {
            row[..self.encoded[i].len()].copy_from_slice(&self.encoded[i]);
        }
        Batch {
            tokens,
            batch: pairs.len(),
            time,
            lengths: pairs.iter().map(|&i| self.encoded[i].len()).collect(),
            image_ids: pairs.iter().map(|&i| self.pairs[i].0).collect(),
            images: pairs.iter().map(|&i| self.images[self.pairs[i].0].clone()).collect(),
            caption_ids: pairs.iter().map(|&i| self.pairs[i].1).collect(),
        }
    }

    /// The batches of `epoch` from batch `start` on (0 for a fresh epoch; the next unseen batch when
    /// resuming).
    pub fn batches_from(&self, epoch: u64, start: usize) -> impl Iterator<Item = Batch> + '_ {
        self.epoch_plan(epoch).into_iter().skip(start).map(move |p| self.make_batch(&p))
    }
}
