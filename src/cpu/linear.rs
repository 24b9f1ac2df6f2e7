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

use rayon::prelude::*;

use crate::cpu::gemm::{gemv_packed_a, pack_a, sgemm, sgemm_packed_a, Epilogue, MatRef, PackedA};

/// y (N,O) = x (N,I) W^T (I,O) + b (O). Overwrites `y`.
pub fn linear_forward(y: &mut [f32], x: &[f32], w: &[f32], b: Option<&[f32]>, n: usize, i: usize, o: usize) {
    assert_eq!(x.len(), n * i, "linear_forward: x is not (N,I)");
    assert_eq!(w.len(), o * i, "linear_forward: W is not (O,I)");
    assert_eq!(y.len(), n * o, "linear_forward: y is not (N,O)");
    let xa = MatRef::row_major(x, n, i);
    let wt = MatRef::row_major(w, o, i).t(); // (I,O)
    sgemm(xa, wt, y, o, &Epilogue { col_bias: b, ..Default::default() });
}

/// An inference-only linear layer: W (O,I) packed once as the GEMM's A operand, and the bias.
/// `linear_forward` packs W^T as the B operand on every call (all of W: 8 MB for ResNet-50's fc,
/// 411 MB for VGG16's fc6), which dominates when N is small; this pays it once at load.
#[derive(Clone, Debug)]
pub struct PackedLinear {
    pub w: PackedA,
    pub bias: Option<Vec<f32>>,
}

impl PackedLinear {
    /// Packs W (O,I) row-major; `bias` has O entries.
    pub fn new(w: &[f32], o: usize, i: usize, bias: Option<Vec<f32>>) -> Self {
        assert_eq!(w.len(), o * i, "PackedLinear: W is not (O,I)");
        assert!(bias.as_ref().is_none_or(|b| b.len() == o), "PackedLinear: bias is not (O)");
        PackedLinear { w: pack_a(MatRef::row_major(w, o, i)), bias }
    }
    pub fn out_features(&self) -> usize {
        self.w.rows()
    }
    pub fn in_features(&self) -> usize {
        self.w.cols()
    }
}

/// y (N,O) = act(x (N,I) W^T + b), the same function as `linear_forward`, computed transposed so
/// the pre-packed W is the A operand: y^T (O,N) = W (O,I) x^T (I,N), bias along rows, then
/// transposed back into y (at N = 1 the two layouts coincide: a matrix-vector product, `gemv_packed_a`).
pub fn linear_forward_packed(y: &mut [f32], x: &[f32], w: &PackedLinear, n: usize, relu: bool) {
    let (o, i) = (w.out_features(), w.in_features());
    assert_eq!(x.len(), n * i, "linear_forward_packed: x is not (N,I)");
    assert_eq!(y.len(), n * o, "linear_forward_packed: y is not (N,O)");
    let epi = Epilogue { row_bias: w.bias.as_deref(), relu, ..Default::default() };
    if n == 1 {
        gemv_packed_a(&w.w, x, y, &epi);
    } else {
        let mut yt = vec![0.0f32; o * n];
        sgemm_packed_a(&w.w, MatRef::row_major(x, n, i).t(), &mut yt, n, &epi); // x^T (I,N)
        transpose_into(y, o, &yt, o, n, false);
    }
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
    weight_grad_acc(dw, i, dy, x, n, o, i);
    if let Some(db) = db {
        assert_eq!(db.len(), o, "linear_backward: db is not (O)");
        colsum_acc(db, dy, n, o);
    }
}

/// db (O) += sum over the N rows of dy (N,O). In parallel over blocks of columns when large (each
/// column's sum is still taken over the rows in order, so the result does not depend on threads).
pub fn colsum_acc(db: &mut [f32], dy: &[f32], n: usize, o: usize) {
    assert!(db.len() >= o && dy.len() >= n * o, "colsum_acc: sizes");
    const BLOCK: usize = 256;
    let block = |(jb, d): (usize, &mut [f32])| {
        let j0 = jb * BLOCK;
        for row in dy[..n * o].chunks_exact(o) {
            d.iter_mut().zip(&row[j0..]).for_each(|(x, &g)| *x += g);
        }
    };
    if n * o >= 1 << 18 {
        db[..o].par_chunks_mut(BLOCK).enumerate().for_each(block);
    } else {
        db[..o].chunks_mut(BLOCK).enumerate().for_each(block);
    }
}

