//! Caption metrics, as the COCO caption evaluation computes them: BLEU-1..4, CIDEr-D, ROUGE-L.
//!
//! Captions are first tokenised like pycocoevalcap's PTBTokenizer (see [`tokenize`]); then
//! - BLEU-1..4 follow pycocoevalcap's `Bleu` (or, with [`BleuMode::Nltk`], NLTK's `corpus_bleu`),
//! - CIDEr-D follows pycocoevalcap's `Cider` (the corpus mean, unscaled beyond its built-in x10),
//! - ROUGE-L follows pycocoevalcap's `Rouge`.
//!
//! Each is checked to 1e-6 against those libraries by tests/metrics_golden.rs. Only images with a
//! hypothesis are scored (as the COCO evaluation does, which scores the result file's image ids);
//! [`Scores::unscored_images`] counts reference images left out so callers can warn.

mod bleu;
mod cider;
mod ngrams;
mod rouge;
pub mod tokenize;

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;

use crate::error::{Error, Result};
pub use tokenize::{tokenize, tokenize_joined};

/// Which BLEU definition to report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BleuMode {
    /// pycocoevalcap's `Bleu(4)` ("closest" reference length, tiny/small smoothing constants).
    #[default]
    Coco,
    /// `nltk.translate.bleu_score.corpus_bleu`, uniform weights up to n, no smoothing.
    Nltk,
}

impl std::str::FromStr for BleuMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "coco" => Ok(BleuMode::Coco),
            "nltk" => Ok(BleuMode::Nltk),
            _ => Err(Error::msg(format!("unknown --bleu `{s}` (expected coco or nltk)"))),
        }
    }
}

/// Corpus scores. BLEU and ROUGE-L are fractions in [0, 1]; CIDEr-D is pycocoevalcap's number
/// (about 0..10, x10 already inside its definition).
#[derive(Clone, Debug, PartialEq)]
pub struct Scores {
    pub bleu: [f64; 4],
    pub cider_d: f64,
    pub rouge_l: f64,
    /// images scored (those with a hypothesis)
    pub images: usize,
    /// reference images without a hypothesis, left out of the scores
    pub unscored_images: usize,
}

impl Scores {
    /// The contract keys (DESIGN.md section 4): `BLEU-1`..`BLEU-4`, `CIDEr-D`, `ROUGE-L`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "BLEU-1": self.bleu[0],
            "BLEU-2": self.bleu[1],
            "BLEU-3": self.bleu[2],
            "BLEU-4": self.bleu[3],
            "CIDEr-D": self.cider_d,
            "ROUGE-L": self.rouge_l,
        })
    }

    /// One `name value` line per metric.
    pub fn lines(&self) -> Vec<String> {
        let mut v: Vec<String> = (0..4).map(|k| format!("BLEU-{}  {:.6}", k + 1, self.bleu[k])).collect();
        v.push(format!("CIDEr-D {:.6}", self.cider_d));
        v.push(format!("ROUGE-L {:.6}", self.rouge_l));
        v
    }
}

/// Scores raw captions: `refs` maps image id → reference captions, `hyps` image id → hypothesis.
/// Both are tokenised as the COCO evaluation does. Errors: a hypothesis whose image has no
/// references, an image with an empty reference list, no hypotheses at all.
pub fn score(
    refs: &BTreeMap<String, Vec<String>>,
    hyps: &BTreeMap<String, String>,
    bleu: BleuMode,
) -> Result<Scores> {
    let mut pairs = Vec::with_capacity(hyps.len());
    for (id, h) in hyps {
        let rs = refs
            .get(id)
            .ok_or_else(|| Error::msg(format!("hypothesis for image `{id}` has no references")))?;
        pairs.push((h, rs));
    }
    let (hyp_toks, ref_toks): (Vec<Vec<String>>, Vec<Vec<Vec<String>>>) =
        pairs.par_iter().map(|(h, rs)| (tokenize(h), rs.iter().map(|r| tokenize(r)).collect())).unzip();
    if let Some((id, _)) = refs.iter().find(|(_, rs)| rs.is_empty()) {
        return Err(Error::msg(format!("image `{id}` has an empty reference list")));
    }
    let mut s = score_tokens(&ref_toks, &hyp_toks, bleu)?;
    s.unscored_images = refs.keys().filter(|k| !hyps.contains_key(*k)).count();
    Ok(s)
}

