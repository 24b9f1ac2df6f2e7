//! The vocabulary: special tokens `<pad>`=0 `<start>`=1 `<end>`=2 `<unk>`=3, then every training word
//! seen at least `min_count` times (default 5), by descending count, ties broken alphabetically (byte
//! order), so the same captions always give the same ids.
//!
//! Encoding wraps a caption as `<start> w1 .. wn <end>`; words not in the vocabulary become `<unk>`.
//! A caption of more than `max_words` words keeps its first `max_words` and still ends with `<end>`
//! (so an encoded caption has at most `max_words + 2` ids); [`EncodeStats`] counts the truncations.
//! Decoding stops at `<end>` and skips `<pad>` and `<start>`.
//!
//! The vocabulary travels in checkpoint metadata as JSON:
//! `{"min_count": 5, "words": ["<pad>", "<start>", "<end>", "<unk>", "a", ...]}`.

use std::collections::HashMap;

use crate::data::tokenize::tokenize;
use crate::error::{Error, Result};

pub const PAD: u32 = 0;
pub const START: u32 = 1;
pub const END: u32 = 2;
pub const UNK: u32 = 3;
pub const SPECIALS: [&str; 4] = ["<pad>", "<start>", "<end>", "<unk>"];
pub const DEFAULT_MIN_COUNT: usize = 5;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vocab {
    words: Vec<String>,
    index: HashMap<String, u32>,
    min_count: usize,
}

/// Counts from encoding a set of captions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncodeStats {
    pub captions: usize,
    /// Captions cut to `max_words`.
    pub truncated: usize,
    /// Words (after truncation) that mapped to `<unk>`.
    pub unk_words: usize,
    /// Words after truncation, `<start>`/`<end>` not counted.
    pub words: usize,
}

impl EncodeStats {
    pub fn add(&mut self, other: EncodeStats) {
        self.captions += other.captions;
        self.truncated += other.truncated;
        self.unk_words += other.unk_words;
        self.words += other.words;
    }
}

impl Vocab {
    /// Builds the vocabulary from tokenized training captions.
    pub fn from_tokens<'a, I, T>(captions: I, min_count: usize) -> Vocab
    where
        I: IntoIterator<Item = T>,
        T: IntoIterator<Item = &'a String>,
    {
        let mut counts: HashMap<&'a str, usize> = HashMap::new();
        for caption in captions {
            for w in caption {
                *counts.entry(w.as_str()).or_default() += 1;
            }
        }
        Vocab::from_counts(counts.into_iter(), min_count)
    }

