//! Data: image preprocessing, caption readers, splits, tokenizer, vocabulary, the synthetic world.

pub mod captions;
pub mod image;
pub mod loader;
pub mod split;
pub mod tokenize;
pub mod vocab;
