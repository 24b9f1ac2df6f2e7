//! Pooling over the spatial dims of NCHW tensors: max-pool and (global / adaptive) average pool.
//! Every (n, c) plane is independent, so planes are the unit of parallel work.

use rayon::prelude::*;

/// Geometry of a max-pool window: kernel, stride, padding (PyTorch `MaxPool2d`, ceil_mode false).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolParams {
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub pad: (usize, usize),
}

impl PoolParams {
    pub fn new(kernel: usize, stride: usize, pad: usize) -> Self {
        PoolParams { kernel: (kernel, kernel), stride: (stride, stride), pad: (pad, pad) }
    }
    /// Output (height, width): floor((H + 2p - k) / s) + 1; None if the window does not fit.
    pub fn out_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let (hp, wp) = (h + 2 * self.pad.0, w + 2 * self.pad.1);
        if hp < self.kernel.0 || wp < self.kernel.1 || self.stride.0 == 0 || self.stride.1 == 0 {
            return None;
        }
        Some(((hp - self.kernel.0) / self.stride.0 + 1, (wp - self.kernel.1) / self.stride.1 + 1))
    }
}

/// Max-pool. x (N, C, H, W) -> y (N, C, P, Q):
///
/// ```text
/// y[n,c,p,q] = max_{r<kh, s<kw} x[n, c, p*sh - ph + r, q*sw - pw + s]
/// ```
///
/// where positions outside the image count as -inf (PyTorch's padding), so they never win. With
/// pad <= kernel/2 (which `ops` enforces, as PyTorch does) every window holds at least one real pixel.
/// A NaN anywhere in a window makes that output NaN, as in PyTorch.
///
/// The max is separable, so each output row is computed in two passes: the element-wise max of the
/// window's input rows over the whole width (`colmax`, contiguous: it vectorises), then the max of
/// each output's `kw` columns of that row. Branch-free (`nan_max` is a compare and a select), which
/// is what keeps the stem pool of ResNet at memory speed.
pub fn max_pool2d(x: &[f32], n: usize, c: usize, h: usize, w: usize, p: &PoolParams, y: &mut [f32]) {
    let (oh, ow) = max_pool_out_hw(p, h, w);
    assert_eq!(x.len(), n * c * h * w, "max_pool2d input size");
    assert_eq!(y.len(), n * c * oh * ow, "max_pool2d output size");
    y.par_chunks_mut(oh * ow)
        .zip(x.par_chunks(h * w))
        .for_each_init(|| vec![0.0f32; w], |colmax, (yp, xp)| pool_plane_any(xp, yp, colmax, h, w, ow, p));
}

/// The output size of a max-pool, after the checks both max-pools make (every window must hold a
/// pixel: `ops` enforces it for user input, as PyTorch does).
fn max_pool_out_hw(p: &PoolParams, h: usize, w: usize) -> (usize, usize) {
    assert!(
        p.kernel.0 >= 1 && p.kernel.1 >= 1 && 2 * p.pad.0 <= p.kernel.0 && 2 * p.pad.1 <= p.kernel.1,
        "max_pool2d: kernel {:?} with padding {:?}: every window must hold a pixel",
        p.kernel,
        p.pad
    );
    p.out_hw(h, w).expect("max_pool2d: empty output")
}

/// `pool_plane` compiled for AVX-512 where the CPU has it (`pool_plane_avx512`), else as built.
fn pool_plane_any(
    xp: &[f32],
    yp: &mut [f32],
    colmax: &mut [f32],
    h: usize,
    w: usize,
    ow: usize,
    p: &PoolParams,
) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::gemm::Isa::Avx512.supported() {
        // SAFETY: `Isa::supported` checked every feature the function enables.
        unsafe { pool_plane_avx512(xp, yp, colmax, h, w, ow, p) };
        return;
    }
    pool_plane(xp, yp, colmax, h, w, ow, p)
}

