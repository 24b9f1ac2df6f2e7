//! The CPU backend: the reference kernels and the workhorse. One file per op family, each op's math
//! explained once in a comment above its reference implementation; the WGSL and CUDA versions name
//! the same op and mirror its structure.
//!
//! Kernels here work on plain slices and sizes (llm.c style); `crate::ops` adapts tensors to them.

pub mod activation;
pub mod conv;
pub mod gemm;
pub mod peak;
pub mod pool;
