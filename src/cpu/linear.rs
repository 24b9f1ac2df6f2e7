//! Fully connected layer.
//!
//! Math: for input x (N, I), weight W (O, I) (PyTorch layout) and bias b (O),
//!
//! ```text
//! y = x W^T + b                      // (N,O)
//! dx += dy W                         // (N,I)
//! dW += dy^T x                       // (O,I)
//! db += sum_n dy[n,:]                // (O)
//! ```
//!
//! All three products go through `sgemm`; the gradients accumulate (`beta = 1`).

use crate::cpu::gemm::{sgemm, Epilogue, MatRef};

/// y (N,O) = x (N,I) W^T (I,O) + b (O). Overwrites `y`.
pub fn linear_forward(y: &mut [f32], x: &[f32], w: &[f32], b: Option<&[f32]>, n: usize, i: usize, o: usize) {
    assert_eq!(x.len(), n * i, "linear_forward: x is not (N,I)");
    assert_eq!(w.len(), o * i, "linear_forward: W is not (O,I)");
    assert_eq!(y.len(), n * o, "linear_forward: y is not (N,O)");
    let xa = MatRef::row_major(x, n, i);
    let wt = MatRef::row_major(w, o, i).t(); // (I,O)
    sgemm(xa, wt, y, o, &Epilogue { col_bias: b, ..Default::default() });
}

/// Accumulates dx (N,I), dW (O,I), db (O) from dy (N,O). `dx` / `db` may be skipped (`None`).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    i: usize,
    o: usize,
) {
    assert_eq!(dy.len(), n * o, "linear_backward: dy is not (N,O)");
    assert_eq!(x.len(), n * i, "linear_backward: x is not (N,I)");
    assert_eq!(w.len(), o * i, "linear_backward: W is not (O,I)");
    assert_eq!(dw.len(), o * i, "linear_backward: dW is not (O,I)");
    let acc = Epilogue { beta: 1.0, ..Default::default() };
    let dya = MatRef::row_major(dy, n, o);
    if let Some(dx) = dx {
        assert_eq!(dx.len(), n * i, "linear_backward: dx is not (N,I)");
        // (N,O) x (O,I)
        sgemm(dya, MatRef::row_major(w, o, i), dx, i, &acc);
    }
    // (O,N) x (N,I)
    sgemm(dya.t(), MatRef::row_major(x, n, i), dw, i, &acc);
    if let Some(db) = db {
        assert_eq!(db.len(), o, "linear_backward: db is not (O)");
        colsum_acc(db, dy, n, o);
    }
}

/// db (O) += sum over the N rows of dy (N,O).
pub fn colsum_acc(db: &mut [f32], dy: &[f32], n: usize, o: usize) {
    for row in dy[..n * o].chunks_exact(o) {
        for (d, &g) in db.iter_mut().zip(row) {
            *d += g;
        }
    }
}

/// dst (N,O) (leading dimension `ld`) = src^T, or += src^T when `accumulate`, for src (O,N)
/// row-major: brings back a product computed transposed (y^T = W x^T with W pre-packed as the GEMM's
/// A operand, `sgemm_packed_a`, which suits a small N such as one recurrent step's batch).
pub fn transpose_into(dst: &mut [f32], ld: usize, src: &[f32], o: usize, n: usize, accumulate: bool) {
    assert!(ld >= o && src.len() >= o * n, "transpose_into: sizes");
    if n == 0 {
        return;
    }
    assert!(dst.len() >= (n - 1) * ld + o, "transpose_into: dst too small");
    // Blocks of 16 rows of dst: each cache line of src (16 consecutive dst rows) is used at once.
    const BR: usize = 16;
    for r0 in (0..n).step_by(BR) {
        let r1 = (r0 + BR).min(n);
        for k in 0..o {
            let s = &src[k * n + r0..k * n + r1];
            for (q, &v) in s.iter().enumerate() {
                let x = &mut dst[(r0 + q) * ld + k];
                *x = if accumulate { *x + v } else { v };
            }
        }
    }
}