    /// Builds the vocabulary from raw training captions, tokenized with [`tokenize`].
    pub fn from_captions<'a>(captions: impl IntoIterator<Item = &'a str>, min_count: usize) -> Vocab {
        // Count as we go rather than keeping every token list.
        let mut counts: HashMap<String, usize> = HashMap::new();
        for c in captions {
            for w in tokenize(c) {
                match counts.get_mut(&w) {
                    Some(n) => *n += 1,
                    None => {
                        counts.insert(w, 1);
                    }
                }
            }
        }
        Vocab::from_counts(counts.iter().map(|(w, &c)| (w.as_str(), c)), min_count)
    }

    /// Specials, then the words counted at least `min_count` times by descending count, ties by
    /// byte order.
    fn from_counts<'a>(counts: impl Iterator<Item = (&'a str, usize)>, min_count: usize) -> Vocab {
        let mut kept: Vec<(&str, usize)> =
            counts.filter(|&(w, c)| c >= min_count.max(1) && !SPECIALS.contains(&w)).collect();
        kept.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let words =
            SPECIALS.iter().map(|s| s.to_string()).chain(kept.into_iter().map(|(w, _)| w.to_string()));
        Vocab::from_words(words.collect(), min_count)
            .expect("specials first and words unique by construction")
    }

    /// Builds the vocabulary from the captions of `images` only (the training part of a split), so
    /// validation and test words never leak into it. Images without captions are ignored.
    pub fn from_caption_map(
        captions: &crate::data::captions::CaptionMap,
        images: &[String],
        min_count: usize,
    ) -> Vocab {
        let caps = images.iter().filter_map(|i| captions.get(i)).flatten().map(String::as_str);
        Vocab::from_captions(caps, min_count)
    }

    fn from_words(words: Vec<String>, min_count: usize) -> std::result::Result<Vocab, String> {
        if words.len() < SPECIALS.len() || words[..SPECIALS.len()].iter().zip(SPECIALS).any(|(a, b)| a != b) {
            return Err(format!("the first words must be {}", SPECIALS.join(" ")));
        }
        if words.len() > u32::MAX as usize {
            return Err("too many words".into());
        }
        let mut index = HashMap::with_capacity(words.len());
        for (i, w) in words.iter().enumerate() {
            if w.is_empty() || w.contains(char::is_whitespace) {
                return Err(format!("word {i} `{w}` is empty or contains whitespace"));
            }
            if index.insert(w.clone(), i as u32).is_some() {
                return Err(format!("word `{w}` appears twice"));
            }
        }
        Ok(Vocab { words, index, min_count })
    }

    /// Number of ids, specials included.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Never true: the four specials are always there.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    pub fn min_count(&self) -> usize {
        self.min_count
    }

    /// The id of `word`, or `<unk>`.
    pub fn id(&self, word: &str) -> u32 {
        self.index.get(word).copied().unwrap_or(UNK)
    }

    /// The word of `id`, if in range.
    pub fn word(&self, id: u32) -> Option<&str> {
        self.words.get(id as usize).map(String::as_str)
    }

    pub fn words(&self) -> &[String] {
        &self.words
    }

    /// `<start> w1 .. wn <end>` with at most `max_words` words.
    pub fn encode_tokens(&self, tokens: &[String], max_words: usize) -> (Vec<u32>, EncodeStats) {
        let kept = &tokens[..tokens.len().min(max_words)];
        let mut ids = Vec::with_capacity(kept.len() + 2);
        ids.push(START);
        let mut unk = 0;
        for w in kept {
            let id = self.id(w);
            unk += (id == UNK) as usize;
            ids.push(id);
        }
        ids.push(END);
        let stats = EncodeStats {
            captions: 1,
            truncated: (tokens.len() > max_words) as usize,
            unk_words: unk,
            words: kept.len(),
        };
        (ids, stats)
    }

    /// Tokenizes and encodes a raw caption.
    pub fn encode(&self, caption: &str, max_words: usize) -> (Vec<u32>, EncodeStats) {
        self.encode_tokens(&tokenize(caption), max_words)
    }

    /// Words of `ids` up to the first `<end>`, skipping `<pad>` and `<start>`; an id out of range
    /// reads as `<unk>`.
    pub fn decode(&self, ids: &[u32]) -> Vec<&str> {
        ids.iter()
            .take_while(|&&id| id != END)
            .filter(|&&id| id != PAD && id != START)
            .map(|&id| self.word(id).unwrap_or(SPECIALS[UNK as usize]))
            .collect()
    }

    /// [`Vocab::decode`] joined with single spaces.
    pub fn decode_string(&self, ids: &[u32]) -> String {
        self.decode(ids).join(" ")
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "min_count": self.min_count, "words": self.words })
    }

    pub fn to_json_string(&self) -> String {
        self.to_json().to_string()
    }

    /// Reads the JSON written by [`Vocab::to_json`]; `source` names where it came from in errors
    /// (e.g. the checkpoint file).
    pub fn from_json(source: &str, json: &serde_json::Value) -> Result<Vocab> {
        let bad = |m: String| Error::format(source, format!("vocabulary: {m}"));
        let words = json
            .get("words")
            .and_then(|w| w.as_array())
            .ok_or_else(|| bad("no `words` array".into()))?
            .iter()
            .enumerate()
            .map(|(i, w)| {
                w.as_str().map(str::to_string).ok_or_else(|| bad(format!("word {i} is not a string")))
            })
            .collect::<Result<Vec<String>>>()?;
        let min_count = match json.get("min_count") {
            None => DEFAULT_MIN_COUNT,
            Some(m) => {
                m.as_u64().ok_or_else(|| bad("`min_count` is not a non-negative integer".into()))? as usize
            }
        };
        Vocab::from_words(words, min_count).map_err(bad)
    }

    pub fn from_json_str(source: &str, s: &str) -> Result<Vocab> {
        let v: serde_json::Value = serde_json::from_str(s)
            .map_err(|e| Error::format(source, format!("vocabulary: not valid JSON: {e}")))?;
        Vocab::from_json(source, &v)
    }
}
