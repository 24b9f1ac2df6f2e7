//! Register-blocked SGEMM micro-kernels, one per ISA, all with the same contract:
//!
//! `kernel(kc, a, b, c, ldc, te)`: `a` is an MR-row panel packed (kc, MR) (column p of the A block is
//! MR consecutive floats), `b` an NR-column panel packed (kc, NR). The kernel accumulates the
//! (MR, NR) product over `kc` in registers, then applies the tile epilogue `te` on the registers and
//! stores the (MR, NR) tile to `c` (row-major, leading dimension `ldc`). Edge tiles: the AVX-512
//! kernel stores only `te.rows` x `te.cols` (masked stores); for the others the driver passes a
//! scratch tile with `TileEpi::PLAIN` and finishes with `apply_scalar`.

use super::TileEpi;

/// How many depth steps ahead the direct-convolution kernel prefetches its input (`DirectB` pads
/// its offsets by as many entries, on every target, so the layout does not depend on the ISA).
pub(super) const DIRECT_PREFETCH: usize = 8;

/// The signature every micro-kernel has (see the module comment).
pub(super) type KernelFn = unsafe fn(usize, *const f32, *const f32, *mut f32, usize, &TileEpi);

/// a * b + c, fused where the target has hardware FMA (the portable paths' building block).
#[inline(always)]
pub fn madd(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(any(target_arch = "aarch64", target_feature = "fma")) {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Applies the tile epilogue `te` to an (mv, nv) block of accumulators (row stride `acs`) and stores
/// it into `c`. The scalar twin of the in-register epilogues below; same order of operations.
///
/// # Safety
/// `acc` must hold mv rows of stride `acs`; `c` and every non-null pointer in `te` must be valid for
/// an (mv, nv) tile with their strides.
pub(super) unsafe fn apply_scalar(
    acc: *const f32,
    acs: usize,
    mv: usize,
    nv: usize,
    c: *mut f32,
    ldc: usize,
    te: &TileEpi,
) {
    for i in 0..mv {
        for j in 0..nv {
            epilogue_one::<false>(*acc.add(i * acs + j), i, j, c, ldc, te);
        }
    }
}

/// The epilogue of one element (i, j) of a tile, stored to C. `FUSED`: the beta term as one
/// exactly rounded FMA, as the AVX-512 kernels' `_mm512_fmadd_ps` does (for an element beside a
/// register tile that must match it bit for bit); otherwise `madd`. ReLU as `vmaxps(v, 0)`: +0.0
/// for -0.0 and NaN too.
///
/// # Safety
/// As `apply_scalar`, for the element (i, j).
#[inline(always)]
pub(super) unsafe fn epilogue_one<const FUSED: bool>(
    acc: f32,
    i: usize,
    j: usize,
    c: *mut f32,
    ldc: usize,
    te: &TileEpi,
) {
    let mut v = acc;
    if !te.scale.is_null() {
        v *= *te.scale.add(i);
    }
    let cp = c.add(i * ldc + j);
    if te.first {
        if te.beta != 0.0 {
            v = if FUSED { te.beta.mul_add(*cp, v) } else { madd(te.beta, *cp, v) };
        }
    } else {
        v += *cp;
    }
    if !te.row_bias.is_null() {
        v += *te.row_bias.add(i);
    }
    if !te.col_bias.is_null() {
        v += *te.col_bias.add(j);
    }
    if !te.res.is_null() {
        v += *te.res.add(i * te.ldr + j);
    }
    if te.relu {
        v = if v > 0.0 { v } else { 0.0 };
    }
    *cp = v;
}

/// Portable 6x8 kernel: plain arrays that LLVM keeps in 12 SSE / NEON registers and vectorises.
pub(super) const PORTABLE_MR: usize = 6;
pub(super) const PORTABLE_NR: usize = 8;

/// # Safety
/// See the module comment: `a`, `b` hold kc packed columns/rows, `c` an (MR, NR) tile.
pub(super) unsafe fn kernel_portable(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    te: &TileEpi,
) {
    const MR: usize = PORTABLE_MR;
    const NR: usize = PORTABLE_NR;
    let mut acc = [[0.0f32; NR]; MR];
    for p in 0..kc {
        let av: [f32; MR] = *(a.add(p * MR) as *const [f32; MR]);
        let bv: [f32; NR] = *(b.add(p * NR) as *const [f32; NR]);
        for i in 0..MR {
            for j in 0..NR {
                acc[i][j] = madd(av[i], bv[j], acc[i][j]);
            }
        }
    }
    apply_scalar(acc.as_ptr() as *const f32, NR, MR, NR, c, ldc, te);
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::TileEpi;
    use std::arch::x86_64::*;

    /// `[f::<1>, .., f::<14>]` (or `f::<r, A, B>` with further const arguments): one kernel per row
    /// count of an MR = 14 panel, indexed by `r - 1`.
    macro_rules! by_rows {
        ($f:ident $(, $v:literal)*) => {
            [
                $f::<1 $(, $v)*>, $f::<2 $(, $v)*>, $f::<3 $(, $v)*>, $f::<4 $(, $v)*>, $f::<5 $(, $v)*>,
                $f::<6 $(, $v)*>, $f::<7 $(, $v)*>, $f::<8 $(, $v)*>, $f::<9 $(, $v)*>, $f::<10 $(, $v)*>,
                $f::<11 $(, $v)*>, $f::<12 $(, $v)*>, $f::<13 $(, $v)*>, $f::<14 $(, $v)*>,
            ]
        };
    }

    /// AVX-512 14x32: 28 zmm accumulators + 2 for the B row + 1 broadcast = 31 of 32 registers.
    /// Per k step: 2 vector loads of B, 14 broadcasts of A (load-port uops), 28 FMAs, i.e. 14 cycles
    /// on two FMA ports with the load ports under-used; the largest MR*NR that fits the register
    /// file, which maximises FMAs per byte loaded. NR = 32 (two vectors along C's contiguous rows)
    /// lets the epilogue add column biases and residual rows with plain vector loads.
    pub(in super::super) const AVX512_MR: usize = 14;
    pub(in super::super) const AVX512_NR: usize = 32;

    /// The full 14x32 kernel.
    ///
    /// # Safety
    /// CPU supports avx512f; pointers as in the module comment.
    #[target_feature(enable = "avx512f")]
    pub(in super::super) unsafe fn kernel_avx512(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        te: &TileEpi,
    ) {
        kernel_avx512_rows::<AVX512_MR>(kc, a, b, c, ldc, te)
    }

    /// The kernel for the last MR panel when it has only `r < MR` real rows (m = 64 = 4*14 + 8,
    /// 1024 = 73*14 + 2): the full kernel would spend 14 rows of FMAs on them.
    pub(in super::super) fn kernel_avx512_for_rows(r: usize) -> super::KernelFn {
        const K: [super::KernelFn; AVX512_MR] = by_rows!(kernel_avx512_rows);
        K[r.clamp(1, AVX512_MR) - 1]
    }

    /// The kernel for a tile with at most 16 real columns (the last NR panel when n % 32 is 1..=16,
    /// e.g. n = 196 = 6*32 + 4 in ResNet's layer3 at batch 1): one B vector per depth step, half
    /// the FMAs. The B panel keeps its NR stride. `r` rows as in `kernel_avx512_for_rows`.
    pub(in super::super) fn kernel_avx512_half_for_rows(r: usize) -> super::KernelFn {
        const K: [super::KernelFn; AVX512_MR] = by_rows!(kernel_avx512_rows_v, 1, 0);
        K[r.clamp(1, AVX512_MR) - 1]
    }

    /// The kernel for a tile with 16 + `X` real columns (the last NR panel when n % 32 = 16 + X,
    /// e.g. n = 49 = 32 + 17: ResNet's 7x7 layers and layer3's Winograd tiles at batch 1), where
    /// the full kernel would spend 32 columns of FMAs on 17. `r` rows as in
    /// `kernel_avx512_for_rows`.
    pub(in super::super) fn kernel_avx512_plus1_for_rows(r: usize) -> super::KernelFn {
        const K: [super::KernelFn; AVX512_MR] = by_rows!(kernel_avx512_rows_v, 1, 1);
        K[r.clamp(1, AVX512_MR) - 1]
    }

    /// The epilogue and store of a 16 + X column tile: columns 0..16 from `acc` in registers,
    /// columns 16.. from `vert` (lane i = row i), element by element with exactly the operations of
    /// `store_tile_avx512` (`epilogue_one::<true>`), so the tile is bit-identical to what the full
    /// kernel stores.
    ///
    /// # Safety
    /// As `store_tile_avx512`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_plus_tile<const R: usize, const X: usize>(
        acc: &[[__m512; 2]; R],
        vert: &[__m512; X],
        c: *mut f32,
        ldc: usize,
        te: &TileEpi,
    ) {
        let t16 = TileEpi { cols: te.cols.min(16), ..*te };
        store_tile_avx512(acc, c, ldc, &t16);
        for (x, v) in vert.iter().enumerate().take(te.cols.saturating_sub(16)) {
            let mut col = [0.0f32; 16];
            _mm512_storeu_ps(col.as_mut_ptr(), *v);
            for (i, &a) in col.iter().enumerate().take(te.rows.min(R)) {
                super::epilogue_one::<true>(a, i, 16 + x, c, ldc, te);
            }
        }
    }

    /// Computes only the first `R` (<= MR) rows of an MR-row tile; the A panel keeps its MR stride.
    ///
    /// # Safety
    /// CPU supports avx512f; pointers as in the module comment.
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel_avx512_rows<const R: usize>(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        te: &TileEpi,
    ) {
        kernel_avx512_rows_v::<R, 2, 0>(kc, a, b, c, ldc, te)
    }

    /// The first `R` rows and the first `V` (1 or 2) 16-column vectors of a tile, plus (with V = 1)
    /// `X` columns 16..16+X computed the other way round: the A panel's row of R floats as one
    /// vector times a broadcast B element, one FMA per depth step per extra column instead of the
    /// R/2 a second B vector would cost. The products and their order of accumulation are the same
    /// as the full kernel's (an FMA is exactly rounded whatever the order of its two factors), and
    /// `store_plus_tile` applies the same epilogue, so that tile is bit-identical to the full
    /// kernel's. te.cols must be at most 16 * V + X.
    ///
    /// # Safety
    /// As `kernel_avx512_rows`.
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel_avx512_rows_v<const R: usize, const V: usize, const X: usize>(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        te: &TileEpi,
    ) {
        const MR: usize = AVX512_MR;
        debug_assert!(te.cols <= 16 * V + X && (X == 0 || V == 1) && X <= 16);
        prefetch_c::<R>(c, ldc);
        // acc[i][1] stays zero when V = 1; the epilogue's column mask skips it.
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        // vert[x] lane i: row i of column 16 + x.
        let mut vert = [_mm512_setzero_ps(); X];
        let rows = ((1u32 << R) - 1) as u16;
        let (mut ap, mut bp) = (a, b);
        // The next A micro-panel follows this one in memory (both packing layouts); when n is small
        // (ResNet's 7x7 layers: n = 49) each A panel feeds only a couple of tiles and A streams
        // from memory, so pull the next panel into L2 one cache line per depth step (kc lines
        // cover its 14*kc floats).
        let mut anext = a.wrapping_add(MR * kc);
        for _ in 0..kc {
            _mm_prefetch::<_MM_HINT_T1>(anext as *const i8);
            anext = anext.wrapping_add(16);
            // B streams past the stationary A micro-panel; fetch 8 rows ahead into L1.
            for h in 0..(if X > 0 { 2 } else { V }) {
                _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(8 * 32 + 16 * h) as *const i8);
            }
            let bv =
                [_mm512_loadu_ps(bp), if V > 1 { _mm512_loadu_ps(bp.add(16)) } else { _mm512_setzero_ps() }];
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*ap.add(i));
                for h in 0..V {
                    row[h] = _mm512_fmadd_ps(ai, bv[h], row[h]);
                }
            }
            if X > 0 {
                // The R real floats of this depth step's A row (masked: the panel row is MR long).
                let av = _mm512_maskz_loadu_ps(rows, ap);
                for (x, v) in vert.iter_mut().enumerate() {
                    *v = _mm512_fmadd_ps(av, _mm512_set1_ps(*bp.add(16 + x)), *v);
                }
            }
            ap = ap.add(MR);
            bp = bp.add(32);
        }
        if X > 0 {
            store_plus_tile::<R, X>(&acc, &vert, c, ldc, te);
        } else {
            store_tile_avx512(&acc, c, ldc, te);
        }
    }

    /// The signature of the direct-convolution kernels:
    /// `(kc, a, x, offs, taps, masks, col, c, ldc, te)` (`col`: see the 16+1-column variant; null
    /// for the others).
    pub(in super::super) type DirectKernelFn = unsafe fn(
        usize,
        *const f32,
        *const f32,
        *const isize,
        *const u8,
        *const u32,
        *const f32,
        *mut f32,
        usize,
        &TileEpi,
    );

    /// The direct kernel computing the first `r` rows (1..=MR) of a tile.
    pub(in super::super) fn kernel_avx512_direct_for_rows(r: usize) -> DirectKernelFn {
        const K: [DirectKernelFn; AVX512_MR] = by_rows!(kernel_avx512_direct_rows, false);
        K[r.clamp(1, AVX512_MR) - 1]
    }

    /// The direct kernel for a tile with 17 real columns (n = 49 = 32 + 17: layer4's 3x3 at batch
    /// 1), first `r` rows: columns 0..16 with one masked load per depth step, column 16 as in
    /// `kernel_avx512_rows_v` with X = 1 (the A row vector times `col[p]`: `DirectB` gathered
    /// that column once, zero where padded). Bit-identical to the full direct kernel.
    pub(in super::super) fn kernel_avx512_direct_plus1_for_rows(r: usize) -> DirectKernelFn {
        const K: [DirectKernelFn; AVX512_MR] = by_rows!(kernel_avx512_direct_rows, true);
        K[r.clamp(1, AVX512_MR) - 1]
    }

    /// The 14x32 kernel with B read straight from a convolution's input instead of a packed panel
    /// (`gemm::DirectB`, the direct convolution): depth step p loads the 32 floats at
    /// `x + offs[p]` with the lanes of mask `masks[taps[p]]` (bit l = lane l; zero elsewhere: the
    /// padding), in place of row p of a packed B panel. Same FMAs in the same order as
    /// `kernel_avx512_rows` on the equivalent im2col panel. It prefetches the input of depth step
    /// p + DIRECT_PREFETCH. `PLUS`: the 16+1-column variant (see its table above).
    ///
    /// # Safety
    /// CPU supports avx512f; `a` as in the module comment; `offs` holds kc + DIRECT_PREFETCH
    /// entries and `taps` kc, every `taps[p]` indexes `masks`, and for every set bit l of
    /// `masks[taps[p]]`, `x + offs[p] + l` is a valid read (masked-off lanes are neither read nor
    /// fault); with `PLUS`, `col` holds kc floats; `c`, `te` as in the module comment.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel_avx512_direct_rows<const R: usize, const PLUS: bool>(
        kc: usize,
        a: *const f32,
        x: *const f32,
        offs: *const isize,
        taps: *const u8,
        masks: *const u32,
        col: *const f32,
        c: *mut f32,
        ldc: usize,
        te: &TileEpi,
    ) {
        const MR: usize = AVX512_MR;
        prefetch_c::<R>(c, ldc);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        // PLUS: vert[0] lane i = row i of column 16.
        let mut vert = [_mm512_setzero_ps(); 1];
        let rows = ((1u32 << R) - 1) as u16;
        let mut ap = a;
        // As in kernel_avx512_rows: pull the next A panel into L2, a cache line per depth step.
        let mut anext = a.wrapping_add(MR * kc);
        for p in 0..kc {
            _mm_prefetch::<_MM_HINT_T1>(anext as *const i8);
            anext = anext.wrapping_add(16);
            let m = *masks.add(*taps.add(p) as usize);
            let bp = x.wrapping_offset(*offs.add(p));
            let bn = x.wrapping_offset(*offs.add(p + super::DIRECT_PREFETCH));
            _mm_prefetch::<_MM_HINT_T0>(bn as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(bn.wrapping_add(16) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(bn.wrapping_add(31) as *const i8);
            let b0 = _mm512_maskz_loadu_ps(m as u16, bp);
            if PLUS {
                for (i, row) in acc.iter_mut().enumerate() {
                    row[0] = _mm512_fmadd_ps(_mm512_set1_ps(*ap.add(i)), b0, row[0]);
                }
                let av = _mm512_maskz_loadu_ps(rows, ap);
                vert[0] = _mm512_fmadd_ps(av, _mm512_set1_ps(*col.add(p)), vert[0]);
            } else {
                let b1 = _mm512_maskz_loadu_ps((m >> 16) as u16, bp.wrapping_add(16));
                for (i, row) in acc.iter_mut().enumerate() {
                    let ai = _mm512_set1_ps(*ap.add(i));
                    row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
                }
            }
            ap = ap.add(MR);
        }
        if PLUS {
            store_plus_tile::<R, 1>(&acc, &vert, c, ldc, te);
        } else {
            store_tile_avx512(&acc, c, ldc, te);
        }
    }

    /// Prefetches the C tile at kernel entry, so its loads in the epilogue are L1 hits. (Prefetches
    /// never fault; wrapping_add because rows past an edge tile may lie outside C.) A prefetch with
    /// intent to write (PREFETCHW, via inline asm: stable Rust's `_MM_HINT_ET0` compiles to a plain
    /// PREFETCHT0) measured ~5% slower on ResNet-50 here.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn prefetch_c<const R: usize>(c: *mut f32, ldc: usize) {
        for i in 0..R {
            _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * ldc) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * ldc + 16) as *const i8);
        }
    }

    /// The in-register epilogue shared by the AVX-512 kernels: applies `te` to the (R, 32) block of
    /// accumulators and stores it to C.
    ///
    /// # Safety
    /// CPU supports avx512f; `c` and the pointers in `te` valid for a te.rows x te.cols tile.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_tile_avx512<const R: usize>(
        acc: &[[__m512; 2]; R],
        c: *mut f32,
        ldc: usize,
        te: &TileEpi,
    ) {
        // Edge tiles (te.rows < MR or te.cols < NR) are stored straight to C: rows past te.rows
        // are skipped (their A rows are zero padding), columns past te.cols masked off. Masked
        // loads never touch (or fault on) masked-out elements.
        let cols = te.cols.min(32);
        let masks = [
            if cols >= 16 { 0xFFFFu16 } else { (1u16 << cols) - 1 },
            if cols >= 32 {
                0xFFFFu16
            } else if cols > 16 {
                (1u16 << (cols - 16)) - 1
            } else {
                0
            },
        ];
        let beta = _mm512_set1_ps(te.beta);
        let zero = _mm512_setzero_ps();
        for (i, row) in acc.iter().enumerate().take(te.rows) {
            let cp = c.add(i * ldc);
            for (h, &r) in row.iter().enumerate() {
                let mk = masks[h];
                if mk == 0 {
                    continue;
                }
                let mut v = r;
                if !te.scale.is_null() {
                    v = _mm512_mul_ps(v, _mm512_set1_ps(*te.scale.add(i)));
                }
                let cph = cp.add(16 * h);
                if te.first {
                    if te.beta != 0.0 {
                        v = _mm512_fmadd_ps(beta, _mm512_maskz_loadu_ps(mk, cph), v);
                    }
                } else {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, cph));
                }
                if !te.row_bias.is_null() {
                    v = _mm512_add_ps(v, _mm512_set1_ps(*te.row_bias.add(i)));
                }
                if !te.col_bias.is_null() {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, te.col_bias.add(16 * h)));
                }
                if !te.res.is_null() {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, te.res.add(i * te.ldr + 16 * h)));
                }
                if te.relu {
                    v = _mm512_max_ps(v, zero);
                }
                _mm512_mask_storeu_ps(cph, mk, v);
            }
        }
    }

    /// Packs one MR-row panel of a row-major A into the (kc, MR) layout the AVX-512 kernel reads:
    /// `out[p * MR + i] = a[i * lda + p]` for i < mv, zero for mv <= i < MR. Per 16 columns it loads
    /// 16-float pieces of the (up to 14) rows, transposes the 16x16 block in registers (64 shuffles)
    /// and writes each column as one masked 14-lane store: ~0.4 instructions per element instead of
    /// a scalar store each.
    ///
    /// # Safety
    /// CPU supports avx512f; `a` valid for reads of `mv` rows of `kc` floats with stride `lda`
    /// (mv <= MR); `out` valid for `kc * MR` writes.
    #[target_feature(enable = "avx512f")]
    pub(in super::super) unsafe fn pack_a_panel_avx512(
        a: *const f32,
        lda: usize,
        mv: usize,
        kc: usize,
        out: *mut f32,
    ) {
        const MR: usize = AVX512_MR;
        let store_mask: __mmask16 = (1 << MR) - 1;
        let mut p0 = 0;
        while p0 < kc {
            let w = 16.min(kc - p0);
            let lm: __mmask16 = if w == 16 { 0xFFFF } else { (1 << w) - 1 };
            // r[i]: columns p0..p0+16 of row i (zero past mv and past kc).
            let mut r = [_mm512_setzero_ps(); 16];
            for (i, ri) in r.iter_mut().enumerate().take(mv) {
                *ri = _mm512_maskz_loadu_ps(lm, a.add(i * lda + p0));
            }
            // 16x16 transpose: 32-bit interleave, 64-bit interleave, then 128-bit lane shuffles.
            let mut t = [_mm512_setzero_ps(); 16];
            for g in 0..8 {
                t[2 * g] = _mm512_unpacklo_ps(r[2 * g], r[2 * g + 1]);
                t[2 * g + 1] = _mm512_unpackhi_ps(r[2 * g], r[2 * g + 1]);
            }
            // u[4g + c], lane l: column 4l + c of rows 4g..4g+4.
            let mut u = [_mm512_setzero_ps(); 16];
            for g in 0..4 {
                let (t0, t1, t2, t3) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
                let pd = |x: __m512, y: __m512, hi: bool| {
                    let (x, y) = (_mm512_castps_pd(x), _mm512_castps_pd(y));
                    _mm512_castpd_ps(if hi { _mm512_unpackhi_pd(x, y) } else { _mm512_unpacklo_pd(x, y) })
                };
                u[4 * g] = pd(t0, t2, false);
                u[4 * g + 1] = pd(t0, t2, true);
                u[4 * g + 2] = pd(t1, t3, false);
                u[4 * g + 3] = pd(t1, t3, true);
            }
            for c in 0..4 {
                let lo01 = _mm512_shuffle_f32x4::<0x44>(u[c], u[4 + c]);
                let hi01 = _mm512_shuffle_f32x4::<0xEE>(u[c], u[4 + c]);
                let lo23 = _mm512_shuffle_f32x4::<0x44>(u[8 + c], u[12 + c]);
                let hi23 = _mm512_shuffle_f32x4::<0xEE>(u[8 + c], u[12 + c]);
                // Column 4l + c, rows 0..16.
                let cols = [
                    _mm512_shuffle_f32x4::<0x88>(lo01, lo23),
                    _mm512_shuffle_f32x4::<0xDD>(lo01, lo23),
                    _mm512_shuffle_f32x4::<0x88>(hi01, hi23),
                    _mm512_shuffle_f32x4::<0xDD>(hi01, hi23),
                ];
                for (l, &v) in cols.iter().enumerate() {
                    let j = 4 * l + c;
                    if j < w {
                        _mm512_mask_storeu_ps(out.add((p0 + j) * MR), store_mask, v);
                    }
                }
            }
            p0 += w;
        }
    }

    /// AVX2+FMA 6x16 (the BLIS Haswell/Zen shape): 12 ymm accumulators + 2 for B + 1 broadcast = 15
    /// of 16 registers; 12 FMAs per 2 loads + 6 broadcasts per k step.
    pub(in super::super) const AVX2_MR: usize = 6;
    pub(in super::super) const AVX2_NR: usize = 16;

    /// # Safety
    /// CPU supports avx2 and fma; pointers as in the module comment.
    #[target_feature(enable = "avx2,fma")]
    pub(in super::super) unsafe fn kernel_avx2(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        te: &TileEpi,
    ) {
        const MR: usize = AVX2_MR;
        for i in 0..MR {
            _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * ldc) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * ldc + 15) as *const i8);
        }
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let (mut ap, mut bp) = (a, b);
        for _ in 0..kc {
            let b0 = _mm256_loadu_ps(bp);
            let b1 = _mm256_loadu_ps(bp.add(8));
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm256_broadcast_ss(&*ap.add(i));
                row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
                row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
            }
            ap = ap.add(MR);
            bp = bp.add(16);
        }
        let beta = _mm256_set1_ps(te.beta);
        let zero = _mm256_setzero_ps();
        for (i, row) in acc.iter().enumerate() {
            let cp = c.add(i * ldc);
            for (h, &r) in row.iter().enumerate() {
                let mut v = r;
                if !te.scale.is_null() {
                    v = _mm256_mul_ps(v, _mm256_set1_ps(*te.scale.add(i)));
                }
                let cph = cp.add(8 * h);
                if te.first {
                    if te.beta != 0.0 {
                        v = _mm256_fmadd_ps(beta, _mm256_loadu_ps(cph), v);
                    }
                } else {
                    v = _mm256_add_ps(v, _mm256_loadu_ps(cph));
                }
                if !te.row_bias.is_null() {
                    v = _mm256_add_ps(v, _mm256_set1_ps(*te.row_bias.add(i)));
                }
                if !te.col_bias.is_null() {
                    v = _mm256_add_ps(v, _mm256_loadu_ps(te.col_bias.add(8 * h)));
                }
                if !te.res.is_null() {
                    v = _mm256_add_ps(v, _mm256_loadu_ps(te.res.add(i * te.ldr + 8 * h)));
                }
                if te.relu {
                    v = _mm256_max_ps(v, zero);
                }
                _mm256_storeu_ps(cph, v);
            }
        }
    }
}
