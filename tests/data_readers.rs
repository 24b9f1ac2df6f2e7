//! Caption readers, splits, tokenizer, vocabulary and batch loader.
//!
//! The fixtures under tests/data/captions/ hold the same captions in every format, each with the
//! same tricky lines (a quoted comma, an embedded quote, an empty caption, a duplicate pair, a bad
//! line, a non-UTF-8 byte); the expected map below is written out by hand, not produced by the code.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use capgen::data::captions::{parse_captions, read_captions, CaptionFormat, CaptionMap};
use capgen::data::loader::{BatchLoader, LoaderConfig};
use capgen::data::split::{
    official_siblings, read_karpathy, read_official_lists, read_split, resolve_split, Split,
};
use capgen::data::tokenize::tokenize;
use capgen::data::vocab::{Vocab, END, PAD, START, UNK};
use capgen::rng::Rng;

const I1: &str = "1000268201_693b08cb0e.jpg";
const I2: &str = "1001773457_577c3a7d70.jpg";
const I3: &str = "1002674143_1b742ab4b8.jpg";
const I4: &str = "1003163366_44323f5815.jpg";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/captions").join(name)
}

/// What every fixture must read as: file order, duplicate and empty captions gone, the Latin-1 `é`
/// (byte 0xE9, invalid UTF-8) replaced by U+FFFD.
fn expected() -> CaptionMap {
    let mut m = CaptionMap::new();
    m.insert(
        I1.into(),
        vec![
            "A child in a pink dress is climbing up a set of stairs in an entry way .".into(),
            "A girl going into a wooden building .".into(),
            "A little girl , in a pink dress , climbing stairs .".into(),
        ],
    );
    m.insert(
        I2.into(),
        vec![
            "A black dog and a spotted dog are fighting".into(),
            "Two dogs on pavement moving toward each other near a caf\u{FFFD} .".into(),
            "A man says \"hello\" to a dog .".into(),
        ],
    );
    m.insert(
        I3.into(),
        vec![
            "A little girl covered in paint sits in front of a painted rainbow with her hands in a bowl ."
                .into(),
            "There is a girl with pigtails sitting in front of a rainbow painting .".into(),
        ],
    );
    m.insert(I4.into(), vec!["A man lays on a bench , his dog sits by him .".into()]);
    m
}

#[test]
fn kaggle_csv_fixture() {
    let (map, r) = read_captions(fixture("captions.txt"), None).unwrap();
    assert_eq!(r.format, Some(CaptionFormat::KaggleCsv));
    assert_eq!(map, expected());
    assert_eq!((r.captions, r.images), (9, 4));
    assert_eq!(r.duplicates.first_lines, vec![5]);
    assert_eq!(r.empty.first_lines, vec![7]);
    assert_eq!(r.non_utf8.first_lines, vec![8]);
    assert_eq!(r.non_utf8_sequences, 1);
    assert_eq!(r.malformed.first_lines, vec![10, 13]);
    assert_eq!(r.repaired.count, 0);
    let w = r.warnings();
    assert_eq!(w.len(), 4, "{w:?}");
    assert!(w.iter().all(|l| l.contains("captions.txt") && !l.contains('\n')), "{w:?}");
    assert!(w.iter().any(|l| l.contains("2 malformed lines skipped (lines 10, 13)")), "{w:?}");
}

#[test]
fn token_fixtures() {
    for name in ["Flickr8k.token.txt", "results_20130124.token"] {
        let (map, r) = read_captions(fixture(name), None).unwrap();
        assert_eq!(r.format, Some(CaptionFormat::Token), "{name}");
        assert_eq!(map, expected(), "{name}");
        assert_eq!(r.duplicates.first_lines, vec![4]);
        assert_eq!(r.empty.first_lines, vec![6]);
        assert_eq!(r.non_utf8.first_lines, vec![7]);
        assert_eq!(r.malformed.first_lines, vec![9]);
    }
}

