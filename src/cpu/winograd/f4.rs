//! The F(4x4, 3x3) transforms; the method, the driver and the GEMMs are the parent module's.
//!
//! Interpolation points 0, 1, -1, 2, -2 and infinity (Lavin & Gray):
//!
//! ```text
//!      |  1/4    0     0   |        | 4  0 -5  0  1  0 |        | 1  1  1  1  1  0 |
//!      | -1/6  -1/6  -1/6  |        | 0 -4 -4  1  1  0 |   Aᵀ = | 0  1 -1  2 -2  0 |
//! G =  | -1/6   1/6  -1/6  |   Bᵀ = | 0  4 -4 -1  1  0 |        | 0  1  1  4  4  0 |
//!      | 1/24  1/12   1/6  |        | 0 -2 -1  2  1  0 |        | 0  1 -1  8 -8  1 |
//!      | 1/24 -1/12   1/6  |        | 0  2 -1 -2  1  0 |
//!      |  0      0     1   |        | 0  4  0 -5  0  1 |
//! ```
//!
//! Input tiles are 6x6 and overlap by 2 (tile (ty, tx) starts at padded row 4ty, column 4tx); each
//! gives a 4x4 output block. 36 multiplies per 16 outputs instead of 144; the larger entries of
//! Bᵀ and Aᵀ cost accuracy (measured ~1-2e-6 relative L2 per conv against ~2e-7 for F(2x2)).
//! As in F(2x2) the transforms are element-wise over chunks of `L` tiles of one tile row: every
//! padded input row is split into its four column phases P_q[i] = padded[4i + q], so that tile tx
//! reads columns P0[tx], P1[tx], P2[tx], P3[tx], P0[tx + 1], P1[tx + 1].

use super::{ch, ch_mut, padded, split_len, store_row, Geo, OutJob, L};
use super::{Isa, Plane};

/// G (6x3), see the module comment.
pub(super) const G: [[f64; 3]; 6] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// Bᵀ c for six chunks c0..c5 (six rows, or six columns, of L tiles), element-wise.
#[inline(always)]
fn bt(c: &[[f32; L]; 6]) -> [[f32; L]; 6] {
    let mut v = [[0.0f32; L]; 6];
    for i in 0..L {
        let (c0, c1, c2, c3, c4, c5) = (c[0][i], c[1][i], c[2][i], c[3][i], c[4][i], c[5][i]);
        v[0][i] = 4.0 * c0 - 5.0 * c2 + c4;
        v[1][i] = (c3 + c4) - 4.0 * (c1 + c2);
        v[2][i] = 4.0 * (c1 - c2) + (c4 - c3);
        v[3][i] = 2.0 * (c3 - c1) + (c4 - c2);
        v[4][i] = 2.0 * (c1 - c3) + (c4 - c2);
        v[5][i] = 4.0 * c1 - 5.0 * c3 + c5;
    }
    v
}

/// Aᵀ m for six chunks m0..m5, element-wise.
#[inline(always)]
fn at(m: &[[f32; L]; 6]) -> [[f32; L]; 4] {
    let mut y = [[0.0f32; L]; 4];
    for i in 0..L {
        let (a, b) = (m[1][i] + m[2][i], m[1][i] - m[2][i]);
        let (c, d) = (m[3][i] + m[4][i], m[3][i] - m[4][i]);
        y[0][i] = m[0][i] + a + c;
        y[1][i] = b + 2.0 * d;
        y[2][i] = a + 4.0 * c;
        y[3][i] = b + 8.0 * d + m[5][i];
    }
    y
}

/// Scratch of one input-transform task: the padded input row (4 phases' worth), 6 row slots and
/// 6 t-rows of 4 phases each.
pub(super) fn input_buf_len(tw: usize) -> usize {
    52 * split_len(tw)
}

input_dispatch!(pub(super) fn dispatch_input, split_row, |row, _, ph| split_row_avx512(row, ph));