/// `max_pool2d` of a channel-major x (C, N, H, W) into a column-blocked y (`cpu::blocked`: the
/// (C, N*P*Q) matrix in blocks of 32 columns; padding zeroed), as ResNet's stem pool feeds layer1:
/// each (channel, image) plane is pooled into a plane buffer (L1-sized), then copied to its runs
/// in the blocks, instead of a channel-major output and a second pass converting it. Same
/// selects as `max_pool2d`, so the same bits.
pub fn max_pool2d_blocked(x: &[f32], c: usize, n: usize, h: usize, w: usize, p: &PoolParams, y: &mut [f32]) {
    use crate::cpu::blocked::{blocked_len, runs, zero_padding};
    use crate::cpu::gemm::COL_BLOCK;
    let (oh, ow) = max_pool_out_hw(p, h, w);
    let cols = n * oh * ow;
    assert_eq!(x.len(), c * n * h * w, "max_pool2d input size");
    assert_eq!(y.len(), blocked_len(c, cols), "max_pool2d output size");
    let out = crate::cpu::SharedMut::new(y.as_mut_ptr());
    x.par_chunks(h * w).enumerate().for_each_init(
        || (vec![0.0f32; w], vec![0.0f32; oh * ow]),
        |(colmax, plane), (pi, xp)| {
            pool_plane_any(xp, plane, colmax, h, w, ow, p);
            // Plane pi = (channel ci, image img): columns img*P*Q .. + P*Q of row ci.
            let (ci, img) = (pi / n, pi % n);
            for (off, at, len) in runs(img * oh * ow, oh * ow, c * COL_BLOCK) {
                // SAFETY: y holds blocked_len(c, cols) floats (asserted) and channel ci's run lies
                // inside it; distinct planes are distinct (channel, column) elements, so no two
                // tasks write the same float, and they join before return.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        plane[at..].as_ptr(),
                        out.get().add(ci * COL_BLOCK + off),
                        len,
                    )
                };
            }
        },
    );
    zero_padding(y, c, cols);
}

/// `pool_plane` compiled for AVX-512, so that the column and window maxima vectorise 16 wide (the
/// crate is built for baseline x86-64). Same selects, so the same result bit for bit.
///
/// # Safety
/// `Isa::Avx512.supported()` (the features enabled here).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
unsafe fn pool_plane_avx512(
    xp: &[f32],
    yp: &mut [f32],
    colmax: &mut [f32],
    h: usize,
    w: usize,
    ow: usize,
    p: &PoolParams,
) {
    pool_plane(xp, yp, colmax, h, w, ow, p)
}

/// One plane of `max_pool2d`: per output row, the column maxima over the window's rows, then each
/// output's window of those.
#[inline(always)]
fn pool_plane(xp: &[f32], yp: &mut [f32], colmax: &mut [f32], h: usize, w: usize, ow: usize, p: &PoolParams) {
    for (py, yrow) in yp.chunks_exact_mut(ow).enumerate() {
        // Clip the window to the image once per row.
        let y0 = (py * p.stride.0) as isize - p.pad.0 as isize;
        let (r0, r1) = (y0.max(0) as usize, ((y0 + p.kernel.0 as isize).min(h as isize)).max(0) as usize);
        colmax.copy_from_slice(&xp[r0 * w..(r0 + 1) * w]);
        for r in r0 + 1..r1 {
            for (m, &v) in colmax.iter_mut().zip(&xp[r * w..(r + 1) * w]) {
                *m = nan_max(*m, v);
            }
        }
        row_window_max(colmax, yrow, p);
    }
}

