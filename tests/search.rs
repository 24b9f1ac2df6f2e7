//! Greedy and beam search against an exhaustive search over every sequence of a tiny vocabulary,
//! K = 1 against greedy, batching against one image at a time, and the never-ending case.
//!
//! The brute force below decodes one hypothesis at a time with the decoder step functions and its own
//! f64 log-softmax, so it shares no search code with `model::search`.

use capgen::data::vocab::{END, PAD, START};
use capgen::model::decoder::{
    attention_init, attention_step, show_tell_init, show_tell_step, AttentionParams, DecodeState,
    DecoderDims, ShowTellParams,
};
use capgen::model::search::{beam_search, generate, greedy, DecoderRef, Generated, SearchConfig};
use capgen::rng::Rng;

const DIMS: DecoderDims = DecoderDims { vocab: 6, embed: 4, feat: 5, regions: 3, hidden: 4, att: 3 };

fn show_tell(seed: u64) -> ShowTellParams {
    let mut p = ShowTellParams::zeros(&DIMS);
    let mut rng = Rng::new(seed);
    // Scale 1.5 makes the next-word distributions peaked enough that greedy and beam differ.
    p.named_mut().into_iter().for_each(|(_, v)| rng.fill_uniform(v, -1.5, 1.5));
    p
}

fn attention(seed: u64) -> AttentionParams {
    let mut p = AttentionParams::zeros(&DIMS);
    let mut rng = Rng::new(seed);
    p.named_mut().into_iter().for_each(|(_, v)| rng.fill_uniform(v, -1.5, 1.5));
    p
}

fn feats(seed: u64, n: usize) -> Vec<f32> {
    let mut v = vec![0.0; n];
    Rng::new(seed).fill_uniform(&mut v, -1.0, 1.0);
    v
}

/// One hypothesis decoded alone.
struct Single<'a> {
    dec: DecoderRef<'a>,
    feats: Vec<f32>,
    att1: Vec<f32>,
    st: DecodeState,
}

impl Single<'_> {
    fn log_probs(&mut self, tok: u32) -> Vec<f64> {
        let logits = match self.dec {
            DecoderRef::ShowTell(p) => show_tell_step(p, &DIMS, &mut self.st, &[tok]).unwrap(),
            DecoderRef::Attention(p) => {
                attention_step(p, &DIMS, &self.feats, &self.att1, &mut self.st, &[tok]).unwrap().0
            }
        };
        let allowed = |k: usize| k != PAD as usize && k != START as usize;
        let m = logits
            .iter()
            .enumerate()
            .filter(|(k, _)| allowed(*k))
            .map(|(_, &x)| x as f64)
            .fold(f64::MIN, f64::max);
        let s: f64 =
            logits.iter().enumerate().filter(|(k, _)| allowed(*k)).map(|(_, &x)| (x as f64 - m).exp()).sum();
        logits
            .iter()
            .enumerate()
            .map(|(k, &x)| if allowed(k) { x as f64 - m - s.ln() } else { f64::NEG_INFINITY })
            .collect()
    }
}

fn single<'a>(dec: DecoderRef<'a>, f: &[f32]) -> Single<'a> {
    match dec {
        DecoderRef::ShowTell(p) => {
            Single { dec, feats: vec![], att1: vec![], st: show_tell_init(p, &DIMS, f).unwrap() }
        }
        DecoderRef::Attention(p) => {
            let (st, att1) = attention_init(p, &DIMS, f).unwrap();
            Single { dec, feats: f.to_vec(), att1, st }
        }
    }
}

/// Every finished sequence (words then `<end>`) of at most `max_len` predicted tokens, with its f64
/// log-probability; also the unfinished ones of exactly `max_len` words.
fn enumerate(
    s: &Single,
    tok: u32,
    prefix: &mut Vec<u32>,
    lp: f64,
    max_len: usize,
    out: &mut Vec<(Vec<u32>, f64, bool)>,
) {
    if prefix.len() == max_len {
        out.push((prefix.clone(), lp, false));
        return;
    }
    let mut s2 = Single { dec: s.dec, feats: s.feats.clone(), att1: s.att1.clone(), st: s.st.clone() };
    let logp = s2.log_probs(tok);
    for (k, &x) in logp.iter().enumerate() {
        if !x.is_finite() {
            continue;
        }
        if k as u32 == END {
            out.push((prefix.clone(), lp + x, true));
        } else {
            prefix.push(k as u32);
            enumerate(&s2, k as u32, prefix, lp + x, max_len, out);
            prefix.pop();
        }
    }
}

