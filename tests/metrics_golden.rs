//! Replays tests/data/metrics_golden.json (written by tools/make_metrics_golden.py with pycocoevalcap,
//! its Java PTBTokenizer and NLTK): our tokenizer against PTBTokenizer outputs, and every metric against
//! the reference implementations, to 1e-6 absolute. The references compute in f64 like we do, with the
//! same formulas; differences come only from summation order (~1e-15), so 1e-6 has a wide margin
//! while still catching any formula difference (the smallest edge-case effects here are ~1e-3).

use std::collections::BTreeMap;

use capgen::metrics::{self, BleuMode};
use serde_json::Value;

const TOL: f64 = 1e-6;

fn golden() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/metrics_golden.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("golden file")).expect("golden JSON")
}

fn split(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

fn check(name: &str, mode: &str, got: &metrics::Scores, want: &Value, failures: &mut Vec<String>) {
    let got = got.to_json();
    for (k, w) in want.as_object().unwrap() {
        let (g, w) = (got[k].as_f64().unwrap(), w.as_f64().unwrap());
        if (g - w).abs() > TOL {
            failures.push(format!("{name} {mode} {k}: ours {g} reference {w}"));
        }
    }
}

#[test]
fn tokenizer_matches_ptbtokenizer() {
    let g = golden();
    let cases = g["tokenizer"].as_array().unwrap();
    assert!(cases.len() > 200);
    let mut bad = Vec::new();
    for c in cases {
        let (raw, want) = (c[0].as_str().unwrap(), c[1].as_str().unwrap());
        let got = metrics::tokenize_joined(raw);
        if got != want {
            bad.push(format!("{raw:?}\n   ours {got:?}\n   PTB  {want:?}"));
        }
    }
    assert!(bad.is_empty(), "{} of {} differ:\n{}", bad.len(), cases.len(), bad.join("\n"));
}

#[test]
fn tokenizer_mostly_matches_on_adversarial_text() {
    // Punctuation glued to words in odd ways exercises corners of CoreNLP's lexer we do not model
    // (listed in src/metrics/tokenize.rs); we measured 97.7% exact on such text (seeds 1-3 of the
    // generator). Require 96% so a regression in a common rule shows up here too.
    let g = golden();
    let cases = g["tokenizer_adversarial"].as_array().unwrap();
    let same = cases
        .iter()
        .filter(|c| metrics::tokenize_joined(c[0].as_str().unwrap()) == c[1].as_str().unwrap())
        .count();
    let frac = same as f64 / cases.len() as f64;
    assert!(frac >= 0.96, "only {same} of {} adversarial cases match PTBTokenizer", cases.len());
}

#[test]
fn metrics_match_references_on_ptb_tokens() {
    // Metrics alone: fed the Java tokenizer's own tokens, so a tokenizer difference cannot hide here.
    let g = golden();
    let mut failures = Vec::new();
    for (name, c) in g["corpora"].as_object().unwrap() {
        let hyps_tok = c["hyps_tok"].as_object().unwrap();
        let ids: Vec<&String> = hyps_tok.keys().collect();
        let hyps: Vec<Vec<String>> = ids.iter().map(|k| split(hyps_tok[*k].as_str().unwrap())).collect();
        let refs: Vec<Vec<Vec<String>>> = ids
            .iter()
            .map(|k| {
                c["refs_tok"][*k].as_array().unwrap().iter().map(|r| split(r.as_str().unwrap())).collect()
            })
            .collect();
        let coco = metrics::score_tokens(&refs, &hyps, BleuMode::Coco).unwrap();
        check(name, "coco", &coco, &c["coco"], &mut failures);
        let nltk = metrics::score_tokens(&refs, &hyps, BleuMode::Nltk).unwrap();
        check(name, "nltk", &nltk, &c["nltk"], &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn metrics_match_references_end_to_end() {
    // Raw captions through our tokenizer and metrics, as `capgen score` does.
    let g = golden();
    let mut failures = Vec::new();
    for (name, c) in g["corpora"].as_object().unwrap() {
        let refs: BTreeMap<String, Vec<String>> = serde_json::from_value(c["refs"].clone()).unwrap();
        let hyps: BTreeMap<String, String> = c["hyps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (h["image_id"].as_str().unwrap().to_string(), h["caption"].as_str().unwrap().to_string())
            })
            .collect();
        let coco = metrics::score(&refs, &hyps, BleuMode::Coco).unwrap();
        assert_eq!(coco.images, hyps.len());
        check(name, "coco", &coco, &c["coco"], &mut failures);
        let nltk = metrics::score(&refs, &hyps, BleuMode::Nltk).unwrap();
        check(name, "nltk", &nltk, &c["nltk"], &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
