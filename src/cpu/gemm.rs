//! SGEMM with a fused epilogue: the workhorse for linear layers, LSTMs and convolutions.
//!
//! Math: for an (m x k) matrix A and a (k x n) matrix B,
//!
//! ```text
//! acc[i,j] = sum_p A[i,p] * B[p,j]
//! C[i,j]   = act( row_scale[i] * acc[i,j] + row_bias[i] + col_bias[j] + R[i,j] + beta * C[i,j] )
//! ```
//!
//! where every term but `acc` is optional (`row_scale` defaults to 1, `beta` to 0, `act` is identity
//! or ReLU). A and B are strided views (`MatRef`), so transposed operands cost nothing: packing reads
//! them with whatever strides they have. C is row-major with leading dimension `ldc`.
//!
//! `sgemm_reference` is the plain triple loop that defines the result; `sgemm` must match it.

/// A read-only strided matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major (rows x cols) matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef { data, rows, cols, rs: cols, cs: 1 }
    }
    /// A row-major matrix with leading dimension `ld` (>= cols).
    pub fn row_major_ld(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Self {
        MatRef { data, rows, cols, rs: ld, cs: 1 }
    }
    /// The transpose, as a view.
    pub fn t(self) -> Self {
        MatRef { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
    #[inline]
    pub fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// What happens to each accumulated tile before it is stored (see the module comment).
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue<'a> {
    /// Multiplies C's old value before adding: 0 overwrites, 1 accumulates (`+=`, for gradients).
    pub beta: f32,
    /// Per-row multiplier (length m), e.g. a batch-norm scale not folded into the weights.
    pub row_scale: Option<&'a [f32]>,
    /// Per-row bias (length m): conv bias / folded BN shift when rows are output channels.
    pub row_bias: Option<&'a [f32]>,
    /// Per-column bias (length n): linear-layer bias when columns are output features.
    pub col_bias: Option<&'a [f32]>,
    /// Residual added before the activation: (m x n) row-major with leading dimension `ldr`.
    pub residual: Option<(&'a [f32], usize)>,
    pub relu: bool,
}

impl Epilogue<'_> {
    /// Applies the epilogue to one accumulated value at (i, j), given C's old value.
    #[inline]
    pub fn apply(&self, i: usize, j: usize, acc: f32, old: f32) -> f32 {
        let mut v = match self.row_scale {
            Some(s) => s[i] * acc,
            None => acc,
        };
        if let Some(b) = self.row_bias {
            v += b[i];
        }
        if let Some(b) = self.col_bias {
            v += b[j];
        }
        if let Some((r, ldr)) = self.residual {
            v += r[i * ldr + j];
        }
        if self.beta != 0.0 {
            v += self.beta * old;
        }
        if self.relu {
            v = v.max(0.0);
        }
        v
    }
}

/// Columns per block of the column-blocked layout (`CLayout::Blocked`): the AVX-512 kernel's NR.
pub const COL_BLOCK: usize = 32;

/// How C, and then also the residual, lies in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CLayout {
    /// Row-major with leading dimension `ldc` (the residual: with its own `ldr`).
    Rows(usize),
    /// Column-blocked, (ceil(n / 32), m, 32): element (i, j) at `(j / 32) * m * 32 + i * 32 + j % 32`
    /// (`cpu::blocked`). The residual has the same layout (its `ldr` is ignored).
    Blocked,
}

impl CLayout {
    /// Offset of element (i, j) of an m-row matrix and the distance between consecutive rows
    /// there: a tile starting at column j, at most 32 - j % 32 wide, is (rows x cols) with that
    /// leading dimension in either layout.
    #[inline]
    fn at(self, m: usize, i: usize, j: usize) -> (usize, usize) {
        match self {
            CLayout::Rows(ld) => (i * ld + j, ld),
            CLayout::Blocked => ((j / COL_BLOCK) * m * COL_BLOCK + i * COL_BLOCK + j % COL_BLOCK, COL_BLOCK),
        }
    }
    /// The residual's layout, given its leading dimension `ldr`: row-major with `ldr` beside a
    /// row-major C; blocked like a blocked C (whose residual has no leading dimension: `ldr` 0 by
    /// convention, anything else is a row-major one passed by mistake).
    fn residual(self, ldr: usize) -> CLayout {
        match self {
            CLayout::Rows(_) => CLayout::Rows(ldr),
            CLayout::Blocked => {
                assert_eq!(ldr, 0, "sgemm: a blocked C needs a blocked residual (ld 0)");
                CLayout::Blocked
            }
        }
    }
    /// Length a slice needs to hold an (m x n) matrix in this layout.
    fn min_len(self, m: usize, n: usize) -> usize {
        match self {
            _ if m == 0 || n == 0 => 0,
            CLayout::Rows(ld) => (m - 1) * ld + n,
            CLayout::Blocked => n.div_ceil(COL_BLOCK) * m * COL_BLOCK,
        }
    }
}

/// Checks that A, B and C fit together; panics on a mismatch (a caller bug, not user input).
fn check_dims(a: &MatRef, b: &MatRef, c: &[f32], ldc: usize, epi: &Epilogue) {
    check_dims_cl(a, b, c, CLayout::Rows(ldc), epi)
}

/// `check_dims` for C in either layout.
fn check_dims_cl(a: &MatRef, b: &MatRef, c: &[f32], cl: CLayout, epi: &Epilogue) {
    assert_eq!(a.cols, b.rows, "sgemm: A is {}x{}, B is {}x{}", a.rows, a.cols, b.rows, b.cols);
    let (m, n) = (a.rows, b.cols);
    if let CLayout::Rows(ldc) = cl {
        assert!(ldc >= n, "sgemm: ldc {ldc} < n {n}");
    }
    assert!(c.len() >= cl.min_len(m, n), "sgemm: C too small");
    if let Some(s) = epi.row_scale {
        assert!(s.len() >= m);
    }
    if let Some(s) = epi.row_bias {
        assert!(s.len() >= m);
    }
    if let Some(s) = epi.col_bias {
        assert!(s.len() >= n);
    }
    if let Some((r, ldr)) = epi.residual {
        let rl = cl.residual(ldr);
        if let CLayout::Rows(_) = rl {
            assert!(ldr >= n, "sgemm: residual ld {ldr} < n {n}");
        }
        assert!(r.len() >= rl.min_len(m, n), "sgemm: residual too small");
    }
}

/// The defining triple loop (f64 accumulation is *not* used: this is the f32 reference).
pub fn sgemm_reference(a: MatRef, b: MatRef, c: &mut [f32], ldc: usize, epi: &Epilogue) {
    check_dims(&a, &b, c, ldc, epi);
    for i in 0..a.rows {
        for j in 0..b.cols {
            let mut acc = 0.0f32;
            for p in 0..a.cols {
                acc += a.at(i, p) * b.at(p, j);
            }
            let old = c[i * ldc + j];
            c[i * ldc + j] = epi.apply(i, j, acc, old);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The packed GEMM (BLIS / GotoBLAS loop nest). See docs/KERNELS.md for the full story.
//
//   for k0 in 0..k step KC                      depth block
//     (if n > NC: pack A[.., k0..] once into MR-row panels, shared)
//     for j0 in 0..n step NC                    B block columns
//       pack B[k0.., j0..] into NR-column panels (kc, NR)     shared by all threads
//       parallel over tasks = (row chunk of whole MR panels) x (range of NR panels)
//         pack A[rows, k0..] into MR-row panels (kc, MR)      per task (unless packed already)
//         for each MR panel: for each NR panel: micro-kernel   (AVX-512: A panel stays in L1)
//         (or NR outer, MR inner: the BLIS order, B panel in L1; AVX2 and portable)
//
// Partial sums across depth blocks live in C itself: the first block writes
// row_scale * acc + beta * C_old, later blocks add row_scale * acc, and the last block also adds
// the biases and the residual and applies ReLU, on the registers, right before the store.
// ---------------------------------------------------------------------------------------------

#[path = "gemm_kernels.rs"]
mod kernels;
pub use kernels::madd;

use crate::cpu::SharedMut;
use rayon::prelude::*;
use std::cell::Cell;
use std::sync::OnceLock;

/// The micro-kernel families, chosen at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2Fma,
    Portable,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2Fma => "avx2+fma",
            Isa::Portable => "portable",
        }
    }
    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            // Every feature the AVX-512 paths enable (`target_feature`): F for the kernels, BW/VL
            // and AVX2/FMA for the code compiled wider (im2col, max-pool, GEMV). (Only Xeon Phi
            // has F without BW/VL; it takes the AVX2 path.)
            Isa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => {
                std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
            }
            Isa::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

/// Every path this CPU can run, widest first (tests run all of them).
pub fn available_isas() -> Vec<Isa> {
    [Isa::Avx512, Isa::Avx2Fma, Isa::Portable].into_iter().filter(|i| i.supported()).collect()
}

/// The widest supported ISA, detected once. The environment variable `CAPGEN_ISA` (`avx512`,
/// `avx2`, `portable`) may force a narrower one, e.g. to measure the AVX2 path on an AVX-512 machine;
/// an unsupported or unknown value is ignored.
pub fn detect_isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = available_isas()[0];
        let forced = match std::env::var("CAPGEN_ISA").ok().as_deref() {
            Some("avx512") => Some(Isa::Avx512),
            Some("avx2") | Some("avx2+fma") => Some(Isa::Avx2Fma),
            Some("portable") => Some(Isa::Portable),
            _ => None,
        };
        forced.filter(|i| i.supported()).unwrap_or(best)
    })
}

/// A micro-kernel and the blocking that suits it.
struct Kernel {
    mr: usize,
    nr: usize,
    /// Depth block (per kernel: see `kernel_for`; 1024 for AVX-512, 256 for the others).
    kc: usize,
    /// Rows per task chunk (multiple of MR): in the BLIS order the (MC, KC) A block stays in L2;
    /// in the A-in-L1 order it only sets the task granularity.
    mc: usize,
    /// Columns per B block (multiple of NR).
    nc: usize,
    /// Loop order inside a task: A micro-panel resident in L1 (true) or B micro-panel (false).
    a_in_l1: bool,
    /// The kernel stores edge tiles itself (`TileEpi::rows/cols`).
    partial: bool,
    f: kernels::KernelFn,
    /// A kernel that computes only the first r rows, for the last MR panel when m % MR != 0.
    rows_fn: Option<fn(usize) -> kernels::KernelFn>,
    /// A kernel for r rows and at most NR/2 columns (the last NR panel when n % NR <= NR/2).
    half_fn: Option<fn(usize) -> kernels::KernelFn>,
    /// A kernel for r rows and NR/2 + 1 columns (the last NR panel when n % NR = NR/2 + 1).
    plus1_fn: Option<fn(usize) -> kernels::KernelFn>,
}

