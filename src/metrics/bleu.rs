//! BLEU-1..4, two ways: pycocoevalcap's `Bleu` (the COCO caption evaluation) and NLTK's `corpus_bleu`.
//!
//! Both are corpus BLEU: for each order n, clipped n-gram matches and hypothesis n-gram counts are
//! summed over all images, p_n = matches_n / guesses_n, and
//!   BLEU-N = BP * (prod_{n<=N} p_n)^(1/N),  BP = exp(1 - r/c) if c < r else 1,
//! with c the total hypothesis length and r the total "closest" reference length (per image, the
//! reference length nearest the hypothesis length, the shorter one on a tie). A match is clipped by
//! the largest count of that n-gram in any single reference of the image.
//!
//! They differ in the corner cases:
//! - COCO: p_n = (matches + 1e-15) / (guesses + 1e-9), so a zero precision gives a tiny, not zero,
//!   score; the length ratio is (c + 1e-15) / (r + 1e-9) and BP = exp(1 - 1/ratio) when ratio < 1.
//! - NLTK: each image's n-gram denominator is at least 1 (so an image shorter than n counts one
//!   guess); if there is no unigram match at all the score is 0; a zero precision for some order is
//!   replaced by the smallest positive normal f64 (it warns), i.e. log p = -708.4, so the score is
//!   ~1e-77 or smaller — effectively 0; BP = 0 for an empty corpus of hypotheses.

use super::ngrams::{order, NGrams};

/// Per-image sufficient statistics for BLEU.
#[derive(Clone, Debug, Default)]
pub(crate) struct BleuStats {
    pub hyp_len: usize,
    /// reference length closest to the hypothesis length (ties: the shorter)
    pub closest_ref_len: usize,
    /// clipped matches for n = 1..4
    pub correct: [usize; 4],
    /// hypothesis n-grams for n = 1..4: max(0, len - n + 1)
    pub guess: [usize; 4],
}

/// Statistics for one hypothesis against its references (at least one).
pub(crate) fn image_stats(hyp: &NGrams, refs: &[NGrams]) -> BleuStats {
    let hyp_len = hyp.len;
    let closest_ref_len = refs
        .iter()
        .map(|r| r.len)
        .min_by_key(|&l| (l.abs_diff(hyp_len), l))
        .expect("an image has at least one reference (checked by the caller)");
    let mut s = BleuStats { hyp_len, closest_ref_len, ..Default::default() };
    for &(g, c) in &hyp.grams {
        // clip by the largest count in any single reference
        let max_ref = refs.iter().map(|r| r.count(g)).max().unwrap_or(0);
        s.correct[order(g) - 1] += c.min(max_ref) as usize;
    }
    for n in 1..=4 {
        s.guess[n - 1] = (hyp_len + 1).saturating_sub(n);
    }
    s
}

/// pycocoevalcap `Bleu(4)` corpus scores, BLEU-1..4.
pub(crate) fn bleu_coco(stats: &[BleuStats]) -> [f64; 4] {
    const TINY: f64 = 1e-15;
    const SMALL: f64 = 1e-9;
    let (mut c, mut r) = (0usize, 0usize);
    let (mut correct, mut guess) = ([0usize; 4], [0usize; 4]);
    for s in stats {
        c += s.hyp_len;
        r += s.closest_ref_len;
        for k in 0..4 {
            correct[k] += s.correct[k];
            guess[k] += s.guess[k];
        }
    }
    let mut out = [0.0; 4];
    let mut prod = 1.0f64;
    for k in 0..4 {
        prod *= (correct[k] as f64 + TINY) / (guess[k] as f64 + SMALL);
        out[k] = prod.powf(1.0 / (k as f64 + 1.0));
    }
    let ratio = (c as f64 + TINY) / (r as f64 + SMALL);
    if ratio < 1.0 {
        let bp = (1.0 - 1.0 / ratio).exp();
        out.iter_mut().for_each(|b| *b *= bp);
    }
    out
}

/// NLTK `corpus_bleu` with weights (1), (1/2,1/2), (1/3,1/3,1/3), (1/4 x4) and no smoothing.
pub(crate) fn bleu_nltk(stats: &[BleuStats]) -> [f64; 4] {
    let (mut c, mut r) = (0usize, 0usize);
    let (mut num, mut den) = ([0usize; 4], [0usize; 4]);
    for s in stats {
        c += s.hyp_len;
        r += s.closest_ref_len;
        for k in 0..4 {
            num[k] += s.correct[k];
            den[k] += s.guess[k].max(1);
        }
    }
    if num[0] == 0 {
        return [0.0; 4];
    }
    let bp = if c > r {
        1.0
    } else if c == 0 {
        0.0
    } else {
        (1.0 - r as f64 / c as f64).exp()
    };
    // log p_n; a zero precision becomes f64::MIN_POSITIVE (NLTK's sys.float_info.min)
    let logp: Vec<f64> = (0..4)
        .map(|k| if num[k] == 0 { f64::MIN_POSITIVE.ln() } else { (num[k] as f64 / den[k] as f64).ln() })
        .collect();
    let mut out = [0.0; 4];
    for (n, o) in out.iter_mut().enumerate() {
        let w = 1.0 / (n as f64 + 1.0);
        *o = bp * (logp[..=n].iter().map(|l| w * l).sum::<f64>()).exp();
    }
    out
}
