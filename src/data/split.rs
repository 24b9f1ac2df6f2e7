//! Train / val / test splits: Karpathy's `dataset_flickr{8k,30k}.json`, the official Flickr8k
//! `Flickr_8k.{train,dev,test}Images.txt` lists, or a seeded ratio split when none is given.
//!
//! - Karpathy JSON: `{"images": [{"filename": "x.jpg", "split": "train", "sentences": [{"raw": ...,
//!   "tokens": [...]}, ...]}, ...]}`. `split` is one of train / val / test / restval; **restval goes
//!   to train** (it is the part of the official val set that Karpathy's splits give to training; the
//!   Flickr files do not use it, COCO's does). The file also carries the captions, which
//!   [`parse_karpathy`] returns too.
//! - Official Flickr8k lists: one file name per line; `dev` is our `val`. Given one of the three
//!   paths, [`official_siblings`] finds the other two by swapping `train`/`dev`/`test` in the name.
//! - Ratio split (no split file): image names sorted, shuffled with `Rng::for_name(seed, "split")`,
//!   then cut into val, test and the rest for train. Default ratios 80/10/10 ([`DEFAULT_RATIOS`]).
//!
//! An image in two parts is a hard error (it would leak test data into training). An image listed
//! twice in the same part is kept once and counted. Images named in a split but absent from the
//! captions are counted by [`Split::check`]; the caller decides what to do about their features.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use crate::data::captions::{Builder, CaptionFormat, CaptionMap, ReadReport};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Train / val / test fractions used when no split file is given.
pub const DEFAULT_RATIOS: [f64; 3] = [0.8, 0.1, 0.1];

/// How many names a report shows per kind of problem (counts are always exact).
const SHOWN_NAMES: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    Train,
    Val,
    Test,
}

impl Part {
    pub const ALL: [Part; 3] = [Part::Train, Part::Val, Part::Test];
    pub fn name(self) -> &'static str {
        match self {
            Part::Train => "train",
            Part::Val => "val",
            Part::Test => "test",
        }
    }
}

/// Image file names of each part, in the order the split file lists them (ratio split: shuffled).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<String>,
    pub val: Vec<String>,
    pub test: Vec<String>,
    /// Images listed more than once within the same part (kept once).
    pub duplicates: usize,
}

/// A split checked against the captions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SplitCheck {
    /// Images of each part (train, val, test) that have no caption.
    pub missing: [usize; 3],
    /// The first few missing names.
    pub first_missing: Vec<String>,
    /// Captioned images that are in no part (unused).
    pub unassigned: usize,
}

impl SplitCheck {
    pub fn warnings(&self, split_name: &str) -> Vec<String> {
        let mut w = Vec::new();
        let total: usize = self.missing.iter().sum();
        if total > 0 {
            w.push(format!(
                "{split_name}: {total} images have no caption (train {}, val {}, test {}; e.g. {})",
                self.missing[0],
                self.missing[1],
                self.missing[2],
                self.first_missing.join(", ")
            ));
        }
        if self.unassigned > 0 {
            w.push(format!(
                "{split_name}: {} captioned images are in no part and go unused",
                self.unassigned
            ));
        }
        w
    }
}

impl Split {
    pub fn part(&self, p: Part) -> &[String] {
        match p {
            Part::Train => &self.train,
            Part::Val => &self.val,
            Part::Test => &self.test,
        }
    }

    fn part_mut(&mut self, p: Part) -> &mut Vec<String> {
        match p {
            Part::Train => &mut self.train,
            Part::Val => &mut self.val,
            Part::Test => &mut self.test,
        }
    }

    /// Builds a split from (part, name) pairs in order; duplicates within a part are dropped and
    /// counted, a name in two parts is an error naming `source`.
    fn from_pairs(source: &str, pairs: impl IntoIterator<Item = (Part, String)>) -> Result<Split> {
        let mut split = Split::default();
        let mut owner: HashMap<String, Part> = HashMap::new();
        for (part, name) in pairs {
            match owner.get(&name) {
                Some(&p) if p == part => split.duplicates += 1,
                Some(&p) => {
                    return Err(Error::format(
                        source,
                        format!("image {name} is in both the {} and the {} part", p.name(), part.name()),
                    ))
                }
                None => {
                    owner.insert(name.clone(), part);
                    split.part_mut(part).push(name);
                }
            }
        }
        Ok(split)
    }

