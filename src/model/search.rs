//! Caption generation: greedy decoding and batched beam search, for both decoders.
//!
//! Every step feeds one token per live hypothesis and gets log-probabilities over the vocabulary:
//! `logp[r,k] = logits[r,k] - logsumexp(logits[r,:])`, with `<pad>` and `<start>` masked to -inf
//! (they are never generated). A hypothesis' log-probability is the sum over its predicted tokens
//! (the words and, when it finished, `<end>`).
//!
//! **Beam search** (`beam` = K): each image starts from one hypothesis (`<start>`). At each step ALL
//! live hypotheses of ALL images advance in ONE decoder step call (batch = sum of live beams, at most
//! images x K). Per image, the candidates are (live hypothesis, next token) pairs ranked by summed
//! log-probability; the best `K - finished` are kept. A kept candidate whose token is `<end>` is set
//! aside as finished (so an image's live beam shrinks as hypotheses finish); the others stay live,
//! their decoder rows gathered (`DecodeState::gather`). An image is done when nothing is live, or
//! after `max_len` steps. Ties break toward the lower (hypothesis, token) index, so K = 1 is exactly
//! greedy.
//!
//! **Length normalisation**: finished hypotheses are compared by `score = log_prob / len^alpha`, with
//! `len` the number of predicted tokens including `<end>` and `alpha` = `length_alpha` (default 0.7;
//! 0 compares raw log-probabilities, 1 the per-token mean). The result is the best finished
//! hypothesis; when none finished within `max_len` steps, the best live one by the same score
//! (`finished = false`) — never an error.
//!
//! **Greedy** (`beam` = 1): the arg-max token each step for every image at once, until `<end>` or
//! `max_len` steps.
//!
//! The attention decoder also returns, for the chosen hypothesis, each step's attention weights
//! (one row of L regions per predicted token, `<end>` included when it finished).

use crate::data::vocab::{END, PAD, START};
use crate::error::{Error, Result};
use crate::model::decoder::{
    attention_init, attention_step, show_tell_init, show_tell_step, AttentionParams, DecodeState,
    DecoderDims, ShowTellParams,
};

/// A decoder's parameters, borrowed.
#[derive(Clone, Copy, Debug)]
pub enum DecoderRef<'a> {
    ShowTell(&'a ShowTellParams),
    Attention(&'a AttentionParams),
}

impl DecoderRef<'_> {
    /// Feature length per image: D (show-tell) or L*D (attention).
    pub fn feat_len(&self, d: &DecoderDims) -> usize {
        match self {
            DecoderRef::ShowTell(_) => d.feat,
            DecoderRef::Attention(_) => d.regions * d.feat,
        }
    }
}

/// Search settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SearchConfig {
    /// Beam width K (1 = greedy).
    pub beam: usize,
    /// Maximum number of predicted tokens (`<end>` included).
    pub max_len: usize,
    /// Length-normalisation exponent (see the module comment).
    pub length_alpha: f32,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig { beam: 1, max_len: 20, length_alpha: 0.7 }
    }
}

/// One generated caption.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    /// Word ids, without `<start>` and `<end>`.
    pub tokens: Vec<u32>,
    /// Sum of the log-probabilities of the predicted tokens (`<end>` included when finished).
    pub log_prob: f32,
    /// `log_prob / steps^alpha` (the beam-search ranking; `steps` counts `<end>`).
    pub score: f32,
    /// Whether the caption ended with `<end>` (false: cut at `max_len`).
    pub finished: bool,
    /// Attention decoder: (steps, L) weights, one row per predicted token. Empty for show-tell.
    pub alphas: Vec<f32>,
}

/// Length-normalised score of a hypothesis with `steps` predicted tokens.
pub fn normalised_score(log_prob: f32, steps: usize, alpha: f32) -> f32 {
    log_prob / (steps.max(1) as f32).powf(alpha)
}

/// Log-softmax of each row of `logits` (N,V) in place, `<pad>` and `<start>` set to -inf.
pub fn log_softmax_rows(logits: &mut [f32], v: usize) {
    for row in logits.chunks_mut(v) {
        row[PAD as usize] = f32::NEG_INFINITY;
        row[START as usize] = f32::NEG_INFINITY;
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let s: f32 = row.iter().map(|&x| (x - m).exp()).sum();
        let lse = m + s.ln();
        row.iter_mut().for_each(|x| *x -= lse);
    }
}

/// Decoder rows during generation: the recurrent state plus, for attention, each row's features and
/// their projection att1.
struct Runner<'a> {
    dec: DecoderRef<'a>,
    d: DecoderDims,
    state: DecodeState,
    feats: Vec<f32>,
    att1: Vec<f32>,
}