/// Scores already-tokenised captions: `refs[i]` are the references of the image whose hypothesis is
/// `hyps[i]`. No tokenisation is applied (tokens are compared as given).
pub fn score_tokens(refs: &[Vec<Vec<String>>], hyps: &[Vec<String>], bleu: BleuMode) -> Result<Scores> {
    if refs.len() != hyps.len() {
        return Err(Error::msg(format!("{} hypotheses but {} reference sets", hyps.len(), refs.len())));
    }
    if hyps.is_empty() {
        return Err(Error::msg("nothing to score: no hypotheses"));
    }
    if let Some(i) = refs.iter().position(|r| r.is_empty()) {
        return Err(Error::msg(format!("image #{i} has an empty reference list")));
    }
    let mut vocab = ngrams::Vocab::default();
    let hyp_grams: Vec<ngrams::NGrams> = hyps.iter().map(|h| ngrams::NGrams::new(&vocab.ids(h))).collect();
    let ref_grams: Vec<Vec<ngrams::NGrams>> =
        refs.iter().map(|rs| rs.iter().map(|r| ngrams::NGrams::new(&vocab.ids(r))).collect()).collect();
    let stats: Vec<_> = hyp_grams.iter().zip(&ref_grams).map(|(h, r)| bleu::image_stats(h, r)).collect();
    let bleu = match bleu {
        BleuMode::Coco => bleu::bleu_coco(&stats),
        BleuMode::Nltk => bleu::bleu_nltk(&stats),
    };
    let n = hyps.len() as f64;
    let cider_d = cider::cider_d(&hyp_grams, &ref_grams).iter().sum::<f64>() / n;
    // per-image scores in parallel, summed in order so results do not depend on the thread count
    let per_image: Vec<f64> = hyps.par_iter().zip(refs).map(|(h, r)| rouge::rouge_l(h, r)).collect();
    let rouge_l = per_image.iter().sum::<f64>() / n;
    Ok(Scores { bleu, cider_d, rouge_l, images: hyps.len(), unscored_images: 0 })
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(text.trim_start_matches('\u{feff}'))
        .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))
}

/// An image id as written in a file: a string, or an integer (COCO result files use integers).
fn image_id(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        _ => None,
    }
}

/// Reads REFS.json: `{"image id": ["caption", ...], ...}`.
pub fn load_refs(path: &Path) -> Result<BTreeMap<String, Vec<String>>> {
    let v = read_json(path)?;
    let obj = v
        .as_object()
        .ok_or_else(|| Error::format(path, "expected an object {\"image id\": [\"caption\", ...]}"))?;
    if obj.is_empty() {
        return Err(Error::format(path, "no images"));
    }
    let mut out = BTreeMap::new();
    for (id, caps) in obj {
        let arr = caps
            .as_array()
            .ok_or_else(|| Error::format(path, format!("image `{id}`: expected a list of captions")))?;
        if arr.is_empty() {
            return Err(Error::format(path, format!("image `{id}` has an empty reference list")));
        }
        let caps = arr
            .iter()
            .map(|c| c.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::format(path, format!("image `{id}`: captions must be strings")))?;
        out.insert(id.clone(), caps);
    }
    Ok(out)
}

/// Reads HYPS.json in the COCO results format: `[{"image_id": "...", "caption": "..."}, ...]`.
pub fn load_hyps(path: &Path) -> Result<BTreeMap<String, String>> {
    let v = read_json(path)?;
    let arr = v.as_array().ok_or_else(|| {
        Error::format(path, "expected a list [{\"image_id\": \"...\", \"caption\": \"...\"}, ...]")
    })?;
    if arr.is_empty() {
        return Err(Error::format(path, "no hypotheses"));
    }
    let mut out = BTreeMap::new();
    for (i, e) in arr.iter().enumerate() {
        let id = e.get("image_id").and_then(image_id).ok_or_else(|| {
            Error::format(path, format!("entry {i}: missing or non-string/integer \"image_id\""))
        })?;
        let cap = e.get("caption").and_then(|c| c.as_str()).ok_or_else(|| {
            Error::format(path, format!("entry {i} (image `{id}`): missing or non-string \"caption\""))
        })?;
        if out.insert(id.clone(), cap.to_string()).is_some() {
            return Err(Error::format(path, format!("duplicate hypothesis for image `{id}`")));
        }
    }
    Ok(out)
}