    /// A seeded random split of `images` with fractions `ratios` = [train, val, test] (non-negative,
    /// summing to 1). The val and test sizes are rounded to the nearest integer; train gets the rest.
    /// The result depends only on the set of names and the seed, not on their order.
    pub fn by_ratio<'a>(
        images: impl IntoIterator<Item = &'a String>,
        ratios: [f64; 3],
        seed: u64,
    ) -> Result<Split> {
        if ratios.iter().any(|r| !r.is_finite() || *r < 0.0)
            || (ratios.iter().sum::<f64>() - 1.0).abs() > 1e-6
        {
            return Err(Error::msg(format!(
                "split ratios {ratios:?} must be non-negative and sum to 1 (e.g. 0.8, 0.1, 0.1)"
            )));
        }
        let mut names: Vec<String> =
            images.into_iter().cloned().collect::<BTreeSet<_>>().into_iter().collect();
        Rng::for_name(seed, "split").shuffle(&mut names);
        let n = names.len();
        let n_val = (n as f64 * ratios[1]).round() as usize;
        let n_test = ((n as f64 * ratios[2]).round() as usize).min(n - n_val);
        let test = names.split_off(n - n_test);
        let val = names.split_off(n - n_test - n_val);
        Ok(Split { train: names, val, test, duplicates: 0 })
    }

    /// Counts images of each part that have no caption, and captioned images in no part.
    pub fn check(&self, captions: &CaptionMap) -> SplitCheck {
        let mut c = SplitCheck::default();
        let mut assigned = 0;
        for (k, p) in Part::ALL.into_iter().enumerate() {
            for name in self.part(p) {
                if captions.contains_key(name) {
                    assigned += 1;
                } else {
                    c.missing[k] += 1;
                    if c.first_missing.len() < SHOWN_NAMES {
                        c.first_missing.push(name.clone());
                    }
                }
            }
        }
        c.unassigned = captions.len() - assigned;
        c
    }
}

/// Everything a Karpathy split file holds.
#[derive(Clone, Debug)]
pub struct KarpathyFile {
    pub split: Split,
    /// Captions from `sentences[].raw`, with the same empty / duplicate bookkeeping as the readers.
    pub captions: CaptionMap,
    /// Its `malformed` counts `images[]` entries skipped because `filename` or `split` was missing
    /// or unknown, and sentences without `raw` (numbers are 1-based `images[]` positions).
    pub caption_report: ReadReport,
}

/// Reads a Karpathy split JSON file.
pub fn read_karpathy(path: impl AsRef<Path>) -> Result<KarpathyFile> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_karpathy(&path.display().to_string(), &bytes)
}

/// Parses Karpathy split JSON from memory; `name` is used in messages only.
pub fn parse_karpathy(name: &str, bytes: &[u8]) -> Result<KarpathyFile> {
    // Non-UTF-8 bytes are replaced (lossy) and counted, as in the line readers, rather than failing
    // the whole file; JSON escapes can only produce valid text, so only raw bytes can be bad.
    let (text, bad) = match std::str::from_utf8(bytes) {
        Ok(t) => (std::borrow::Cow::Borrowed(t), 0),
        Err(_) => {
            let bad = bytes.utf8_chunks().filter(|c| !c.invalid().is_empty()).count();
            (String::from_utf8_lossy(bytes), bad)
        }
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(name, format!("not valid JSON: {e}")))?;
    let images = v
        .get("images")
        .and_then(|i| i.as_array())
        .ok_or_else(|| Error::format(name, "no `images` array (expected a Karpathy dataset_*.json file)"))?;
    let mut pairs = Vec::with_capacity(images.len());
    let mut b = Builder::new(name, CaptionFormat::KarpathyJson);
    b.report.non_utf8_sequences = bad;
    for (i, img) in images.iter().enumerate() {
        let entry = i + 1;
        let filename = img.get("filename").and_then(|f| f.as_str()).map(str::trim).filter(|f| !f.is_empty());
        let part = match img.get("split").and_then(|s| s.as_str()) {
            Some("train") | Some("restval") => Some(Part::Train),
            Some("val") => Some(Part::Val),
            Some("test") => Some(Part::Test),
            _ => None,
        };
        let (Some(filename), Some(part)) = (filename, part) else {
            b.report.malformed.add(entry);
            continue;
        };
        pairs.push((part, filename.to_string()));
        for s in img.get("sentences").and_then(|s| s.as_array()).map(Vec::as_slice).unwrap_or(&[]) {
            match s.get("raw").and_then(|r| r.as_str()) {
                Some(raw) => b.push(filename.to_string(), raw.to_string(), entry),
                None => b.report.malformed.add(entry),
            }
        }
    }
    if pairs.is_empty() {
        return Err(Error::format(name, "no usable entry in `images` (each needs `filename` and `split`)"));
    }
    let split = Split::from_pairs(name, pairs)?;
    // A split file without sentences is fine here; `parse_captions` insists on captions.
    let (captions, caption_report) = b.into_parts();
    Ok(KarpathyFile { split, captions, caption_report })
}