/// dst (N,O) (leading dimension `ld`) = src^T, or += src^T when `accumulate`, for src (O,N)
/// row-major: brings back a product computed transposed (y^T = W x^T with W pre-packed as the GEMM's
/// A operand, `sgemm_packed_a`, which suits a small N such as one recurrent step's batch).
pub fn transpose_into(dst: &mut [f32], ld: usize, src: &[f32], o: usize, n: usize, accumulate: bool) {
    assert!(ld >= o && src.len() >= o * n, "transpose_into: sizes");
    if n == 0 || o == 0 {
        return;
    }
    assert!(dst.len() >= (n - 1) * ld + o, "transpose_into: dst too small");
    // 16 x 16 tiles: 16 rows of src (16 cache lines) are copied into a local tile, whose columns
    // are then written as 16-float pieces of 16 dst rows. No branch in the inner loops. Blocks of
    // 16 dst rows are independent: in parallel when the matrix is large.
    const BT: usize = 16;
    let block = |(rb, d): (usize, &mut [f32])| {
        let r0 = rb * BT;
        let rw = BT.min(n - r0);
        for k0 in (0..o).step_by(BT) {
            let kw = BT.min(o - k0);
            let mut tile = [[0.0f32; BT]; BT]; // tile[q][kk] = src[k0 + kk, r0 + q]
            for kk in 0..kw {
                let s = &src[(k0 + kk) * n + r0..(k0 + kk) * n + r0 + rw];
                for (q, &v) in s.iter().enumerate() {
                    tile[q][kk] = v;
                }
            }
            for (q, t) in tile.iter().enumerate().take(rw) {
                let d = &mut d[q * ld + k0..q * ld + k0 + kw];
                if accumulate {
                    d.iter_mut().zip(t).for_each(|(x, &v)| *x += v);
                } else {
                    d.copy_from_slice(&t[..kw]);
                }
            }
        }
    };
    let dst = &mut dst[..(n - 1) * ld + o];
    // (A (2048, 64) step product, ~130K elements, is ~0.2 ms of work: worth a fork/join.)
    if o * n >= 1 << 16 {
        dst.par_chunks_mut(BT * ld).enumerate().for_each(block);
    } else {
        dst.chunks_mut(BT * ld).enumerate().for_each(block);
    }
}