fn kernel_for(isa: Isa) -> Kernel {
    assert!(isa.supported(), "sgemm: ISA {} not supported on this CPU", isa.name());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // The A micro-panel is the register tile's stationary operand (a_in_l1: it is reused
        // across the B panels), B panels stream through the caches (prefetched in the kernel).
        // KC 1024: the
        // A panel (56 KiB) outgrows L1 and the B block (4 MiB) L2, but every depth block costs a
        // pass over B and a reload of each C tile, and with the prefetches the longer blocks win.
        // Measured on Zen 4 (32 KiB L1d, 1 MiB L2; 2 threads): sgemm 1024 / 2048 85-86% of peak at
        // KC 256, 87-88% at 512, 89-90% at 1024; ResNet-50's convs 0.94-0.99x per op. (On the
        // AVX-512 Xeon of sessions 2-4, 48 KiB L1d and 2 MiB L2, KC 256 measured best among
        // 128..512: see PERF.md.)
        Isa::Avx512 => Kernel {
            mr: kernels::x86::AVX512_MR,
            nr: kernels::x86::AVX512_NR,
            kc: 1024,
            mc: 14 * 20,
            nc: 32 * 32,
            a_in_l1: true,
            partial: true,
            f: kernels::x86::kernel_avx512,
            rows_fn: Some(kernels::x86::kernel_avx512_for_rows),
            half_fn: Some(kernels::x86::kernel_avx512_half_for_rows),
            plus1_fn: Some(kernels::x86::kernel_avx512_plus1_for_rows),
        },
        #[cfg(target_arch = "x86_64")]
        // BLIS order: B micro-panel 256 x 16 x 4 B = 16 KiB stays in a 32 KiB L1d (Zen 3), A block
        // 288 x 256 x 4 B = 288 KiB in L2.
        Isa::Avx2Fma => Kernel {
            mr: kernels::x86::AVX2_MR,
            nr: kernels::x86::AVX2_NR,
            kc: 256,
            mc: 6 * 48,
            nc: 16 * 128,
            a_in_l1: false,
            partial: false,
            f: kernels::x86::kernel_avx2,
            rows_fn: None,
            half_fn: None,
            plus1_fn: None,
        },
        _ => Kernel {
            mr: kernels::PORTABLE_MR,
            nr: kernels::PORTABLE_NR,
            kc: 256,
            mc: 6 * 48,
            nc: 8 * 256,
            a_in_l1: false,
            partial: false,
            f: kernels::kernel_portable,
            rows_fn: None,
            half_fn: None,
            plus1_fn: None,
        },
    }
}

/// Depth block size: split k into ceil(k / KC) nearly equal blocks (k = 300 gives 150 + 150, not
/// 256 + 44, so no block is too thin to amortise its C load/store).
fn depth_block(k: usize, kc_max: usize) -> usize {
    let nb = k.div_ceil(kc_max).max(1);
    k.div_ceil(nb).max(1)
}

/// The per-tile epilogue the micro-kernels apply on their registers (see `kernels::apply_scalar`
/// for the exact formula). Pointers are already offset to the tile's first row / column; null means
/// "absent". Biases, residual and ReLU are only set on the last depth block.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // rows/cols: only the AVX-512 kernel reads them
pub(crate) struct TileEpi {
    /// First depth block: add `beta * C_old` (if beta != 0); otherwise add C (the partial sum).
    pub first: bool,
    pub beta: f32,
    pub scale: *const f32,
    pub row_bias: *const f32,
    pub col_bias: *const f32,
    pub res: *const f32,
    pub ldr: usize,
    pub relu: bool,
    /// Rows and columns of the tile that exist in C (MR and NR for a full tile); only kernels
    /// with `Kernel::partial` honour these, the driver routes edge tiles of the others through a
    /// scratch tile.
    pub rows: usize,
    pub cols: usize,
}

impl TileEpi {
    /// Store the raw accumulators (used for edge tiles, which go through a scratch tile).
    const PLAIN: TileEpi = TileEpi {
        first: true,
        beta: 0.0,
        scale: std::ptr::null(),
        row_bias: std::ptr::null(),
        col_bias: std::ptr::null(),
        res: std::ptr::null(),
        ldr: 0,
        relu: false,
        rows: usize::MAX,
        cols: usize::MAX,
    };
}

/// A source of the B operand that can pack itself into NR-column panels. `MatRef` packs a strided
/// matrix; the convolution packs image patches ("lazy im2col"); a column-blocked activation
/// (`cpu::blocked::BlockedB`) hands out its 32-wide panels in place.
///
/// # Safety
/// The GEMM orders read through the pointer `in_place` returns: where it returns `Some(p)`, `p`
/// must be valid for reads of `kc * nr` floats (kc rows of nr, row-major) for as long as `self`
/// is borrowed, holding what `pack` would write for that panel (or, past the matrix's last
/// column, any values: those columns are never stored).
pub(crate) unsafe trait PackB: Sync {
    /// Packs rows `k0..k0+kc` and columns `j0..j0+nc` into `ceil(nc/nr)` panels, panel t holding
    /// columns `j0 + t*nr ..` laid out (kc, nr) row-major in `out[t*kc*nr ..]`; columns past `nc`
    /// are zero.
    fn pack(&self, k0: usize, kc: usize, j0: usize, nc: usize, nr: usize, out: &mut [f32]);
    /// Where the source already holds the panel `pack(k0, kc, j0, nr, nr, ..)` would write (kc rows
    /// of nr floats, row-major, zero or at least finite past the matrix's last column), its start;
    /// `None` (the default) where it must be packed.
    fn in_place(&self, _k0: usize, _kc: usize, _j0: usize, _nr: usize) -> Option<*const f32> {
        None
    }
}

// SAFETY: `in_place` is the default (None): every panel is packed.
unsafe impl PackB for MatRef<'_> {
    fn pack(&self, k0: usize, kc: usize, j0: usize, nc: usize, nr: usize, out: &mut [f32]) {
        if self.cs == 1 {
            // Row-major B: walk it row by row, each row's nc columns in one sequential run that
            // is scattered into the panels (panel t, row p at out[t*kc*nr + p*nr]). Reading panel
            // by panel instead touches kc rows (often 100 KB apart) for only nr floats each, and
            // the hardware prefetchers lose track of that many short streams.
            for p in 0..kc {
                let row = &self.data[(k0 + p) * self.rs + j0..(k0 + p) * self.rs + j0 + nc];
                for (t, src) in row.chunks(nr).enumerate() {
                    let dst = &mut out[t * kc * nr + p * nr..t * kc * nr + (p + 1) * nr];
                    dst[..src.len()].copy_from_slice(src);
                    dst[src.len()..].fill(0.0);
                }
            }
            return;
        }
        // Strided columns (cs != 1): panel by panel.
        for (t, panel) in out.chunks_mut(kc * nr).take(nc.div_ceil(nr)).enumerate() {
            let jb = j0 + t * nr;
            let nv = nr.min(j0 + nc - jb);
            if self.rs == 1 {
                // Transposed view (column j contiguous in p): as in pack_a_panels, copy one
                // cache line of each column at a time and scatter it into a 16-row block.
                let mut p0 = 0;
                while p0 < kc {
                    let pl = 16.min(kc - p0);
                    let blk = &mut panel[p0 * nr..(p0 + pl) * nr];
                    for j in 0..nv {
                        let base = (jb + j) * self.cs + k0 + p0;
                        for (q, &v) in self.data[base..base + pl].iter().enumerate() {
                            blk[q * nr + j] = v;
                        }
                    }
                    if nv < nr {
                        for q in 0..pl {
                            blk[q * nr + nv..(q + 1) * nr].fill(0.0);
                        }
                    }
                    p0 += pl;
                }
                continue;
            }
            for p in 0..kc {
                let dst = &mut panel[p * nr..(p + 1) * nr];
                let row = (k0 + p) * self.rs;
                for (j, d) in dst[..nv].iter_mut().enumerate() {
                    *d = self.data[row + (jb + j) * self.cs];
                }
                dst[nv..].fill(0.0);
            }
        }
    }
}

/// Packs rows `i0..` (whole MR panels, `np` of them; rows >= a.rows read as zero) and depth
/// `k0..k0+kc` of A into `out`: panel t laid out (kc, mr) at `out[t*kc*mr ..]`.
#[allow(clippy::too_many_arguments)]
fn pack_a_panels(a: &MatRef, i0: usize, np: usize, k0: usize, kc: usize, mr: usize, out: &mut [f32]) {
    for (t, panel) in out.chunks_mut(kc * mr).take(np).enumerate() {
        let ib = i0 + t * mr;
        let mv = mr.min(a.rows.saturating_sub(ib));
        #[cfg(target_arch = "x86_64")]
        if a.cs == 1 && mr == kernels::x86::AVX512_MR && mv > 0 {
            let first = ib * a.rs + k0;
            let end = (ib + mv - 1) * a.rs + k0 + kc;
            assert!(end <= a.data.len() && panel.len() >= kc * mr, "pack_a_panels: out of bounds");
            // SAFETY: MR = 14 is only the AVX-512 kernel's, and kernel_for checked that this CPU
            // supports it; the assert above bounds every read (mv rows of kc floats, stride rs,
            // from `first`) and the kc * MR writes.
            unsafe {
                kernels::x86::pack_a_panel_avx512(a.data[first..].as_ptr(), a.rs, mv, kc, panel.as_mut_ptr())
            };
            continue;
        }
        if a.cs == 1 {
            // Row-major A: copy 16-float (one cache line) pieces of each row and scatter them with
            // stride MR into a 16*MR block of the panel, which stays in L1. Reading whole lines
            // matters: the MR rows are often 4 KiB apart and would evict each other from L1 if read
            // one float at a time.
            let mut p0 = 0;
            while p0 + 16 <= kc {
                for i in 0..mv {
                    let base = (ib + i) * a.rs + k0 + p0;
                    let src: &[f32; 16] = a.data[base..base + 16].try_into().unwrap();
                    let dst = &mut panel[p0 * mr..(p0 + 16) * mr];
                    for (t, &v) in src.iter().enumerate() {
                        dst[t * mr + i] = v;
                    }
                }
                p0 += 16;
            }
            for i in 0..mv {
                let row = &a.data[(ib + i) * a.rs + k0..(ib + i) * a.rs + k0 + kc];
                for p in p0..kc {
                    panel[p * mr + i] = row[p];
                }
            }
        } else {
            for p in 0..kc {
                for i in 0..mv {
                    panel[p * mr + i] = a.data[(ib + i) * a.rs + (k0 + p) * a.cs];
                }
            }
        }
        if mv < mr {
            for p in 0..kc {
                panel[p * mr + mv..(p + 1) * mr].fill(0.0);
            }
        }
    }
}

/// A matrix packed once into the micro-kernel's A layout (e.g. a layer's weights, which never
/// change): for each depth block, all MR-row panels. Tied to the ISA it was packed for.
#[derive(Clone, Debug)]
pub struct PackedA {
    isa: Isa,
    m: usize,
    k: usize,
    kc: usize,
    mr: usize,
    buf: AlignedBuf,
}

impl PackedA {
    pub fn rows(&self) -> usize {
        self.m
    }
    pub fn cols(&self) -> usize {
        self.k
    }
    pub fn isa(&self) -> Isa {
        self.isa
    }
    /// Start of MR panel `ip` of the depth block starting at `k0` (of depth `kcur`).
    fn panel_ptr(&self, k0: usize, kcur: usize, ip: usize) -> *const f32 {
        let mpad = self.m.div_ceil(self.mr) * self.mr;
        self.buf.as_slice()[k0 * mpad + ip * self.mr * kcur..].as_ptr()
    }
}

