//! Winograd F(2x2, 3x3) and F(4x4, 3x3) (`f4`) convolution for 3x3, stride-1, pad-1 layers
//! (ResNet's 3x3 convs). The method is written out below for F(2x2); F(4x4) is the same with 6x6
//! input tiles, 36 GEMMs and the matrices in `f4`.
//!
//! Math (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016). Cut the padded
//! input of each (image, channel) into 4x4 tiles `d` that overlap by 2 (tile (ty, tx) starts at
//! padded row 2*ty, column 2*tx); each yields a 2x2 output block. For one input and one output
//! channel, with the 3x3 filter `g`,
//!
//! ```text
//! Y (2x2) = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A            U = G g Gᵀ (4x4), V = Bᵀ d B (4x4)
//!
//!      | 1    0    0  |        | 1  0 -1  0 |        | 1  1  1  0 |
//! G =  | 1/2  1/2  1/2|   Bᵀ = | 0  1  1  0 |   Aᵀ = | 0  1 -1 -1 |
//!      | 1/2 -1/2  1/2|        | 0 -1  1  0 |
//!      | 0    0    1  |        | 0  1  0 -1 |
//! ```
//!
//! Summed over input channels, the element-wise product becomes 16 independent GEMMs, one per
//! position e = (i, j) of the 4x4 tile:
//!
//! ```text
//! M[e] (K, T) = U[e] (K, C) · V[e] (C, T)          T = tiles = N * ceil(H/2) * ceil(W/2)
//! y[k, tile] = Aᵀ M[., k, tile] A + bias[k] (+ residual) (then ReLU)
//! ```
//!
//! 16 * C * K multiplies per tile instead of 36 * C * K for the four outputs of direct
//! convolution: 2.25x fewer FLOPs, paid for by the transforms (which are adds only, memory-bound)
//! and by a weight 16/9 as large. Odd H or W: the last tile row/column is a partial tile (its
//! input beyond the image reads as zero padding, its outputs beyond the image are not stored).
//!
//! The weight transform runs once (`WinogradWeights::new`); each U[e] is packed into GEMM A panels
//! (`pack_a`). The forward (`winograd_forward`) walks the tiles in blocks of whole tile rows (so
//! the scratch stays a few MB): input transform (parallel over channels) -> 16 GEMMs on pre-packed
//! A (parallel over e) -> output transform with bias, residual and ReLU fused (parallel over
//! output channels).
//!
//! Accuracy: exact in real arithmetic; in f32 the transforms add a few roundings and the GEMMs sum
//! C products instead of 9C, so the error is of the same order as direct convolution's (see
//! tests/winograd.rs for the bound and the measured values).

use crate::cpu::blocked::{columns_from_blocked, columns_to_blocked};
use crate::cpu::conv::{ConvParams, ConvWeights};
use crate::cpu::gemm::{
    detect_isa, pack_a_with_isa, sgemm_packed_a, Epilogue, Isa, MatRef, PackedA, COL_BLOCK,
};
use crate::cpu::SharedMut;
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Where element (c, n, y, x) of an activation of spatial size (H, W) lives. Plain layouts
/// (`block_stride` 0): `c * c_stride + n * n_stride + y * W + x`; NCHW is `nchw(C, H, W)`, a
/// (C, N, H, W) layout `cnhw(N, H, W)`. Column-blocked (`blocked(C, H, W)`, `cpu::blocked`): the
/// (C, N*H*W) matrix in blocks of 32 columns (`c_stride` 32, `n_stride` H*W, `block_stride` C*32);
/// `winograd_forward` moves such activations through plain windows (see there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActLayout {
    pub c_stride: usize,
    pub n_stride: usize,
    /// C * 32 for the column-blocked layout, 0 for the plain ones.
    pub block_stride: usize,
}

impl ActLayout {
    /// (N, C, H, W) row-major.
    pub fn nchw(c: usize, h: usize, w: usize) -> Self {
        ActLayout { c_stride: h * w, n_stride: c * h * w, block_stride: 0 }
    }
    /// (C, N, H, W) row-major.
    pub fn cnhw(n: usize, h: usize, w: usize) -> Self {
        ActLayout { c_stride: n * h * w, n_stride: h * w, block_stride: 0 }
    }
    /// (C, N*H*W) column-blocked (`cpu::blocked`).
    pub fn blocked(c: usize, h: usize, w: usize) -> Self {
        ActLayout { c_stride: COL_BLOCK, n_stride: h * w, block_stride: c * COL_BLOCK }
    }
    fn is_blocked(&self) -> bool {
        self.block_stride > 0
    }
    /// Smallest slice length that holds (c, n, h, w) elements in this layout.
    pub fn len(&self, c: usize, n: usize, h: usize, w: usize) -> usize {
        if c == 0 || n == 0 || h == 0 || w == 0 {
            return 0;
        }
        if self.is_blocked() {
            return (n * h * w).div_ceil(COL_BLOCK) * self.block_stride;
        }
        (c - 1) * self.c_stride + (n - 1) * self.n_stride + h * w
    }
    /// True if no two (c, n, y, x) of a (c, n, h, w) activation share an address: the outer
    /// dimensions (those of size > 1), ordered by stride, each step over at least everything inside.
    /// (A blocked layout is, when its blocks hold c channels and its images follow each other.)
    fn injective(&self, c: usize, n: usize, h: usize, w: usize) -> bool {
        if self.is_blocked() {
            return self.c_stride == COL_BLOCK
                && self.block_stride == c * COL_BLOCK
                && self.n_stride == h * w;
        }
        let mut dims: Vec<(usize, usize)> =
            [(self.c_stride, c), (self.n_stride, n)].into_iter().filter(|&(_, cnt)| cnt > 1).collect();
        dims.sort_unstable();
        let mut span = h * w;
        for (stride, cnt) in dims {
            if stride < span {
                return false;
            }
            span = stride.saturating_mul(cnt);
        }
        true
    }
}

