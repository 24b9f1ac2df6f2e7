//! Winograd F(2x2, 3x3) convolution for 3x3, stride-1, pad-1 layers (ResNet's 3x3 convs).
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

use crate::cpu::conv::{ConvParams, ConvWeights};
use crate::cpu::gemm::{detect_isa, pack_a_with_isa, sgemm_packed_a, Epilogue, Isa, MatRef, PackedA};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Where element (c, n, y, x) of a channel-major activation of spatial size (H, W) lives:
/// `c * c_stride + n * n_stride + y * W + x`. NCHW is `nchw(C, H, W)`; a (C, N, H, W) layout is
/// `cnhw(N, H, W)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActLayout {
    pub c_stride: usize,
    pub n_stride: usize,
}

impl ActLayout {
    /// (N, C, H, W) row-major.
    pub fn nchw(c: usize, h: usize, w: usize) -> Self {
        ActLayout { c_stride: h * w, n_stride: c * h * w }
    }
    /// (C, N, H, W) row-major.
    pub fn cnhw(n: usize, h: usize, w: usize) -> Self {
        ActLayout { c_stride: n * h * w, n_stride: h * w }
    }
    /// Smallest slice length that holds (c, n, h, w) elements in this layout.
    pub fn len(&self, c: usize, n: usize, h: usize, w: usize) -> usize {
        if c == 0 || n == 0 || h == 0 || w == 0 {
            return 0;
        }
        (c - 1) * self.c_stride + (n - 1) * self.n_stride + h * w
    }
    /// True if no two (c, n, y, x) of a (c, n, h, w) activation share an address: the outer
    /// dimensions (those of size > 1), ordered by stride, each step over at least everything inside.
    fn injective(&self, c: usize, n: usize, h: usize, w: usize) -> bool {
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

/// True for the convolutions this module computes: 3x3, stride 1, padding 1, dilation 1.
pub fn winograd_applicable(w: &ConvWeights, p: &ConvParams) -> bool {
    w.r == 3 && w.s == 3 && p.stride == (1, 1) && p.pad == (1, 1) && p.dilation == (1, 1)
}

/// A 3x3 convolution's weights transformed for F(2x2, 3x3): U[e] = (G g Gᵀ)[e] as 16 (K, C)
/// matrices, each packed into GEMM A panels for one ISA.
#[derive(Clone, Debug)]
pub struct WinogradWeights {
    pub k: usize,
    pub c: usize,
    /// (K); zeros when the conv has no bias.
    pub bias: Vec<f32>,
    /// U[e], e = 4*i + j, each (K, C) packed.
    u: Vec<PackedA>,
    isa: Isa,
}

/// G (4x3), see the module comment.
const G: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];

/// U = G g Gᵀ for one 3x3 filter `g` (row-major), in f64 so the only rounding is the final one.
pub fn transform_filter(g: &[f32]) -> [f32; 16] {
    let mut gg = [[0.0f64; 3]; 4]; // G g (4x3)
    for (i, row) in gg.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = (0..3).map(|p| G[i][p] * g[p * 3 + j] as f64).sum();
        }
    }
    let mut u = [0.0f32; 16];
    for i in 0..4 {
        for j in 0..4 {
            u[i * 4 + j] = (0..3).map(|p| gg[i][p] * G[j][p]).sum::<f64>() as f32;
        }
    }
    u
}

impl WinogradWeights {
    /// From a raw (K, C, 3, 3) row-major weight and an optional bias (K). Panics on a size
    /// mismatch (a caller bug: layer shapes are checked where weights are loaded).
    pub fn new(weight: &[f32], bias: Option<&[f32]>, k: usize, c: usize) -> Self {
        Self::new_with_isa(detect_isa(), weight, bias, k, c)
    }