/// y (m) = epilogue(A x) for a pre-packed A and a vector x (k): the one-column case of
/// `sgemm_packed_a`, which would spend a 32-column micro-kernel (NR) on one column. Reads the panels
/// in place (each depth block's (kc, MR) panel, MR rows side by side) and is bound by streaming A
/// from memory (ResNet-50's fc: 8 MB). One run of consecutive panels per thread, read depth block
/// by depth block (`gemv_chunk`); each row's sum runs over four interleaved partial sums (depth p
/// mod 4), added at the end.
pub fn gemv_packed_a(a: &PackedA, x: &[f32], y: &mut [f32], epi: &Epilogue) {
    assert_eq!(x.len(), a.k, "gemv: x has {} entries, A is {}x{}", x.len(), a.m, a.k);
    assert_eq!(y.len(), a.m, "gemv: y has {} entries, A is {}x{}", y.len(), a.m, a.k);
    match a.mr {
        14 => gemv_panels::<14>(a, x, y, epi),
        6 => gemv_panels::<6>(a, x, y, epi),
        mr => unreachable!("gemv: no panel height {mr}"),
    }
}

fn gemv_panels<const MR: usize>(a: &PackedA, x: &[f32], y: &mut [f32], epi: &Epilogue) {
    let (m, k) = (a.m, a.k);
    let chunk = |(ci, yc): (usize, &mut [f32]), per: usize| {
        let (p0, p1) = (ci * per, ci * per + yc.len().div_ceil(MR));
        #[cfg(target_arch = "x86_64")]
        if a.isa == Isa::Avx512 {
            // SAFETY: the panels were packed for AVX-512, which `pack_a_with_isa` only does on a
            // CPU that supports it (`Isa::supported`: every feature the wrapper enables).
            unsafe { gemv_chunk_avx512::<MR>(a, x, p0, p1, yc, epi) };
            return;
        }
        gemv_chunk::<MR>(a, x, p0, p1, yc, epi)
    };
    // Memory-bound: worth a fork/join (~10 us) once A is a few hundred KB; then one run of
    // consecutive panels per thread, so each streams contiguous memory (see `gemv_chunk`).
    let np = m.div_ceil(MR);
    if m * k >= 1 << 16 {
        let per = np.div_ceil(rayon::current_num_threads().max(1));
        y.par_chunks_mut(per * MR).enumerate().for_each(|c| chunk(c, per));
    } else {
        chunk((0, y), np);
    }
}

/// `gemv_chunk` compiled for AVX-512 (the crate is built for baseline x86-64), so the MR lanes of
/// a depth step are one masked vector; same multiplies and adds, so the same result.
///
/// # Safety
/// `Isa::Avx512.supported()` (the features enabled here).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
unsafe fn gemv_chunk_avx512<const MR: usize>(
    a: &PackedA,
    x: &[f32],
    p0: usize,
    p1: usize,
    yc: &mut [f32],
    epi: &Epilogue,
) {
    gemv_chunk::<MR>(a, x, p0, p1, yc, epi)
}

/// Panels p0..p1 (rows p0 * MR .. into `yc`) of `gemv_packed_a`, depth block by depth block: a
/// block's panels lie side by side in the packed buffer, so the chunk reads one contiguous run per
/// block (where panel by panel it would read kc * MR floats, then jump a block ahead). Each row
/// keeps four partial sums (depth p mod 4) across the blocks, added at the end.
#[inline(always)]
fn gemv_chunk<const MR: usize>(a: &PackedA, x: &[f32], p0: usize, p1: usize, yc: &mut [f32], epi: &Epilogue) {
    let k = a.k;
    let mut accs = vec![[[0.0f32; MR]; 4]; p1 - p0];
    let mut k0 = 0;
    while k0 < k {
        let kcur = a.kc.min(k - k0);
        let xs = &x[k0..k0 + kcur];
        for (ip, saved) in (p0..p1).zip(accs.iter_mut()) {
            // (A local copy: the compiler keeps it in registers.)
            let mut acc = *saved;
            let base = a.panel_ptr(k0, kcur, ip);
            // SAFETY: panel_ptr points at this depth block's panel ip, kcur * MR packed floats
            // inside the buffer (pack_a_with_isa laid out every panel of every block).
            let pan = unsafe { std::slice::from_raw_parts(base, kcur * MR) };
            let (p4, x4) = (pan.chunks_exact(4 * MR), xs.chunks_exact(4));
            let (pr, xr) = (p4.remainder(), x4.remainder());
            for (cols, xv) in p4.zip(x4) {
                for (u, acc) in acc.iter_mut().enumerate() {
                    for (s, &v) in acc.iter_mut().zip(&cols[u * MR..(u + 1) * MR]) {
                        *s = madd(v, xv[u], *s);
                    }
                }
            }
            for (col, &xv) in pr.chunks_exact(MR).zip(xr) {
                for (s, &v) in acc[0].iter_mut().zip(col) {
                    *s = madd(v, xv, *s);
                }
            }
            *saved = acc;
        }
        k0 += kcur;
    }
    for ((ip, acc), yp) in (p0..p1).zip(&accs).zip(yc.chunks_mut(MR)) {
        for (r, out) in yp.iter_mut().enumerate() {
            let sum = (acc[0][r] + acc[1][r]) + (acc[2][r] + acc[3][r]);
            *out = epi.apply(ip * MR + r, 0, sum, *out);
        }
    }
}

/// Packs A for the detected ISA (see `sgemm_packed_a`).
pub fn pack_a(a: MatRef) -> PackedA {
    pack_a_with_isa(detect_isa(), a)
}

/// Packs A for a given (supported) ISA's kernel.
pub fn pack_a_with_isa(isa: Isa, a: MatRef) -> PackedA {
    let kern = kernel_for(isa);
    let (m, k) = (a.rows, a.cols);
    let kc = depth_block(k, kern.kc);
    let np = m.div_ceil(kern.mr);
    let mpad = np * kern.mr;
    let mut buf = AlignedBuf::new(mpad * k);
    let data = buf.as_mut_slice();
    let mut k0 = 0;
    while k0 < k {
        let kcur = kc.min(k - k0);
        pack_a_panels(&a, 0, np, k0, kcur, kern.mr, &mut data[k0 * mpad..(k0 + kcur) * mpad]);
        k0 += kcur;
    }
    PackedA { isa, m, k, kc, mr: kern.mr, buf }
}

/// A Vec<f32> whose usable part starts on a 64-byte boundary (a cache line; one zmm load).
#[derive(Clone, Debug, Default)]
struct AlignedBuf {
    v: Vec<f32>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let mut b = AlignedBuf::default();
        b.resize(len);
        b
    }
    fn resize(&mut self, len: usize) {
        if self.v.len() < len + 16 {
            self.v = vec![0.0; len + 16];
        }
        let addr = self.v.as_ptr() as usize;
        self.off = (64 - addr % 64) % 64 / 4;
        self.len = len;
    }
    fn as_slice(&self) -> &[f32] {
        &self.v[self.off..self.off + self.len]
    }
    fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.v[self.off..self.off + self.len]
    }
}

thread_local! {
    // Packing buffers, reused across calls. Taken out of the cell while in use (never borrowed), so
    // a nested GEMM run by rayon work-stealing on the same thread simply allocates its own.
    static A_BUF: Cell<AlignedBuf> = Cell::new(AlignedBuf::default());
    static B_BUF: Cell<AlignedBuf> = Cell::new(AlignedBuf::default());
    static S_BUF: Cell<AlignedBuf> = Cell::new(AlignedBuf::default());
    // Whether the driver may take the column-split / whole-B orders (tests turn them off to compare).
    static PACKED_A_ORDERS: Cell<bool> = const { Cell::new(true) };
}