/// Reads one official list: one image file name per line (blank lines ignored).
fn read_list(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let names: Vec<String> = String::from_utf8_lossy(&bytes)
        .lines()
        .map(|l| l.trim().trim_start_matches('\u{FEFF}').to_string())
        .filter(|l| !l.is_empty())
        .collect();
    if let Some((k, bad)) = names.iter().enumerate().find(|(_, n)| n.contains(char::is_whitespace)) {
        return Err(Error::format(path, format!("entry {}: `{bad}` is not one image file name", k + 1)));
    }
    if names.is_empty() {
        return Err(Error::format(path, "no image name in the list"));
    }
    Ok(names)
}

/// Reads the three official Flickr8k lists (train, dev → val, test).
pub fn read_official_lists(train: &Path, dev: &Path, test: &Path) -> Result<Split> {
    let mut pairs = Vec::new();
    for (part, p) in [(Part::Train, train), (Part::Val, dev), (Part::Test, test)] {
        pairs.extend(read_list(p)?.into_iter().map(|n| (part, n)));
    }
    Split::from_pairs(&format!("{} (with its dev/test lists)", train.display()), pairs)
}

/// Given one of `Flickr_8k.{train,dev,test}Images.txt`, the paths of all three (train, dev, test).
pub fn official_siblings(path: &Path) -> Result<[PathBuf; 3]> {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .ok_or_else(|| Error::msg(format!("{}: not a file path", path.display())))?;
    let which = ["train", "dev", "test"]
        .into_iter()
        .find_map(|w| file.find(&format!("{w}Images")).map(|at| (w, at)))
        .or_else(|| ["train", "dev", "test"].into_iter().find_map(|w| file.find(w).map(|at| (w, at))));
    let Some((w, at)) = which else {
        return Err(Error::msg(format!(
            "{}: cannot find the train/dev/test lists next to it (its name contains none of train, dev, test)",
            path.display()
        )));
    };
    let sib = |x: &str| path.with_file_name(format!("{}{x}{}", &file[..at], &file[at + w.len()..]));
    Ok([sib("train"), sib("dev"), sib("test")])
}

/// Reads a split file: a Karpathy JSON (by `.json` extension or a leading `{`), otherwise one of the
/// official Flickr8k lists, whose two siblings are found next to it.
pub fn read_split(path: impl AsRef<Path>) -> Result<Split> {
    let path = path.as_ref();
    let head = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let is_json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"))
        || head.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if is_json {
        return Ok(parse_karpathy(&path.display().to_string(), &head)?.split);
    }
    let [train, dev, test] = official_siblings(path)?;
    read_official_lists(&train, &dev, &test)
}

/// The split to train with: read from `split_file` when given, otherwise a seeded
/// [`DEFAULT_RATIOS`] split of the captioned images. Also returns the warnings a command should
/// print (images listed twice, split images without captions, captioned images in no part).
pub fn resolve_split(
    split_file: Option<&Path>,
    captions: &CaptionMap,
    seed: u64,
) -> Result<(Split, Vec<String>)> {
    let (split, name) = match split_file {
        Some(p) => (read_split(p)?, p.display().to_string()),
        None => {
            (Split::by_ratio(captions.keys(), DEFAULT_RATIOS, seed)?, format!("ratio split (seed {seed})"))
        }
    };
    let mut warnings = Vec::new();
    if split.duplicates > 0 {
        warnings
            .push(format!("{name}: {} images listed twice in the same part (kept once)", split.duplicates));
    }
    warnings.extend(split.check(captions).warnings(&name));
    Ok((split, warnings))
}