/// How the rows of one channel lie in a plain layout, or in a window of one: row (img, y) of
/// width W starts at `img * ns + y * W - org` from the channel's first element (`org` is the
/// window's first pixel, 0 for a whole activation).
#[derive(Clone, Copy, Debug)]
struct Plane {
    ns: usize,
    org: usize,
}

impl Plane {
    #[inline]
    fn row(self, img: usize, y: usize, w: usize) -> usize {
        let p = img * self.ns + y * w;
        debug_assert!(p >= self.org, "row ({img}, {y}) lies before the window at {}", self.org);
        p - self.org
    }
}

/// True for the convolutions this module computes: 3x3, stride 1, padding 1, dilation 1.
pub fn winograd_applicable(w: &ConvWeights, p: &ConvParams) -> bool {
    w.r == 3 && w.s == 3 && p.stride == (1, 1) && p.pad == (1, 1) && p.dilation == (1, 1)
}

/// Which Winograd algorithm: F(m x m, 3x3) on tiles of a x a = (m + 2) x (m + 2) inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WinoTile {
    /// F(2x2, 3x3): 16 GEMMs, 2.25x fewer multiplies than direct convolution.
    F2,
    /// F(4x4, 3x3) (`f4`): 36 GEMMs, 4x fewer multiplies; ~5x the F2 rounding error (still >6x
    /// inside tests/winograd.rs's bound), and the transformed weights are 36/9 = 4x the raw ones.
    F4,
}

impl WinoTile {
    /// Output tile side m.
    pub fn m(self) -> usize {
        match self {
            WinoTile::F2 => 2,
            WinoTile::F4 => 4,
        }
    }
    /// Number of element-wise positions (GEMMs): (m + 2)².
    pub fn positions(self) -> usize {
        (self.m() + 2) * (self.m() + 2)
    }
    pub fn name(self) -> &'static str {
        match self {
            WinoTile::F2 => "F(2x2,3x3)",
            WinoTile::F4 => "F(4x4,3x3)",
        }
    }
}

/// A 3x3 convolution's weights transformed for F(m x m, 3x3): U[e] = (G g Gᵀ)[e] as (m + 2)²
/// (K, C) matrices, each packed into GEMM A panels for one ISA.
#[derive(Clone, Debug)]
pub struct WinogradWeights {
    pub k: usize,
    pub c: usize,
    pub tile: WinoTile,
    /// (K); zeros when the conv has no bias.
    pub bias: Vec<f32>,
    /// U[e], e = a*i + j, each (K, C) packed.
    u: Vec<PackedA>,
    isa: Isa,
}

/// G (4x3) of F(2x2, 3x3), see the module comment.
const G: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];

/// U = G g Gᵀ ((m + 2)², row-major) for one 3x3 filter `g` (row-major), in f64 so the only
/// rounding is the final one.
pub fn transform_filter(tile: WinoTile, g: &[f32]) -> Vec<f32> {
    let gm: &[[f64; 3]] = match tile {
        WinoTile::F2 => &G,
        WinoTile::F4 => &f4::G,
    };
    let a = gm.len();
    let gg: Vec<[f64; 3]> = // G g (a x 3)
        gm.iter().map(|gi| std::array::from_fn(|j| (0..3).map(|p| gi[p] * g[p * 3 + j] as f64).sum())).collect();
    let mut u = vec![0.0f32; a * a];
    for i in 0..a {
        for j in 0..a {
            u[i * a + j] = (0..3).map(|p| gg[i][p] * gm[j][p]).sum::<f64>() as f32;
        }
    }
    u
}

impl WinogradWeights {
    /// From a raw (K, C, 3, 3) row-major weight and an optional bias (K). Panics on a size
    /// mismatch (a caller bug: layer shapes are checked where weights are loaded).
    pub fn new(tile: WinoTile, weight: &[f32], bias: Option<&[f32]>, k: usize, c: usize) -> Self {
        Self::new_with_isa(detect_isa(), tile, weight, bias, k, c)
    }

    /// `new`, packed for a chosen (supported) ISA's GEMM kernel (tests run every path).
    pub fn new_with_isa(
        isa: Isa,
        tile: WinoTile,
        weight: &[f32],
        bias: Option<&[f32]>,
        k: usize,
        c: usize,
    ) -> Self {
        assert_eq!(weight.len(), k * c * 9, "winograd weight size");
        let bias = bias.map_or_else(|| vec![0.0; k], |b| b.to_vec());
        assert_eq!(bias.len(), k, "winograd bias size");
        // (E, K, C): all U[e] side by side, then each packed.
        let ne = tile.positions();
        let mut ut = vec![0.0f32; ne * k * c];
        for ko in 0..k {
            for ci in 0..c {
                let o = (ko * c + ci) * 9;
                let u = transform_filter(tile, &weight[o..o + 9]);
                for (e, &v) in u.iter().enumerate() {
                    ut[(e * k + ko) * c + ci] = v;
                }
            }
        }
        let u = (0..ne)
            .map(|e| pack_a_with_isa(isa, MatRef::row_major(&ut[e * k * c..(e + 1) * k * c], k, c)))
            .collect();
        WinogradWeights { k, c, tile, bias, u, isa }
    }

