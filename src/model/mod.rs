//! Encoder + decoder = captioner; greedy and beam search.
pub mod decoder;
