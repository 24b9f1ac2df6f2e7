//! Layers as plain structs of tensors with forward (and, for the decoder, backward) passes, and the
//! encoders built from them. Layers call kernels through `crate::ops`, never a backend directly.

pub mod buffers;
pub mod conv;
pub mod encoder;
pub mod linear;
pub mod profile;
pub mod resnet;
pub mod train_resnet;
pub mod vgg;
pub use encoder::{load_encoder, Encoder, EncoderKind, FeatureLayer};