    /// From a conv layer's (batch-norm folded) weights; an error if it is not 3x3.
    pub fn from_conv(w: &ConvWeights, tile: WinoTile) -> Result<Self> {
        if w.r != 3 || w.s != 3 {
            return Err(Error::shape(format!(
                "winograd {} needs a 3x3 kernel, got {}x{} ({} -> {} channels)",
                tile.name(),
                w.r,
                w.s,
                w.c,
                w.k
            )));
        }
        Ok(Self::new(tile, &w.weight, Some(&w.bias), w.k, w.c))
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }
}

/// The transforms work in fixed chunks of this many tiles (one AVX-512 register; 2 AVX2 / 4 SSE
/// registers) so that short rows (tw = 4..28 tiles) still run as whole vectors; rows of V and M are
/// padded by one chunk so that a chunk may run past the end of a row.
const L: usize = 16;

/// The chunk of `L` values at `at` (a fixed-size array, so the loops over it have no bounds checks
/// and vectorise).
#[inline(always)]
fn ch(s: &[f32], at: usize) -> &[f32; L] {
    s[at..at + L].try_into().expect("chunk in range")
}

#[inline(always)]
fn ch_mut(s: &mut [f32], at: usize) -> &mut [f32; L] {
    (&mut s[at..at + L]).try_into().expect("chunk in range")
}

/// Row length of V and M for a block of `tb` tiles (see `L`).
fn padded(tb: usize) -> usize {
    tb + L
}

/// The scratch the forward needs for a block of `tb` tiles: V (C, E, tb + L) and M (E, K, tb + L)
/// for E = `ne` positions.
fn block_floats(ne: usize, c: usize, k: usize, tb: usize) -> usize {
    ne * (c + k) * padded(tb)
}

/// Scratch budget per block (floats): 4 MiB for V and M of one block, the L2 of both cores here
/// (2 MiB each), so V and M stay close between the input transform, the GEMMs and the output
/// transform. (A sweep of 1-8 MiB budgets x 64-256 minimum tiles on the ResNet-50 shapes, 1 and 2
/// threads, batch 1 and 8: 4 MiB / 256 tiles was best or tied.)
const BLOCK_FLOATS: usize = 1 << 20;

/// ...but at least this many tiles per block: every block streams all U[e] (4 E K C bytes),
/// and a GEMM does 2 * tiles FLOPs per weight element it loads, so fewer tiles make the GEMMs
/// weight-bandwidth-bound (at 512 channels the weights are 16 MiB).
const MIN_TILES: usize = 256;

/// Tile rows per block: as many as fit the budget, at least `MIN_TILES` tiles, at least one row.
fn rows_per_block(ne: usize, c: usize, k: usize, tw: usize) -> usize {
    let fit = BLOCK_FLOATS / (ne * (c + k) * (tw + L));
    fit.max(MIN_TILES.div_ceil(tw)).max(1)
}

/// Workspace length (floats) `winograd_forward` uses for this layer and input size, with plain
/// layouts (a blocked input or output adds its windows).
pub fn workspace_len(wt: &WinogradWeights, n: usize, h: usize, w: usize) -> usize {
    let (m, ne) = (wt.tile.m(), wt.tile.positions());
    let (th, tw) = (h.div_ceil(m), w.div_ceil(m));
    let rows = rows_per_block(ne, wt.c, wt.k, tw).min(n * th);
    block_floats(ne, wt.c, wt.k, rows * tw)
}