#[test]
fn flickr30k_csv_fixture() {
    let (map, r) = read_captions(fixture("results.csv"), None).unwrap();
    assert_eq!(r.format, Some(CaptionFormat::Flickr30kCsv));
    assert_eq!(map, expected());
    assert_eq!(r.duplicates.first_lines, vec![5]);
    assert_eq!(r.empty.first_lines, vec![7]);
    assert_eq!(r.non_utf8.first_lines, vec![8]);
    assert_eq!(r.malformed.first_lines, vec![10]);
    // The row that lacks its second `|` (as line 19999 of the real file does) is repaired.
    assert_eq!(r.repaired.first_lines, vec![12]);
}

#[test]
fn karpathy_json_fixture() {
    let (map, r) = read_captions(fixture("dataset_flickr8k.json"), None).unwrap();
    assert_eq!(r.format, Some(CaptionFormat::KarpathyJson));
    assert_eq!(map, expected());
    assert_eq!(r.duplicates.count, 1);
    assert_eq!(r.empty.count, 1);
    // images[3] has no `split`: skipped with its sentences.
    assert_eq!(r.malformed.first_lines, vec![4]);
}

#[test]
fn all_formats_agree_and_override_works() {
    let files = [
        ("captions.txt", "kaggle"),
        ("Flickr8k.token.txt", "token"),
        ("results_20130124.token", "token"),
        ("results.csv", "flickr30k"),
        ("dataset_flickr8k.json", "karpathy"),
    ];
    let reference = expected();
    for (f, fmt) in files {
        let forced: CaptionFormat = fmt.parse().unwrap();
        let (m, _) = read_captions(fixture(f), Some(forced)).unwrap();
        assert_eq!(m, reference, "{f} read as {fmt}");
    }
    // Forcing the wrong format is a hard error (wrong header), not a silent empty read.
    let e = read_captions(fixture("results.csv"), Some(CaptionFormat::KaggleCsv)).unwrap_err().to_string();
    assert!(e.contains("results.csv") && e.contains("line 1") && e.contains("image,caption"), "{e}");
    assert!("nonsense".parse::<CaptionFormat>().is_err());
}

#[test]
fn hard_errors_name_the_file() {
    let e = read_captions(fixture("no_such_file.txt"), None).unwrap_err().to_string();
    assert!(e.contains("no_such_file.txt"), "{e}");

    let e = parse_captions("bad.csv", b"img,text\na.jpg,a dog\n", CaptionFormat::KaggleCsv).unwrap_err();
    let e = e.to_string();
    assert!(e.starts_with("bad.csv: line 1:") && e.contains("image,caption"), "{e}");

    let e = parse_captions("f.csv", b"image_name| comment\n", CaptionFormat::Flickr30kCsv).unwrap_err();
    assert!(e.to_string().contains("f.csv: line 1"), "{e}");

    // Header only, or nothing but bad lines: no valid caption at all.
    let e = parse_captions("h.txt", b"image,caption\n\n", CaptionFormat::KaggleCsv).unwrap_err().to_string();
    assert!(e.contains("h.txt") && e.contains("no valid caption"), "{e}");
    let e =
        parse_captions("t.token", b"garbage\nmore garbage\n", CaptionFormat::Token).unwrap_err().to_string();
    assert!(e.contains("t.token") && e.contains("line 1"), "{e}");
    let e = parse_captions("x.token", b"", CaptionFormat::Token).unwrap_err().to_string();
    assert!(e.contains("x.token"), "{e}");

    // Detection failure is a clear error too.
    let e = read_captions(fixture("Flickr_8k.devImages.txt"), None).unwrap_err().to_string();
    assert!(e.contains("Flickr_8k.devImages.txt") && e.contains("--caption-format"), "{e}");

    let e = parse_captions("k.json", b"{\"images\": 3", CaptionFormat::KarpathyJson).unwrap_err();
    assert!(e.to_string().starts_with("k.json: not valid JSON"), "{e}");
}

#[test]
fn csv_quoting_edge_cases() {
    let text = "\u{FEFF}image,caption\n\
                a.jpg,\"one , two\"\n\
                a.jpg,\"say \"\"hi\"\" now\"\n\
                a.jpg,  \"spaced quote\"  \n\
                a.jpg,\"closed\" trailing junk\n\
                \"b.jpg\",quoted image name\n";
    let (m, r) = parse_captions("q.csv", text.as_bytes(), CaptionFormat::KaggleCsv).unwrap();
    assert_eq!(m["a.jpg"], vec!["one , two", "say \"hi\" now", "spaced quote"]);
    assert_eq!(m["b.jpg"], vec!["quoted image name"]);
    assert_eq!(r.malformed.first_lines, vec![5]);
}