/// The A operand: a strided view packed per call, or pre-packed panels.
pub(crate) enum ASrc<'a> {
    Mat(MatRef<'a>),
    Packed(&'a PackedA),
}

/// Problems below this many FLOPs run on the calling thread: fork/join costs ~10-20 us, which is
/// ~1-2 MFLOP of work at these speeds.
const PARALLEL_MIN_FLOPS: usize = 4 << 20;

/// The largest B (floats, 16 MiB) the whole-B order packs at once.
const WHOLE_B_MAX_FLOATS: usize = 4 << 20;

/// Pre-packed A and at least this many NR panels of B per thread: the column-split order.
const COL_SPLIT_MIN_PANELS: usize = 4;
/// ... and at most this many rows, unless B is much wider than a column group.
const COL_SPLIT_MAX_ROWS: usize = 320;

/// How to split the (MR panels) x (NR panels) of one B block among threads: returns the number of
/// row chunks and of column chunks. The driver hands out panels evenly (chunk i of t gets panels
/// `i*p/t .. (i+1)*p/t`), so with 74 panels and 4 chunks each of 2 threads gets 37, not 38 and 36.
fn task_grid(mp: usize, np: usize, mc_panels: usize, threads: usize) -> (usize, usize) {
    if threads <= 1 {
        return (mp.div_ceil(mc_panels).max(1), 1);
    }
    if mp >= 4 * threads {
        // Enough rows: split rows only (each task packs its own A; B panels shared), in a multiple
        // of `threads` chunks so every thread gets the same share.
        (mp.div_ceil(mc_panels).max(threads).div_ceil(threads) * threads, 1)
    } else {
        // Few rows (e.g. m = 64): split columns too, 2 chunks per thread for balance.
        let mt = mp.div_ceil(mc_panels.min(mp));
        (mt, (2 * threads).div_ceil(mt).min(np).max(1))
    }
}

/// Runs the micro-kernel on the C tile at (i, j) for one depth block of `kcur` (`first` / `last`:
/// whether it is the first / last depth block), with the epilogue parts that block applies.
///
/// # Safety
/// `ap` / `bp` must hold `kcur * MR` / `kcur * NR` packed floats; `check_dims` (run by every public
/// entry) must have verified that C and the residual hold an (m x n) matrix in layout `cl`
/// (`CLayout::min_len`) and that row_scale/row_bias (m) and col_bias (n) are long enough, so every
/// offset stays in bounds for this tile's (mv x nv) elements (in the blocked layout a tile lies in
/// one column block: NR divides 32); the ISA must be supported (kernel_for checks); no other
/// thread may write this tile meanwhile (tasks own disjoint tiles of C and are joined before the
/// driver returns).
#[allow(clippy::too_many_arguments)]
unsafe fn run_tile(
    kern: &Kernel,
    epi: &Epilogue,
    m: usize,
    n: usize,
    cl: CLayout,
    cptr: SharedMut,
    i: usize,
    j: usize,
    kcur: usize,
    ap: *const f32,
    bp: *const f32,
    first: bool,
    last: bool,
) {
    let (mr, nr) = (kern.mr, kern.nr);
    let (mv, nv) = (mr.min(m - i), nr.min(n - j));
    let te = tile_epi(epi, cl, m, i, j, mv, nv, first, last);
    let (off, ldc) = cl.at(m, i, j);
    let cp = cptr.get().add(off);
    if let (true, Some(half_fn)) = (2 * nv <= nr, kern.half_fn) {
        half_fn(mv)(kcur, ap, bp, cp, ldc, &te);
    } else if let (true, Some(plus1_fn)) = (2 * nv == nr + 2, kern.plus1_fn) {
        plus1_fn(mv)(kcur, ap, bp, cp, ldc, &te);
    } else if let (true, Some(rows_fn)) = (mv < mr, kern.rows_fn) {
        rows_fn(mv)(kcur, ap, bp, cp, ldc, &te);
    } else if (mv == mr && nv == nr) || kern.partial {
        (kern.f)(kcur, ap, bp, cp, ldc, &te);
    } else {
        let mut tmp = [0.0f32; 512];
        (kern.f)(kcur, ap, bp, tmp.as_mut_ptr(), nr, &TileEpi::PLAIN);
        kernels::apply_scalar(tmp.as_ptr(), nr, mv, nv, cp, ldc, &te);
    }
}

/// The tile epilogue for the (mv x nv) tile at (i, j) in depth block (`first`, `last`).
///
/// # Safety
/// As `run_tile`: the epilogue's slices must cover the tile (pointers are offset without checks).
#[allow(clippy::too_many_arguments)]
unsafe fn tile_epi(
    epi: &Epilogue,
    cl: CLayout,
    m: usize,
    i: usize,
    j: usize,
    mv: usize,
    nv: usize,
    first: bool,
    last: bool,
) -> TileEpi {
    let (roff, ldr) = cl.residual(epi.residual.map_or(0, |r| r.1)).at(m, i, j);
    TileEpi {
        first,
        beta: epi.beta,
        scale: epi.row_scale.map_or(std::ptr::null(), |s| s.as_ptr().add(i)),
        row_bias: match epi.row_bias {
            Some(s) if last => s.as_ptr().add(i),
            _ => std::ptr::null(),
        },
        col_bias: match epi.col_bias {
            Some(s) if last => s.as_ptr().add(j),
            _ => std::ptr::null(),
        },
        res: match epi.residual {
            Some((r, _)) if last => r.as_ptr().add(roff),
            _ => std::ptr::null(),
        },
        ldr,
        relu: epi.relu && last,
        rows: mv,
        cols: nv,
    }
}

/// B panels a thread packs and then multiplies by all of A before packing the next ones, in the
/// column-split order (`gemm_column_split`): 16 panels of (KC x 32) floats (2 MiB at KC 1024; the
/// in-place panels of a blocked B are read where they lie).
const COL_GROUP: usize = 16;

/// The column-split order for a pre-packed A (layer weights) and a wide B (a conv's N*P*Q
/// columns): the NR panels are dealt out evenly to one task per thread; a task packs COL_GROUP of
/// its panels at a time, for every depth block in turn, and runs every A panel against them. One
/// fork/join per GEMM (the default order has up to two per depth block per B block: pack, unless
/// B is read in place, then multiply), B is packed by the thread that reads it, and the split is
/// even to a panel.
/// Each tile sees the same kernel calls in the same depth order as in the default order, so C is
/// bit-for-bit the same.
#[allow(clippy::too_many_arguments)]
fn gemm_column_split(
    kern: &Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: &PackedA,
    b: &dyn PackB,
    c: &mut [f32],
    cl: CLayout,
    epi: &Epilogue,
    threads: usize,
) {
    let (mr, nr) = (kern.mr, kern.nr);
    let (mp, np) = (m.div_ceil(mr), n.div_ceil(nr));
    let cptr = SharedMut::new(c.as_mut_ptr());
    let task = |t: usize| {
        let (jp0, jp1) = (t * np / threads, (t + 1) * np / threads);
        let mut bbuf = B_BUF.with(|b| b.take());
        let mut g0 = jp0;
        while g0 < jp1 {
            let g1 = (g0 + COL_GROUP).min(jp1);
            let mut k0 = 0;
            while k0 < k {
                let kcur = a.kc.min(k - k0);
                let j0 = g0 * nr;
                // B panels the source holds already (a blocked activation) are read in place.
                let in_place = b.in_place(k0, kcur, j0, nr).is_some();
                if !in_place {
                    bbuf.resize((g1 - g0) * kcur * nr);
                    b.pack(k0, kcur, j0, (g1 * nr).min(n) - j0, nr, bbuf.as_mut_slice());
                }
                let bpan = bbuf.as_slice();
                let b_at = |jp: usize| match in_place {
                    true => b.in_place(k0, kcur, jp * nr, nr).expect("every panel of an in-place B"),
                    false => bpan[(jp - g0) * kcur * nr..].as_ptr(),
                };
                let (first, last) = (k0 == 0, k0 + kcur == k);
                for ip in 0..mp {
                    let ap = a.panel_ptr(k0, kcur, ip);
                    for jp in g0..g1 {
                        let bp = b_at(jp);
                        // SAFETY: the A panel holds kcur*MR packed floats, the B panel kcur*NR
                        // (packed just above, zero-padded, or the source's own, per `in_place`);
                        // tasks own disjoint column ranges of C; the rest as `run_tile` requires
                        // (checked by the public entry).
                        unsafe {
                            run_tile(kern, epi, m, n, cl, cptr, ip * mr, jp * nr, kcur, ap, bp, first, last)
                        };
                    }
                }
                k0 += kcur;
            }
            g0 = g1;
        }
        B_BUF.with(|b| b.set(bbuf));
    };
    (0..threads).into_par_iter().for_each(task);
}

/// The order for a pre-packed A, a narrow B (one B block, n <= NC) and several depth blocks (ResNet's
/// layer3/4 at small batch: n = 196 or 49, k up to 4608 = 5 depth blocks at KC 1024, 18 at 256):
/// all of B is packed at once (one parallel pass over every (depth block, panel); none when B is
/// read in place), then each task runs its share of the tiles through every depth block. Two
/// fork/joins per GEMM instead of two per depth block (~10 us each, which at 18 blocks was a fifth
/// of a 1.5 ms conv), and a task's C tiles stay in its cache across depth blocks. Same kernel calls per tile in the same depth order as the default: C is
/// bit-for-bit the same.
#[allow(clippy::too_many_arguments)]
fn gemm_whole_b(
    kern: &Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: &PackedA,
    b: &dyn PackB,
    c: &mut [f32],
    cl: CLayout,
    epi: &Epilogue,
    threads: usize,
) {
    let (mr, nr) = (kern.mr, kern.nr);
    let (mp, np) = (m.div_ceil(mr), n.div_ceil(nr));
    // Depth block d covers k0 = d*kc .. min(k, (d+1)*kc); its panels start at k0 * np * nr.
    let (kc, nblk) = (a.kc, k.div_ceil(a.kc));
    let mut bbuf = B_BUF.with(|b| b.take());
    let in_place = b.in_place(0, kc.min(k), 0, nr).is_some();
    bbuf.resize(if in_place { 0 } else { np * nr * k });
    if !in_place {
        // Split the buffer into (depth block, panel) pieces of kcur * nr floats, in order.
        let mut pieces = Vec::with_capacity(nblk * np);
        let mut rest = bbuf.as_mut_slice();
        for d in 0..nblk {
            let (k0, kcur) = (d * kc, kc.min(k - d * kc));
            for t in 0..np {
                let (piece, r) = rest.split_at_mut(kcur * nr);
                pieces.push((k0, kcur, t, piece));
                rest = r;
            }
        }
        pieces
            .into_par_iter()
            .for_each(|(k0, kcur, t, out)| b.pack(k0, kcur, t * nr, nr.min(n - t * nr), nr, out));
    }
    let bpan = bbuf.as_slice();
    let cptr = SharedMut::new(c.as_mut_ptr());
    let (mt, nt) = task_grid(mp, np, kern.mc / mr, threads);
    let task = |t: usize| {
        let (mi, ni) = (t / nt, t % nt);
        let (ip0, ip1) = (mi * mp / mt, (mi + 1) * mp / mt);
        let (jp0, jp1) = (ni * np / nt, (ni + 1) * np / nt);
        for d in 0..nblk {
            let (k0, kcur) = (d * kc, kc.min(k - d * kc));
            let (first, last) = (d == 0, d + 1 == nblk);
            for ip in ip0..ip1 {
                let ap = a.panel_ptr(k0, kcur, ip);
                for jp in jp0..jp1 {
                    let bp = match in_place {
                        true => b.in_place(k0, kcur, jp * nr, nr).expect("every panel of an in-place B"),
                        false => bpan[k0 * np * nr + jp * kcur * nr..].as_ptr(),
                    };
                    // SAFETY: the A panel holds kcur*MR packed floats, the B piece kcur*NR (packed
                    // above, zero-padded, or the source's own); tasks own disjoint tiles of C; the
                    // rest as `run_tile` requires (checked by the public entry).
                    unsafe {
                        run_tile(kern, epi, m, n, cl, cptr, ip * mr, jp * nr, kcur, ap, bp, first, last)
                    };
                }
            }
        }
    };
    (0..mt * nt).into_par_iter().for_each(task);
    B_BUF.with(|b| b.set(bbuf));
}

/// The B operand of a convolution read straight from its (channel-major) input, with no packing
/// (the direct convolution, `cpu::conv`). Column jj of B is output pixel (n, p, q) = flattened jj
/// of the output's (N, P, Q); row kk = (c, r, s) of B reads the input at the same flattened
/// position shifted by `offs[kk]`. Two inputs have that property:
/// * stride 1 with "same" padding (R = 2*pad_h + 1, S = 2*pad_w + 1): x (C, N, H, W) itself, P x Q
///   = H x W, and tap (r, s) is the shift (r - pad_h) rows, (s - pad_w) columns (`DirectB::new`);
/// * stride 2 where H = 2P, W = 2Q and the padding is (R - 1) / 2, (S - 1) / 2 for odd R, S (the
///   ResNet stem and 3x3/2 convs): x split into its four phases (`conv::split_phases`: phase (a, b)
///   holds rows 2i + a, columns 2j + b, each a P x Q plane), and input row 2p + r - pad_h is row
///   p + dr of phase (r - pad_h) mod 2, dr = floor((r - pad_h) / 2) (`DirectB::phases`).
///
/// Either way the tap lies inside the image iff the shifted (row, column) does (else padding:
/// zero), so 32 consecutive columns of a B row are 32 consecutive floats of the input with the
/// lanes whose tap falls in the padding masked off: `masks[panel * taps + r*S + s]`.
/// (Fields private: `gemm_direct`'s safety rests on the constructors having built them together.)
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read only by the AVX-512 kernels
pub(crate) struct DirectB<'a> {
    x: &'a [f32],
    cols: usize,
    offs: Vec<isize>,
    taps: Vec<u8>,
    ntaps: usize,
    masks: Vec<u32>,
    /// When the last panel has 17 columns (n % 32 = 17): B's last column (zero where padded), for
    /// the 16+1-column kernel; empty otherwise.
    last_col: Vec<f32>,
}

impl<'a> DirectB<'a> {
    /// For x (C, N, H, W) and an R x S kernel with "same" padding (checked by the caller).
    pub fn new(x: &'a [f32], c: usize, n: usize, h: usize, w: usize, r: usize, s: usize) -> Self {
        let (ph, pw) = ((r - 1) / 2, (s - 1) / 2);
        let rows: Vec<(isize, isize)> = (0..r).map(|ri| (0, ri as isize - ph as isize)).collect();
        let cols: Vec<(isize, isize)> = (0..s).map(|si| (0, si as isize - pw as isize)).collect();
        Self::build(x, c, n * h * w, n, h, w, &rows, &cols)
    }

