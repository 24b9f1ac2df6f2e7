//! Element-wise activations and softmax over contiguous f32 slices.

/// ReLU in place: x = max(x, 0).
pub fn relu_inplace(x: &mut [f32]) {
    for v in x {
        *v = v.max(0.0);
    }
}

/// Row-wise softmax in place. x (rows, cols):
///
/// ```text
/// y[i,j] = exp(x[i,j] - m_i) / sum_k exp(x[i,k] - m_i),   m_i = max_k x[i,k]
/// ```
///
/// Subtracting the row max changes nothing mathematically and keeps exp from overflowing.
pub fn softmax_rows(x: &mut [f32], cols: usize) {
    assert!(cols > 0 && x.len().is_multiple_of(cols), "softmax_rows: {} values, {cols} columns", x.len());
    for row in x.chunks_exact_mut(cols) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::uniform_vec;

    #[test]
    fn softmax_matches_f64_and_survives_large_inputs() {
        let cols = 17;
        let mut x = uniform_vec(3, "s", 4 * cols, -20.0, 20.0);
        x[5] = 1000.0; // would overflow a naive exp
        let orig = x.clone();
        softmax_rows(&mut x, cols);
        for (r, row) in orig.chunks(cols).enumerate() {
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let s: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            for (j, &v) in row.iter().enumerate() {
                let want = (v as f64 - m).exp() / s;
                // f32 exp and sum: ~1e-6 relative per entry, absolute 1e-7 for tiny probabilities.
                assert!((x[r * cols + j] as f64 - want).abs() <= 1e-6 * want + 1e-7, "{r},{j}");
            }
        }
        let mut y = vec![-1.0, 0.0, 2.5];
        relu_inplace(&mut y);
        assert_eq!(y, [0.0, 0.0, 2.5]);
    }
}
