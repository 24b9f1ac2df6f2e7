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
//! Columns past P in the last block are padding. It starts zeroed (`to_blocked` writes it, `ResNet`
//! zeroes it in every buffer it takes), the kernels store only real columns, and no result reads it:
//! a GEMM column depends on its own B column only, so the padding columns of B flow only into
//! padding columns of C, which are not stored.

use crate::cpu::gemm::{PackB, COL_BLOCK};
use crate::cpu::SharedMut;
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
/// `block_stride` is C * 32.
#[inline]
pub fn runs(p0: usize, len: usize, block_stride: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    let mut p = p0;
    let end = p0 + len;
    std::iter::from_fn(move || {
        if p >= end {
            return None;
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
    columns_to_blocked(x, c, 0, p, out, None, false);
    zero_padding(out, c, p);
}

/// xb column-blocked (C, P) -> out (C, P) channel-major.
pub fn from_blocked(xb: &[f32], c: usize, p: usize, out: &mut [f32]) {
    assert_eq!(xb.len(), blocked_len(c, p), "from_blocked: input size");
    assert_eq!(out.len(), c * p, "from_blocked: output size");
    columns_from_blocked(xb, c, 0, p, out);
}

/// Columns pa..pb of a column-blocked (C, P) activation into `out` (C, pb - pa), channel-major.
/// Parallel over blocks, each read in order: its C runs are contiguous, where one channel's runs
/// lie C * 128 bytes apart (across pages: no prefetcher follows a walk channel by channel).
pub fn columns_from_blocked(x: &[f32], c: usize, pa: usize, pb: usize, out: &mut [f32]) {
    let len = pb - pa;
    assert!(out.len() >= c * len, "columns_from_blocked: output too short");
    assert!(x.len() >= pb.div_ceil(COL_BLOCK) * c * COL_BLOCK, "columns_from_blocked: input too short");
    if c == 0 || len == 0 {
        return;
    }
    let op = SharedMut::new(out.as_mut_ptr());
    let block = |b: usize| {
        let (j0, j1) = (pa.max(b * COL_BLOCK), pb.min((b + 1) * COL_BLOCK));
        let blk = &x[b * c * COL_BLOCK..(b + 1) * c * COL_BLOCK];
        for ci in 0..c {
            let src = &blk[ci * COL_BLOCK + j0 % COL_BLOCK..][..j1 - j0];
            // SAFETY: out holds c * len floats (asserted); this task alone writes columns j0..j1
            // (block b's part of pa..pb) of each channel row, and the tasks join before return.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), op.get().add(ci * len + j0 - pa), j1 - j0) };
        }
    };
    let blocks = pa / COL_BLOCK..pb.div_ceil(COL_BLOCK);
    if c * len >= 1 << 15 {
        blocks.into_par_iter().with_min_len(4).for_each(block);
    } else {
        blocks.for_each(block);
    }
}

/// `win` (K, qb - qa), channel-major, into columns qa..qb of the column-blocked y (K, P), adding
/// `res` (blocked like y) and applying ReLU: y = act(win + res). Parallel over y's blocks, each
/// written in order.
pub fn columns_to_blocked(
    win: &[f32],
    k: usize,
    qa: usize,
    qb: usize,
    y: &mut [f32],
    res: Option<&[f32]>,
    relu: bool,
) {
    let len = qb - qa;
    assert!(win.len() >= k * len, "columns_to_blocked: window too short");
    let (b0, b1) = (qa / COL_BLOCK, qb.div_ceil(COL_BLOCK));
    if k == 0 || len == 0 {
        return;
    }
    let block = |(i, yb): (usize, &mut [f32])| {
        let b = b0 + i;
        let (j0, j1) = (qa.max(b * COL_BLOCK), qb.min((b + 1) * COL_BLOCK));
        let rb = res.map(|r| &r[b * k * COL_BLOCK..(b + 1) * k * COL_BLOCK]);
        for ko in 0..k {
            let o = ko * COL_BLOCK + j0 % COL_BLOCK;
            let out = &mut yb[o..o + j1 - j0];
            let src = &win[ko * len + j0 - qa..][..j1 - j0];
            match rb {
                Some(r) => {
                    for ((y, &s), &rv) in out.iter_mut().zip(src).zip(&r[o..o + j1 - j0]) {
                        let v = s + rv;
                        *y = if relu { v.max(0.0) } else { v };
                    }
                }
                None => {
                    for (y, &s) in out.iter_mut().zip(src) {
                        *y = if relu { s.max(0.0) } else { s };
                    }
                }
            }
        }
    };
    let blocks = &mut y[b0 * k * COL_BLOCK..b1 * k * COL_BLOCK];
    if k * len >= 1 << 15 {
        blocks.par_chunks_mut(k * COL_BLOCK).with_min_len(4).enumerate().for_each(block);
    } else {
        blocks.chunks_mut(k * COL_BLOCK).enumerate().for_each(block);
    }
}

/// Zeroes the padding columns (P .. the last block's end) of a column-blocked (C, P) activation.
pub fn zero_padding(xb: &mut [f32], c: usize, p: usize) {
    assert_eq!(xb.len(), blocked_len(c, p), "zero_padding: size");
    if !p.is_multiple_of(COL_BLOCK) {
        let last = (p / COL_BLOCK) * c * COL_BLOCK;
        for row in xb[last..].chunks_exact_mut(COL_BLOCK) {
            row[p % COL_BLOCK..].fill(0.0);
        }
    }
}

/// Global average pool of a column-blocked (C, N*HW) activation: y (N, C), y[n][c] = the mean of
/// channel c over image n's HW columns (summed in column order, as `pool::global_avg_pool` does,
/// so the same bits). Parallel over images and channels.
pub fn global_avg_pool_blocked(xb: &[f32], c: usize, n: usize, hw: usize, y: &mut [f32]) {
    assert_eq!(xb.len(), blocked_len(c, n * hw), "global_avg_pool_blocked: input size");
    assert_eq!(y.len(), n * c, "global_avg_pool_blocked: output size");
    let inv = 1.0 / hw as f32;
    y.par_iter_mut().enumerate().for_each(|(i, o)| {
        let (img, ci) = (i / c, i % c);
        let xc = &xb[ci * COL_BLOCK..];
        let sum = runs(img * hw, hw, c * COL_BLOCK)
            .fold(0.0f32, |acc, (o, _, len)| xc[o..o + len].iter().fold(acc, |a, &v| a + v));
        *o = sum * inv;
    });
}

/// A column-blocked (C, N*HW) activation as the spatial-major grid (N, HW, C) (DESIGN.md's features
/// file): grid[n][p][c] = x[c][n*HW + p]. Parallel over blocks.
pub fn blocked_to_grid(xb: &[f32], c: usize, n: usize, hw: usize, grid: &mut [f32]) {
    let cols = n * hw;
    assert_eq!(xb.len(), blocked_len(c, cols), "blocked_to_grid: input size");
    assert_eq!(grid.len(), cols * c, "blocked_to_grid: output size");
    if c == 0 || cols == 0 {
        return;
    }
    // Grid rows (one per column p, C floats each) in groups of 32: one block each.
    grid.par_chunks_mut(COL_BLOCK * c).zip(xb.par_chunks(COL_BLOCK * c)).for_each(|(g, blk)| {
        for (l, row) in g.chunks_exact_mut(c).enumerate() {
            for (ci, v) in row.iter_mut().enumerate() {
                *v = blk[ci * COL_BLOCK + l];
            }
        }
    });
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

// SAFETY: `in_place` returns a pointer only for a 32-wide panel starting on block b = j0 / 32 <
// ceil(cols / 32) with k0 + kc <= rows: the kc * 32 floats from `b * rows * 32 + k0 * 32` end at
// most at `(b + 1) * rows * 32 <= x.len()` (`new` checked the length), inside `x`, borrowed for
// as long as `self`; they are exactly the panel `pack` writes, padding columns included.
unsafe impl PackB for BlockedB<'_> {
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
    fn pooling_grid_and_padding_match_the_channel_major_versions() {
        let mut rng = Rng::new(5);
        for &(c, n, hw) in &[(3, 2, 49), (5, 3, 7), (2, 1, 64), (4, 2, 1)] {
            let x: Vec<f32> = (0..c * n * hw).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let mut b = vec![0.0; blocked_len(c, n * hw)];
            to_blocked(&x, c, n * hw, &mut b);
            // (C, N, HW) -> NCHW for the reference pool.
            let mut nchw = vec![0.0; x.len()];
            for ci in 0..c {
                for img in 0..n {
                    let src = &x[ci * n * hw + img * hw..][..hw];
                    nchw[(img * c + ci) * hw..][..hw].copy_from_slice(src);
                }
            }
            let (mut want, mut got) = (vec![0.0; n * c], vec![1.0; n * c]);
            crate::cpu::pool::global_avg_pool(&nchw, n, c, hw, 1, &mut want);
            global_avg_pool_blocked(&b, c, n, hw, &mut got);
            assert_eq!(got, want, "c {c} n {n} hw {hw}");
            let mut grid = vec![0.0; n * hw * c];
            blocked_to_grid(&b, c, n, hw, &mut grid);
            for img in 0..n {
                for p in 0..hw {
                    for ci in 0..c {
                        assert_eq!(grid[(img * hw + p) * c + ci], x[ci * n * hw + img * hw + p]);
                    }
                }
            }
            let mut dirty = b.iter().map(|v| v + 1.0).collect::<Vec<_>>();
            zero_padding(&mut dirty, c, n * hw);
            for (i, (&d, &v)) in dirty.iter().zip(&b).enumerate() {
                let (blk, l) = (i / (c * COL_BLOCK), i % COL_BLOCK);
                if blk * COL_BLOCK + l >= n * hw {
                    assert_eq!(d, 0.0);
                } else {
                    assert_eq!(d, v + 1.0);
                }
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