/// dW (O,I) (leading dimension `ldw`) += dY^T X over N rows, for dY (N,O) and X (N,I) row-major:
/// the weight gradient of a linear layer. The GEMM packs its A operand slowly from a transposed view
/// (one strided load per element, a new cache line and often a new page each), so when dY is the
/// bigger operand (O > I, e.g. the output layer's 8000 x 512) the product is taken transposed,
/// dW^T (I,O) = X^T dY, where only the small X is read transposed and dY is a row-major B, and
/// added back with `transpose_into`.
pub fn weight_grad_acc(dw: &mut [f32], ldw: usize, dy: &[f32], x: &[f32], n: usize, o: usize, i: usize) {
    assert_eq!(dy.len(), n * o, "weight_grad_acc: dY is not (N,O)");
    assert_eq!(x.len(), n * i, "weight_grad_acc: X is not (N,I)");
    let acc = Epilogue { beta: 1.0, ..Default::default() };
    let (dya, xa) = (MatRef::row_major(dy, n, o), MatRef::row_major(x, n, i));
    // Transposed costs ~ I*N slow loads + an O*I transpose, against O*N slow loads.
    if o > i && o * n > i * n + o * i {
        let mut ct = vec![0.0f32; i * o]; // dW^T (I,O)
        sgemm(xa.t(), dya, &mut ct, o, &Epilogue::default());
        transpose_into(dw, ldw, &ct, i, o, true);
    } else {
        sgemm(dya.t(), xa, dw, ldw, &acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gemm::sgemm_reference;
    use crate::rng::{uniform_vec, Rng};

    /// colsum_acc against an f64 column sum, serial and parallel sizes, O not a multiple of the block.
    /// Tolerance 1e-6 sqrt(N): N-term f32 sums (same bound as the sgemm tests).
    #[test]
    fn colsum_matches_f64() {
        let mut rng = Rng::new(23);
        for &(n, o) in &[(3, 5), (70, 300), (1280, 1000), (600, 8000)] {
            let dy: Vec<f32> = (0..n * o).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let db0: Vec<f32> = (0..o).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let mut db = db0.clone();
            colsum_acc(&mut db, &dy, n, o);
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for j in 0..o {
                let want = db0[j] as f64 + (0..n).map(|i| dy[i * o + j] as f64).sum::<f64>();
                num += (db[j] as f64 - want).powi(2);
                den += want * want;
            }
            let e = (num / den).sqrt();
            assert!(e <= 1e-6 * (n as f64).sqrt(), "colsum {n}x{o}: {e:.3e}");
        }
    }

    /// weight_grad_acc against the reference triple loop, on both of its paths (O > I transposed,
    /// O <= I direct) with a padded leading dimension. Tolerance 1e-6 sqrt(N): N-term f32 dot
    /// products summed in a different order (the sgemm tests' bound).
    #[test]
    fn weight_grad_matches_reference() {
        let mut rng = Rng::new(22);
        for &(n, o, i, ldw) in &[(37, 50, 23, 23), (300, 300, 20, 25), (40, 8, 70, 80), (5, 1, 9, 9)] {
            let dy: Vec<f32> = (0..n * o).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let x: Vec<f32> = (0..n * i).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let w0: Vec<f32> = (0..o * ldw).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let mut want = w0.clone();
            let acc = Epilogue { beta: 1.0, ..Default::default() };
            let xm = MatRef::row_major(&x, n, i);
            sgemm_reference(MatRef::row_major(&dy, n, o).t(), xm, &mut want, ldw, &acc);
            let mut got = w0.clone();
            weight_grad_acc(&mut got, ldw, &dy, &x, n, o, i);
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for (a, b) in got.iter().zip(&want) {
                num += (*a as f64 - *b as f64).powi(2);
                den += (*b as f64).powi(2);
            }
            let e = (num / den).sqrt();
            assert!(e <= 1e-6 * (n as f64).sqrt(), "weight_grad {n}x{o}x{i}: {e:.3e}");
        }
    }

    /// transpose_into is a pure copy (or one add per element): exact, on shapes that are and are
    /// not multiples of the 16 x 16 tile; the padding columns past O must stay untouched.
    #[test]
    fn transpose_into_is_exact() {
        let mut rng = Rng::new(21);
        for &(o, n) in &[(1, 1), (3, 17), (2048, 64), (33, 16), (16, 33), (100, 7), (512, 1000)] {
            let src: Vec<f32> = (0..o * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let ld = o + 3;
            let old: Vec<f32> = (0..n * ld).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let mut put = old.clone();
            transpose_into(&mut put, ld, &src, o, n, false);
            let mut add = old.clone();
            transpose_into(&mut add, ld, &src, o, n, true);
            for r in 0..n {
                for k in 0..ld {
                    let i = r * ld + k;
                    if k < o {
                        assert_eq!(put[i], src[k * n + r], "{o}x{n} at ({r},{k})");
                        assert_eq!(add[i], old[i] + src[k * n + r], "{o}x{n} at ({r},{k})");
                    } else {
                        assert_eq!((put[i], add[i]), (old[i], old[i]), "{o}x{n}: padding written");
                    }
                }
            }
        }
    }

    /// The packed layer is `linear_forward` (the GEMM, or at N = 1 `gemv_packed_a` with its four
    /// partial sums: equal to f32 rounding of the sum order, rel L2 <= 1e-6), for N = 1 and N > 1
    /// (transposed back), with and without bias and ReLU, on fresh random inputs.
    #[test]
    fn packed_linear_matches_linear_forward() {
        for (n, i, o) in [(1, 300, 77), (3, 64, 1000), (37, 129, 45)] {
            let x = uniform_vec(1, "x", n * i, -1.0, 1.0);
            let w = uniform_vec(2, "w", o * i, -1.0, 1.0);
            let b = uniform_vec(3, "b", o, -1.0, 1.0);
            for (bias, relu) in [(true, false), (false, true), (true, true)] {
                let bb = bias.then(|| b.clone());
                let mut want = vec![0.0f32; n * o];
                linear_forward(&mut want, &x, &w, bb.as_deref(), n, i, o);
                if relu {
                    want.iter_mut().for_each(|v| *v = v.max(0.0));
                }
                let pl = PackedLinear::new(&w, o, i, bb);
                let mut got = vec![f32::NAN; n * o];
                linear_forward_packed(&mut got, &x, &pl, n, relu);
                let num: f64 = got.iter().zip(&want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
                let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
                assert!((num / den).sqrt() <= 1e-6, "n {n} i {i} o {o} bias {bias} relu {relu}");
            }
        }
    }
}