/// Splits one input row into the four phases of its zero-padded version:
/// P_q[i] = padded[4i + q] = row[4i + q - 1] (zero outside the row), for i < len, where `ph` holds
/// the four phases of `len` floats each (whole chunks). `prow` is scratch of 4 * len floats whose
/// entries past w are zero. Portable: copy into the padded row, then split chunk by chunk.
#[inline(always)]
fn split_row(row: &[f32], prow: &mut [f32], ph: &mut [f32]) {
    let (w, len) = (row.len(), ph.len() / 4);
    prow[0] = 0.0;
    prow[1..=w].copy_from_slice(row);
    for c0 in (0..len).step_by(L) {
        let p: &[f32; 4 * L] = prow[4 * c0..4 * c0 + 4 * L].try_into().expect("chunk in range");
        for q in 0..4 {
            *ch_mut(ph, q * len + c0) = std::array::from_fn(|i| p[4 * i + q]);
        }
    }
}

/// `split_row` on AVX-512: four masked loads straight from the row (lanes outside it read as zero,
/// the padding), then per phase two two-source permutes and one 128-bit-lane shuffle.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn split_row_avx512(row: &[f32], ph: &mut [f32]) {
    use std::arch::x86_64::*;
    let (w, len) = (row.len() as isize, ph.len() / 4);
    // idx[q], lanes 0..8: entries q, q + 4, .., q + 28 of a two-register (32-float) source.
    let idx = [0, 1, 2, 3].map(|q| {
        _mm512_setr_epi32(q, q + 4, q + 8, q + 12, q + 16, q + 20, q + 24, q + 28, 0, 0, 0, 0, 0, 0, 0, 0)
    });
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
    for c0 in (0..len).step_by(L) {
        // padded[4 c0 + j] = row[4 c0 - 1 + j], j in 0..64.
        let start = 4 * c0 as isize - 1;
        let p = row.as_ptr();
        // SAFETY: a masked load touches only the lanes whose bit is set, and `mask` sets exactly
        // those with row index in 0..w, i.e. inside `row` (`wrapping_offset` only forms the
        // address). Each store writes one whole chunk of one phase, in range because every phase
        // is `len` floats, a whole number of chunks (checked by `ch_mut`).
        unsafe {
            let r =
                [0, 16, 32, 48].map(|o| _mm512_maskz_loadu_ps(mask(start + o), p.wrapping_offset(start + o)));
            for (q, iq) in idx.iter().enumerate() {
                let lo = _mm512_permutex2var_ps(r[0], *iq, r[1]);
                let hi = _mm512_permutex2var_ps(r[2], *iq, r[3]);
                // Lanes 0..8 of lo, then lanes 0..8 of hi.
                _mm512_storeu_ps(ch_mut(ph, q * len + c0).as_mut_ptr(), _mm512_shuffle_f32x4::<0x44>(lo, hi));
            }
        }
    }
}

/// One input channel's transform for tile rows g0..g1. The six padded input rows of a tile row
/// (4ty - 1 .. 4ty + 4) are split into phases, Bᵀ runs down the rows (phase by phase), then across
/// the columns, writing V[6 ri + j][tile]. Split rows live in 6 slots indexed by padded row % 6, so
/// the two rows a tile row shares with the previous one are split once.
/// buf: `input_buf_len(tw)` floats; vc: (36, ld) for this channel.
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
    split: impl Fn(&[f32], &mut [f32], &mut [f32]),
) {
    let (h, w, th, tw) = (geo.h, geo.w, geo.th, geo.tw);
    let len = split_len(tw);
    let twc = tw.div_ceil(L) * L;
    let ld = padded((g1 - g0) * tw);
    let (prow, rest) = buf.split_at_mut(4 * len);
    let (rows, trows) = rest.split_at_mut(24 * len);
    for g in g0..g1 {
        let (img, ty) = (g / th, g % th);
        let first = if g == g0 || ty == 0 { 0 } else { 2 };
        for r in first..6 {
            let slot = (4 * ty + r) % 6;
            let ph = &mut rows[4 * slot * len..4 * (slot + 1) * len];
            let iy = (4 * ty + r) as isize - 1;
            if iy < 0 || iy >= h as isize {
                ph.fill(0.0);
                continue;
            }
            let r0 = pl.row(img, iy as usize, w);
            split(&xc[r0..r0 + w], prow, ph);
        }
        let slot = |r: usize| (4 * ty + r) % 6;
        // Bᵀ d down the rows, phase by phase: t-row i, phase q at trows[(4i + q) * len].
        for q in 0..4 {
            let d: [&[f32]; 6] =
                std::array::from_fn(|r| &rows[(4 * slot(r) + q) * len..(4 * slot(r) + q + 1) * len]);
            for c0 in (0..len).step_by(L) {
                let t = bt(&std::array::from_fn(|r| *ch(d[r], c0)));
                for (i, ti) in t.iter().enumerate() {
                    *ch_mut(trows, (4 * i + q) * len + c0) = *ti;
                }
            }
        }
        // · B across the columns (anything past tile tw - 1 is overwritten by the next tile row
        // or lands in the padding of V's rows).
        let toff = (g - g0) * tw;
        for ri in 0..6 {
            let p: [&[f32]; 4] = std::array::from_fn(|q| &trows[(4 * ri + q) * len..(4 * ri + q + 1) * len]);
            for c0 in (0..twc).step_by(L) {
                let cols = [
                    *ch(p[0], c0),
                    *ch(p[1], c0),
                    *ch(p[2], c0),
                    *ch(p[3], c0),
                    *ch(p[0], c0 + 1),
                    *ch(p[1], c0 + 1),
                ];
                for (j, vj) in bt(&cols).iter().enumerate() {
                    *ch_mut(vc, (6 * ri + j) * ld + toff + c0) = *vj;
                }
            }
        }
    }
}