/// The exhaustive best finished sequence by log_prob / steps^alpha.
fn brute_best(dec: DecoderRef, f: &[f32], max_len: usize, alpha: f64) -> (Vec<u32>, f64) {
    let mut all = Vec::new();
    enumerate(&single(dec, f), START, &mut Vec::new(), 0.0, max_len, &mut all);
    all.into_iter()
        .filter(|c| c.2)
        .map(|(t, lp, _)| {
            let steps = (t.len() + 1) as f64;
            (t, lp / steps.powf(alpha))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap()
}

fn decoders<'a>(st: &'a ShowTellParams, at: &'a AttentionParams) -> Vec<(DecoderRef<'a>, usize)> {
    vec![(DecoderRef::ShowTell(st), DIMS.feat), (DecoderRef::Attention(at), DIMS.regions * DIMS.feat)]
}

#[test]
fn exhaustive_beam_finds_the_brute_force_best() {
    // 4 generable tokens (<end>, <unk>, 2 words), max 4 steps: at most 3^3 = 27 live hypotheses per
    // step, so K = 64 keeps every candidate and the beam is exhaustive.
    let (st, at) = (show_tell(1), attention(2));
    let max_len = 4;
    for alpha in [0.0f32, 0.7, 1.0] {
        for (dec, fl) in decoders(&st, &at) {
            let n = 3;
            let f = feats(10, n * fl);
            let cfg = SearchConfig { beam: 64, max_len, length_alpha: alpha };
            let got = beam_search(dec, &DIMS, &f, &cfg).unwrap();
            for (i, g) in got.iter().enumerate() {
                let (tokens, score) = brute_best(dec, &f[i * fl..(i + 1) * fl], max_len, alpha as f64);
                assert_eq!(g.tokens, tokens, "image {i} alpha {alpha} {dec:?}");
                assert!(g.finished);
                // f32 sums of <= 4 log-probabilities of magnitude < 10 vs f64: 1e-5 relative.
                assert!(
                    (g.score as f64 - score).abs() <= 1e-5 * score.abs().max(1.0),
                    "{} vs {score}",
                    g.score
                );
            }
        }
    }
}

#[test]
fn beam_three_differs_from_greedy_somewhere() {
    // Guards the toy: if beam 3 always matched greedy, the other tests could not tell them apart.
    let (st, at) = (show_tell(3), attention(4));
    let mut differs = false;
    for (dec, fl) in decoders(&st, &at) {
        let n = 16;
        let f = feats(11, n * fl);
        let g1 = greedy(dec, &DIMS, &f, &SearchConfig { beam: 1, max_len: 6, length_alpha: 0.0 }).unwrap();
        let g3 =
            beam_search(dec, &DIMS, &f, &SearchConfig { beam: 3, max_len: 6, length_alpha: 0.0 }).unwrap();
        differs |= g1.iter().zip(&g3).any(|(a, b)| a.tokens != b.tokens);
    }
    assert!(differs, "beam 3 never differs from greedy");
}

fn assert_same(a: &[Generated], b: &[Generated]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.tokens, y.tokens);
        assert_eq!(x.finished, y.finished);
        // Same arithmetic except the decoder batch size (GEMM blocking): 1e-5 relative.
        assert!((x.log_prob - y.log_prob).abs() <= 1e-5 * x.log_prob.abs().max(1.0));
        assert_eq!(x.alphas.len(), y.alphas.len());
        for (p, q) in x.alphas.iter().zip(&y.alphas) {
            assert!((p - q).abs() <= 1e-5, "{p} vs {q}");
        }
    }
}

#[test]
fn beam_one_equals_greedy() {
    let (st, at) = (show_tell(5), attention(6));
    for (dec, fl) in decoders(&st, &at) {
        let f = feats(12, 8 * fl);
        let cfg = SearchConfig { beam: 1, max_len: 7, length_alpha: 0.7 };
        let g = greedy(dec, &DIMS, &f, &cfg).unwrap();
        let b = beam_search(dec, &DIMS, &f, &cfg).unwrap();
        assert_same(&g, &b);
        assert_same(&generate(dec, &DIMS, &f, &cfg).unwrap(), &g);
        if let DecoderRef::Attention(_) = dec {
            for x in &g {
                let steps = x.tokens.len() + x.finished as usize;
                assert_eq!(x.alphas.len(), steps * DIMS.regions);
                // Each step's attention is a softmax over the regions.
                for row in x.alphas.chunks(DIMS.regions) {
                    assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                }
            }
        }
    }
}

#[test]
fn batched_beam_equals_one_image_at_a_time() {
    let (st, at) = (show_tell(7), attention(8));
    for (dec, fl) in decoders(&st, &at) {
        let n = 5;
        let f = feats(13, n * fl);
        let cfg = SearchConfig { beam: 3, max_len: 8, length_alpha: 0.7 };
        let all = beam_search(dec, &DIMS, &f, &cfg).unwrap();
        let one: Vec<Generated> =
            (0..n).flat_map(|i| beam_search(dec, &DIMS, &f[i * fl..(i + 1) * fl], &cfg).unwrap()).collect();
        assert_same(&all, &one);
    }
}

#[test]
fn no_end_returns_the_best_unfinished_caption() {
    let (mut st, mut at) = (show_tell(9), attention(10));
    // <end> can never win: its logit bias is hugely negative (finite, so the softmax stays finite).
    st.fc_b[END as usize] = -1e4;
    at.fc_b[END as usize] = -1e4;
    for (dec, fl) in decoders(&st, &at) {
        let f = feats(14, 2 * fl);
        for beam in [1, 3] {
            let cfg = SearchConfig { beam, max_len: 5, length_alpha: 0.7 };
            let got = generate(dec, &DIMS, &f, &cfg).unwrap();
            for g in got {
                assert!(!g.finished);
                assert_eq!(g.tokens.len(), 5);
                assert!(g.tokens.iter().all(|&t| t != END && t != PAD && t != START));
                assert!((g.score - g.log_prob / 5f32.powf(0.7)).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn bad_settings_are_errors() {
    let st = show_tell(11);
    let dec = DecoderRef::ShowTell(&st);
    let f = feats(15, DIMS.feat);
    assert!(generate(dec, &DIMS, &f, &SearchConfig { beam: 0, ..Default::default() }).is_err());
    assert!(generate(dec, &DIMS, &f, &SearchConfig { max_len: 0, ..Default::default() }).is_err());
    assert!(generate(dec, &DIMS, &f[..3], &SearchConfig::default()).is_err());
    let mut nan = st.clone();
    nan.fc_w.fill(f32::NAN);
    for beam in [1, 2] {
        let r = generate(DecoderRef::ShowTell(&nan), &DIMS, &f, &SearchConfig { beam, ..Default::default() });
        assert!(r.is_err(), "NaN weights, beam {beam}");
    }
}
