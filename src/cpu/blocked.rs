//! The column-blocked activation layout, in which the ResNet forward keeps its activations.
//!
//! A channel-major activation is a (C, P) matrix: one row per channel, one column per pixel,
//! P = N * H * W (`conv2d_forward_cn`). Column-blocked, it is (ceil(P / 32), C, 32): block b holds
//! columns 32b .. 32b + 32 of every channel, channel after channel, so
//!
//! ```text
//! element (c, p)  lies at  (p / 32) * C * 32 + c * 32 + p % 32
//! ```
//!
//! Why (measured in docs/PERF.md): a 1x1 convolution is the GEMM Y (K, P) = W (K, C) · X (C, P),
//! whose B operand X the kernel reads as 32-column panels of kc rows. Column-blocked, the panel
//! for block b and depth rows k0 .. k0 + kc is already there, contiguous, at
//! `b * C * 32 + k0 * 32`: the GEMM reads it in place instead of packing it. And each 14 x 32 tile
//! of Y is one contiguous run of 14 * 32 floats (channels k0 .. k0 + 14 of block b), where in
//! (C, P) it is 14 rows a whole activation row apart: the output and the residual stream through
//! memory in order. (onnxruntime's NCHWc layout does the same with the channels as the vector.)
//!
//! Columns past P in the last block are padding. The buffers start zeroed (`to_blocked` and
//! `ResNet`'s pool zero them), the kernels store only real columns, and no result reads padding:
//! a GEMM column depends on its own B column only, so the padding columns of B flow only into
//! padding columns of C, which are not stored.

use crate::cpu::gemm::{PackB, COL_BLOCK};
use rayon::prelude::*;

/// Floats a (C, P) activation takes column-blocked (padding included).
pub fn blocked_len(c: usize, p: usize) -> usize {
    p.div_ceil(COL_BLOCK) * c * COL_BLOCK
}

/// Index of element (channel ci, column p) of a C-channel column-blocked activation.
#[inline]
pub fn blocked_index(c: usize, ci: usize, p: usize) -> usize {
    (p / COL_BLOCK) * c * COL_BLOCK + ci * COL_BLOCK + p % COL_BLOCK
}

/// The contiguous runs of the columns p0 .. p0 + len of one channel: (offset from the channel's
/// first element, i.e. from index `blocked_index(c, ci, 0)`, offset within the range, length).
/// `block_stride` is C * 32; 0 stands for a plain row-major (C, P) matrix: one run.
#[inline]
pub fn runs(p0: usize, len: usize, block_stride: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    let mut p = p0;
    let end = p0 + len;
    std::iter::from_fn(move || {
        if p >= end {
            return None;
        }
        if block_stride == 0 {
            p = end;
            return Some((p0, 0, len));
        }
        let run = (COL_BLOCK - p % COL_BLOCK).min(end - p);
        let item = ((p / COL_BLOCK) * block_stride + p % COL_BLOCK, p - p0, run);
        p += run;
        Some(item)
    })
}

/// x (C, P) channel-major -> out column-blocked (`blocked_len(c, p)` floats, padding zeroed).
pub fn to_blocked(x: &[f32], c: usize, p: usize, out: &mut [f32]) {
    assert_eq!(x.len(), c * p, "to_blocked: input size");
    assert_eq!(out.len(), blocked_len(c, p), "to_blocked: output size");
    let block = |(b, ob): (usize, &mut [f32])| {
        let (j0, nv) = (b * COL_BLOCK, COL_BLOCK.min(p - b * COL_BLOCK));
        for (ci, row) in ob.chunks_exact_mut(COL_BLOCK).enumerate() {
            row[..nv].copy_from_slice(&x[ci * p + j0..ci * p + j0 + nv]);
            row[nv..].fill(0.0);
        }
    };
    if c == 0 {
        return;
    }
    if out.len() >= 1 << 16 {
        out.par_chunks_mut(c * COL_BLOCK).enumerate().for_each(block);
    } else {
        out.chunks_mut(c * COL_BLOCK).enumerate().for_each(block);
    }
}

/// xb column-blocked (C, P) -> out (C, P) channel-major.
pub fn from_blocked(xb: &[f32], c: usize, p: usize, out: &mut [f32]) {
    assert_eq!(xb.len(), blocked_len(c, p), "from_blocked: input size");
    assert_eq!(out.len(), c * p, "from_blocked: output size");
    let chan = |(ci, row): (usize, &mut [f32])| {
        for (o, i, len) in runs(0, p, c * COL_BLOCK) {
            row[i..i + len].copy_from_slice(&xb[ci * COL_BLOCK + o..ci * COL_BLOCK + o + len]);
        }
    };
    if p == 0 {
        return;
    }
    if out.len() >= 1 << 16 {
        out.par_chunks_mut(p).enumerate().for_each(chan);
    } else {
        out.chunks_mut(p).enumerate().for_each(chan);
    }
}