/// Scores two files; a hypothesis for an image missing from REFS is an error naming HYPS.
pub fn score_files(refs_path: &Path, hyps_path: &Path, bleu: BleuMode) -> Result<Scores> {
    let refs = load_refs(refs_path)?;
    let hyps = load_hyps(hyps_path)?;
    if let Some(id) = hyps.keys().find(|k| !refs.contains_key(*k)) {
        return Err(Error::format(
            hyps_path,
            format!("image `{id}` has no references in {}", refs_path.display()),
        ));
    }
    score(&refs, &hyps, bleu)
}

#[cfg(test)]
mod tests {
    //! Hand-computable cases; the golden test compares against the reference implementations.
    use super::*;

    fn toks(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    fn run(refs: &[&[&str]], hyps: &[&str], mode: BleuMode) -> Scores {
        let r: Vec<Vec<Vec<String>>> = refs.iter().map(|rs| rs.iter().map(|s| toks(s)).collect()).collect();
        let h: Vec<Vec<String>> = hyps.iter().map(|s| toks(s)).collect();
        score_tokens(&r, &h, mode).unwrap()
    }

    // COCO's smoothing constants (1e-15 / 1e-9) move exact values by < 1e-9 for these sizes.
    const EPS: f64 = 1e-9;

    #[test]
    fn bleu_clips_repeated_words() {
        // "the" x4 against "the cat": 1 of 4 unigrams counts; no bigram matches.
        for mode in [BleuMode::Coco, BleuMode::Nltk] {
            let s = run(&[&["the cat"]], &["the the the the"], mode);
            assert!((s.bleu[0] - 0.25).abs() < EPS, "{mode:?} {:?}", s.bleu);
            // a zero bigram precision: COCO gives sqrt(0.25 * 1e-15/3), NLTK exp(0.5 ln .25 + 0.5 ln 2^-1022)
            assert!(s.bleu[1] > 0.0 && s.bleu[1] < 1e-7, "{mode:?} {:?}", s.bleu);
        }
    }

    #[test]
    fn bleu_brevity_penalty_and_closest_reference() {
        // c = 2, r = 5: BP = exp(1 - 5/2), all unigrams and the bigram match.
        for mode in [BleuMode::Coco, BleuMode::Nltk] {
            let s = run(&[&["a cat sat on mat"]], &["a cat"], mode);
            let bp = (1.0f64 - 2.5).exp();
            assert!((s.bleu[0] - bp).abs() < EPS && (s.bleu[1] - bp).abs() < EPS, "{mode:?} {:?}", s.bleu);
        }
        // hypothesis length 4, references 3 and 5: the tie goes to the shorter (3), so no penalty;
        // picking 5 would give exp(1 - 5/4) = 0.78.
        let s = run(&[&["a b c", "a b c d e"]], &["a b c d"], BleuMode::Coco);
        assert!((s.bleu[0] - 1.0).abs() < EPS, "{:?}", s.bleu);
    }

    #[test]
    fn nltk_zero_without_unigram_matches() {
        let s = run(&[&["a dog"], &["a cat"]], &["zebra", "purple"], BleuMode::Nltk);
        assert_eq!(s.bleu, [0.0; 4]);
        let s = run(&[&["a dog"], &["a cat"]], &["zebra", "purple"], BleuMode::Coco);
        assert!(s.bleu[0] > 0.0 && s.bleu[0] < 1e-12); // COCO: (0 + 1e-15) / (2 + 1e-9)
    }

    #[test]
    fn rouge_l_by_hand() {
        // LCS("a b c d", "a x c d e") = 3: P = 3/4, R = 3/5, F = 2.44 P R / (R + 1.44 P) = 0.6535714...
        let s = run(&[&["a x c d e"]], &["a b c d"], BleuMode::Coco);
        assert!((s.rouge_l - 2.44 * 0.75 * 0.6 / (0.6 + 1.44 * 0.75)).abs() < 1e-12, "{}", s.rouge_l);
        // P and R are maximised over references separately: P = 1 from the long one, R = 1 from the short.
        let s = run(&[&["a b", "a b c d e f g h"]], &["a b c d"], BleuMode::Coco);
        assert!((s.rouge_l - 1.0).abs() < 1e-12, "{}", s.rouge_l);
    }

    #[test]
    fn cider_d_by_hand() {
        // Two images, each hypothesis equal to its single reference, n-grams unique to their image:
        // idf = ln 2 - ln 1 for all, cosine 1 for n = 1, 2, and no 3-/4-grams (zero norms -> 0):
        // 10 * (1 + 1 + 0 + 0) / 4 = 5.
        let s = run(&[&["a b"], &["c d"]], &["a b", "c d"], BleuMode::Coco);
        assert!((s.cider_d - 5.0).abs() < 1e-12, "{}", s.cider_d);
        // One image: log N = 0, so every tf-idf weight is 0 and so is CIDEr-D.
        let s = run(&[&["a b c"]], &["a b c"], BleuMode::Coco);
        assert_eq!(s.cider_d, 0.0);
    }

    fn tmp(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("capgen-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn files_and_their_errors() {
        let refs = tmp("refs.json", r#"{"1": ["a dog runs", "A dog is running."], "2": ["a cat"]}"#);
        let err = |h: &str, name: &str| {
            let hp = tmp(name, h);
            score_files(&refs, &hp, BleuMode::Coco).unwrap_err().to_string()
        };
        // integer ids (COCO results) are accepted; image 2 has no hypothesis and is left out
        let ok = tmp("ok.json", r#"[{"image_id": 1, "caption": "a dog runs"}]"#);
        let s = score_files(&refs, &ok, BleuMode::Coco).unwrap();
        assert_eq!((s.images, s.unscored_images), (1, 1));
        assert!((s.bleu[0] - 1.0).abs() < EPS);

        let e = err(r#"[{"image_id": "3", "caption": "x"}]"#, "h1.json");
        assert!(e.contains("h1.json") && e.contains("`3` has no references"), "{e}");
        let e = err(r#"[{"image_id": "1", "caption": "x"}, {"image_id": 1, "caption": "y"}]"#, "h2.json");
        assert!(e.contains("h2.json") && e.contains("duplicate"), "{e}");
        let e = err(r#"[{"image_id": "1"}]"#, "h3.json");
        assert!(e.contains("h3.json") && e.contains("caption"), "{e}");
        let e = err(r#"{"image_id": "1"}"#, "h4.json");
        assert!(e.contains("h4.json") && e.contains("expected a list"), "{e}");
        let e = err("[{", "h5.json");
        assert!(e.contains("h5.json") && e.contains("not valid JSON"), "{e}");
        let e = err("[]", "h6.json");
        assert!(e.contains("h6.json") && e.contains("no hypotheses"), "{e}");
        let missing = refs.with_file_name("missing.json");
        let e = score_files(&missing, &ok, BleuMode::Coco).unwrap_err().to_string();
        assert!(e.contains("missing.json"), "{e}");

        let bad_refs = tmp("r2.json", r#"{"1": []}"#);
        let e = score_files(&bad_refs, &ok, BleuMode::Coco).unwrap_err().to_string();
        assert!(e.contains("r2.json") && e.contains("empty reference list"), "{e}");
        let bad_refs = tmp("r3.json", r#"{"1": "a dog"}"#);
        let e = score_files(&bad_refs, &ok, BleuMode::Coco).unwrap_err().to_string();
        assert!(e.contains("r3.json") && e.contains("list of captions"), "{e}");
        let bad_refs = tmp("r4.json", r#"["a dog"]"#);
        let e = score_files(&bad_refs, &ok, BleuMode::Coco).unwrap_err().to_string();
        assert!(e.contains("r4.json") && e.contains("expected an object"), "{e}");
    }
}