/// yrow[q] = max of `colmax` over the q-th window of the row (clipped to the row at its ends).
#[inline(always)]
fn row_window_max(colmax: &[f32], yrow: &mut [f32], p: &PoolParams) {
    let (k, st, pad, w) = (p.kernel.1, p.stride.1, p.pad.1, colmax.len());
    let clipped = |px: usize| {
        let x0 = (px * st) as isize - pad as isize;
        let (s0, s1) = (x0.max(0) as usize, ((x0 + k as isize).min(w as isize)).max(0) as usize);
        colmax[s0 + 1..s1].iter().fold(colmax[s0], |m, &v| nan_max(m, v))
    };
    // Outputs whose window lies wholly inside the row: px*st >= pad and px*st - pad + k <= w.
    let lo = pad.div_ceil(st).min(yrow.len());
    let hi = if w + pad >= k { ((w + pad - k) / st + 1).clamp(lo, yrow.len()) } else { lo };
    for (px, out) in yrow.iter_mut().enumerate().take(lo) {
        *out = clipped(px);
    }
    if (k, st) == (3, 2) {
        // ResNet's stem pool: constant stride and width, so the loop vectorises (interleaved loads).
        let base = lo * 2 - pad;
        for (i, out) in yrow[lo..hi].iter_mut().enumerate() {
            let b = base + 2 * i;
            *out = nan_max(nan_max(colmax[b], colmax[b + 1]), colmax[b + 2]);
        }
    } else {
        for (px, out) in yrow.iter_mut().enumerate().take(hi).skip(lo) {
            let b = px * st - pad;
            *out = colmax[b + 1..b + k].iter().fold(colmax[b], |m, &v| nan_max(m, v));
        }
    }
    for (px, out) in yrow.iter_mut().enumerate().skip(hi) {
        *out = clipped(px);
    }
}

/// max(a, b) that returns NaN if either is NaN (`f32::max` would drop it), without a branch.
#[inline(always)]
fn nan_max(a: f32, b: f32) -> f32 {
    // On a tie the first wins (window order), so 0.0 vs -0.0 keeps the earlier one's sign.
    if b > a || b.is_nan() {
        b
    } else {
        a
    }
}

/// Global average pool. x (N, C, H, W) -> y (N, C): y[n,c] = mean over h, w of x[n,c,h,w].
pub fn global_avg_pool(x: &[f32], n: usize, c: usize, h: usize, w: usize, y: &mut [f32]) {
    assert_eq!(x.len(), n * c * h * w, "global_avg_pool input size");
    assert_eq!(y.len(), n * c, "global_avg_pool output size");
    let inv = 1.0 / (h * w) as f32;
    y.par_iter_mut().zip(x.par_chunks(h * w)).for_each(|(o, plane)| {
        *o = plane.iter().sum::<f32>() * inv;
    });
}

/// The input range [floor(i * n / out), ceil((i + 1) * n / out)) of adaptive-pool bin `i`; the
/// forward and backward passes must agree on it exactly.
fn adaptive_bin(i: usize, n: usize, out: usize) -> (usize, usize) {
    (i * n / out, ((i + 1) * n).div_ceil(out))
}

/// Adaptive average pool (PyTorch `AdaptiveAvgPool2d`). x (N, C, H, W) -> y (N, C, OH, OW):
///
/// ```text
/// y[n,c,i,j] = mean of x[n, c, h0(i)..h1(i), w0(j)..w1(j)]
/// h0(i) = floor(i * H / OH),  h1(i) = ceil((i + 1) * H / OH)   (w likewise)
/// ```
///
/// Bins may overlap (and, when OH > H, repeat pixels); when H is a multiple of OH it is an ordinary
/// average pool with kernel = stride = H / OH.
#[allow(clippy::too_many_arguments)]
pub fn adaptive_avg_pool2d(
    x: &[f32],
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    y: &mut [f32],
) {
    assert_eq!(x.len(), n * c * h * w, "adaptive_avg_pool2d input size");
    assert_eq!(y.len(), n * c * oh * ow, "adaptive_avg_pool2d output size");
    y.par_chunks_mut(oh * ow).zip(x.par_chunks(h * w)).for_each(|(yp, xp)| {
        for i in 0..oh {
            let (h0, h1) = adaptive_bin(i, h, oh);
            for j in 0..ow {
                let (w0, w1) = adaptive_bin(j, w, ow);
                let mut acc = 0.0f32;
                for r in h0..h1 {
                    acc += xp[r * w + w0..r * w + w1].iter().sum::<f32>();
                }
                yp[i * ow + j] = acc / ((h1 - h0) * (w1 - w0)) as f32;
            }
        }
    });
}

