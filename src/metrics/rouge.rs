//! ROUGE-L as pycocoevalcap's `Rouge` computes it.
//!
//! With LCS the longest common subsequence length (in tokens) of hypothesis h and reference r,
//! P = max_r LCS/|h| and R = max_r LCS/|r| are maximised over the references *separately*, then
//!   ROUGE-L = (1 + b^2) P R / (R + b^2 P),  b = 1.2   (0 if P or R is 0),
//! and the corpus score is the mean over images. pycocoevalcap splits on single spaces, so an empty
//! sentence is one empty token: we mirror that (it only matters when a reference is empty too).

/// Longest common subsequence length of two token sequences, O(|a||b|) time, O(|b|) memory.
fn lcs(a: &[&str], b: &[&str]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y { prev[j] + 1 } else { prev[j + 1].max(cur[j]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Python's `" ".join(words).split(" ")`: an empty sentence is one empty token.
fn split_like_python(words: &[String]) -> Vec<&str> {
    if words.is_empty() {
        vec![""]
    } else {
        words.iter().map(|s| s.as_str()).collect()
    }
}

/// ROUGE-L of one hypothesis against its references.
pub(crate) fn rouge_l(hyp: &[String], refs: &[Vec<String>]) -> f64 {
    const BETA: f64 = 1.2;
    let h = split_like_python(hyp);
    let (mut p_max, mut r_max) = (0.0f64, 0.0f64);
    for r in refs {
        let r = split_like_python(r);
        let l = lcs(&r, &h) as f64;
        p_max = p_max.max(l / h.len() as f64);
        r_max = r_max.max(l / r.len() as f64);
    }
    if p_max != 0.0 && r_max != 0.0 {
        (1.0 + BETA * BETA) * p_max * r_max / (r_max + BETA * BETA * p_max)
    } else {
        0.0
    }
}
