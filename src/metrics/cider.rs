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

use std::collections::{HashMap, HashSet};

use super::bleu::ngram_counts;
use super::NGram;

const N: usize = 4;
const SIGMA: f64 = 6.0;

/// tf-idf vectors (one map per order), their L2 norms, and the bigram count used as "length".
struct Vector<'a> {
    vec: [HashMap<NGram<'a>, f64>; N],
    norm: [f64; N],
    len: f64,
}

fn to_vector<'a>(words: &'a [String], df: &HashMap<NGram, f64>, log_n: f64) -> Vector<'a> {
    let mut v = Vector { vec: Default::default(), norm: [0.0; N], len: 0.0 };
    for (g, tf) in ngram_counts(words, N) {
        let n = g.len() - 1;
        let idf = log_n - df.get(g).copied().unwrap_or(0.0).max(1.0).ln();
        let x = tf as f64 * idf;
        v.vec[n].insert(g, x);
        v.norm[n] += x * x;
        if n == 1 {
            v.len += tf as f64;
        }
    }
    v.norm.iter_mut().for_each(|x| *x = x.sqrt());
    v
}

/// Per-image CIDEr-D scores (x10), in the order of `hyps`/`refs`.
pub(crate) fn cider_d(hyps: &[Vec<String>], refs: &[Vec<Vec<String>>]) -> Vec<f64> {
    // document frequency: in how many images' reference sets each n-gram occurs
    let mut df: HashMap<NGram, f64> = HashMap::new();
    for rs in refs {
        let set: HashSet<NGram> = rs.iter().flat_map(|r| ngram_counts(r, N).into_keys()).collect();
        for g in set {
            *df.entry(g).or_insert(0.0) += 1.0;
        }
    }
    let log_n = (refs.len() as f64).ln();
    hyps.iter()
        .zip(refs)
        .map(|(h, rs)| {
            let vh = to_vector(h, &df, log_n);
            let mut score = [0.0f64; N];
            for r in rs {
                let vr = to_vector(r, &df, log_n);
                let delta = vh.len - vr.len;
                let penalty = (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp();
                for (n, acc) in score.iter_mut().enumerate() {
                    let mut val: f64 = vh.vec[n]
                        .iter()
                        .map(|(g, &x)| {
                            let y = vr.vec[n].get(g).copied().unwrap_or(0.0);
                            x.min(y) * y
                        })
                        .sum();
                    if vh.norm[n] != 0.0 && vr.norm[n] != 0.0 {
                        val /= vh.norm[n] * vr.norm[n];
                    }
                    *acc += val * penalty;
                }
            }
            score.iter().sum::<f64>() / N as f64 / rs.len() as f64 * 10.0
        })
        .collect()
}