/// y = act(conv3x3(x, w, pad 1, stride 1) + bias + residual) by F(2x2, 3x3) or F(4x4, 3x3) (as
/// the weights were transformed).
///
/// x: (C, N, H, W) elements in layout `xl`; y and the optional residual: (K, N, H, W) elements in
/// their layouts (see `ActLayout`). `ws` is scratch, grown as needed and reusable across calls
/// and layers. Panics if a slice is too short or the output layout overlaps itself (caller bugs).
#[allow(clippy::too_many_arguments)]
pub fn winograd_forward(
    wt: &WinogradWeights,
    x: &[f32],
    xl: ActLayout,
    n: usize,
    h: usize,
    w: usize,
    residual: Option<(&[f32], ActLayout)>,
    relu: bool,
    y: &mut [f32],
    yl: ActLayout,
    ws: &mut Vec<f32>,
) {
    let (c, k) = (wt.c, wt.k);
    if n == 0 || h == 0 || w == 0 || k == 0 {
        return;
    }
    assert!(x.len() >= xl.len(c, n, h, w), "winograd: input slice too short");
    assert!(y.len() >= yl.len(k, n, h, w), "winograd: output slice too short");
    assert!(yl.injective(k, n, h, w), "winograd: output layout {yl:?} overlaps itself");
    if let Some((r, rl)) = residual {
        assert!(r.len() >= rl.len(k, n, h, w), "winograd: residual slice too short");
        // A blocked output gets its residual added in `columns_to_blocked`, a plain one row by row.
        assert_eq!(rl.is_blocked(), yl.is_blocked(), "winograd: residual {rl:?} and output {yl:?} layouts");
        assert!(!rl.is_blocked() || rl.injective(k, n, h, w), "winograd: residual layout {rl:?}");
    }
    // (A blocked input is read through `columns_from_blocked` with C = wt.c and H*W per image.)
    assert!(!xl.is_blocked() || xl.injective(c, n, h, w), "winograd: input layout {xl:?}");
    let (m, ne) = (wt.tile.m(), wt.tile.positions());
    let (th, tw) = (h.div_ceil(m), w.div_ceil(m));
    let rows_total = n * th;
    let rpb = rows_per_block(ne, c, k, tw).min(rows_total);
    let geo = Geo { h, w, th, tw };
    // Column-blocked input or output goes through a plain (channel-major) window of the tile rows
    // at hand: the transforms walk one channel's rows, which blocked lie in 32-column pieces C*128
    // bytes apart (across pages, where no prefetcher follows: ~15-20% slower at batch 8), while the
    // copies between window and blocks walk both in order.
    let (win_in, win_out) = (
        if xl.is_blocked() { c * window_cols(&geo, m, rows_total, rpb, true) } else { 0 },
        if yl.is_blocked() { k * window_cols(&geo, m, rows_total, rpb, false) } else { 0 },
    );
    let need = block_floats(ne, c, k, rpb * tw) + win_in + win_out;
    if ws.len() < need {
        ws.resize(need, 0.0);
    }
    let yp = SharedMut::new(y.as_mut_ptr());
    let mut g0 = 0;
    while g0 < rows_total {
        let g1 = (g0 + rpb).min(rows_total);
        let tb = (g1 - g0) * tw;
        let ld = padded(tb);
        let (v, rest) = ws.split_at_mut(ne * c * ld);
        let (mm, rest) = rest.split_at_mut(ne * k * ld);
        let (xwin, ywin) = rest.split_at_mut(win_in);
        let (xs, xpl) = if xl.is_blocked() {
            // Input rows m*ty - 1 .. m*ty + m + 1 of tile rows g0..g1.
            let (pa, pb) = window(&geo, m, g0, g1, true);
            let xwin = &mut xwin[..c * (pb - pa)];
            columns_from_blocked(x, c, pa, pb, xwin);
            (&xwin[..], (pb - pa, Plane { ns: h * w, org: pa }))
        } else {
            (x, (xl.c_stride, Plane { ns: xl.n_stride, org: 0 }))
        };
        input_transform(wt, xs, xpl, &geo, g0, g1, v);
        // E GEMMs: M[e] (K, tb) = U[e] (K, C) · V[e] (C, tb); rows of V[e] are E*ld apart.
        let v: &[f32] = v;
        mm.par_chunks_mut(k * ld).zip(wt.u.par_iter()).enumerate().for_each(|(e, (me, ue))| {
            let b = MatRef::row_major_ld(&v[e * ld..], c, tb, ne * ld);
            sgemm_packed_a(ue, b, me, ld, &Epilogue::default());
        });
        if yl.is_blocked() {
            // Output rows m*ty .. m*ty + m: bias only into the window, then residual and ReLU on
            // the way to the blocks ((s + bias) + residual, as `store_row` sums it).
            let (qa, qb) = window(&geo, m, g0, g1, false);
            let ywin = &mut ywin[..k * (qb - qa)];
            let wp = SharedMut::new(ywin.as_mut_ptr());
            output_transform(wt, mm, &geo, g0, g1, None, false, wp, (qb - qa, Plane { ns: h * w, org: qa }));
            // SAFETY: the output tasks have joined; y is borrowed mutably by this call.
            let yb = unsafe { std::slice::from_raw_parts_mut(yp.get(), yl.len(k, n, h, w)) };
            columns_to_blocked(ywin, k, qa, qb, yb, residual.map(|(r, _)| r), relu);
        } else {
            let res = residual.map(|(r, rl)| (r, rl.c_stride, rl.n_stride));
            output_transform(
                wt,
                mm,
                &geo,
                g0,
                g1,
                res,
                relu,
                yp,
                (yl.c_stride, Plane { ns: yl.n_stride, org: 0 }),
            );
        }
        g0 = g1;
    }
}

/// The pixels (columns of the (C, N*H*W) matrix) that tile rows g0..g1 of F(m x m, 3x3) touch:
/// input rows m*ty - 1 ..= m*ty + m of each (`input`) or output rows m*ty .. m*ty + m, clipped to
/// the image; consecutive in pixel order (images follow each other), as (first, end).
fn window(geo: &Geo, m: usize, g0: usize, g1: usize, input: bool) -> (usize, usize) {
    let (lo, hi) = if input { (1, m + 1) } else { (0, m) };
    let (img0, ty0) = (g0 / geo.th, g0 % geo.th);
    let (img1, ty1) = ((g1 - 1) / geo.th, (g1 - 1) % geo.th);
    let first = (m * ty0).saturating_sub(lo);
    let last = (m * ty1 + hi).min(geo.h);
    (img0 * geo.h * geo.w + first * geo.w, img1 * geo.h * geo.w + last * geo.w)
}

