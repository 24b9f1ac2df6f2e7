//! Data: image preprocessing, caption readers, splits, tokenizer, vocabulary, the synthetic world.

pub mod image;