    /// `new`, packed for a chosen (supported) ISA's GEMM kernel (tests run every path).
    pub fn new_with_isa(isa: Isa, weight: &[f32], bias: Option<&[f32]>, k: usize, c: usize) -> Self {
        assert_eq!(weight.len(), k * c * 9, "winograd weight size");
        let bias = bias.map_or_else(|| vec![0.0; k], |b| b.to_vec());
        assert_eq!(bias.len(), k, "winograd bias size");
        // (16, K, C): all U[e] side by side, then each packed.
        let mut ut = vec![0.0f32; 16 * k * c];
        for ko in 0..k {
            for ci in 0..c {
                let o = (ko * c + ci) * 9;
                let u = transform_filter(&weight[o..o + 9]);
                for (e, &v) in u.iter().enumerate() {
                    ut[(e * k + ko) * c + ci] = v;
                }
            }
        }
        let u = (0..16)
            .map(|e| pack_a_with_isa(isa, MatRef::row_major(&ut[e * k * c..(e + 1) * k * c], k, c)))
            .collect();
        WinogradWeights { k, c, bias, u, isa }
    }

    /// From a conv layer's (batch-norm folded) weights; an error if it is not 3x3.
    pub fn from_conv(w: &ConvWeights) -> Result<Self> {
        if w.r != 3 || w.s != 3 {
            return Err(Error::shape(format!(
                "winograd F(2x2,3x3) needs a 3x3 kernel, got {}x{} ({} -> {} channels)",
                w.r, w.s, w.c, w.k
            )));
        }
        Ok(Self::new(&w.weight, Some(&w.bias), w.k, w.c))
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }
}

/// The scratch the forward needs for a block of `tb` tiles: V (C, 16, tb) and M (16, K, tb).
fn block_floats(c: usize, k: usize, tb: usize) -> usize {
    16 * (c + k) * tb
}

/// Scratch budget per block (floats): 2 Mi floats = 8 MiB, a block of a few hundred tiles at
/// 256-512 channels (GEMM n >= 128, enough to amortise each GEMM's B packing) and the whole image
/// at 64 channels.
const BLOCK_FLOATS: usize = 2 << 20;

/// Tile rows per block: as many as fit the budget, at least one.
fn rows_per_block(c: usize, k: usize, tw: usize) -> usize {
    (BLOCK_FLOATS / block_floats(c, k, tw)).max(1)
}

/// Workspace length (floats) `winograd_forward` uses for this layer and input size.
pub fn workspace_len(wt: &WinogradWeights, n: usize, h: usize, w: usize) -> usize {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let rows = rows_per_block(wt.c, wt.k, tw).min(n * th);
    block_floats(wt.c, wt.k, rows * tw)
}

/// The output's base pointer, shared by the output-transform tasks, which write disjoint rows.
#[derive(Clone, Copy)]
struct YPtr(*mut f32);
// SAFETY: each task writes only the output rows of its own output channel k; the layout is checked
// injective before any task starts and the tasks are joined before `winograd_forward` returns, so
// no element is written twice concurrently and no access outlives the borrow of `y`.
unsafe impl Send for YPtr {}
// SAFETY: as above.
unsafe impl Sync for YPtr {}
impl YPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// y = act(conv3x3(x, w, pad 1, stride 1) + bias + residual) by F(2x2, 3x3).
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
    }
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let rows_total = n * th;
    let rpb = rows_per_block(c, k, tw).min(rows_total);
    let need = block_floats(c, k, rpb * tw);
    if ws.len() < need {
        ws.resize(need, 0.0);
    }
    let geo = Geo { h, w, th, tw };
    let yp = YPtr(y.as_mut_ptr());
    let mut g0 = 0;
    while g0 < rows_total {
        let g1 = (g0 + rpb).min(rows_total);
        let tb = (g1 - g0) * tw;
        let (v, rest) = ws.split_at_mut(16 * c * tb);
        let m = &mut rest[..16 * k * tb];
        input_transform(wt.isa, x, xl, c, &geo, g0, g1, v);
        // 16 GEMMs: M[e] (K, tb) = U[e] (K, C) · V[e] (C, tb), V[e] rows strided by 16*tb.
        let v: &[f32] = v;
        m.par_chunks_mut(k * tb).zip(wt.u.par_iter()).enumerate().for_each(|(e, (me, ue))| {
            let b = MatRef::row_major_ld(&v[e * tb..], c, tb, 16 * tb);
            sgemm_packed_a(ue, b, me, tb, &Epilogue::default());
        });
        output_transform(wt, m, &geo, g0, g1, residual, relu, yp, yl);
        g0 = g1;
    }
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