/// The widest `window` over the blocks of `rpb` tile rows that `winograd_forward` walks.
fn window_cols(geo: &Geo, m: usize, rows_total: usize, rpb: usize, input: bool) -> usize {
    (0..rows_total)
        .step_by(rpb.max(1))
        .map(|g0| {
            let (a, b) = window(geo, m, g0, (g0 + rpb).min(rows_total), input);
            b - a
        })
        .max()
        .unwrap_or(0)
}

/// `winograd_forward` on NCHW tensors, with the argument order of `conv::conv2d_forward`:
/// x (N, C, H, W), y and residual (N, K, H, W).
#[allow(clippy::too_many_arguments)]
pub fn winograd_forward_nchw(
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    wt: &WinogradWeights,
    residual: Option<&[f32]>,
    relu: bool,
    y: &mut [f32],
    ws: &mut Vec<f32>,
) {
    let yl = ActLayout::nchw(wt.k, h, w);
    winograd_forward(wt, x, ActLayout::nchw(wt.c, h, w), n, h, w, residual.map(|r| (r, yl)), relu, y, yl, ws);
}

/// Spatial geometry of one call: images of H x W, th x tw tiles each.
struct Geo {
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
}

/// Defines `dispatch_input` (one input channel's transform on the ISA the weights were packed
/// for) and its two `target_feature` wrappers around this module's (or `f4`'s) `input_channel`,
/// given the portable and the AVX-512 row splitters: the same body compiled per ISA. (The AVX-512
/// splitter is a closure inside the AVX-512 wrapper, whose feature it inherits, so calling the
/// `target_feature` function in it is safe.)
macro_rules! input_dispatch {
    ($vis:vis fn $name:ident, $split:expr, $split_avx512:expr) => {
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(
            isa: Isa,
            xc: &[f32],
            pl: Plane,
            geo: &Geo,
            g0: usize,
            g1: usize,
            buf: &mut [f32],
            vc: &mut [f32],
        ) {
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: weights are only packed for an ISA this CPU supports
                // (`Isa::supported`), so the features the wrapper enables are present.
                Isa::Avx512 => unsafe { input_channel_avx512(xc, pl, geo, g0, g1, buf, vc) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Isa::Avx2Fma => unsafe { input_channel_avx2(xc, pl, geo, g0, g1, buf, vc) },
                _ => input_channel(xc, pl, geo, g0, g1, buf, vc, $split),
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        fn input_channel_avx512(
            xc: &[f32],
            pl: Plane,
            geo: &Geo,
            g0: usize,
            g1: usize,
            buf: &mut [f32],
            vc: &mut [f32],
        ) {
            input_channel(xc, pl, geo, g0, g1, buf, vc, $split_avx512)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn input_channel_avx2(
            xc: &[f32],
            pl: Plane,
            geo: &Geo,
            g0: usize,
            g1: usize,
            buf: &mut [f32],
            vc: &mut [f32],
        ) {
            input_channel(xc, pl, geo, g0, g1, buf, vc, $split)
        }
    };
}

mod f4;

/// V[c][e][t] = (Bᵀ d B)[e] for the tiles of tile rows g0..g1 (g = image * th + ty), parallel over
/// input channels. v: (C, E, ld).
fn input_transform(
    wt: &WinogradWeights,
    x: &[f32],
    (cs, pl): (usize, Plane),
    geo: &Geo,
    g0: usize,
    g1: usize,
    v: &mut [f32],
) {
    let (isa, c, ne) = (wt.isa, wt.c, wt.tile.positions());
    let ld = padded((g1 - g0) * geo.tw);
    // At least ~16K outputs per task so small blocks do not drown in scheduling.
    let min_len = (16384 / (ne * ld)).max(1);
    let buf_len = match wt.tile {
        WinoTile::F2 => input_buf_len(geo.tw),
        WinoTile::F4 => f4::input_buf_len(geo.tw),
    };
    v[..c * ne * ld].par_chunks_mut(ne * ld).with_min_len(min_len).enumerate().for_each_init(
        || vec![0.0f32; buf_len],
        |buf, (ci, vc)| {
            let xc = &x[ci * cs..];
            match wt.tile {
                WinoTile::F2 => dispatch_input(isa, xc, pl, geo, g0, g1, buf, vc),
                WinoTile::F4 => f4::dispatch_input(isa, xc, pl, geo, g0, g1, buf, vc),
            }
        },
    );
}

input_dispatch!(fn dispatch_input, split_row, |row, _, e, o| split_row_avx512(row, e, o));

/// Splits one input row into the even and odd columns of its zero-padded version:
/// E[i] = padded[2i] = row[2i - 1], O[i] = padded[2i + 1] = row[2i] (zero outside the row), for
/// i < e.len() (a whole number of chunks). `prow` is scratch of 2 * e.len() floats whose entries
/// past w + 1 are zero. Portable: copy into the padded row, then split chunk by chunk.
#[inline(always)]
fn split_row(row: &[f32], prow: &mut [f32], e: &mut [f32], o: &mut [f32]) {
    let w = row.len();
    prow[0] = 0.0;
    prow[1..=w].copy_from_slice(row);
    for c0 in (0..e.len()).step_by(L) {
        let p: &[f32; 2 * L] = prow[2 * c0..2 * c0 + 2 * L].try_into().expect("chunk in range");
        let (ec, oc) = (ch_mut(e, c0), ch_mut(o, c0));
        for i in 0..L {
            ec[i] = p[2 * i];
            oc[i] = p[2 * i + 1];
        }
    }
}

/// `split_row` on AVX-512: masked loads straight from the row (lanes outside it read as zero,
/// which is the padding) and two two-source permutes per chunk; no padded copy, so no
/// store-to-load forwarding stall between a copy and the wider loads that follow it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn split_row_avx512(row: &[f32], e: &mut [f32], o: &mut [f32]) {
    use std::arch::x86_64::*;
    let w = row.len() as isize;
    let ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    // Bits j of a 16-lane mask for which row index start + j lies in 0..w.
    let mask = |start: isize| -> u16 {
        let lo = (-start).clamp(0, 16) as u32;
        let hi = (w - start).clamp(0, 16) as u32;
        if hi <= lo {
            0
        } else {
            ((((1u32 << hi) - 1) >> lo) << lo) as u16
        }
    };
    for c0 in (0..e.len()).step_by(L) {
        // padded[2 c0 + j] = row[2 c0 - 1 + j], j in 0..32.
        let start = 2 * c0 as isize - 1;
        let p = row.as_ptr();
        // SAFETY: a masked load touches only the lanes whose bit is set, and `mask` sets exactly
        // those with row index in 0..w, i.e. inside `row` (`wrapping_offset` only forms the
        // address; no masked-off lane is dereferenced). The stores write one whole chunk of e and
        // of o, in range because e.len() and o.len() are whole chunks (checked by `ch_mut`).
        unsafe {
            let a = _mm512_maskz_loadu_ps(mask(start), p.wrapping_offset(start));
            let b = _mm512_maskz_loadu_ps(mask(start + 16), p.wrapping_offset(start + 16));
            _mm512_storeu_ps(ch_mut(e, c0).as_mut_ptr(), _mm512_permutex2var_ps(a, ie, b));
            _mm512_storeu_ps(ch_mut(o, c0).as_mut_ptr(), _mm512_permutex2var_ps(a, io, b));
        }
    }
}

/// Length of a split row (E or O): the tw + 1 values a tile row reads, rounded up to whole chunks
/// plus one chunk (tile tx reads index tx + 1).
fn split_len(tw: usize) -> usize {
    tw.div_ceil(L) * L + L
}

/// Scratch of one input-transform task: the padded input row, 4 split rows and 4 t-rows.
fn input_buf_len(tw: usize) -> usize {
    let len = split_len(tw);
    2 * len + 16 * len
}

/// One input channel's transform. For each tile row, the four padded input rows (2ty-1 .. 2ty+2)
/// are split into even and odd padded columns (E[i] = padded[2i], O[i] = padded[2i+1]), so tile
/// tx reads E[tx], O[tx], E[tx+1], O[tx+1] and every step below is an element-wise loop over tx,
/// run in whole chunks of `L` (the padding beyond the image reads as zero, and values computed
/// past tile tw - 1 land in the padding of V's rows).
///   rows:    t0 = d0 - d2, t1 = d1 + d2, t2 = d2 - d1, t3 = d1 - d3          (Bᵀ d)
///   columns: v0 = E0 - E1, v1 = O0 + E1, v2 = E1 - O0, v3 = O0 - O1          (· B)
/// The split rows live in 4 slots indexed by (input row + 1) % 4, so the two rows a tile row shares
/// with the previous one (tiles overlap by 2) are split only once.
/// buf: `input_buf_len(tw)` floats; vc: (16, ld) for this channel.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn input_channel(
    xc: &[f32],
    pl: Plane,
    geo: &Geo,
    g0: usize,
    g1: usize,
    buf: &mut [f32],
    vc: &mut [f32],
    split: impl Fn(&[f32], &mut [f32], &mut [f32], &mut [f32]),
) {
    let (h, w, th, tw) = (geo.h, geo.w, geo.th, geo.tw);
    let len = split_len(tw);
    let twc = tw.div_ceil(L) * L; // tiles rounded up to whole chunks
    let ld = padded((g1 - g0) * tw);
    // prow: [0, row[0..w], 0...] (2 * len; only 1..=w is ever written, so the rest stays zero).
    let (prow, rest) = buf.split_at_mut(2 * len);
    let (rows, trows) = rest.split_at_mut(8 * len); // 4 slots x (E, O), then 4 t-rows x (E, O)
    for g in g0..g1 {
        let (img, ty) = (g / th, g % th);
        // Rows 0 and 1 of this tile row are rows 2 and 3 of the previous one (same image).
        let first = if g == g0 || ty == 0 { 0 } else { 2 };
        for r in first..4 {
            let slot = (2 * ty + r) % 4;
            let (e, o) = rows[2 * slot * len..(2 * slot + 2) * len].split_at_mut(len);
            let iy = (2 * ty + r) as isize - 1;
            if iy < 0 || iy >= h as isize {
                e.fill(0.0);
                o.fill(0.0);
                continue;
            }
            let r0 = pl.row(img, iy as usize, w);
            split(&xc[r0..r0 + w], prow, e, o);
        }
        // Bᵀ d on the rows, separately for the even and odd halves (element-wise over columns).
        let slot = |r: usize| (2 * ty + r) % 4;
        for half in 0..2 {
            let d = |r: usize| &rows[(2 * slot(r) + half) * len..(2 * slot(r) + half + 1) * len];
            let (d0, d1, d2, d3) = (d(0), d(1), d(2), d(3));
            let (t0, rest) = trows[half * len..].split_at_mut(len);
            let (t1, rest) = rest[len..].split_at_mut(len);
            let (t2, rest) = rest[len..].split_at_mut(len);
            let t3 = &mut rest[len..2 * len];
            for c0 in (0..len).step_by(L) {
                // Whole chunks in and out through locals: LLVM cannot see that the slices do not
                // alias once inlined, and would otherwise keep every load after every store.
                let (a0, a1, a2, a3) = (*ch(d0, c0), *ch(d1, c0), *ch(d2, c0), *ch(d3, c0));
                *ch_mut(t0, c0) = std::array::from_fn(|i| a0[i] - a2[i]);
                *ch_mut(t1, c0) = std::array::from_fn(|i| a1[i] + a2[i]);
                *ch_mut(t2, c0) = std::array::from_fn(|i| a2[i] - a1[i]);
                *ch_mut(t3, c0) = std::array::from_fn(|i| a1[i] - a3[i]);
            }
        }
        // · B on the columns; writes V[ri*4 + j][tile] for the tiles of this row (whole chunks:
        // anything past tile tw - 1 is overwritten by the next tile row or lands in the padding).
        let toff = (g - g0) * tw;
        for ri in 0..4 {
            let e = &trows[2 * ri * len..(2 * ri + 1) * len];
            let o = &trows[(2 * ri + 1) * len..(2 * ri + 2) * len];
            let (v0, rest) = vc[ri * 4 * ld + toff..].split_at_mut(ld);
            let (v1, rest) = rest.split_at_mut(ld);
            let (v2, v3) = rest.split_at_mut(ld);
            for c0 in (0..twc).step_by(L) {
                // (Copied into locals: plain unaligned vector loads, no cross-chunk shuffles.)
                let (e0, e1, o0, o1) = (*ch(e, c0), *ch(e, c0 + 1), *ch(o, c0), *ch(o, c0 + 1));
                *ch_mut(v0, c0) = std::array::from_fn(|i| e0[i] - e1[i]);
                *ch_mut(v1, c0) = std::array::from_fn(|i| o0[i] + e1[i]);
                *ch_mut(v2, c0) = std::array::from_fn(|i| e1[i] - o0[i]);
                *ch_mut(v3, c0) = std::array::from_fn(|i| o0[i] - o1[i]);
            }
        }
    }
}

/// y[k, 2x2 block] = Aᵀ M[., k, tile] A + bias[k] (+ residual), ReLU; parallel over output
/// channels. Each of the two output rows of a tile row is assembled in `buf` (columns interleaved:
/// buf[2tx + j]) and stored once, clipped to W.
///   rows:    s0 = m0 + m1 + m2, s1 = m1 - m2 - m3                (Aᵀ m, per column j)
///   columns: y0 = s0 + s1 + s2, y1 = s1 - s2 - s3                (· A)
#[allow(clippy::too_many_arguments)]
fn output_transform(
    wt: &WinogradWeights,
    m: &[f32],
    geo: &Geo,
    g0: usize,
    g1: usize,
    residual: Option<(&[f32], usize, usize)>,
    relu: bool,
    yp: SharedMut,
    (ycs, pl): (usize, Plane),
) {
    let k = wt.k;
    let ld = padded((g1 - g0) * geo.tw);
    let ne = wt.tile.positions();
    let min_len = (16384 / (ne * ld)).max(1);
    let isa = wt.isa;
    let f4 = wt.tile == WinoTile::F4;
    let twc = geo.tw.div_ceil(L) * L;
    (0..k).into_par_iter().with_min_len(min_len).for_each_init(
        || vec![0.0f32; if f4 { 16 * twc } else { 4 * twc }],
        |buf, ko| {
            let res = residual.map(|(r, rcs, rns)| (&r[ko * rcs..], rns));
            let job = OutJob { m, k, ko, ld, bias: wt.bias[ko], res, relu, geo, g0, g1 };
            // SAFETY: output channel `ko` is written only by this task (the output layout was
            // checked injective; a window's channel rows follow each other), the tasks join before
            // the transform returns, and its
            // rows lie within `y` (length checked against the layout by the caller); buf is the
            // length the tile's `output_channel` assembles its rows in.
            unsafe {
                let yk = yp.get().add(ko * ycs);
                if f4 {
                    f4::output_channel_for(isa, &job, buf, yk, pl)
                } else {
                    output_channel_for(isa, &job, buf, yk, pl)
                }
            }
        },
    );
}

/// `output_channel` on the ISA the weights were packed for.
///
/// # Safety
/// As `output_channel`.
unsafe fn output_channel_for(isa: Isa, job: &OutJob, buf: &mut [f32], yk: *mut f32, pl: Plane) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the ISA was checked supported when the weights were packed; the rest forwarded.
        Isa::Avx512 => unsafe { output_channel_avx512(job, buf, yk, pl) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2Fma => unsafe { output_channel_avx2(job, buf, yk, pl) },
        // SAFETY: forwarded contract.
        _ => unsafe { output_channel(job, buf, yk, pl) },
    }
}