impl<'a> Runner<'a> {
    fn new(dec: DecoderRef<'a>, d: &DecoderDims, feats: &[f32]) -> Result<Self> {
        let d = *d;
        Ok(match dec {
            DecoderRef::ShowTell(p) => {
                Runner { dec, d, state: show_tell_init(p, &d, feats)?, feats: Vec::new(), att1: Vec::new() }
            }
            DecoderRef::Attention(p) => {
                let (state, att1) = attention_init(p, &d, feats)?;
                Runner { dec, d, state, feats: feats.to_vec(), att1 }
            }
        })
    }

    /// Advances every row by one token; returns log-probabilities (N,V) and alphas (N,L) or empty.
    fn step(&mut self, tokens: &[u32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut logits, alphas) = match self.dec {
            DecoderRef::ShowTell(p) => (show_tell_step(p, &self.d, &mut self.state, tokens)?, Vec::new()),
            DecoderRef::Attention(p) => {
                attention_step(p, &self.d, &self.feats, &self.att1, &mut self.state, tokens)?
            }
        };
        log_softmax_rows(&mut logits, self.d.vocab);
        Ok((logits, alphas))
    }

    /// Keeps rows `rows` in that order (repeats allowed).
    fn gather(&mut self, rows: &[usize]) {
        self.state = self.state.gather(rows, self.d.hidden);
        if let DecoderRef::Attention(_) = self.dec {
            let (lf, la) = (self.d.regions * self.d.feat, self.d.regions * self.d.att);
            self.feats = gather_rows(&self.feats, rows, lf);
            self.att1 = gather_rows(&self.att1, rows, la);
        }
    }
}

fn gather_rows(v: &[f32], rows: &[usize], w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * w);
    for &r in rows {
        out.extend_from_slice(&v[r * w..(r + 1) * w]);
    }
    out
}

fn check(dec: DecoderRef, d: &DecoderDims, feats: &[f32], cfg: &SearchConfig) -> Result<usize> {
    if cfg.beam == 0 {
        return Err(Error::msg("--beam 0: use a beam width of at least 1"));
    }
    if cfg.max_len == 0 {
        return Err(Error::msg("maximum caption length 0: use at least 1"));
    }
    if d.vocab <= END as usize {
        return Err(Error::shape(format!("vocabulary of {} words has no <end>", d.vocab)));
    }
    let fl = dec.feat_len(d);
    if feats.is_empty() || !feats.len().is_multiple_of(fl) {
        return Err(Error::shape(format!("generation: features of length {} are not (N,{fl})", feats.len())));
    }
    Ok(feats.len() / fl)
}

/// Captions N images (features (N,D) or (N,L,D)): greedy when `cfg.beam` is 1, else beam search.
pub fn generate(
    dec: DecoderRef,
    d: &DecoderDims,
    feats: &[f32],
    cfg: &SearchConfig,
) -> Result<Vec<Generated>> {
    if cfg.beam == 1 {
        greedy(dec, d, feats, cfg)
    } else {
        beam_search(dec, d, feats, cfg)
    }
}

/// Greedy decoding of N images at once (see the module comment).
pub fn greedy(dec: DecoderRef, d: &DecoderDims, feats: &[f32], cfg: &SearchConfig) -> Result<Vec<Generated>> {
    let n = check(dec, d, feats, cfg)?;
    let (v, l) = (d.vocab, d.regions);
    let mut run = Runner::new(dec, d, feats)?;
    let mut out: Vec<Generated> = (0..n)
        .map(|_| Generated { tokens: vec![], log_prob: 0.0, score: 0.0, finished: false, alphas: vec![] })
        .collect();
    // live[r] = the image that decoder row r belongs to.
    let mut live: Vec<usize> = (0..n).collect();
    let mut tokens = vec![START; n];
    for _ in 0..cfg.max_len {
        let (logp, alphas) = run.step(&tokens)?;
        let mut keep = Vec::with_capacity(live.len());
        let mut next = Vec::with_capacity(live.len());
        for (r, &img) in live.iter().enumerate() {
            let row = &logp[r * v..(r + 1) * v];
            let k = argmax(row);
            if !row[k].is_finite() {
                return Err(non_finite());
            }
            let g = &mut out[img];
            g.log_prob += row[k];
            if !alphas.is_empty() {
                g.alphas.extend_from_slice(&alphas[r * l..(r + 1) * l]);
            }
            if k as u32 == END {
                g.finished = true;
            } else {
                g.tokens.push(k as u32);
                keep.push(r);
                next.push(k as u32);
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() != live.len() {
            run.gather(&keep);
            live = keep.iter().map(|&r| live[r]).collect();
        }
        tokens = next;
    }
    for g in &mut out {
        let steps = g.tokens.len() + g.finished as usize;
        g.score = normalised_score(g.log_prob, steps, cfg.length_alpha);
    }
    Ok(out)
}

fn non_finite() -> Error {
    Error::msg("caption generation: the decoder produced NaN scores (are the model weights finite?)")
}

/// The first index of the largest value (ties to the lower index, as the beam's ordering).
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (k, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = k;
        }
    }
    best
}

