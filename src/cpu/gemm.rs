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

/// Checks that A, B and C fit together; panics on a mismatch (a caller bug, not user input).
fn check_dims(a: &MatRef, b: &MatRef, c: &[f32], ldc: usize, epi: &Epilogue) {
    assert_eq!(a.cols, b.rows, "sgemm: A is {}x{}, B is {}x{}", a.rows, a.cols, b.rows, b.cols);
    let (m, n) = (a.rows, b.cols);
    assert!(ldc >= n, "sgemm: ldc {ldc} < n {n}");
    if m > 0 && n > 0 {
        assert!(c.len() >= (m - 1) * ldc + n, "sgemm: C too small");
    }
    if let Some(s) = epi.row_scale {
        assert!(s.len() >= m);
    }
    if let Some(s) = epi.row_bias {
        assert!(s.len() >= m);
    }
    if let Some(s) = epi.col_bias {
        assert!(s.len() >= n);
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

/// C = epilogue(A * B). Multithreaded with rayon (runs on the current rayon pool).
pub fn sgemm(a: MatRef, b: MatRef, c: &mut [f32], ldc: usize, epi: &Epilogue) {
    // Placeholder until the packed, register-blocked kernel lands: the reference loop.
    sgemm_reference(a, b, c, ldc, epi);
}
