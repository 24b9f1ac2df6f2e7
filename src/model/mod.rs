//! Encoder + decoder = captioner; greedy and beam search.