/// V[c][e][t] = (Bᵀ d B)[e] for the tiles of tile rows g0..g1 (g = image * th + ty), parallel over
/// input channels. v: (C, 16, tb).
#[allow(clippy::too_many_arguments)]
fn input_transform(
    isa: Isa,
    x: &[f32],
    xl: ActLayout,
    c: usize,
    geo: &Geo,
    g0: usize,
    g1: usize,
    v: &mut [f32],
) {
    let tb = (g1 - g0) * geo.tw;
    let len = geo.tw + 1;
    // At least ~16K outputs per task so small blocks do not drown in scheduling.
    let min_len = (16384 / (16 * tb)).max(1);
    v[..c * 16 * tb].par_chunks_mut(16 * tb).with_min_len(min_len).enumerate().for_each_init(
        || vec![0.0f32; 16 * len],
        |buf, (ci, vc)| {
            let xc = &x[ci * xl.c_stride..];
            dispatch_input(isa, xc, xl.n_stride, geo, g0, g1, buf, vc);
        },
    );
}

#[allow(clippy::too_many_arguments)]
fn dispatch_input(
    isa: Isa,
    xc: &[f32],
    ns: usize,
    geo: &Geo,
    g0: usize,
    g1: usize,
    buf: &mut [f32],
    vc: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: weights are only packed for an ISA this CPU supports (`Isa::supported`), so the
        // features the wrapper enables are present.
        Isa::Avx512 => unsafe { input_channel_avx512(xc, ns, geo, g0, g1, buf, vc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2Fma => unsafe { input_channel_avx2(xc, ns, geo, g0, g1, buf, vc) },
        _ => input_channel(xc, ns, geo, g0, g1, buf, vc),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn input_channel_avx512(
    xc: &[f32],
    ns: usize,
    geo: &Geo,
    g0: usize,
    g1: usize,
    buf: &mut [f32],
    vc: &mut [f32],
) {
    input_channel(xc, ns, geo, g0, g1, buf, vc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn input_channel_avx2(
    xc: &[f32],
    ns: usize,
    geo: &Geo,
    g0: usize,
    g1: usize,
    buf: &mut [f32],
    vc: &mut [f32],
) {
    input_channel(xc, ns, geo, g0, g1, buf, vc)
}

/// One input channel's transform. For each tile row, the four padded input rows (2ty-1 .. 2ty+2)
/// are split into even and odd padded columns (E[i] = padded[2i], O[i] = padded[2i+1], i <= tw),
/// so tile tx reads E[tx], O[tx], E[tx+1], O[tx+1] and every step below is an element-wise loop
/// over tx that the compiler vectorises.
///   rows:    t0 = d0 - d2, t1 = d1 + d2, t2 = d2 - d1, t3 = d1 - d3          (Bᵀ d)
///   columns: v0 = E0 - E1, v1 = O0 + E1, v2 = E1 - O0, v3 = O0 - O1          (· B)
/// buf: 16 * (tw + 1) floats; vc: (16, tb) for this channel.
#[inline(always)]
fn input_channel(xc: &[f32], ns: usize, geo: &Geo, g0: usize, g1: usize, buf: &mut [f32], vc: &mut [f32]) {
    let (h, w, th, tw) = (geo.h, geo.w, geo.th, geo.tw);
    let len = tw + 1;
    let tb = (g1 - g0) * tw;
    let (rows, trows) = buf.split_at_mut(8 * len); // 4 rows x (E, O), then 4 t-rows x (E, O)
    for g in g0..g1 {
        let (img, ty) = (g / th, g % th);
        let xi = &xc[img * ns..];
        for r in 0..4 {
            let (e, o) = rows[2 * r * len..(2 * r + 2) * len].split_at_mut(len);
            let iy = (2 * ty + r) as isize - 1;
            if iy < 0 || iy >= h as isize {
                e.fill(0.0);
                o.fill(0.0);
                continue;
            }
            let row = &xi[iy as usize * w..iy as usize * w + w];
            // padded[j] = row[j - 1] for 1 <= j <= w: E[i] = row[2i - 1], O[i] = row[2i].
            e[0] = 0.0;
            for i in 1..len {
                e[i] = if 2 * i <= w { row[2 * i - 1] } else { 0.0 };
            }
            for (i, oi) in o.iter_mut().enumerate() {
                *oi = if 2 * i < w { row[2 * i] } else { 0.0 };
            }
        }
        // Bᵀ d on the rows, separately for the even and odd halves (element-wise over columns).
        {
            let (d, t) = (&*rows, &mut *trows);
            for half in 0..2 {
                let dr = |r: usize| &d[(2 * r + half) * len..(2 * r + half + 1) * len];
                let (d0, d1, d2, d3) = (dr(0), dr(1), dr(2), dr(3));
                let (t0, rest) = t[half * len..].split_at_mut(len);
                for i in 0..len {
                    t0[i] = d0[i] - d2[i];
                }
                let t1 = &mut rest[len..2 * len];
                for i in 0..len {
                    t1[i] = d1[i] + d2[i];
                }
                let t2 = &mut rest[3 * len..4 * len];
                for i in 0..len {
                    t2[i] = d2[i] - d1[i];
                }
                let t3 = &mut rest[5 * len..6 * len];
                for i in 0..len {
                    t3[i] = d1[i] - d3[i];
                }
            }
        }
        // · B on the columns; writes V[ri*4 + j][tile] for the tw tiles of this row.
        let toff = (g - g0) * tw;
        for ri in 0..4 {
            let e = &trows[2 * ri * len..(2 * ri + 1) * len];
            let o = &trows[(2 * ri + 1) * len..(2 * ri + 2) * len];
            let base = (ri * 4) * tb + toff;
            let (v0, rest) = vc[base..].split_at_mut(tb);
            let (v1, rest) = rest.split_at_mut(tb);
            let (v2, v3) = rest.split_at_mut(tb);
            for tx in 0..tw {
                v0[tx] = e[tx] - e[tx + 1];
                v1[tx] = o[tx] + e[tx + 1];
                v2[tx] = e[tx + 1] - o[tx];
                v3[tx] = o[tx] - o[tx + 1];
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
    residual: Option<(&[f32], ActLayout)>,
    relu: bool,
    yp: YPtr,
    yl: ActLayout,
) {
    let k = wt.k;
    let tb = (g1 - g0) * geo.tw;
    let min_len = (16384 / (16 * tb)).max(1);
    let isa = wt.isa;
    (0..k).into_par_iter().with_min_len(min_len).for_each_init(
        || vec![0.0f32; 8 * geo.tw + 8],
        |buf, ko| {
            let res = residual.map(|(r, rl)| (&r[ko * rl.c_stride..], rl.n_stride));
            let job = OutJob { m, k, ko, tb, bias: wt.bias[ko], res, relu, geo, g0, g1 };
            // SAFETY: see `YPtr`: output channel `ko` is written only by this task, and its
            // rows lie within `y` (length checked against the layout by the caller).
            let yk = unsafe { yp.get().add(ko * yl.c_stride) };
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the ISA was checked supported when the weights were packed.
                Isa::Avx512 => unsafe { output_channel_avx512(&job, buf, yk, yl.n_stride) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Isa::Avx2Fma => unsafe { output_channel_avx2(&job, buf, yk, yl.n_stride) },
                // SAFETY: as in the dispatch above.
                _ => unsafe { output_channel(&job, buf, yk, yl.n_stride) },
            }
        },
    );
}

/// What one output channel's transform reads.
struct OutJob<'a> {
    m: &'a [f32],
    k: usize,
    ko: usize,
    tb: usize,
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
unsafe fn output_channel_avx512(j: &OutJob, buf: &mut [f32], yk: *mut f32, ns: usize) {
    // SAFETY: forwarded contract.
    unsafe { output_channel(j, buf, yk, ns) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
/// # Safety
/// As `output_channel`, on a CPU with AVX2 and FMA.
unsafe fn output_channel_avx2(j: &OutJob, buf: &mut [f32], yk: *mut f32, ns: usize) {
    // SAFETY: forwarded contract.
    unsafe { output_channel(j, buf, yk, ns) }
}

/// One output channel's transform for tile rows g0..g1.
///
/// # Safety
/// `yk` points at output channel k's element (n = 0, y = 0, x = 0); for every image n < N and row
/// y < H, `yk + n * ns + y * W .. + W` must be writable and written by no one else meanwhile.
#[inline(always)]
unsafe fn output_channel(j: &OutJob, buf: &mut [f32], yk: *mut f32, ns: usize) {
    let (h, w, th, tw) = (j.geo.h, j.geo.w, j.geo.th, j.geo.tw);
    let (tb, k) = (j.tb, j.k);
    // M[e][ko][.] for the 16 e.
    let me = |e: usize| &j.m[(e * k + j.ko) * tb..(e * k + j.ko + 1) * tb];
    let mrows: [&[f32]; 16] = std::array::from_fn(me);
    let (r0, r1) = buf.split_at_mut(4 * tw + 4);
    for g in j.g0..j.g1 {
        let (img, ty) = (g / th, g % th);
        let toff = (g - j.g0) * tw;
        let m = |e: usize| &mrows[e][toff..toff + tw];
        // s_i[col] for the 4 tile columns, then y rows 0 and 1 interleaved into r0, r1.
        let (m0, m1, m2, m3) = (m(0), m(1), m(2), m(3));
        let (m4, m5, m6, m7) = (m(4), m(5), m(6), m(7));
        let (m8, m9, m10, m11) = (m(8), m(9), m(10), m(11));
        let (m12, m13, m14, m15) = (m(12), m(13), m(14), m(15));
        for tx in 0..tw {
            // Aᵀ m: row sums over tile rows 0..2 (s0) and 1..3 with signs (s1), per column.
            let s00 = m0[tx] + m4[tx] + m8[tx];
            let s01 = m1[tx] + m5[tx] + m9[tx];
            let s02 = m2[tx] + m6[tx] + m10[tx];
            let s03 = m3[tx] + m7[tx] + m11[tx];
            let s10 = m4[tx] - m8[tx] - m12[tx];
            let s11 = m5[tx] - m9[tx] - m13[tx];
            let s12 = m6[tx] - m10[tx] - m14[tx];
            let s13 = m7[tx] - m11[tx] - m15[tx];
            r0[2 * tx] = s00 + s01 + s02;
            r0[2 * tx + 1] = s01 - s02 - s03;
            r1[2 * tx] = s10 + s11 + s12;
            r1[2 * tx + 1] = s11 - s12 - s13;
        }
        for (i, src) in [&*r0, &*r1].into_iter().enumerate() {
            let oy = 2 * ty + i;
            if oy >= h {
                break;
            }
            let off = img * ns + oy * w;
            // SAFETY: (img, oy) is a valid row of this channel (img < N, oy < H), which the caller
            // guarantees is writable by this task alone.
            let out = unsafe { std::slice::from_raw_parts_mut(yk.add(off), w) };
            let src = &src[..w];
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
    }
}
