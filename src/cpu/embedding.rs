//! Token embedding: a table lookup.
//!
//! Math: for a table E (V, C) and token ids tok (N),
//!
//! ```text
//! y[n,:] = E[tok[n],:]                     // (N,C)
//! dE[tok[n],:] += dy[n,:]   for every n    // scatter-add (V,C)
//! ```
//!
//! Optionally one index (the `<pad>` token) receives no gradient, so its row stays as initialised.

/// y (N,C) = E[tok] with E (V,C). Panics on an id >= V (ids come from our own vocabulary).
pub fn embedding_forward(y: &mut [f32], tok: &[u32], table: &[f32], v: usize, c: usize) {
    assert_eq!(table.len(), v * c, "embedding_forward: table is not (V,C)");
    assert_eq!(y.len(), tok.len() * c, "embedding_forward: y is not (N,C)");
    for (row, &t) in y.chunks_exact_mut(c).zip(tok) {
        let t = t as usize;
        assert!(t < v, "embedding_forward: token id {t} >= vocabulary size {v}");
        row.copy_from_slice(&table[t * c..(t + 1) * c]);
    }
}

/// dE (V,C) += scatter of dy (N,C) by tok (N); rows of `skip` (e.g. `<pad>`) get nothing.
pub fn embedding_backward(
    dtable: &mut [f32],
    dy: &[f32],
    tok: &[u32],
    skip: Option<u32>,
    v: usize,
    c: usize,
) {
    assert_eq!(dtable.len(), v * c, "embedding_backward: dtable is not (V,C)");
    assert_eq!(dy.len(), tok.len() * c, "embedding_backward: dy is not (N,C)");
    for (row, &t) in dy.chunks_exact(c).zip(tok) {
        if Some(t) == skip {
            continue;
        }
        let t = t as usize;
        assert!(t < v, "embedding_backward: token id {t} >= vocabulary size {v}");
        for (d, &g) in dtable[t * c..(t + 1) * c].iter_mut().zip(row) {
            *d += g;
        }
    }
}