    /// For the phases xp (C, 2, 2, N, P, Q) of a stride-2 conv's input (H = 2P, W = 2Q) and an
    /// R x S kernel with padding ((R - 1) / 2, (S - 1) / 2) (checked by the caller).
    pub fn phases(xp: &'a [f32], c: usize, n: usize, p: usize, q: usize, r: usize, s: usize) -> Self {
        let plane = n * p * q;
        // Input offset t = tap - pad = 2 * d + a with phase a in {0, 1}: (phase offset, shift d).
        let split = |t: isize| (t.rem_euclid(2), t.div_euclid(2));
        let (ph, pw) = (((r - 1) / 2) as isize, ((s - 1) / 2) as isize);
        let rows: Vec<(isize, isize)> = (0..r as isize)
            .map(|ri| {
                let (a, d) = split(ri - ph);
                (2 * a * plane as isize, d)
            })
            .collect();
        let cols: Vec<(isize, isize)> = (0..s as isize)
            .map(|si| {
                let (b, d) = split(si - pw);
                (b * plane as isize, d)
            })
            .collect();
        Self::build(xp, c, 4 * plane, n, p, q, &rows, &cols)
    }

    /// Rows and columns of the kernel as (offset to the tap's plane, shift within it); x holds C
    /// channels `cstride` apart, each N planes of `h x w` (the output's size) per phase.
    #[allow(clippy::too_many_arguments)]
    fn build(
        x: &'a [f32],
        c: usize,
        cstride: usize,
        n: usize,
        h: usize,
        w: usize,
        rows: &[(isize, isize)],
        cols: &[(isize, isize)],
    ) -> Self {
        let (r, s) = (rows.len(), cols.len());
        let ncols = n * h * w;
        assert_eq!(x.len(), c * cstride, "direct conv input size");
        let ntaps = r * s;
        assert!(ntaps <= 256, "direct conv: at most 256 taps");
        let mut offs = Vec::with_capacity(c * ntaps);
        let mut taps = Vec::with_capacity(c * ntaps);
        for ci in 0..c {
            for (ri, &(ro, dr)) in rows.iter().enumerate() {
                for (si, &(so, ds)) in cols.iter().enumerate() {
                    offs.push((ci * cstride) as isize + ro + so + dr * w as isize + ds);
                    taps.push((ri * s + si) as u8);
                }
            }
        }
        let np = ncols.div_ceil(32);
        let masks = direct_masks(ncols, h, w, rows, cols);
        // For the 16+1-column kernel: B's last column, i.e. lane 16 of the last panel.
        let mut last_col = Vec::new();
        if ncols % 32 == 17 {
            let pm = &masks[(np - 1) * ntaps..];
            last_col =
                offs.iter()
                    .zip(&taps)
                    .map(|(&o, &t)| {
                        if pm[t as usize] >> 16 & 1 == 1 {
                            x[((ncols - 1) as isize + o) as usize]
                        } else {
                            0.0
                        }
                    })
                    .collect();
        }
        // DIRECT_PREFETCH copies of the last offset after the end: the kernel reads offs[p + D]
        // to prefetch a later depth step's input (`kernel_avx512_direct_rows`).
        let last = offs.last().copied().unwrap_or(0);
        offs.extend(std::iter::repeat_n(last, kernels::DIRECT_PREFETCH));
        DirectB { x, cols: ncols, offs, taps, ntaps, masks, last_col }
    }
}

/// The lane masks of a direct conv's B: per 32-column panel and tap (ri, si), bit l set iff column
/// jj = 32 * panel + l = (img, p, q) of the flattened (N, H, W) output exists and its tap lies inside
/// the image: row p + dr and column q + ds, for rows[ri] = (_, dr) and cols[si] = (_, ds). Those
/// are also exactly the lanes whose read stays within the tap's own plane, so every set bit is a
/// read inside x. A panel's columns fall into runs of one output row each (constant p, q counting
/// up), so each row mask is a run's bits or none, and each column mask the run's sub-range
/// q + ds in [0, W): a few runs per panel instead of a test per lane. (This runs on every conv
/// call, before the GEMM: per lane it cost the stem 0.16 ms of its 1.4.)
fn direct_masks(
    ncols: usize,
    h: usize,
    w: usize,
    rows: &[(isize, isize)],
    cols: &[(isize, isize)],
) -> Vec<u32> {
    let (r, s) = (rows.len(), cols.len());
    let ntaps = r * s;
    let mut masks = vec![0u32; ncols.div_ceil(32) * ntaps];
    if ntaps == 0 {
        return masks;
    }
    // Lanes lo..hi of a panel (hi <= 32).
    let bits = |lo: usize, hi: usize| (((1u64 << hi) - (1u64 << lo)) & 0xFFFF_FFFF) as u32;
    let (hi_, wi) = (h as isize, w as isize);
    let panel = |(jp, pm): (usize, &mut [u32])| {
        let (mut rowm, mut colm) = ([0u32; 256], [0u32; 256]);
        let jj0 = jp * 32;
        let lanes = 32.min(ncols - jj0);
        let mut l = 0;
        while l < lanes {
            let jj = jj0 + l;
            let (p, q) = (((jj / w) % h) as isize, (jj % w) as isize);
            let len = (w - jj % w).min(lanes - l);
            for (m, &(_, dr)) in rowm.iter_mut().zip(rows) {
                if (0..hi_).contains(&(p + dr)) {
                    *m |= bits(l, l + len);
                }
            }
            for (m, &(_, ds)) in colm.iter_mut().zip(cols) {
                // Run lanes t (column q + t) with 0 <= q + t + ds < W.
                let lo = (-ds - q).clamp(0, len as isize) as usize;
                let hi = (wi - ds - q).clamp(0, len as isize) as usize;
                if lo < hi {
                    *m |= bits(l + lo, l + hi);
                }
            }
            l += len;
        }
        for (ri, &rm) in rowm[..r].iter().enumerate() {
            for (si, &cm) in colm[..s].iter().enumerate() {
                pm[ri * s + si] = rm & cm;
            }
        }
    };
    // (The stem at batch 8 has 3136 panels x 49 taps: worth both threads.)
    if masks.len() >= 1 << 15 {
        masks.par_chunks_mut(ntaps).enumerate().for_each(panel);
    } else {
        masks.chunks_mut(ntaps).enumerate().for_each(panel);
    }
    masks
}

/// C (m x n) = epilogue(A * B) for a pre-packed A (the conv weights, K x C*R*S in (c, r, s) order)
/// and a `DirectB` (AVX-512 only: it needs masked loads). Tasks as in the pack-free orders above:
/// columns split evenly over threads when B is wide, else the task grid; each task runs its tiles
/// through every depth block (its A panel reused across the group's columns, the input rows it
/// reads from L1/L2).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_direct(
    m: usize,
    n: usize,
    k: usize,
    a: &PackedA,
    b: &DirectB,
    c: &mut [f32],
    cl: CLayout,
    epi: &Epilogue,
) {
    #[cfg(target_arch = "x86_64")]
    {
        assert_eq!(a.isa, Isa::Avx512, "gemm_direct: AVX-512 only");
        assert!(
            a.m == m
                && a.k == k
                && b.offs.len() == k + kernels::DIRECT_PREFETCH
                && b.taps.len() == k
                && b.cols == n,
            "gemm_direct: shapes"
        );
        if m == 0 || n == 0 || k == 0 {
            // (k = 0 cannot come from a conv: direct_applicable requires channels.)
            assert!(m == 0 || n == 0, "gemm_direct: empty depth");
            return;
        }
        let shape = MatRef { data: &[], rows: m, cols: k, rs: 0, cs: 0 };
        let bshape = MatRef { data: &[], rows: k, cols: n, rs: 0, cs: 0 };
        check_dims_cl(&shape, &bshape, c, cl, epi);
        assert_eq!(b.masks.len(), n.div_ceil(32) * b.ntaps, "gemm_direct: masks");
        let kern = kernel_for(Isa::Avx512);
        let (mr, nr) = (kern.mr, kern.nr);
        let (mp, np) = (m.div_ceil(mr), n.div_ceil(nr));
        let threads =
            if 2 * m * n * k < PARALLEL_MIN_FLOPS { 1 } else { rayon::current_num_threads().max(1) };
        let (mt, nt) = if np >= COL_SPLIT_MIN_PANELS * threads {
            (1, threads)
        } else {
            task_grid(mp, np, kern.mc / mr, threads)
        };
        let (kc, nblk) = (a.kc, k.div_ceil(a.kc));
        let cptr = SharedMut::new(c.as_mut_ptr());
        let task = |t: usize| {
            let (mi, ni) = (t / nt, t % nt);
            let (ip0, ip1) = (mi * mp / mt, (mi + 1) * mp / mt);
            let (jp0, jp1) = (ni * np / nt, (ni + 1) * np / nt);
            let mut g0 = jp0;
            while g0 < jp1 {
                let g1 = (g0 + COL_GROUP).min(jp1);
                for d in 0..nblk {
                    let (k0, kcur) = (d * kc, kc.min(k - d * kc));
                    let (first, last) = (d == 0, d + 1 == nblk);
                    for ip in ip0..ip1 {
                        let (i, ap) = (ip * mr, a.panel_ptr(k0, kcur, ip));
                        let mv = mr.min(m - i);
                        let f = kernels::x86::kernel_avx512_direct_for_rows(mv);
                        let fplus = kernels::x86::kernel_avx512_direct_plus1_for_rows(mv);
                        for jp in g0..g1 {
                            let j = jp * nr;
                            // A 17-column last panel: the 16+1 kernel, with B's last column.
                            let plus = n - j == 17 && b.last_col.len() == k;
                            let (g, col) =
                                if plus { (fplus, b.last_col[k0..].as_ptr()) } else { (f, std::ptr::null()) };
                            // SAFETY: the A panel holds kcur*MR packed floats; offs holds k +
                            // DIRECT_PREFETCH entries and taps k (asserted), so k0..k0+kcur (+ the
                            // prefetch distance) are in range, and last_col k (checked); the
                            // constructors set a mask bit only where column jj < n and its tap
                            // lands inside the image, i.e. where x + jj + offs[kk] is an element
                            // of x; check_dims covered C and the epilogue; tasks own disjoint
                            // tiles; AVX-512 was asserted.
                            unsafe {
                                let te = tile_epi(epi, cl, m, i, j, mv, nr.min(n - j), first, last);
                                let (off, ldc) = cl.at(m, i, j);
                                g(
                                    kcur,
                                    ap,
                                    b.x.as_ptr().wrapping_add(j),
                                    b.offs.as_ptr().add(k0),
                                    b.taps.as_ptr().add(k0),
                                    b.masks.as_ptr().add(jp * b.ntaps),
                                    col,
                                    cptr.get().add(off),
                                    ldc,
                                    &te,
                                )
                            };
                        }
                    }
                }
                g0 = g1;
            }
        };
        if threads > 1 && mt * nt > 1 {
            (0..mt * nt).into_par_iter().for_each(task);
        } else {
            (0..mt * nt).for_each(task);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, n, k, a, b, c, cl, epi);
        unreachable!("gemm_direct: AVX-512 only");
    }
}

