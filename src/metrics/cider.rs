//! CIDEr-D as pycocoevalcap's `Cider` computes it.
//!
//! For each n = 1..4, a sentence is a tf-idf vector over its n-grams: g_k = tf_k * (log N - log
//! max(1, df_k)), where N is the number of images scored and df_k the number of images whose
//! references (any of them) contain n-gram k. For a hypothesis h and reference r
//!   sim_n(h, r) = sum_k min(g_k(h), g_k(r)) * g_k(r) / (|g(h)| |g(r)|)      (0 where a norm is 0)
//!                 * exp(-(l_h - l_r)^2 / (2 sigma^2)),  sigma = 6,
//! where the "length" l is, as in pycocoevalcap's code, the number of bigrams of the sentence
//! (max(0, words - 1)), not the number of words. An image scores
//!   CIDEr-D = 10 * mean_n( sum_r sim_n(h, r) ) / |refs|
//! and the corpus score is the mean over images (unscaled otherwise; ~0.5-1.0 for decent captioners).

use rayon::prelude::*;

use super::ngrams::{order, FastMap, NGrams, MAX_N as N};

const SIGMA: f64 = 6.0;

/// A sentence's tf-idf weights sorted by n-gram key, their L2 norm per order, and the bigram count
/// used as "length".
struct Vector {
    weights: Vec<(u128, f64)>,
    norm: [f64; N],
    len: f64,
}

fn to_vector(s: &NGrams, df: &FastMap<u128, u32>, log_n: f64) -> Vector {
    let mut norm = [0.0; N];
    let mut len = 0.0;
    let weights = s
        .grams
        .iter()
        .map(|&(g, tf)| {
            let n = order(g) - 1;
            let df = df.get(&g).copied().unwrap_or(0).max(1) as f64;
            let x = tf as f64 * (log_n - df.ln());
            norm[n] += x * x;
            if n == 1 {
                len += tf as f64;
            }
            (g, x)
        })
        .collect();
    norm.iter_mut().for_each(|x| *x = x.sqrt());
    Vector { weights, norm, len }
}

/// sum over shared n-grams of min(h, r) * r, per order (a merge-join of two sorted vectors)
fn clipped_dot(h: &[(u128, f64)], r: &[(u128, f64)]) -> [f64; N] {
    let mut val = [0.0; N];
    let (mut i, mut j) = (0, 0);
    while i < h.len() && j < r.len() {
        match h[i].0.cmp(&r[j].0) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                val[order(h[i].0) - 1] += h[i].1.min(r[j].1) * r[j].1;
                i += 1;
                j += 1;
            }
        }
    }
    val
}

/// Per-image CIDEr-D scores (x10), in the order of `hyps`/`refs`.
pub(crate) fn cider_d(hyps: &[NGrams], refs: &[Vec<NGrams>]) -> Vec<f64> {
    // document frequency: in how many images' reference sets each n-gram occurs
    let mut df: FastMap<u128, u32> = FastMap::default();
    let mut keys = Vec::new();
    for rs in refs {
        keys.clear();
        keys.extend(rs.iter().flat_map(|r| r.grams.iter().map(|&(g, _)| g)));
        keys.sort_unstable();
        keys.dedup();
        for &g in &keys {
            *df.entry(g).or_insert(0) += 1;
        }
    }
    let log_n = (refs.len() as f64).ln();
    hyps.par_iter()
        .zip(refs)
        .map(|(h, rs)| {
            let vh = to_vector(h, &df, log_n);
            let mut score = [0.0f64; N];
            for r in rs {
                let vr = to_vector(r, &df, log_n);
                let delta = vh.len - vr.len;
                let penalty = (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp();
                let val = clipped_dot(&vh.weights, &vr.weights);
                for n in 0..N {
                    let mut v = val[n];
                    if vh.norm[n] != 0.0 && vr.norm[n] != 0.0 {
                        v /= vh.norm[n] * vr.norm[n];
                    }
                    score[n] += v * penalty;
                }
            }
            score.iter().sum::<f64>() / N as f64 / rs.len() as f64 * 10.0
        })
        .collect()
}
