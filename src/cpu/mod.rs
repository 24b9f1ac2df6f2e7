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

/// A mutable base pointer handed to parallel tasks that each write their own, disjoint part of one
/// buffer (GEMM tiles, Winograd output rows, window columns) and are joined before the buffer's
/// borrow ends. Each write through it is an `unsafe` block at the use site, whose SAFETY comment
/// says which part that task owns.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(*mut f32);
// SAFETY: the wrapper only carries an address between threads; dereferencing it needs `unsafe` at
// each use, justified there (disjoint parts, tasks joined before the borrow ends).
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    pub(crate) fn new(p: *mut f32) -> Self {
        SharedMut(p)
    }
    /// (A method, so closures capture the whole Sync wrapper, not its raw-pointer field.)
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