/// A live or finished hypothesis.
#[derive(Clone, Debug)]
struct Hyp {
    tokens: Vec<u32>,
    log_prob: f32,
    alphas: Vec<f32>,
}

impl Hyp {
    fn done(self, finished: bool, alpha: f32) -> Generated {
        let steps = self.tokens.len() + finished as usize;
        Generated {
            score: normalised_score(self.log_prob, steps, alpha),
            tokens: self.tokens,
            log_prob: self.log_prob,
            finished,
            alphas: self.alphas,
        }
    }
}

/// The best of `gs` by score (the first one on ties).
fn best(gs: Vec<Generated>) -> Option<Generated> {
    gs.into_iter().reduce(|a, b| if b.score > a.score { b } else { a })
}

/// Batched beam search over N images (see the module comment).
pub fn beam_search(
    dec: DecoderRef,
    d: &DecoderDims,
    feats: &[f32],
    cfg: &SearchConfig,
) -> Result<Vec<Generated>> {
    let n = check(dec, d, feats, cfg)?;
    let (v, l, k) = (d.vocab, d.regions, cfg.beam);
    let mut run = Runner::new(dec, d, feats)?;
    // Per image: its live hypotheses, in decoder-row order (image-major), and its finished ones.
    let mut live: Vec<Vec<Hyp>> =
        (0..n).map(|_| vec![Hyp { tokens: vec![], log_prob: 0.0, alphas: vec![] }]).collect();
    let mut finished: Vec<Vec<Generated>> = vec![Vec::new(); n];
    let mut tokens = vec![START; n];
    for _ in 0..cfg.max_len {
        let (logp, alphas) = run.step(&tokens)?;
        let mut rows = Vec::new();
        let mut next_tokens = Vec::new();
        let mut row0 = 0;
        for img in 0..n {
            let hyps = std::mem::take(&mut live[img]);
            let nh = hyps.len();
            if nh == 0 {
                continue;
            }
            let want = k - finished[img].len();
            // Candidates (hypothesis j, token t) ranked by summed log-probability, ties to lower index.
            let mut cand: Vec<(f32, usize)> = Vec::with_capacity(nh * v);
            for (j, h) in hyps.iter().enumerate() {
                let row = &logp[(row0 + j) * v..(row0 + j + 1) * v];
                cand.extend(
                    row.iter()
                        .enumerate()
                        .filter(|(_, x)| x.is_finite())
                        .map(|(t, &x)| (h.log_prob + x, j * v + t)),
                );
            }
            let order = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
            if cand.len() > want {
                cand.select_nth_unstable_by(want - 1, order);
                cand.truncate(want);
            }
            cand.sort_unstable_by(order);
            for (lp, idx) in cand {
                let (j, t) = (idx / v, (idx % v) as u32);
                let mut h =
                    Hyp { tokens: hyps[j].tokens.clone(), log_prob: lp, alphas: hyps[j].alphas.clone() };
                if !alphas.is_empty() {
                    h.alphas.extend_from_slice(&alphas[(row0 + j) * l..(row0 + j + 1) * l]);
                }
                if t == END {
                    finished[img].push(h.done(true, cfg.length_alpha));
                } else {
                    h.tokens.push(t);
                    live[img].push(h);
                    rows.push(row0 + j);
                    next_tokens.push(t);
                }
            }
            row0 += nh;
        }
        if rows.is_empty() {
            break;
        }
        run.gather(&rows);
        tokens = next_tokens;
    }
    let mut out = Vec::with_capacity(n);
    for (img, fin) in finished.into_iter().enumerate() {
        let g = match best(fin) {
            Some(g) => g,
            None => {
                let unfinished =
                    std::mem::take(&mut live[img]).into_iter().map(|h| h.done(false, cfg.length_alpha));
                // Empty only when every score was NaN (all candidates dropped).
                best(unfinished.collect()).ok_or_else(non_finite)?
            }
        };
        out.push(g);
    }
    Ok(out)
}
