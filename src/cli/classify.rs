//! `capgen classify`: ResNet-50 logits -> softmax -> the top-k ImageNet classes with probabilities.

use crate::cli::ClassifyArgs;
use crate::data::image::{preprocess_file, stack};
use crate::error::{Error, Result};
use crate::nn::{load_encoder, EncoderKind};
use crate::tensor::Device;

/// The 1000 ImageNet class names in index order (from torchvision; tools/imagenet_classes.py).
pub const IMAGENET_CLASSES: &str = include_str!("../data/imagenet_classes.txt");

/// Softmax over `logits` (computed in f64, max-subtracted for stability), then the `k` most probable
/// indices with their probabilities, most probable first (ties: lower index first).
///
/// p[i] = exp(z[i] - max z) / sum_j exp(z[j] - max z)
pub fn top_k(logits: &[f32], k: usize) -> Vec<(usize, f64)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits.iter().map(|&z| (z as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| e[b].total_cmp(&e[a]).then(a.cmp(&b)));
    idx.into_iter().take(k).map(|i| (i, e[i] / sum)).collect()
}

pub fn run(args: &ClassifyArgs) -> Result<()> {
    let _device: Device = Device::parse(&args.device)?;
    if args.top == 0 {
        return Err(Error::msg("--top 0: ask for at least one class"));
    }
    let classes: Vec<&str> = IMAGENET_CLASSES.lines().collect();
    let x = stack(&[preprocess_file(&args.image)?])?;
    let encoder = load_encoder(EncoderKind::ResNet50, &args.weights, 0)?;
    let logits = encoder.logits(&x)?;
    if logits.dims() != [1, classes.len()] {
        return Err(Error::shape(format!(
            "classifier gives logits of shape {:?}, expected [1, {}] (ImageNet)",
            logits.dims(),
            classes.len()
        )));
    }
    for (rank, (i, p)) in top_k(&logits.to_f32_vec(), args.top).into_iter().enumerate() {
        println!("{:>2}. {:>7.3}%  {:>3}  {}", rank + 1, 100.0 * p, i, classes[i]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_are_imagenet() {
        let c: Vec<&str> = IMAGENET_CLASSES.lines().collect();
        assert_eq!(c.len(), 1000);
        assert_eq!(c[0], "tench");
        assert_eq!(c[281], "tabby");
    }

    #[test]
    fn top_k_orders_and_normalises() {
        // Hand-computed: softmax([0, ln 2, ln 3, ln 4]) = [1, 2, 3, 4] / 10.
        let z = [0.0f32, 2f32.ln(), 3f32.ln(), 4f32.ln()];
        let t = top_k(&z, 3);
        assert_eq!(t.iter().map(|x| x.0).collect::<Vec<_>>(), [3, 2, 1]);
        for ((_, p), want) in t.iter().zip([0.4, 0.3, 0.2]) {
            assert!((p - want).abs() < 1e-6, "{p} vs {want}");
        }
        // Large logits must not overflow.
        let t = top_k(&[1000.0, 1000.0], 2);
        assert!((t[0].1 - 0.5).abs() < 1e-12 && t[0].0 == 0);
    }
}