/// A column-blocked (C, P) activation as the B operand of a GEMM (C rows, P columns): 32-column
/// panels are read in place (`PackB::in_place`); narrower kernels (AVX2: 16, portable: 8) get
/// their panels copied out by `pack`.
pub struct BlockedB<'a> {
    pub x: &'a [f32],
    pub rows: usize,
    pub cols: usize,
}

impl<'a> BlockedB<'a> {
    pub fn new(x: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(x.len(), blocked_len(rows, cols), "BlockedB: size");
        BlockedB { x, rows, cols }
    }
}

impl PackB for BlockedB<'_> {
    fn pack(&self, k0: usize, kc: usize, j0: usize, nc: usize, nr: usize, out: &mut [f32]) {
        for (t, panel) in out.chunks_mut(kc * nr).take(nc.div_ceil(nr)).enumerate() {
            let jb = j0 + t * nr;
            let nv = nr.min(j0 + nc - jb);
            for (p, dst) in panel.chunks_exact_mut(nr).enumerate() {
                for (o, i, len) in runs(jb, nv, self.rows * COL_BLOCK) {
                    let src = (k0 + p) * COL_BLOCK + o;
                    dst[i..i + len].copy_from_slice(&self.x[src..src + len]);
                }
                dst[nv..].fill(0.0);
            }
        }
    }

    fn in_place(&self, k0: usize, kc: usize, j0: usize, nr: usize) -> Option<*const f32> {
        // A 32-wide panel starting on a block is rows k0 .. k0 + kc of that block, row-major.
        (nr == COL_BLOCK && j0.is_multiple_of(COL_BLOCK) && j0 < self.cols && k0 + kc <= self.rows)
            .then(|| self.x[(j0 / COL_BLOCK) * self.rows * COL_BLOCK + k0 * COL_BLOCK..].as_ptr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn round_trip_index_and_runs() {
        let mut rng = Rng::new(3);
        for &(c, p) in &[(1, 1), (3, 31), (5, 32), (7, 33), (4, 100)] {
            let x: Vec<f32> = (0..c * p).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let mut b = vec![f32::NAN; blocked_len(c, p)];
            to_blocked(&x, c, p, &mut b);
            for ci in 0..c {
                for j in 0..p {
                    assert_eq!(b[blocked_index(c, ci, j)], x[ci * p + j]);
                }
            }
            // Padding is zero.
            let real: usize = c * p;
            assert_eq!(b.iter().filter(|v| **v == 0.0).count(), b.len() - real);
            let mut back = vec![0.0; c * p];
            from_blocked(&b, c, p, &mut back);
            assert_eq!(back, x);
            // Runs cover a range in order, each inside one block.
            for (p0, len) in [(0, p), (p / 2, p - p / 2), (5.min(p), 0)] {
                let mut seen = 0;
                for (o, i, l) in runs(p0, len, c * COL_BLOCK) {
                    assert_eq!(i, seen);
                    assert_eq!(o, blocked_index(c, 0, p0 + i));
                    assert!((p0 + i) % COL_BLOCK + l <= COL_BLOCK);
                    seen += l;
                }
                assert_eq!(seen, len);
            }
        }
    }

    #[test]
    fn blocked_b_packs_like_the_matrix() {
        use crate::cpu::gemm::MatRef;
        let (c, p) = (9, 77);
        let mut rng = Rng::new(4);
        let x: Vec<f32> = (0..c * p).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let mut xb = vec![0.0; blocked_len(c, p)];
        to_blocked(&x, c, p, &mut xb);
        let bb = BlockedB::new(&xb, c, p);
        let m = MatRef::row_major(&x, c, p);
        for (k0, kc, j0, nc, nr) in [
            (0usize, 9usize, 0usize, 77usize, 32usize),
            (2, 5, 16, 50, 16),
            (1, 7, 8, 69, 8),
            (0, 9, 64, 13, 32),
        ] {
            let len = nc.div_ceil(nr) * kc * nr;
            let (mut want, mut got) = (vec![1.0; len], vec![2.0; len]);
            m.pack(k0, kc, j0, nc, nr, &mut want);
            bb.pack(k0, kc, j0, nc, nr, &mut got);
            assert_eq!(got, want, "k0 {k0} kc {kc} j0 {j0} nc {nc} nr {nr}");
        }
        // In place: exactly the 32-wide packed panel (the padding columns are the zeroed ones).
        let mut want = vec![0.0; 4 * 32];
        m.pack(3, 4, 64, 13, 32, &mut want);
        let ptr = bb.in_place(3, 4, 64, 32).expect("a 32-wide panel on a block");
        // SAFETY: in_place returns the start of 4 rows of 32 floats inside xb.
        let got = unsafe { std::slice::from_raw_parts(ptr, 4 * 32) };
        assert_eq!(got, &want[..]);
        assert!(bb.in_place(0, 4, 16, 32).is_none() && bb.in_place(0, 4, 0, 16).is_none());
    }
}