/// Max-pool that also records, for each output, the flat index (within its H*W plane) of the input
/// that won: the first maximum in window order (row by row), as PyTorch does for ties; NaN wins.
/// argmax is (N, C, P, Q) like y.
#[allow(clippy::too_many_arguments)]
pub fn max_pool2d_with_argmax(
    x: &[f32],
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    p: &PoolParams,
    y: &mut [f32],
    argmax: &mut [u32],
) {
    let (oh, ow) = p.out_hw(h, w).expect("max_pool2d: empty output");
    assert_eq!(x.len(), n * c * h * w, "max_pool2d input size");
    assert_eq!(y.len(), n * c * oh * ow, "max_pool2d output size");
    assert_eq!(argmax.len(), y.len(), "max_pool2d argmax size");
    assert!(h * w <= u32::MAX as usize, "max_pool2d plane too large for u32 indices");
    y.par_chunks_mut(oh * ow).zip(argmax.par_chunks_mut(oh * ow)).zip(x.par_chunks(h * w)).for_each(
        |((yp, ap), xp)| {
            for py in 0..oh {
                let y0 = (py * p.stride.0) as isize - p.pad.0 as isize;
                let (r0, r1) =
                    (y0.max(0) as usize, ((y0 + p.kernel.0 as isize).min(h as isize)).max(0) as usize);
                for px in 0..ow {
                    let x0 = (px * p.stride.1) as isize - p.pad.1 as isize;
                    let (s0, s1) =
                        (x0.max(0) as usize, ((x0 + p.kernel.1 as isize).min(w as isize)).max(0) as usize);
                    let (mut m, mut at) = (f32::NEG_INFINITY, r0 * w + s0);
                    'win: for r in r0..r1 {
                        for (i, &v) in xp.iter().enumerate().take(r * w + s1).skip(r * w + s0) {
                            if v.is_nan() {
                                (m, at) = (v, i);
                                break 'win;
                            }
                            if v > m {
                                (m, at) = (v, i);
                            }
                        }
                    }
                    yp[py * ow + px] = m;
                    ap[py * ow + px] = at as u32;
                }
            }
        },
    );
}

/// Max-pool backward: each output's gradient goes to the input its window picked.
/// dy, argmax (N, C, P, Q); accumulates dx (N, C, H, W).
pub fn max_pool2d_backward(
    dy: &[f32],
    argmax: &[u32],
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    dx: &mut [f32],
) {
    assert_eq!(dy.len(), argmax.len(), "max_pool2d backward sizes");
    assert_eq!(dx.len(), n * c * h * w, "max_pool2d backward dx size");
    let opl = dy.len() / (n * c).max(1);
    dx.par_chunks_mut(h * w).zip(dy.par_chunks(opl).zip(argmax.par_chunks(opl))).for_each(
        |(dxp, (dyp, ap))| {
            for (&d, &i) in dyp.iter().zip(ap) {
                dxp[i as usize] += d;
            }
        },
    );
}

/// Global average pool backward: dx[n,c,h,w] += dy[n,c] / (H*W). dy (N, C), dx (N, C, H, W).
pub fn global_avg_pool_backward(dy: &[f32], n: usize, c: usize, h: usize, w: usize, dx: &mut [f32]) {
    assert_eq!(dy.len(), n * c, "global_avg_pool backward dy size");
    assert_eq!(dx.len(), n * c * h * w, "global_avg_pool backward dx size");
    let inv = 1.0 / (h * w) as f32;
    dx.par_chunks_mut(h * w).zip(dy.par_iter()).for_each(|(p, &d)| p.iter_mut().for_each(|v| *v += d * inv));
}