#[test]
fn report_keeps_exact_count_but_few_line_numbers() {
    let mut text = String::from("image,caption\nok.jpg,fine\n");
    for _ in 0..12 {
        text.push_str("no comma here\n");
    }
    let (_, r) = parse_captions("m.csv", text.as_bytes(), CaptionFormat::KaggleCsv).unwrap();
    assert_eq!(r.malformed.count, 12);
    assert_eq!(r.malformed.first_lines, vec![3, 4, 5, 6, 7]);
    assert!(r.warnings()[0].contains("12 malformed lines skipped (lines 3, 4, 5, 6, 7, ...)"));
}

#[test]
fn karpathy_split() {
    let k = read_karpathy(fixture("dataset_flickr8k.json")).unwrap();
    // restval goes to train.
    assert_eq!(k.split.train, vec![I1, I2]);
    assert_eq!(k.split.val, vec![I3]);
    assert_eq!(k.split.test, vec![I4, "9999999999_missing.jpg"]);
    assert_eq!(read_split(fixture("dataset_flickr8k.json")).unwrap(), k.split);

    let (caps, _) = read_captions(fixture("captions.txt"), None).unwrap();
    let c = k.split.check(&caps);
    assert_eq!(c.missing, [0, 0, 1]);
    assert_eq!(c.first_missing, vec!["9999999999_missing.jpg"]);
    assert_eq!(c.unassigned, 0);
    let w = c.warnings("dataset_flickr8k.json");
    assert_eq!(w.len(), 1);
    assert!(w[0].contains("1 images have no caption"), "{w:?}");
}

#[test]
fn official_lists_and_siblings() {
    let [tr, dev, te] = official_siblings(&fixture("Flickr_8k.devImages.txt")).unwrap();
    assert_eq!(tr, fixture("Flickr_8k.trainImages.txt"));
    assert_eq!(dev, fixture("Flickr_8k.devImages.txt"));
    assert_eq!(te, fixture("Flickr_8k.testImages.txt"));
    let s = read_official_lists(&tr, &dev, &te).unwrap();
    assert_eq!(s.train, vec![I1, I2]);
    assert_eq!(s.val, vec![I3]);
    assert_eq!(s.test, vec![I4, "9999999999_missing.jpg"]);
    assert_eq!(s.duplicates, 1); // I1 is listed twice in the train list
                                 // Any one of the three finds the others; the result matches the Karpathy file's split.
    let k = read_karpathy(fixture("dataset_flickr8k.json")).unwrap().split;
    for f in ["Flickr_8k.trainImages.txt", "Flickr_8k.testImages.txt"] {
        let s2 = read_split(fixture(f)).unwrap();
        assert_eq!((&s2.train, &s2.val, &s2.test), (&k.train, &k.val, &k.test));
    }
}

