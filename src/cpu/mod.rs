//! The CPU backend: the reference kernels and the workhorse. One file per op family, each op's math
//! explained once in a comment above its reference implementation; the WGSL and CUDA versions name
//! the same op and mirror its structure.
//!
//! Kernels here work on plain slices and sizes (llm.c style); `crate::ops` adapts tensors to them.

pub mod activation;
pub mod adam;
pub mod attention;
pub mod batchnorm;
pub mod blocked;
pub mod conv;
pub mod dropout;
pub mod embedding;
pub mod gemm;
pub mod linear;
pub mod loss;
pub mod lstm;
pub mod peak;
pub mod pool;
pub mod spin;
pub mod winograd;
