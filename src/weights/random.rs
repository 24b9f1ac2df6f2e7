//! Seeded random weights for any state dict, reproducible bit for bit by `tools/capgen_rng.py`.
//!
//! Used by `--weights random` (benchmarks, smoke tests) and by golden tests, which build the full
//! ResNet-50 / VGG16 from a seed instead of shipping 100 MB of weights. The rule for each tensor
//! depends only on its name, its shape and the seed (see `crate::rng` for the stream):
//!
//! | tensor                                   | values                         |
//! |------------------------------------------|--------------------------------|
//! | `*running_var`                           | U(0.5, 1.5)                    |
//! | `*running_mean`                          | U(-0.1, 0.1)                   |
//! | `*.weight` of rank 1 (batch-norm gamma)  | U(0.5, 1.5)                    |
//! | `*.bias`                                 | U(-0.1, 0.1)                   |
//! | `*.weight` of rank >= 2 (conv, linear)   | U(-b, b), b = sqrt(3 / fan_in) |
//! | anything else                            | U(-0.1, 0.1)                   |
//!
//! fan_in = product of all dims but the first, so weights have variance 1/fan_in.

use crate::rng::uniform_vec;

/// The values of the tensor `name` of shape `dims` under `seed`.
pub fn init_tensor(name: &str, dims: &[usize], seed: u64) -> Vec<f32> {
    let n: usize = dims.iter().product();
    let (lo, hi) = init_range(name, dims);
    uniform_vec(seed, name, n, lo, hi)
}

/// The uniform range `init_tensor` draws from.
pub fn init_range(name: &str, dims: &[usize]) -> (f32, f32) {
    if name.ends_with("running_var") {
        (0.5, 1.5)
    } else if name.ends_with("running_mean") {
        (-0.1, 0.1)
    } else if name.ends_with(".weight") && dims.len() == 1 {
        (0.5, 1.5)
    } else if name.ends_with(".bias") {
        (-0.1, 0.1)
    } else if name.ends_with(".weight") && dims.len() >= 2 {
        let fan_in: usize = dims[1..].iter().product();
        let b = (3.0 / fan_in as f32).sqrt();
        (-b, b)
    } else {
        (-0.1, 0.1)
    }
}
