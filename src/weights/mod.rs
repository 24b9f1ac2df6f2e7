//! Reading and writing weights: safetensors (our own reader/writer, so every error names the file
//! and the problem precisely), torchvision state-dict names, and seeded random weights.

pub mod random;