/// The packed GEMM driver: C (m x n, ld `ldc`) = epilogue(A (m x k) * B (k x n)).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_driver(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    a: &ASrc,
    b: &dyn PackB,
    c: &mut [f32],
    cl: CLayout,
    epi: &Epilogue,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                let o = cl.at(m, i, j).0;
                // `apply` reads residual element i * ldr + j; in either layout it lies at
                // ro >= j, so it is seen from ro - j with ld 0.
                let residual = epi.residual.map(|(r, ldr)| (&r[cl.residual(ldr).at(m, i, j).0 - j..], 0));
                c[o] = Epilogue { residual, ..*epi }.apply(i, j, 0.0, c[o]);
            }
        }
        return;
    }
    let kern = kernel_for(isa);
    let (mr, nr) = (kern.mr, kern.nr);
    // A blocked C's tiles must each lie in one 32-column block.
    assert!(cl != CLayout::Blocked || COL_BLOCK.is_multiple_of(nr), "sgemm: NR {nr} splits a column block");
    let kc_blk = match a {
        ASrc::Packed(p) => {
            assert!(p.isa == isa && p.m == m && p.k == k, "sgemm: packed A does not fit");
            p.kc
        }
        ASrc::Mat(_) => depth_block(k, kern.kc),
    };
    let threads = if 2 * m * n * k < PARALLEL_MIN_FLOPS { 1 } else { rayon::current_num_threads().max(1) };
    if let ASrc::Packed(pa) = a {
        let np = n.div_ceil(nr);
        let wide = np >= COL_SPLIT_MIN_PANELS * threads && (m <= COL_SPLIT_MAX_ROWS || np >= 8 * COL_GROUP);
        if threads > 1 && PACKED_A_ORDERS.with(Cell::get) {
            if wide {
                return gemm_column_split(&kern, m, n, k, pa, b, c, cl, epi, threads);
            }
            // (B whole must stay modest: it lives on in the thread-local buffer.)
            if n <= kern.nc && k > pa.kc && np * nr * k <= WHOLE_B_MAX_FLOATS {
                return gemm_whole_b(&kern, m, n, k, pa, b, c, cl, epi, threads);
            }
        }
    }
    let mp = m.div_ceil(mr);
    let cptr = SharedMut::new(c.as_mut_ptr());
    let mut bbuf = B_BUF.with(|b| b.take());

    // When n spans several B blocks, pack A's (m, kc) slab once per depth block, shared by all
    // of them (and packed in parallel), instead of once per B block per task.
    let slab_a = n > kern.nc && matches!(a, ASrc::Mat(_));
    let mut sbuf = if slab_a { S_BUF.with(|b| b.take()) } else { AlignedBuf::default() };
    let mut k0 = 0;
    while k0 < k {
        let kcur = kc_blk.min(k - k0);
        if let ASrc::Mat(am) = a {
            if slab_a {
                sbuf.resize(mp * mr * kcur);
                const CH: usize = 4; // panels per packing job
                let pack = |(ci, out): (usize, &mut [f32])| {
                    let np = out.len() / (mr * kcur);
                    pack_a_panels(am, ci * CH * mr, np, k0, kcur, mr, out)
                };
                if threads > 1 {
                    sbuf.as_mut_slice().par_chunks_mut(CH * mr * kcur).enumerate().for_each(pack);
                } else {
                    sbuf.as_mut_slice().chunks_mut(CH * mr * kcur).enumerate().for_each(pack);
                }
            }
        }
        let slab: &[f32] = sbuf.as_slice();
        let mut j0 = 0;
        while j0 < n {
            let ncur = kern.nc.min(n - j0);
            let np = ncur.div_ceil(nr);
            // B panels the source holds already (a blocked activation) are read in place.
            let in_place = b.in_place(k0, kcur, j0, nr).is_some();
            bbuf.resize(if in_place { 0 } else { np * nr * kcur });
            let bpan = bbuf.as_mut_slice();
            if !in_place && threads > 1 && np > 1 {
                bpan.par_chunks_mut(kcur * nr)
                    .enumerate()
                    .for_each(|(t, out)| b.pack(k0, kcur, j0 + t * nr, nr.min(ncur - t * nr), nr, out));
            } else if !in_place {
                b.pack(k0, kcur, j0, ncur, nr, bpan);
            }
            let bpan: &[f32] = bpan;
            let b_at = |jp: usize| match in_place {
                true => b.in_place(k0, kcur, j0 + jp * nr, nr).expect("every panel of an in-place B"),
                false => bpan[jp * kcur * nr..].as_ptr(),
            };
            let (mt, nt) = task_grid(mp, np, kern.mc / mr, threads);
            let first = k0 == 0;
            let last = k0 + kcur == k;
            let task = |t: usize| {
                let (mi, ni) = (t / nt, t % nt);
                let (ip0, ip1) = (mi * mp / mt, (mi + 1) * mp / mt);
                let (jp0, jp1) = (ni * np / nt, (ni + 1) * np / nt);
                if ip0 >= ip1 || jp0 >= jp1 {
                    return;
                }
                // A-stationary order with a plain A: pack each MR panel right before its tiles,
                // into a 2-panel buffer (the kernel prefetches the "next panel", i.e. the buffer's
                // second half), instead of the task's whole (rows, kc) chunk, which would crowd
                // the L2 that the B block streams through.
                // Only when each panel feeds many tiles: with few B panels (n = 196) packing one
                // panel at a time exposes the memory latency that a bulk pack streams past.
                let per_panel = kern.a_in_l1 && matches!(a, ASrc::Mat(_)) && !slab_a && jp1 - jp0 >= 16;
                let mut abuf = None;
                let apan: *const f32 = match a {
                    ASrc::Mat(_) if slab_a => slab[ip0 * mr * kcur..].as_ptr(),
                    ASrc::Mat(am) => {
                        let mut buf = A_BUF.with(|b| b.take());
                        if per_panel {
                            buf.resize(2 * mr * kcur);
                        } else {
                            buf.resize((ip1 - ip0) * mr * kcur);
                            pack_a_panels(am, ip0 * mr, ip1 - ip0, k0, kcur, mr, buf.as_mut_slice());
                        }
                        let p = buf.as_slice().as_ptr();
                        abuf = Some(buf);
                        p
                    }
                    ASrc::Packed(pa) => pa.panel_ptr(k0, kcur, ip0),
                };
                let tile = |ip: usize, jp: usize, ap: *const f32| {
                    let bp = b_at(jp);
                    // SAFETY: A and B panels hold kcur*MR and kcur*NR floats (packed above,
                    // zero-padded, or the source's own, per `in_place`); see `run_tile` for the
                    // rest.
                    unsafe {
                        run_tile(&kern, epi, m, n, cl, cptr, ip * mr, j0 + jp * nr, kcur, ap, bp, first, last)
                    };
                };
                // Panel ip of this task's A (for per_panel: the one just packed).
                let a_at = |ip: usize| apan.wrapping_add((ip - ip0) * mr * kcur);
                if per_panel {
                    let (ASrc::Mat(am), Some(buf)) = (a, abuf.as_mut()) else { unreachable!() };
                    for ip in ip0..ip1 {
                        pack_a_panels(am, ip * mr, 1, k0, kcur, mr, buf.as_mut_slice());
                        let ap = buf.as_slice().as_ptr();
                        for jp in jp0..jp1 {
                            tile(ip, jp, ap);
                        }
                    }
                } else if kern.a_in_l1 {
                    // The A micro-panel is reused across the block's B panels, which stream past.
                    for ip in ip0..ip1 {
                        for jp in jp0..jp1 {
                            tile(ip, jp, a_at(ip));
                        }
                    }
                } else {
                    // Classic BLIS order: the B micro-panel stays in L1, A panels stream from L2.
                    for jp in jp0..jp1 {
                        for ip in ip0..ip1 {
                            tile(ip, jp, a_at(ip));
                        }
                    }
                }
                if let Some(buf) = abuf {
                    A_BUF.with(|b| b.set(buf));
                }
            };
            if threads > 1 && mt * nt > 1 {
                (0..mt * nt).into_par_iter().for_each(task);
            } else {
                (0..mt * nt).for_each(task);
            }
            j0 += ncur;
        }
        k0 += kcur;
    }
    B_BUF.with(|b| b.set(bbuf));
    if slab_a {
        S_BUF.with(|b| b.set(sbuf));
    }
}

/// C = epilogue(A * B). Multithreaded with rayon (runs on the current rayon pool); uses the widest
/// micro-kernel this CPU supports.
pub fn sgemm(a: MatRef, b: MatRef, c: &mut [f32], ldc: usize, epi: &Epilogue) {
    sgemm_with_isa(detect_isa(), a, b, c, ldc, epi);
}

/// `sgemm` on a chosen ISA path (tests and benches use it to exercise every path). Panics if the
/// CPU does not support `isa`.
pub fn sgemm_with_isa(isa: Isa, a: MatRef, b: MatRef, c: &mut [f32], ldc: usize, epi: &Epilogue) {
    check_dims(&a, &b, c, ldc, epi);
    gemm_driver(isa, a.rows, b.cols, a.cols, &ASrc::Mat(a), &b, c, CLayout::Rows(ldc), epi);
}

