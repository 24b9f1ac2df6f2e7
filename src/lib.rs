//! capgen: a from-scratch tensor engine with hand-written kernels, and an image captioner built on it.
//!
//! Data flows one way: `data` → `model` (which calls `nn`) → `train` / `metrics`; `nn` reaches a
//! backend (`cpu`, later `wgpu` and `cuda`) through `ops`, which dispatches on the tensor's device.

pub mod cli;
pub mod cpu;
pub mod data;
pub mod error;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod ops;
pub mod rng;
pub mod tensor;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
pub use tensor::{DType, Device, Shape, Tensor};
