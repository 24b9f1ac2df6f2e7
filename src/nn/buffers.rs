//! A small pool of reusable activation tensors.
//!
//! A forward pass takes each layer's output buffer from the pool and gives it back as soon as the
//! next layer has consumed it, so after the first call a network allocates nothing per layer: the
//! free list holds roughly one tensor per distinct activation size that is live at the same time
//! (for ResNet-50 about a dozen; peak memory ~ the few largest activations, not the sum of all).
//!
//! Buffers are matched by element count (a buffer of 802,816 floats serves any shape of that size, via
//! a free `reshape`). A tensor handed to a caller that keeps a clone of it (e.g. a trace tap) stays
//! valid: writes go through `Tensor::as_f32_slice_mut`, which copies a shared storage first.

use crate::tensor::Tensor;
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct ActivationPool {
    free: Vec<Tensor>,
    /// Buffers allocated over the pool's life (for tests and diagnostics).
    pub allocations: usize,
    /// Scratch for the Winograd convs (grows to the largest layer's need, then is reused).
    pub workspace: Vec<f32>,
    /// Scratch for the other convs' converted or subsampled inputs (`conv2d_forward_blocked`).
    pub scratch: Vec<f32>,
}

impl ActivationPool {
    pub fn new() -> Self {
        Self::default()
    }

    /// An f32 tensor of `dims` with unspecified contents (recycled, or fresh if none fits).
    pub fn take(&mut self, dims: &[usize]) -> Tensor {
        let n: usize = dims.iter().product();
        if let Some(i) = self.free.iter().position(|t| t.numel() == n) {
            let t = self.free.swap_remove(i);
            return t.reshape(dims).expect("same element count");
        }
        self.allocations += 1;
        Tensor::zeros(dims)
    }

    /// Returns a buffer for reuse. Only contiguous f32 tensors are kept.
    pub fn give(&mut self, t: Tensor) {
        if t.is_contiguous() && t.dtype() == crate::tensor::DType::F32 {
            self.free.push(t);
        }
    }

    /// Number of buffers waiting for reuse.
    pub fn len(&self) -> usize {
        self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.free.is_empty()
    }
}

/// Runs one forward `f` with the pool kept in `slot` (an encoder's): takes the pool out for the
/// call (a concurrent call simply gets a fresh one), runs `f` with the other workers kept spinning
/// for its ~100 parallel regions (`cpu::spin::hot`), then puts the pool back, adding the
/// allocation count of any pool it replaces.
pub(crate) fn with_pool<R>(slot: &Mutex<ActivationPool>, f: impl FnOnce(&mut ActivationPool) -> R) -> R {
    let mut pool = std::mem::take(&mut *slot.lock().unwrap_or_else(|e| e.into_inner()));
    let result = crate::cpu::spin::hot(|| f(&mut pool));
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    pool.allocations += slot.allocations;
    *slot = pool;
    result
}