/// `sgemm` with a pre-packed A (see `pack_a`); runs on the ISA A was packed for.
pub fn sgemm_packed_a(a: &PackedA, b: MatRef, c: &mut [f32], ldc: usize, epi: &Epilogue) {
    assert_eq!(a.k, b.rows, "sgemm: A is {}x{}, B is {}x{}", a.m, a.k, b.rows, b.cols);
    // check_dims needs a MatRef for A only for its shape.
    let shape = MatRef { data: &[], rows: a.m, cols: a.k, rs: 0, cs: 0 };
    check_dims(&shape, &b, c, ldc, epi);
    gemm_driver(a.isa, a.m, b.cols, a.k, &ASrc::Packed(a), &b, c, CLayout::Rows(ldc), epi);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn rand_vec(rng: &mut Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.uniform(-1.0, 1.0)).collect()
    }

    fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
        let (mut d, mut w) = (0.0f64, 0.0f64);
        for (&g, &e) in got.iter().zip(want) {
            d += (g as f64 - e as f64).powi(2);
            w += (e as f64).powi(2);
        }
        (d / w.max(1e-300)).sqrt()
    }

    /// Tolerance: both sides accumulate k f32 products, in different orders (blocked, FMA vs
    /// mul+add). Each rounding is <= 2^-24 relative, and for random-sign terms the errors add like a
    /// random walk, so the relative error of a dot product grows ~ 2^-24 * sqrt(k) ~ 6e-8 sqrt(k);
    /// 1e-6 * sqrt(k) leaves ~16x headroom for the epilogue's extra roundings while still catching
    /// any indexing bug (which gives errors of order 1).
    fn tol(k: usize) -> f64 {
        1e-6 * (k.max(1) as f64).sqrt()
    }

    #[derive(Clone, Copy)]
    struct Case {
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        /// Extra leading-dimension padding for A, B, C and the residual.
        pad: usize,
    }

    /// Runs one case on `isa` with epilogue options `opts` (bitmask: 1 row_scale, 2 row_bias,
    /// 4 col_bias, 8 residual, 16 beta=1, 32 relu, 64 beta=0.5), returns the relative L2 error.
    fn run_case(isa: Isa, cs: Case, opts: u32, seed: u64) -> f64 {
        let Case { m, n, k, ta, tb, pad } = cs;
        let mut rng = Rng::new(seed);
        // A stored as (m, k) or as (k, m) and viewed transposed; likewise B.
        let (ar, ac) = if ta { (k, m) } else { (m, k) };
        let lda = ac + pad;
        let adata = rand_vec(&mut rng, ar * lda);
        let mut av = MatRef::row_major_ld(&adata, ar, ac, lda);
        if ta {
            av = av.t();
        }
        let (br, bc) = if tb { (n, k) } else { (k, n) };
        let ldb = bc + pad;
        let bdata = rand_vec(&mut rng, br * ldb);
        let mut bv = MatRef::row_major_ld(&bdata, br, bc, ldb);
        if tb {
            bv = bv.t();
        }
        let ldc = n + pad;
        let c0 = rand_vec(&mut rng, m * ldc);
        let scale = rand_vec(&mut rng, m);
        let rb = rand_vec(&mut rng, m);
        let cb = rand_vec(&mut rng, n);
        let res = rand_vec(&mut rng, m * ldc);
        let epi = epi_for(opts, &scale, &rb, &cb, Some((&res, ldc)));
        let mut want = c0.clone();
        sgemm_reference(av, bv, &mut want, ldc, &epi);
        let mut got = c0.clone();
        sgemm_with_isa(isa, av, bv, &mut got, ldc, &epi);
        // The padding columns of C must be untouched.
        for i in 0..m {
            for j in n..ldc {
                assert_eq!(got[i * ldc + j], c0[i * ldc + j], "padding of C written at ({i},{j})");
            }
        }
        rel_l2(&got, &want)
    }

    fn check(isa: Isa, cs: Case, opts: u32, seed: u64) {
        let e = run_case(isa, cs, opts, seed);
        assert!(
            e <= tol(cs.k),
            "{} m={} n={} k={} ta={} tb={} pad={} opts={opts:#b}: rel L2 {e:.3e} > {:.3e}",
            isa.name(),
            cs.m,
            cs.n,
            cs.k,
            cs.ta,
            cs.tb,
            cs.pad,
            tol(cs.k)
        );
    }

    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (1, 7, 3),
        (5, 1, 9),
        (37, 53, 71),
        (14, 32, 16),   // exactly one AVX-512 tile
        (6, 16, 16),    // exactly one AVX2 tile
        (29, 65, 300),  // two depth blocks at KC 256 (AVX2, portable)
        (13, 40, 2100), // three depth blocks at KC 1024 (AVX-512), nine at 256
        (300, 45, 33),  // m > MC
        (20, 2100, 40), // n > NC; few rows, so threads split columns
        (131, 257, 129),
    ];

    #[test]
    fn sgemm_matches_reference_all_shapes_all_isas() {
        let mut seed = 1;
        for isa in available_isas() {
            for &(m, n, k) in SHAPES {
                for (ta, tb, pad) in [(false, false, 0), (true, false, 3), (false, true, 1), (true, true, 0)]
                {
                    seed += 1;
                    check(isa, Case { m, n, k, ta, tb, pad }, 0, seed);
                }
            }
        }
    }

    #[test]
    fn sgemm_epilogue_options_all_isas() {
        let mut seed = 1000;
        let opts_list = [1, 2, 4, 8, 16, 32, 64, 2 | 8 | 32, 1 | 2 | 4 | 8 | 16 | 32, 64 | 1 | 32];
        for isa in available_isas() {
            // Single depth block, and several (partial sums through C with beta and scale).
            for &(m, n, k) in &[(37, 53, 71), (29, 65, 300), (45, 70, 1100), (29, 49, 300)] {
                for &opts in &opts_list {
                    seed += 1;
                    check(isa, Case { m, n, k, ta: false, tb: false, pad: 2 }, opts, seed);
                }
            }
        }
    }

    #[test]
    fn sgemm_every_edge_row_count() {
        // m = 1..=29 covers every remainder m % MR for MR = 6, 8, 14 (the AVX-512 path has a kernel
        // per remainder); k = 1100 gives two or more depth blocks at every KC (partial sums in C),
        // n = 45 a column edge.
        // n = 49 = 32 + 17 runs the AVX-512 16+1-column kernel on its last panel.
        let mut seed = 5000;
        for isa in available_isas() {
            for m in 1..=29 {
                for n in [45, 49] {
                    seed += 1;
                    check(
                        isa,
                        Case { m, n, k: 1100, ta: false, tb: false, pad: 1 },
                        1 | 4 | 8 | 32 | 64,
                        seed,
                    );
                }
            }
        }
    }

    /// The 16+1-column kernel gives bit for bit what the full 14x32 kernel gives on the same
    /// 17-column tile (its doc says why), for every row count, with every epilogue term set and on
    /// a first and a later depth block.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn plus1_kernel_is_bitwise_the_full_kernel() {
        if !Isa::Avx512.supported() {
            println!("plus1 kernel test skipped: no AVX-512 on this CPU");
            return;
        }
        let (mr, nr, kc, ldc) = (14, 32, 37, 40);
        let mut rng = Rng::new(17);
        let a = rand_vec(&mut rng, mr * kc);
        let mut b = rand_vec(&mut rng, kc * nr);
        for row in b.chunks_mut(nr) {
            row[17..].fill(0.0); // packed B: columns past n are zero
        }
        let (scale, rb, cb) = (rand_vec(&mut rng, mr), rand_vec(&mut rng, mr), rand_vec(&mut rng, nr));
        let res = rand_vec(&mut rng, mr * ldc);
        let c0 = rand_vec(&mut rng, mr * ldc);
        for r in 1..=mr {
            for first in [true, false] {
                let te = TileEpi {
                    first,
                    beta: 0.3, // not a power of two: the beta term must be fused like the kernel's
                    scale: scale.as_ptr(),
                    row_bias: rb.as_ptr(),
                    col_bias: cb.as_ptr(),
                    res: res.as_ptr(),
                    ldr: ldc,
                    relu: true,
                    rows: r,
                    cols: 17,
                };
                let (mut want, mut got) = (c0.clone(), c0.clone());
                // SAFETY: AVX-512 checked above; A holds kc*MR floats, B kc*NR, C, res MR rows
                // of ldc >= 17 floats, scale/row_bias MR, col_bias NR.
                unsafe {
                    kernels::x86::kernel_avx512_for_rows(r)(
                        kc,
                        a.as_ptr(),
                        b.as_ptr(),
                        want.as_mut_ptr(),
                        ldc,
                        &te,
                    );
                    kernels::x86::kernel_avx512_plus1_for_rows(r)(
                        kc,
                        a.as_ptr(),
                        b.as_ptr(),
                        got.as_mut_ptr(),
                        ldc,
                        &te,
                    );
                }
                let (wb, gb): (Vec<u32>, Vec<u32>) =
                    (want.iter().map(|v| v.to_bits()).collect(), got.iter().map(|v| v.to_bits()).collect());
                assert_eq!(gb, wb, "rows {r}, first {first}");
            }
        }
    }

    /// The epilogue of options `opts`: bit 1 row scale, 2 row bias, 4 column bias, 8 residual,
    /// 16 beta 1 (64: beta 0.5), 32 ReLU.
    fn epi_for<'a>(
        opts: u32,
        scale: &'a [f32],
        rb: &'a [f32],
        cb: &'a [f32],
        residual: Option<(&'a [f32], usize)>,
    ) -> Epilogue<'a> {
        Epilogue {
            beta: if opts & 16 != 0 {
                1.0
            } else if opts & 64 != 0 {
                0.5
            } else {
                0.0
            },
            row_scale: (opts & 1 != 0).then_some(scale),
            row_bias: (opts & 2 != 0).then_some(rb),
            col_bias: (opts & 4 != 0).then_some(cb),
            residual: if opts & 8 != 0 { residual } else { None },
            relu: opts & 32 != 0,
        }
    }

    /// C column-blocked (`CLayout::Blocked`, the residual likewise), and B read in place from a
    /// blocked matrix (`BlockedB`): bit for bit what the row-major driver gives with the same A
    /// source (same kernels, same depth order per tile), on every ISA, every driver order (plain
    /// and pre-packed A; narrow, wide and several depth blocks), edge rows and columns; C's padding
    /// columns untouched.
    #[test]
    fn blocked_c_and_in_place_b_are_bitwise_the_row_major_result() {
        // Two workers: the packed-A orders need 2+ threads and 2*m*n*k >= PARALLEL_MIN_FLOPS:
        // (20, 2100, 64) takes the column split, (64, 196, 1100) the whole-B order (AVX-512), the others the
        // default order ((8, 1100, 40): two B blocks); all read B in place on AVX-512.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(blocked_c_cases);
    }

    fn blocked_c_cases() {
        use crate::cpu::blocked::{blocked_index, blocked_len, to_blocked, BlockedB};
        let mut seed = 9000;
        for isa in available_isas() {
            for &(m, n, k) in &[
                (37, 53, 71),
                (29, 65, 300),
                (14, 32, 16),
                (20, 2100, 64),
                (13, 49, 2100),
                (300, 45, 33),
                (64, 196, 1100),
                (8, 1100, 40),
                (5, 7, 0),
            ] {
                for opts in [0u32, 2 | 8 | 32, 1 | 2 | 8 | 16 | 32, 64 | 8] {
                    seed += 1;
                    let mut rng = Rng::new(seed);
                    let (ad, bd) = (rand_vec(&mut rng, m * k), rand_vec(&mut rng, k * n));
                    let (c0, res) = (rand_vec(&mut rng, m * n), rand_vec(&mut rng, m * n));
                    let (scale, rb) = (rand_vec(&mut rng, m), rand_vec(&mut rng, m));
                    let blk = |v: &[f32], rows: usize| {
                        let mut o = vec![0.0; blocked_len(rows, n)];
                        to_blocked(v, rows, n, &mut o);
                        o
                    };
                    let (mut bb, mut resb) = (blk(&bd, k), blk(&res, m));
                    let mut cb0 = blk(&c0, m);
                    // Padding of C: a sentinel that must survive; of B and the residual: NaN,
                    // which must not reach a stored value (columns are independent).
                    for j in n..n.div_ceil(COL_BLOCK) * COL_BLOCK {
                        for i in 0..m {
                            cb0[blocked_index(m, i, j)] = 7.5;
                            resb[blocked_index(m, i, j)] = f32::NAN;
                        }
                        for p in 0..k {
                            bb[blocked_index(k, p, j)] = f32::NAN;
                        }
                    }
                    // (No column bias: these options never set bit 4.)
                    let mk = |residual| epi_for(opts, &scale, &rb, &[], residual);
                    let am = MatRef::row_major(&ad, m, k);
                    let pa = pack_a_with_isa(isa, am);
                    for a in [ASrc::Mat(am), ASrc::Packed(&pa)] {
                        let mut want = c0.clone();
                        gemm_driver(
                            isa,
                            m,
                            n,
                            k,
                            &a,
                            &MatRef::row_major(&bd, k, n),
                            &mut want,
                            CLayout::Rows(n),
                            &mk(Some((&res, n))),
                        );
                        for in_place in [false, true] {
                            let mut got = cb0.clone();
                            let src: &dyn PackB = if in_place {
                                &BlockedB::new(&bb, k, n)
                            } else {
                                &MatRef::row_major(&bd, k, n)
                            };
                            gemm_driver(
                                isa,
                                m,
                                n,
                                k,
                                &a,
                                src,
                                &mut got,
                                CLayout::Blocked,
                                &mk(Some((&resb, 0))),
                            );
                            for i in 0..m {
                                for j in 0..n.div_ceil(COL_BLOCK) * COL_BLOCK {
                                    let g = got[blocked_index(m, i, j)];
                                    let w = if j < n { want[i * n + j] } else { 7.5 };
                                    assert_eq!(
                                        g.to_bits(),
                                        w.to_bits(),
                                        "{} m {m} n {n} k {k} opts {opts:#b} packed-A {} in-place B {in_place} at ({i},{j})",
                                        isa.name(),
                                        matches!(a, ASrc::Packed(_))
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn sgemm_zero_depth_applies_epilogue() {
        // k = 0: C = epilogue(0), e.g. bias only. Compared with the reference.
        for isa in available_isas() {
            check(isa, Case { m: 5, n: 7, k: 0, ta: false, tb: false, pad: 0 }, 2 | 4 | 16, 7);
        }
    }

    #[test]
    fn sgemm_parallel_splits_on_odd_thread_counts() {
        // Big enough to go parallel; a 3-thread pool exercises uneven task grids.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        pool.install(|| {
            for isa in available_isas() {
                // The last one has n > NC on every path: A packed once per depth block, shared.
                for &(m, n, k) in &[(200, 150, 140), (10, 900, 300), (64, 700, 200), (45, 2100, 1100)] {
                    check(isa, Case { m, n, k, ta: false, tb: false, pad: 1 }, 2 | 8 | 32, 99);
                }
            }
        });
    }

    /// Measurement, not a test (run with `--ignored --nocapture`): the micro-kernel alone on
    /// L1/L2-resident, 64-B aligned panels (one A panel, 8 B panels, kc 256; `MK_KC` and `MK_NB`
    /// change depth and B panel count, e.g. `MK_NB=1 MK_KC=128` keeps everything in L1), 1 thread,
    /// against the FMA peak. Separates the kernel's own efficiency from packing and memory traffic.
    #[test]
    #[ignore]
    fn microkernel_throughput() {
        let isa = detect_isa();
        let kern = kernel_for(isa);
        let env = |v: &str, d: usize| std::env::var(v).ok().and_then(|s| s.parse().ok()).unwrap_or(d);
        let (mr, nr, kc, nb) = (kern.mr, kern.nr, env("MK_KC", 256), env("MK_NB", 8));
        let reps = 10000 * 8 * 256 / (nb * kc);
        let mut rng = Rng::new(3);
        let mut a = AlignedBuf::new(mr * kc);
        a.as_mut_slice().copy_from_slice(&rand_vec(&mut rng, mr * kc));
        let mut b = AlignedBuf::new(nb * nr * kc);
        b.as_mut_slice().copy_from_slice(&rand_vec(&mut rng, nb * nr * kc));
        let (a, b) = (a.as_slice(), b.as_slice());
        let mut c = vec![0.0f32; mr * nr * nb];
        let te = TileEpi { rows: mr, cols: nr, ..TileEpi::PLAIN };
        // On a shared machine wall time mostly measures the other processes; also report FLOPs per
        // second this thread was actually on a CPU (Linux schedstat, tick-granular: fine at ~50 ms).
        let on_cpu_ns = || -> u64 {
            std::fs::read_to_string("/proc/thread-self/schedstat")
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
                .unwrap_or(0)
        };
        let (mut best, mut best_cpu) = (0.0f64, 0.0f64);
        for _ in 0..5 {
            let cpu0 = on_cpu_ns();
            let t = std::time::Instant::now();
            for _ in 0..reps {
                for jp in 0..nb {
                    // SAFETY: panels hold kc*mr and kc*nr floats; C holds mr rows of 8*nr.
                    unsafe {
                        (kern.f)(
                            kc,
                            a.as_ptr(),
                            b[jp * kc * nr..].as_ptr(),
                            c[jp * nr..].as_mut_ptr(),
                            nb * nr,
                            &te,
                        )
                    };
                }
            }
            let fl = 2.0 * (reps * nb * mr * nr * kc) as f64;
            best = best.max(fl / t.elapsed().as_secs_f64() / 1e9);
            best_cpu = best_cpu.max(fl / (on_cpu_ns() - cpu0).max(1) as f64);
        }
        let peak = crate::cpu::peak::fma_peak_gflops(1);
        println!(
            "{} micro-kernel {mr}x{nr}: wall {best:.1} GFLOP/s, on-cpu {best_cpu:.1}, peak {peak:.1}",
            isa.name()
        );
        std::hint::black_box(&c);
    }

    /// The column-split and whole-B orders (pre-packed A, wide or narrow B, 2+ threads) against the
    /// reference, with every epilogue option, edge rows and columns and several depth blocks; and
    /// bit-for-bit against the default order, which runs the same kernel calls per tile (so any
    /// difference is a bug in which tiles or depth blocks a task covers).
    #[test]
    fn packed_a_orders_match_default_order_bitwise() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let mut rng = Rng::new(77);
        pool.install(|| {
            for isa in available_isas() {
                let nr = kernel_for(isa).nr;
                // Column split: n = 8 panels exactly; 19 panels + a partial one (uneven split); m
                // with edge panels. Whole-B order (narrow n, several depth blocks): 49 x 4608 and
                // a 20-row m (split over columns).
                let cases = [
                    (64, 8 * nr, 300),
                    (37, 19 * nr + 5, 1100),
                    (300, 600, 64),
                    (64, 40 * nr, 300), // several column groups per task
                    (512, 49, 4608),
                    (20, 3 * nr + 1, 4608), // whole B with the columns split too (grid 1 x 4)
                ];
                for &(m, n, k) in &cases {
                    let a = rand_vec(&mut rng, m * k);
                    let b = rand_vec(&mut rng, k * n);
                    let (c0, res) = (rand_vec(&mut rng, m * n), rand_vec(&mut rng, m * n));
                    let (scale, rb, cb) =
                        (rand_vec(&mut rng, m), rand_vec(&mut rng, m), rand_vec(&mut rng, n));
                    let epi = Epilogue {
                        beta: 0.5,
                        row_scale: Some(&scale),
                        row_bias: Some(&rb),
                        col_bias: Some(&cb),
                        residual: Some((&res, n)),
                        relu: true,
                    };
                    let (av, bv) = (MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n));
                    let pa = pack_a_with_isa(isa, av);
                    let mut want = c0.clone();
                    sgemm_reference(av, bv, &mut want, n, &epi);
                    let mut split = c0.clone();
                    sgemm_packed_a(&pa, bv, &mut split, n, &epi);
                    PACKED_A_ORDERS.with(|c| c.set(false));
                    let mut default = c0.clone();
                    sgemm_packed_a(&pa, bv, &mut default, n, &epi);
                    PACKED_A_ORDERS.with(|c| c.set(true));
                    let e = rel_l2(&split, &want);
                    assert!(e <= tol(k), "{} {m}x{n}x{k}: {e:.3e}", isa.name());
                    assert!(split == default, "{} {m}x{n}x{k}: orders differ", isa.name());
                }
            }
        });
    }

    /// gemv_packed_a against the reference product with one column, on every ISA's panel layout,
    /// with edge panels, several depth blocks, row bias and ReLU; tolerance as for sgemm.
    #[test]
    fn gemv_packed_a_matches_reference() {
        let mut rng = Rng::new(91);
        for isa in available_isas() {
            // (1000 x 2048 and 3001 x 40 run in parallel chunks whose last panel is partial.)
            for &(m, k) in &[(1, 1), (77, 300), (1000, 2048), (13, 5), (3001, 40)] {
                let a = rand_vec(&mut rng, m * k);
                let x = rand_vec(&mut rng, k);
                let rb = rand_vec(&mut rng, m);
                let epi = Epilogue { row_bias: Some(&rb), relu: true, ..Default::default() };
                let av = MatRef::row_major(&a, m, k);
                let mut want = vec![0.0; m];
                sgemm_reference(av, MatRef::row_major(&x, k, 1), &mut want, 1, &epi);
                let mut got = vec![f32::NAN; m];
                gemv_packed_a(&pack_a_with_isa(isa, av), &x, &mut got, &epi);
                let e = rel_l2(&got, &want);
                assert!(e <= tol(k), "{} gemv {m}x{k}: {e:.3e}", isa.name());
            }
        }
    }

    #[test]
    fn sgemm_packed_a_matches_reference() {
        let mut rng = Rng::new(42);
        for isa in available_isas() {
            for &(m, n, k) in &[(37, 53, 71), (70, 100, 1100), (1, 5, 1)] {
                let a = rand_vec(&mut rng, m * k);
                let b = rand_vec(&mut rng, k * n);
                let rb = rand_vec(&mut rng, m);
                let epi = Epilogue { row_bias: Some(&rb), relu: true, ..Default::default() };
                let (av, bv) = (MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n));
                let mut want = vec![0.0; m * n];
                sgemm_reference(av, bv, &mut want, n, &epi);
                let pa = pack_a_with_isa(isa, av);
                let mut got = vec![0.0; m * n];
                sgemm_packed_a(&pa, bv, &mut got, n, &epi);
                let e = rel_l2(&got, &want);
                assert!(e <= tol(k), "{} packed {m}x{n}x{k}: {e:.3e}", isa.name());
            }
        }
    }

    /// `direct_masks` (run by run) against the definition, lane by lane: images narrower and
    /// wider than a panel, several images per panel, one-pixel images, shifts past the whole
    /// image, a ragged last panel.
    #[test]
    fn direct_masks_match_the_per_lane_definition() {
        // (n, h, w, row shifts, column shifts)
        type Case = (usize, usize, usize, &'static [isize], &'static [isize]);
        let cases: [Case; 7] = [
            (1, 112, 112, &[-2, -1, 0, 1], &[-2, -1, 0, 1]), // the stem's phases
            (2, 28, 28, &[-1, 0], &[-1, 0]),
            (3, 7, 7, &[-1, 0, 1], &[-1, 0, 1]),
            (5, 1, 1, &[-1, 0, 1], &[-1, 0, 1]),
            (2, 3, 5, &[-4, 0, 3], &[-6, -5, 0, 5, 6]),
            (1, 9, 40, &[-3, 2], &[-33, -1, 0, 31, 39]),
            (3, 4, 13, &[0], &[-2, 2]),
        ];
        for (i, &(n, h, w, dr, ds)) in cases.iter().enumerate() {
            let rows: Vec<(isize, isize)> = dr.iter().map(|&d| (0, d)).collect();
            let cols: Vec<(isize, isize)> = ds.iter().map(|&d| (0, d)).collect();
            let ncols = n * h * w;
            let got = direct_masks(ncols, h, w, &rows, &cols);
            let ntaps = rows.len() * cols.len();
            assert_eq!(got.len(), ncols.div_ceil(32) * ntaps, "case {i}");
            for (jp, pm) in got.chunks(ntaps).enumerate() {
                for (t, &m) in pm.iter().enumerate() {
                    let (d_r, d_s) = (dr[t / cols.len()], ds[t % cols.len()]);
                    let want = (0..32).fold(0u32, |acc, l| {
                        let jj = jp * 32 + l;
                        let (p, q) = (((jj / w) % h) as isize, (jj % w) as isize);
                        let inside = jj < ncols
                            && (0..h as isize).contains(&(p + d_r))
                            && (0..w as isize).contains(&(q + d_s));
                        acc | (u32::from(inside) << l)
                    });
                    assert_eq!(m, want, "case {i} panel {jp} tap {t}: {m:032b} vs {want:032b}");
                }
            }
        }
    }
}
