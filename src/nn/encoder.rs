//! The encoder interface the CLI and captioner use, whatever the network.

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Which network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncoderKind {
    ResNet50,
    Vgg16,
}

impl EncoderKind {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "resnet50" => Ok(EncoderKind::ResNet50),
            "vgg16" => Ok(EncoderKind::Vgg16),
            other => Err(Error::msg(format!("--encoder {other}: expected resnet50 or vgg16"))),
        }
    }
}

/// Which features (DESIGN.md section 3): `Pooled` is (N, D) — ResNet-50 global average pool (2048),
/// VGG16 fc7 after ReLU (4096); `Grid` is (N, 49, C) — the last conv block, spatial-major row-major
/// 7x7 (ResNet-50 layer4, C = 2048; VGG16 after the last ReLU and max-pool, C = 512).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureLayer {
    Pooled,
    Grid,
}

impl FeatureLayer {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "pooled" => Ok(FeatureLayer::Pooled),
            "grid" => Ok(FeatureLayer::Grid),
            other => Err(Error::msg(format!("--layer {other}: expected pooled or grid"))),
        }
    }
}

/// An image encoder. Input: a normalised batch (N, 3, H, W), f32.
pub trait Encoder: Send + Sync {
    fn kind(&self) -> EncoderKind;
    /// Features of one layer (see `FeatureLayer`).
    fn features(&self, x: &Tensor, layer: FeatureLayer) -> Result<Tensor>;
    /// Class scores (N, num_classes) before softmax.
    fn logits(&self, x: &Tensor) -> Result<Tensor>;
    /// The full forward pass returning logits, calling `tap(name, activation)` on named intermediate
    /// activations (ResNet: "conv1" after BN+ReLU, "maxpool", "layer1".."layer4", "pooled";
    /// VGG16: "features.{i}" after each ReLU/max-pool, "fc6", "fc7"). For golden tests and debugging.
    fn forward_trace(&self, x: &Tensor, tap: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor>;
}

/// Loads an encoder. `weights` is a safetensors path with torchvision names, or `random` (seeded
/// random weights, `crate::weights::random`, with `seed`).
///
/// With a file, the number of classes is taken from its `fc.weight` / `classifier.6.weight` (so a
/// fine-tuned head loads too); every other tensor must match the torchvision state dict exactly.
pub fn load_encoder(kind: EncoderKind, weights: &str, seed: u64) -> Result<Box<dyn Encoder>> {
    use crate::nn::resnet::{ResNet, ResNetConfig};
    use crate::nn::vgg::{Vgg, VggConfig};
    let (mut rcfg, mut vcfg) = (ResNetConfig::resnet50(), VggConfig::vgg16());
    if weights == "random" {
        return Ok(match kind {
            EncoderKind::ResNet50 => Box::new(ResNet::random(&rcfg, seed)),
            EncoderKind::Vgg16 => Box::new(Vgg::random(&vcfg, seed)),
        });
    }
    let f = crate::weights::TensorFile::load(std::path::Path::new(weights))?;
    let classes = |name: &str| f.get(name).filter(|t| t.rank() == 2).map(|t| t.dims()[0]);
    Ok(match kind {
        EncoderKind::ResNet50 => {
            rcfg.num_classes = classes("fc.weight").unwrap_or(rcfg.num_classes);
            Box::new(ResNet::from_tensor_file(&rcfg, &f)?)
        }
        EncoderKind::Vgg16 => {
            vcfg.num_classes = classes("classifier.6.weight").unwrap_or(vcfg.num_classes);
            Box::new(Vgg::from_tensor_file(&vcfg, &f)?)
        }
    })
}