/// What one output channel's transform reads.
struct OutJob<'a> {
    m: &'a [f32],
    k: usize,
    ko: usize,
    /// Row length of M.
    ld: usize,
    bias: f32,
    /// This channel's residual (offset to channel ko) and its image stride.
    res: Option<(&'a [f32], usize)>,
    relu: bool,
    geo: &'a Geo,
    g0: usize,
    g1: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
/// # Safety
/// As `output_channel`, on a CPU with AVX-512F.
unsafe fn output_channel_avx512(j: &OutJob, buf: &mut [f32], yk: *mut f32, pl: Plane) {
    // SAFETY: forwarded contract.
    unsafe { output_channel(j, buf, yk, pl) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
/// # Safety
/// As `output_channel`, on a CPU with AVX2 and FMA.
unsafe fn output_channel_avx2(j: &OutJob, buf: &mut [f32], yk: *mut f32, pl: Plane) {
    // SAFETY: forwarded contract.
    unsafe { output_channel(j, buf, yk, pl) }
}

/// One output channel's transform for tile rows g0..g1.
///
/// # Safety
/// `yk` points at output channel k's first element (of the activation or of the window); for
/// every row (n, y) of tile rows `j.g0..j.g1`, `yk + pl.row(n, y, W) .. + W` must be writable and
/// written by no one else meanwhile.
#[inline(always)]
unsafe fn output_channel(j: &OutJob, buf: &mut [f32], yk: *mut f32, pl: Plane) {
    let (h, w, th, tw) = (j.geo.h, j.geo.w, j.geo.th, j.geo.tw);
    let (ld, k) = (j.ld, j.k);
    let twc = tw.div_ceil(L) * L;
    // M[e][ko][.] for the 16 e (whole padded rows: chunks may run past the block's last tile).
    let mrows: [&[f32]; 16] = std::array::from_fn(|e| &j.m[(e * k + j.ko) * ld..(e * k + j.ko + 1) * ld]);
    let (r0, r1) = buf.split_at_mut(2 * twc);
    for g in j.g0..j.g1 {
        let (img, ty) = (g / th, g % th);
        let toff = (g - j.g0) * tw;
        // Output rows 0 and 1 of the tile row, columns interleaved (r[2tx + j]), in chunks of L.
        let m: [&[f32]; 16] = std::array::from_fn(|e| &mrows[e][toff..toff + twc]);
        for c0 in (0..twc).step_by(L) {
            let mc: [[f32; L]; 16] = std::array::from_fn(|e| *ch(m[e], c0));
            let (mut y00, mut y01, mut y10, mut y11) = ([0.0f32; L], [0.0f32; L], [0.0f32; L], [0.0f32; L]);
            for i in 0..L {
                // Aᵀ m: s0 = tile rows 0 + 1 + 2, s1 = rows 1 - 2 - 3, per tile column.
                let s00 = mc[0][i] + mc[4][i] + mc[8][i];
                let s01 = mc[1][i] + mc[5][i] + mc[9][i];
                let s02 = mc[2][i] + mc[6][i] + mc[10][i];
                let s03 = mc[3][i] + mc[7][i] + mc[11][i];
                let s10 = mc[4][i] - mc[8][i] - mc[12][i];
                let s11 = mc[5][i] - mc[9][i] - mc[13][i];
                let s12 = mc[6][i] - mc[10][i] - mc[14][i];
                let s13 = mc[7][i] - mc[11][i] - mc[15][i];
                // · A: columns 0 + 1 + 2 and 1 - 2 - 3.
                y00[i] = s00 + s01 + s02;
                y01[i] = s01 - s02 - s03;
                y10[i] = s10 + s11 + s12;
                y11[i] = s11 - s12 - s13;
            }
            // Interleave the columns: r[2tx] = y.0, r[2tx + 1] = y.1.
            for (r, (ya, yb)) in [(&mut *r0, (&y00, &y01)), (&mut *r1, (&y10, &y11))] {
                *ch_mut(r, 2 * c0) = std::array::from_fn(|i| if i % 2 == 0 { ya[i / 2] } else { yb[i / 2] });
                *ch_mut(r, 2 * c0 + L) =
                    std::array::from_fn(|i| if i % 2 == 0 { ya[L / 2 + i / 2] } else { yb[L / 2 + i / 2] });
            }
        }
        for (i, src) in [&*r0, &*r1].into_iter().enumerate() {
            let oy = 2 * ty + i;
            if oy >= h {
                break;
            }
            // SAFETY: (img, oy) is a valid row of this channel (img < N, oy < H), which the caller
            // guarantees is writable by this task alone.
            unsafe { store_row(j, &src[..w], yk, pl, img, oy) };
        }
    }
}

/// Writes output row (img, oy) of channel `j.ko`: src (W values) + bias (+ residual), ReLU.
///
/// # Safety
/// As `output_channel`, for this one row (img < N, oy < H).
#[inline(always)]
unsafe fn store_row(j: &OutJob, src: &[f32], yk: *mut f32, pl: Plane, img: usize, oy: usize) {
    let w = src.len();
    let off = pl.row(img, oy, w);
    // SAFETY: forwarded contract: the row is writable by this task alone.
    let out = unsafe { std::slice::from_raw_parts_mut(yk.add(off), w) };
    let b = j.bias;
    match j.res {
        Some((r, rns)) => {
            let rr = &r[img * rns + oy * w..img * rns + oy * w + w];
            for ((o, &s), &rv) in out.iter_mut().zip(src).zip(rr) {
                let v = s + b + rv;
                *o = if j.relu { v.max(0.0) } else { v };
            }
        }
        None => {
            for (o, &s) in out.iter_mut().zip(src) {
                let v = s + b;
                *o = if j.relu { v.max(0.0) } else { v };
            }
        }
    }
}