/// Adaptive average pool backward: each output bin spreads its gradient evenly over its bin.
/// dy (N, C, OH, OW); accumulates dx (N, C, H, W).
#[allow(clippy::too_many_arguments)]
pub fn adaptive_avg_pool2d_backward(
    dy: &[f32],
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    dx: &mut [f32],
) {
    assert_eq!(dy.len(), n * c * oh * ow, "adaptive_avg_pool2d backward dy size");
    assert_eq!(dx.len(), n * c * h * w, "adaptive_avg_pool2d backward dx size");
    dx.par_chunks_mut(h * w).zip(dy.par_chunks(oh * ow)).for_each(|(dxp, dyp)| {
        for i in 0..oh {
            let (h0, h1) = adaptive_bin(i, h, oh);
            for j in 0..ow {
                let (w0, w1) = adaptive_bin(j, w, ow);
                let g = dyp[i * ow + j] / ((h1 - h0) * (w1 - w0)) as f32;
                for r in h0..h1 {
                    dxp[r * w + w0..r * w + w1].iter_mut().for_each(|v| *v += g);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::uniform_vec;

    #[test]
    fn max_pool_hand_computed() {
        // 1x1x4x4, kernel 3, stride 2, pad 1 (ResNet's stem pool) -> 2x2.
        #[rustfmt::skip]
        let x = [ 1.,  2.,  3.,  4.,
                  5., -6.,  7.,  8.,
                  9., 10., 11., 12.,
                -13., 14., 15., 16.];
        let mut y = [0.0; 4];
        max_pool2d(&x, 1, 1, 4, 4, &PoolParams::new(3, 2, 1), &mut y);
        // Window rows/cols: out (0,0) covers rows -1..2, cols -1..2 -> {1,2,5,-6} -> 5
        // (0,1): rows -1..2, cols 1..4 -> {2,3,4,-6,7,8} -> 8; (1,0): rows 1..4, cols -1..2 -> 14;
        // (1,1): rows 1..4, cols 1..4 -> 16.
        assert_eq!(y, [5., 8., 14., 16.]);
        // All-negative input: padding (-inf) must never win.
        let xn: Vec<f32> = x.iter().map(|v| -v.abs() - 1.0).collect();
        max_pool2d(&xn, 1, 1, 4, 4, &PoolParams::new(3, 2, 1), &mut y);
        assert_eq!(y, [-2., -3., -6., -7.]);
    }

    #[test]
    fn max_pool_matches_direct_loop() {
        let (n, c, h, w) = (2, 3, 9, 7);
        let x = uniform_vec(5, "x", n * c * h * w, -1.0, 1.0);
        for p in [PoolParams::new(3, 2, 1), PoolParams::new(2, 2, 0), PoolParams::new(3, 1, 1)] {
            let (oh, ow) = p.out_hw(h, w).unwrap();
            let mut y = vec![0.0; n * c * oh * ow];
            max_pool2d(&x, n, c, h, w, &p, &mut y);
            // Direct definition over the padded window.
            for b in 0..n * c {
                for i in 0..oh {
                    for j in 0..ow {
                        let mut m = f32::NEG_INFINITY;
                        for r in 0..p.kernel.0 {
                            for s in 0..p.kernel.1 {
                                let (iy, ix) = (
                                    (i * p.stride.0 + r) as isize - p.pad.0 as isize,
                                    (j * p.stride.1 + s) as isize - p.pad.1 as isize,
                                );
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    m = m.max(x[b * h * w + iy as usize * w + ix as usize]);
                                }
                            }
                        }
                        assert_eq!(y[b * oh * ow + i * ow + j], m, "{p:?} at {b},{i},{j}");
                    }
                }
            }
        }
    }

    /// `max_pool2d_blocked` is `max_pool2d` (on C planes of N images) then `to_blocked`, bit for
    /// bit, with its padding zeroed: planes whose columns straddle blocks, several images, and
    /// the stem's geometry.
    #[test]
    fn max_pool_blocked_is_pool_then_blocked() {
        use crate::cpu::blocked::{blocked_len, to_blocked};
        for (c, n, h, w, p) in [
            (3, 2, 9, 7, PoolParams::new(3, 2, 1)),
            (5, 3, 12, 12, PoolParams::new(3, 2, 1)),
            (4, 1, 10, 11, PoolParams::new(2, 2, 0)),
            (2, 2, 112, 112, PoolParams::new(3, 2, 1)),
        ] {
            let x = uniform_vec(9, "x", c * n * h * w, -1.0, 1.0);
            let (oh, ow) = p.out_hw(h, w).unwrap();
            let cols = n * oh * ow;
            let mut plain = vec![f32::NAN; c * cols];
            max_pool2d(&x, c, n, h, w, &p, &mut plain);
            let mut want = vec![f32::NAN; blocked_len(c, cols)];
            to_blocked(&plain, c, cols, &mut want);
            let mut got = vec![f32::NAN; blocked_len(c, cols)];
            max_pool2d_blocked(&x, c, n, h, w, &p, &mut got);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(&got) == bits(&want), "{c}x{n}x{h}x{w} {p:?}");
        }
    }

    #[test]
    fn max_pool_propagates_nan_on_an_odd_plane() {
        // A NaN poisons exactly the windows that contain it (stem pool geometry, 11x13 plane).
        let (h, w) = (11, 13);
        let p = PoolParams::new(3, 2, 1);
        let (oh, ow) = p.out_hw(h, w).unwrap();
        let mut x = uniform_vec(8, "nan", h * w, -1.0, 1.0);
        x[4 * w + 7] = f32::NAN; // row 4, column 7
        let mut y = vec![0.0; oh * ow];
        max_pool2d(&x, 1, 1, h, w, &p, &mut y);
        for i in 0..oh {
            for j in 0..ow {
                // Output (i, j) covers rows 2i-1..=2i+1 and columns 2j-1..=2j+1.
                let covers = (2 * i).abs_diff(4) <= 1 && (2 * j).abs_diff(7) <= 1;
                assert_eq!(y[i * ow + j].is_nan(), covers, "at {i},{j}");
            }
        }
    }

    #[test]
    fn average_pools() {
        // Hand case: 1x1x3x3, adaptive to 2x2: bins rows {0..2, 1..3}, cols likewise.
        let x = [1., 2., 3., 4., 5., 6., 7., 8., 9.];
        let mut y = [0.0; 4];
        adaptive_avg_pool2d(&x, 1, 1, 3, 3, 2, 2, &mut y);
        assert_eq!(y, [3., 4., 6., 7.]); // (1+2+4+5)/4, (2+3+5+6)/4, (4+5+7+8)/4, (5+6+8+9)/4
                                         // Upsampling bins (OH > H): 1x1x2x2 -> 3x3; bins rows {0..1, 0..2, 1..2}.
        let x2 = [1., 2., 3., 4.];
        let mut y2 = [0.0; 9];
        adaptive_avg_pool2d(&x2, 1, 1, 2, 2, 3, 3, &mut y2);
        assert_eq!(y2, [1., 1.5, 2., 2., 2.5, 3., 3., 3.5, 4.]);
        // Global pool == adaptive to 1x1 == plain mean (rel tol: f32 summation order differs).
        let (n, c, h, w) = (2, 5, 7, 6);
        let xr = uniform_vec(9, "g", n * c * h * w, -1.0, 1.0);
        let mut g = vec![0.0; n * c];
        let mut a = vec![0.0; n * c];
        global_avg_pool(&xr, n, c, h, w, &mut g);
        adaptive_avg_pool2d(&xr, n, c, h, w, 1, 1, &mut a);
        for i in 0..n * c {
            let mean = xr[i * h * w..(i + 1) * h * w].iter().map(|&v| v as f64).sum::<f64>() / (h * w) as f64;
            assert!((g[i] as f64 - mean).abs() < 1e-6 && (a[i] as f64 - mean).abs() < 1e-6);
        }
        // Divisible case = average pool with kernel = stride = H/OH (7x7 -> 7x7 is the identity).
        let mut same = vec![0.0; xr.len()];
        adaptive_avg_pool2d(&xr, n, c, h, w, h, w, &mut same);
        assert_eq!(same, xr);
    }
}
