//! Encoder + decoder = captioner; greedy and beam search.
pub mod decoder;
pub mod search;
