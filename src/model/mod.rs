//! Encoder + decoder = captioner; greedy and beam search.
pub mod checkpoint;
pub mod decoder;
pub mod search;