#[test]
fn split_errors() {
    let dir = std::env::temp_dir().join(format!("capgen-split-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let w = |n: &str, s: &str| {
        let p = dir.join(n);
        std::fs::write(&p, s).unwrap();
        p
    };
    // An image in train and test: leak, hard error naming it.
    let tr = w("x_trainImages.txt", "a.jpg\nb.jpg\n");
    let dv = w("x_devImages.txt", "c.jpg\n");
    let te = w("x_testImages.txt", "b.jpg\n");
    let e = read_official_lists(&tr, &dv, &te).unwrap_err().to_string();
    assert!(e.contains("b.jpg") && e.contains("train") && e.contains("test"), "{e}");
    // A missing sibling is named.
    let lone = w("y_trainImages.txt", "a.jpg\n");
    let e = read_split(&lone).unwrap_err().to_string();
    assert!(e.contains("y_devImages.txt"), "{e}");
    // A file name that says nothing of train/dev/test.
    let other = w("names.txt", "a.jpg\n");
    assert!(read_split(&other).unwrap_err().to_string().contains("names.txt"));
    // Karpathy JSON without an images array.
    let j = w("k.json", "{\"dataset\": \"flickr8k\"}");
    assert!(read_split(&j).unwrap_err().to_string().contains("k.json"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ratio_split() {
    let names: Vec<String> = (0..1000).map(|i| format!("img{i:04}.jpg")).collect();
    let s = Split::by_ratio(&names, [0.8, 0.1, 0.1], 42).unwrap();
    assert_eq!((s.train.len(), s.val.len(), s.test.len()), (800, 100, 100));
    let all: BTreeSet<&String> = s.train.iter().chain(&s.val).chain(&s.test).collect();
    assert_eq!(all.len(), 1000, "parts must be disjoint and cover every image");
    // Deterministic, independent of input order; another seed gives another split.
    let mut rev = names.clone();
    rev.reverse();
    assert_eq!(Split::by_ratio(&rev, [0.8, 0.1, 0.1], 42).unwrap(), s);
    assert_ne!(Split::by_ratio(&names, [0.8, 0.1, 0.1], 43).unwrap().test, s.test);
    // Rounding on tiny sets, and bad ratios.
    let few: Vec<String> = names[..7].to_vec();
    let t = Split::by_ratio(&few, [0.8, 0.1, 0.1], 1).unwrap();
    assert_eq!((t.train.len(), t.val.len(), t.test.len()), (5, 1, 1));
    assert!(Split::by_ratio(&names, [0.8, 0.3, 0.1], 1).is_err());
    assert!(Split::by_ratio(&names, [1.1, -0.1, 0.0], 1).is_err());
}

#[test]
fn tokenizer_cases() {
    let t = |s: &str| tokenize(s);
    assert_eq!(t("A dog runs ."), ["a", "dog", "runs"]);
    assert_eq!(t("  Two   DOGS,playing!\tin\nthe snow... "), ["two", "dogs", "playing", "in", "the", "snow"]);
    // Apostrophes and hyphens join (Karpathy's convention); Flickr's pre-split `'s` becomes `s`.
    assert_eq!(t("a man's t-shirt"), ["a", "mans", "tshirt"]);
    assert_eq!(t("the dog 's ball"), ["the", "dog", "s", "ball"]);
    assert_eq!(t("don\u{2019}t"), ["dont"]);
    // Unicode punctuation and dashes separate; letters with accents and digits survive.
    assert_eq!(t("\u{201C}Café\u{201D} \u{2014} 2 kids\u{2026}"), ["café", "2", "kids"]);
    assert_eq!(t("ÉCOLE «école»"), ["école", "école"]);
    assert_eq!(t("cafe\u{301}"), ["cafe\u{301}"]);
    assert_eq!(t("a/b (c) [d] {e} $5 50% #1 a&b"), ["a", "b", "c", "d", "e", "5", "50", "1", "a", "b"]);
    assert!(t(" .,;:!? -- ").is_empty());
    assert!(t("").is_empty());
}

fn toks(s: &[&str]) -> Vec<Vec<String>> {
    s.iter().map(|c| tokenize(c)).collect()
}

#[test]
fn vocab_order_min_count_and_determinism() {
    // Counts: a 4, dog 3, cat 3, bird 2, fish 1.
    let caps = toks(&["a dog", "a cat", "a dog a cat", "dog cat bird", "bird fish"]);
    let v = Vocab::from_tokens(caps.iter(), 2);
    assert_eq!(v.words(), ["<pad>", "<start>", "<end>", "<unk>", "a", "cat", "dog", "bird"]);
    assert_eq!((v.id("<pad>"), v.id("<start>"), v.id("<end>"), v.id("<unk>")), (PAD, START, END, UNK));
    assert_eq!(v.id("fish"), UNK);
    assert_eq!(v.id("zebra"), UNK);
    // Order of the captions does not matter.
    let mut rev = caps.clone();
    rev.reverse();
    assert_eq!(Vocab::from_tokens(rev.iter(), 2), v);
    // Building from raw captions (tokenized inside) gives the same vocabulary.
    assert_eq!(Vocab::from_captions(["A dog.", "a cat", "a DOG a cat", "dog, cat, bird", "bird fish"], 2), v);
    // min_count 3 drops bird; 1 keeps fish.
    assert_eq!(Vocab::from_tokens(caps.iter(), 3).len(), 4 + 3);
    assert_eq!(Vocab::from_tokens(caps.iter(), 1).len(), 4 + 5);
    // A token spelled like a special one (the tokenizer never makes one, but a caller might) is
    // not added twice.
    let odd: Vec<Vec<String>> = vec![vec!["<unk>".into(), "x".into(), "<pad>".into()]];
    assert_eq!(Vocab::from_tokens(odd.iter(), 1).words(), ["<pad>", "<start>", "<end>", "<unk>", "x"]);
    // Default min count is 5.
    assert_eq!(capgen::data::vocab::DEFAULT_MIN_COUNT, 5);
}

#[test]
fn vocab_encode_decode_and_truncation() {
    let v = Vocab::from_captions(["a dog runs", "a dog sits", "a cat"], 1);
    let (ids, s) = v.encode("A dog flies!", 10);
    assert_eq!(ids, vec![START, v.id("a"), v.id("dog"), UNK, END]);
    assert_eq!((s.truncated, s.unk_words, s.words), (0, 1, 3));
    assert_eq!(v.decode_string(&ids), "a dog <unk>");
    let (ids, s) = v.encode("a dog runs a cat sits", 4);
    assert_eq!(ids.len(), 4 + 2);
    assert_eq!(*ids.last().unwrap(), END);
    assert_eq!(s.truncated, 1);
    assert_eq!(v.decode_string(&ids), "a dog runs a");
    // Decoding skips <pad>/<start>, stops at the first <end>, and never panics on a bad id.
    let d = v.decode(&[START, v.id("cat"), PAD, v.id("sits"), END, v.id("dog")]);
    assert_eq!(d, ["cat", "sits"]);
    assert_eq!(v.decode(&[v.id("a"), 9999]), ["a", "<unk>"]);
}

#[test]
fn vocab_json_round_trip_and_bad_json() {
    let (caps, _) = read_captions(fixture("captions.txt"), None).unwrap();
    let v = Vocab::from_captions(caps.values().flatten().map(String::as_str), 2);
    let back = Vocab::from_json_str("model.safetensors", &v.to_json_string()).unwrap();
    assert_eq!(back, v);
    assert_eq!(back.min_count(), 2);
    for bad in [
        "not json",
        "{}",
        r#"{"words": ["<start>", "<pad>", "<end>", "<unk>"]}"#,
        r#"{"words": ["<pad>", "<start>", "<end>", "<unk>", "a", "a"]}"#,
        r#"{"words": ["<pad>", "<start>", "<end>", "<unk>", 7]}"#,
        r#"{"words": ["<pad>", "<start>", "<end>", "<unk>", "two words"]}"#,
    ] {
        let e = Vocab::from_json_str("model.safetensors", bad).unwrap_err().to_string();
        assert!(e.starts_with("model.safetensors: vocabulary"), "{bad}: {e}");
    }
}

/// A synthetic corpus: `n` images with 1..=5 captions of 1..=20 random words.
fn corpus(n: usize, seed: u64) -> (CaptionMap, Vec<String>, Vocab) {
    let words = ["a", "dog", "cat", "runs", "on", "the", "grass", "red", "ball", "man", "blue", "sky"];
    let mut rng = Rng::new(seed);
    let mut m = CaptionMap::new();
    for i in 0..n {
        let caps = (0..1 + rng.below(5))
            .map(|_| {
                (0..1 + rng.below(20)).map(|_| words[rng.below(words.len())]).collect::<Vec<_>>().join(" ")
            })
            .collect();
        m.insert(format!("{i:05}.jpg"), caps);
    }
    let names: Vec<String> = m.keys().cloned().collect();
    let v = Vocab::from_captions(m.values().flatten().map(String::as_str), 1);
    (m, names, v)
}

#[test]
fn loader_every_pair_once_and_batches_well_formed() {
    let (caps, names, vocab) = corpus(300, 5);
    let mut cfg = LoaderConfig::new(16, 9, 15);
    cfg.bucket_batches = 4;
    let (l, rep) = BatchLoader::new(&caps, &names, &vocab, cfg).unwrap();
    let total: usize = caps.values().map(Vec::len).sum();
    assert_eq!(l.num_pairs(), total);
    assert_eq!(rep.encode.captions, total);
    // Captions are 1..=20 words; those over 15 were cut, and the report counts exactly those.
    let long = caps.values().flatten().filter(|c| c.split(' ').count() > 15).count();
    assert!(long > 0);
    assert_eq!(rep.encode.truncated, long);
    for epoch in 0..3 {
        let mut seen = BTreeSet::new();
        let mut nb = 0;
        for b in l.batches_from(epoch, 0) {
            nb += 1;
            assert!(b.batch >= 1 && b.batch <= 16);
            assert_eq!(b.tokens.len(), b.batch * b.time);
            assert_eq!(b.time, *b.lengths.iter().max().unwrap());
            assert!(b.lengths.windows(2).all(|w| w[0] >= w[1]), "rows sorted by decreasing length");
            for r in 0..b.batch {
                let row = b.row(r);
                let len = b.lengths[r];
                assert!(len <= 15 + 2);
                assert_eq!(row[0], START);
                assert_eq!(row[len - 1], END);
                assert!(row[1..len - 1].iter().all(|&t| t > UNK), "words only between <start> and <end>");
                assert!(row[len..].iter().all(|&t| t == PAD));
                // The tokens are this image's caption, re-encoded independently here.
                let cap = &caps[&b.images[r]][b.caption_ids[r]];
                let words: Vec<&str> = cap.split(' ').take(15).collect();
                assert_eq!(vocab.decode(row), words);
                assert_eq!(l.images()[b.image_ids[r]], b.images[r]);
                assert!(seen.insert((b.images[r].clone(), b.caption_ids[r])), "pair seen twice");
            }
        }
        assert_eq!(nb, l.num_batches());
        assert_eq!(seen.len(), total, "every pair exactly once per epoch");
    }
}

#[test]
fn loader_deterministic_and_resumable() {
    let (caps, names, vocab) = corpus(200, 6);
    let cfg = LoaderConfig::new(8, 1234, 30);
    let (a, _) = BatchLoader::new(&caps, &names, &vocab, cfg).unwrap();
    let (b, _) = BatchLoader::new(&caps, &names, &vocab, cfg).unwrap();
    let ea: Vec<_> = a.batches_from(3, 0).collect();
    assert_eq!(ea, b.batches_from(3, 0).collect::<Vec<_>>(), "same seed and epoch, same batches");
    // Resuming at batch k reproduces the tail.
    let k = ea.len() / 2;
    assert_eq!(ea[k..].to_vec(), a.batches_from(3, k).collect::<Vec<_>>());
    // Another epoch or seed gives another order.
    assert_ne!(a.epoch_plan(3), a.epoch_plan(4));
    let (c, _) = BatchLoader::new(&caps, &names, &vocab, LoaderConfig { seed: 99, ..cfg }).unwrap();
    assert_ne!(a.epoch_plan(3), c.epoch_plan(3));
    // drop_last removes only the short last batch.
    let (d, _) = BatchLoader::new(&caps, &names, &vocab, LoaderConfig { drop_last: true, ..cfg }).unwrap();
    assert_eq!(d.num_batches(), d.num_pairs() / 8);
    assert!(d.batches_from(0, 0).all(|b| b.batch == 8));
}

#[test]
fn loader_padding_is_bounded() {
    let (caps, names, vocab) = corpus(400, 7);
    let bucket_batches = 8;
    let cfg = LoaderConfig { bucket_batches, ..LoaderConfig::new(16, 3, 30) };
    let (l, _) = BatchLoader::new(&caps, &names, &vocab, cfg).unwrap();
    let (unsorted, _) =
        BatchLoader::new(&caps, &names, &vocab, LoaderConfig { bucket_batches: 1, ..cfg }).unwrap();
    let all_lens: Vec<usize> = l.batches_from(0, 0).flat_map(|b| b.lengths).collect();
    let range = all_lens.iter().max().unwrap() - all_lens.iter().min().unwrap();
    let buckets = l.num_pairs().div_ceil(16 * bucket_batches);
    for epoch in 0..3 {
        // Within a bucket the batches cover disjoint length ranges, so the spreads (longest minus
        // shortest) of all batches add up to at most one full length range per bucket.
        let spread: usize = l.batches_from(epoch, 0).map(|b| b.lengths[0] - b.lengths[b.batch - 1]).sum();
        assert!(spread <= buckets * range, "epoch {epoch}: spread {spread} > {buckets} x {range}");
        // And padding is far below that of unbucketed batches.
        let pad = |it: &mut dyn Iterator<Item = capgen::data::loader::Batch>| -> usize {
            it.map(|b| b.tokens.iter().filter(|&&t| t == PAD).count()).sum()
        };
        let (p, q) = (pad(&mut l.batches_from(epoch, 0)), pad(&mut unsorted.batches_from(epoch, 0)));
        assert!(p * 3 < q, "epoch {epoch}: bucketed padding {p} vs unbucketed {q}");
    }
}

#[test]
fn loader_bad_input() {
    let (caps, names, vocab) = corpus(10, 8);
    assert!(BatchLoader::new(&caps, &names, &vocab, LoaderConfig::new(0, 1, 20)).is_err());
    let ghosts = vec!["ghost.jpg".to_string()];
    let e = BatchLoader::new(&caps, &ghosts, &vocab, LoaderConfig::new(4, 1, 20)).err().unwrap();
    assert!(e.to_string().contains("no caption"), "{e}");
    let mut some = names.clone();
    some.push("ghost.jpg".into());
    let (_, rep) = BatchLoader::new(&caps, &some, &vocab, LoaderConfig::new(4, 1, 20)).unwrap();
    assert_eq!(rep.images_without_captions, 1);
}

#[test]
fn resolve_split_and_train_only_vocab() {
    let (caps, _) = read_captions(fixture("captions.txt"), None).unwrap();
    // With a split file: its parts, plus a warning for the test image without captions.
    let (s, w) = resolve_split(Some(&fixture("dataset_flickr8k.json")), &caps, 0).unwrap();
    assert_eq!(s.val, vec![I3]);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("dataset_flickr8k.json") && w[0].contains("9999999999_missing.jpg"), "{w:?}");
    // The official lists also list I1 twice: one more warning.
    let (_, w) = resolve_split(Some(&fixture("Flickr_8k.trainImages.txt")), &caps, 0).unwrap();
    assert_eq!(w.len(), 2, "{w:?}");
    // Without one: a seeded ratio split of exactly the captioned images, no warnings.
    let (r, w) = resolve_split(None, &caps, 7).unwrap();
    assert!(w.is_empty(), "{w:?}");
    let mut all: Vec<&String> = r.train.iter().chain(&r.val).chain(&r.test).collect();
    all.sort();
    assert_eq!(all, caps.keys().collect::<Vec<_>>());
    // A vocabulary from the train part only: `pigtails` is a val word (I3), `dog` a train word.
    let v = Vocab::from_caption_map(&caps, &s.train, 1);
    assert_ne!(v.id("dog"), UNK);
    assert_eq!(v.id("pigtails"), UNK);
    assert_eq!(v.id("bench"), UNK); // test image I4
}

#[test]
fn karpathy_json_with_a_non_utf8_byte_is_read_lossily() {
    let json = b"{\"images\": [{\"filename\": \"a.jpg\", \"split\": \"train\", \
                 \"sentences\": [{\"raw\": \"a caf\xe9 .\"}]}]}";
    let (m, r) = parse_captions("k.json", json, CaptionFormat::KarpathyJson).unwrap();
    assert_eq!(m["a.jpg"], vec!["a caf\u{FFFD} ."]);
    assert_eq!(r.non_utf8_sequences, 1);
    let w = r.warnings();
    assert!(w.len() == 1 && w[0].starts_with("k.json: 1 non-UTF-8"), "{w:?}");
}