/// y[ko, 4x4 block] = Aᵀ M[., ko, tile] A + bias[ko] (+ residual), ReLU for one output channel on
/// the ISA the weights were packed for (the parent's `output_transform` runs it over the
/// channels); each output row is assembled in `buf` (16 tw rounded up to chunks; columns
/// interleaved: buf[4tx + q]) and stored once, clipped to W.
///
/// # Safety
/// As the parent module's `output_channel`.
pub(super) unsafe fn output_channel_for(isa: Isa, job: &OutJob, buf: &mut [f32], yk: *mut f32, pl: Plane) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the ISA was checked supported when the weights were packed; the rest forwarded.
        Isa::Avx512 => unsafe { output_channel_avx512(job, buf, yk, pl) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2Fma => unsafe { output_channel_avx2(job, buf, yk, pl) },
        // SAFETY: forwarded contract.
        _ => unsafe { output_channel(job, buf, yk, pl, interleave) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
/// # Safety
/// As `output_channel`, on a CPU with AVX-512F.
unsafe fn output_channel_avx512(j: &OutJob, buf: &mut [f32], yk: *mut f32, pl: Plane) {
    // SAFETY: forwarded contract. (The closure inherits this function's AVX-512 feature.)
    unsafe { output_channel(j, buf, yk, pl, |y| interleave_avx512(y)) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
/// # Safety
/// As `output_channel`, on a CPU with AVX2 and FMA.
unsafe fn output_channel_avx2(j: &OutJob, buf: &mut [f32], yk: *mut f32, pl: Plane) {
    // SAFETY: forwarded contract.
    unsafe { output_channel(j, buf, yk, pl, interleave) }
}

/// The four output columns q of L tiles, y[q][t], interleaved into one output row segment of 4L
/// values: out[u][i] = y[i % 4][4u + i / 4] (element 4t + q of the row is y[q][t]).
#[inline(always)]
fn interleave(y: &[[f32; L]; 4]) -> [[f32; L]; 4] {
    std::array::from_fn(|u| std::array::from_fn(|i| y[i % 4][4 * u + i / 4]))
}

/// `interleave` on AVX-512: a 4x4 transpose of floats inside each 128-bit lane (unpacks), then a
/// 4x4 transpose of the 128-bit lanes across the four registers (lane shuffles).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn interleave_avx512(y: &[[f32; L]; 4]) -> [[f32; L]; 4] {
    use std::arch::x86_64::*;
    // SAFETY: unaligned loads of four whole [f32; 16] arrays and stores into four whole arrays of
    // `out`; pointers come from references to them.
    unsafe {
        let [y0, y1, y2, y3] = [0, 1, 2, 3].map(|q| _mm512_loadu_ps(y[q].as_ptr()));
        // Within each 128-bit lane g (tiles 4g..4g+3): t_j = [y0, y1, y2, y3] at tile 4g + j.
        let a = _mm512_unpacklo_ps(y0, y1); // y0[0] y1[0] y0[1] y1[1]
        let b = _mm512_unpackhi_ps(y0, y1); // y0[2] y1[2] y0[3] y1[3]
        let c = _mm512_unpacklo_ps(y2, y3);
        let d = _mm512_unpackhi_ps(y2, y3);
        let pd = |v: __m512| _mm512_castps_pd(v);
        let t0 = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a), pd(c)));
        let t1 = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a), pd(c)));
        let t2 = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(b), pd(d)));
        let t3 = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(b), pd(d)));
        // out[u] = lane u of t0, t1, t2, t3.
        let lo01 = _mm512_shuffle_f32x4::<0x44>(t0, t1); // t0.0 t0.1 t1.0 t1.1
        let lo23 = _mm512_shuffle_f32x4::<0x44>(t2, t3);
        let hi01 = _mm512_shuffle_f32x4::<0xee>(t0, t1); // t0.2 t0.3 t1.2 t1.3
        let hi23 = _mm512_shuffle_f32x4::<0xee>(t2, t3);
        let o = [
            _mm512_shuffle_f32x4::<0x88>(lo01, lo23), // t0.0 t1.0 t2.0 t3.0
            _mm512_shuffle_f32x4::<0xdd>(lo01, lo23), // t0.1 t1.1 t2.1 t3.1
            _mm512_shuffle_f32x4::<0x88>(hi01, hi23),
            _mm512_shuffle_f32x4::<0xdd>(hi01, hi23),
        ];
        let mut out = [[0.0f32; L]; 4];
        for (dst, v) in out.iter_mut().zip(o) {
            _mm512_storeu_ps(dst.as_mut_ptr(), v);
        }
        out
    }
}

