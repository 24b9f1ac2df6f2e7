//! Inverted dropout with a seeded mask.
//!
//! Math: keep each element with probability 1 - p, scaled by 1 / (1 - p) so the expectation is
//! unchanged: mask_k = [u_k >= p] / (1 - p) with u_k uniform in [0,1) from `crate::rng::Rng`;
//! y = x * mask; dx += dy * mask. The mask is stored (as the scale factors) for backward.

use crate::error::{Error, Result};
use crate::rng::Rng;

/// y = x * mask, drawing a fresh mask (same length as x) from `rng`. p must be in [0, 1).
pub fn dropout_forward(y: &mut [f32], mask: &mut Vec<f32>, x: &[f32], p: f32, rng: &mut Rng) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::msg(format!("dropout probability {p} is not in [0, 1)")));
    }
    assert_eq!(y.len(), x.len(), "dropout_forward: y and x differ in length");
    let keep = 1.0 / (1.0 - p);
    mask.clear();
    mask.extend((0..x.len()).map(|_| if rng.next_f32() >= p { keep } else { 0.0 }));
    for ((o, &i), &m) in y.iter_mut().zip(x).zip(mask.iter()) {
        *o = i * m;
    }
    Ok(())
}

/// dx += dy * mask (the mask from the forward).
pub fn dropout_backward(dx: &mut [f32], dy: &[f32], mask: &[f32]) {
    assert!(dx.len() == dy.len() && dy.len() == mask.len(), "dropout_backward: lengths differ");
    for ((d, &g), &m) in dx.iter_mut().zip(dy).zip(mask) {
        *d += g * m;
    }
}
