//! Encoder + decoder = captioner; greedy and beam search.
pub mod attention_map;
pub mod checkpoint;
pub mod decoder;
pub mod search;