/// One output channel's transform for tile rows g0..g1: Aᵀ down each of the six tile columns,
/// then across the four resulting rows.
///
/// # Safety
/// As the parent module's `output_channel`.
#[inline(always)]
unsafe fn output_channel(
    j: &OutJob,
    buf: &mut [f32],
    yk: *mut f32,
    pl: Plane,
    interleave: impl Fn(&[[f32; L]; 4]) -> [[f32; L]; 4],
) {
    let (h, w, th, tw) = (j.geo.h, j.geo.w, j.geo.th, j.geo.tw);
    let (ld, k) = (j.ld, j.k);
    let twc = tw.div_ceil(L) * L;
    // M[e][ko][.] for the 36 e (whole padded rows: chunks may run past the block's last tile).
    let mrows: [&[f32]; 36] = std::array::from_fn(|e| &j.m[(e * k + j.ko) * ld..(e * k + j.ko + 1) * ld]);
    for g in j.g0..j.g1 {
        let (img, ty) = (g / th, g % th);
        let toff = (g - j.g0) * tw;
        for c0 in (0..twc).step_by(L) {
            // s[p][col] = (Aᵀ m)[p] for tile column col.
            let mut s = [[[0.0f32; L]; 6]; 4];
            for col in 0..6 {
                let a = at(&std::array::from_fn(|i| *ch(mrows[6 * i + col], toff + c0)));
                for p in 0..4 {
                    s[p][col] = a[p];
                }
            }
            for (p, sp) in s.iter().enumerate() {
                let y = at(sp); // y[q][t]: output column q of tile c0 + t
                let r = &mut buf[4 * p * twc..4 * (p + 1) * twc];
                let out = interleave(&y);
                for (u, o) in out.iter().enumerate() {
                    *ch_mut(r, 4 * c0 + u * L) = *o;
                }
            }
        }
        for p in 0..4 {
            let oy = 4 * ty + p;
            if oy >= h {
                break;
            }
            // SAFETY: (img, oy) is a valid row of this channel (img < N, oy < H), which the caller
            // guarantees is writable by this task alone.
            unsafe { store_row(j, &buf[4 * p * twc..4 * p * twc + w], yk, pl, img, oy) };
        }
    }
}
