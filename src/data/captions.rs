//! Caption file readers (DESIGN.md section 3): Flickr8k Kaggle `captions.txt`, `Flickr8k.token.txt`,
//! Flickr30k `results.csv` and `results_20130124.token`, and the captions inside a Karpathy split JSON.
//!
//! Every reader produces the same thing: a map from image file name to its captions, in file order,
//! plus a [`ReadReport`] that counts what was dropped or repaired. Only three things are hard errors:
//! a file that cannot be read, a wrong header, and a file with no valid caption at all. Everything else
//! (empty captions, duplicate (image, caption) pairs, malformed lines, non-UTF-8 bytes) is skipped or
//! repaired and counted, so one bad line in 40 000 never stops a training run.
//!
//! Format details, as found in the real files:
//! - Kaggle `captions.txt`: CSV with the header `image,caption`. Captions that contain commas are
//!   quoted (`"a dog , a cat ."`, with `""` for a literal quote). An unquoted caption is taken
//!   verbatim up to the end of the line, commas included (the file has only two columns, so this is
//!   unambiguous). A quoted field must close on its own line: captions never contain newlines, and a
//!   stray quote must not swallow the rest of the file.
//! - `Flickr8k.token.txt` and `results_20130124.token`: `name.jpg#k<TAB>caption`, no header. The `#k`
//!   suffix is dropped (the caption's position in the file is its order). A line with spaces instead of
//!   the tab is accepted when its first word ends in `#<digits>`.
//! - Flickr30k `results.csv`: `image_name| comment_number| comment` with a space after each `|`, no
//!   quoting. The real file has one row that lacks the second `|` (`2199200615.jpg| 4 A dog runs ...`):
//!   a two-field row whose second field is `<number> <text>` is repaired and counted as such.
//! - Karpathy JSON: `images[].filename` and `images[].sentences[].raw` (see `split.rs`).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Image file name → its captions, in file order.
pub type CaptionMap = BTreeMap<String, Vec<String>>;

/// How many line numbers a report keeps per kind of problem (the count is always exact).
pub const SHOWN_LINES: usize = 5;

/// The caption file formats we read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CaptionFormat {
    /// Flickr8k Kaggle `captions.txt`: CSV `image,caption` with a header.
    KaggleCsv,
    /// `Flickr8k.token.txt` / `results_20130124.token`: `name.jpg#k<TAB>caption`.
    Token,
    /// Flickr30k `results.csv`: `image_name| comment_number| comment`.
    Flickr30kCsv,
    /// Karpathy split file `dataset_flickr{8k,30k}.json` (captions from `sentences[].raw`).
    KarpathyJson,
}

impl CaptionFormat {
    /// The name used on the command line (`--caption-format`).
    pub fn name(self) -> &'static str {
        match self {
            CaptionFormat::KaggleCsv => "kaggle",
            CaptionFormat::Token => "token",
            CaptionFormat::Flickr30kCsv => "flickr30k",
            CaptionFormat::KarpathyJson => "karpathy",
        }
    }
}

impl fmt::Display for CaptionFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CaptionFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "kaggle" | "csv" | "captions.txt" => Ok(CaptionFormat::KaggleCsv),
            "token" | "flickr8k-token" => Ok(CaptionFormat::Token),
            "flickr30k" | "flickr30k-csv" | "results.csv" => Ok(CaptionFormat::Flickr30kCsv),
            "karpathy" | "json" => Ok(CaptionFormat::KarpathyJson),
            _ => Err(Error::msg(format!(
                "unknown caption format `{s}`; expected one of kaggle, token, flickr30k, karpathy"
            ))),
        }
    }
}

/// A count of one kind of problem plus the first few line numbers (1-based) where it happened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LineIssues {
    pub count: usize,
    pub first_lines: Vec<usize>,
}

impl LineIssues {
    pub fn add(&mut self, line: usize) {
        self.count += 1;
        if self.first_lines.len() < SHOWN_LINES {
            self.first_lines.push(line);
        }
    }

    fn describe(&self, what: &str, unit: &str) -> Option<String> {
        if self.count == 0 {
            return None;
        }
        let shown: Vec<String> = self.first_lines.iter().map(|l| l.to_string()).collect();
        let more = if self.count > self.first_lines.len() { ", ..." } else { "" };
        Some(format!("{} {what} ({unit} {}{more})", self.count, shown.join(", ")))
    }
}

/// What a reader skipped, dropped or repaired. For the Karpathy JSON the "line" numbers are 1-based
/// positions in its `images` array.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadReport {
    pub path: String,
    pub format: Option<CaptionFormat>,
    /// Captions kept.
    pub captions: usize,
    /// Images with at least one caption kept.
    pub images: usize,
    /// Captions that were empty after trimming, skipped.
    pub empty: LineIssues,
    /// Exact repeats of an (image, caption) pair already seen, dropped.
    pub duplicates: LineIssues,
    /// Lines that could not be parsed, skipped.
    pub malformed: LineIssues,
    /// Lines with a known defect that were repaired (the Flickr30k row missing a `|`).
    pub repaired: LineIssues,
    /// Lines with non-UTF-8 bytes, decoded lossily (each bad sequence becomes U+FFFD).
    pub non_utf8: LineIssues,
    /// Number of invalid byte sequences replaced, over the whole file.
    pub non_utf8_sequences: usize,
}

impl ReadReport {
    fn new(path: &str, format: CaptionFormat) -> Self {
        ReadReport { path: path.to_string(), format: Some(format), ..Default::default() }
    }

    /// True when nothing was skipped, dropped or repaired.
    pub fn is_clean(&self) -> bool {
        self.warnings().is_empty()
    }

    /// One line per kind of problem, each naming the file, e.g.
    /// `captions.txt: 2 malformed lines skipped (lines 7, 12)`.
    pub fn warnings(&self) -> Vec<String> {
        let unit =
            if self.format == Some(CaptionFormat::KarpathyJson) { "images[] entries" } else { "lines" };
        [
            self.malformed.describe("malformed lines skipped", unit),
            self.empty.describe("empty captions skipped", unit),
            self.duplicates.describe("duplicate (image, caption) pairs dropped", unit),
            self.repaired.describe("lines with a missing field repaired", unit),
            self.non_utf8.describe(
                &format!(
                    "lines with non-UTF-8 bytes ({} sequences replaced by U+FFFD)",
                    self.non_utf8_sequences
                ),
                unit,
            ),
            // The JSON reader counts sequences only (it has no lines to name).
            (self.non_utf8.count == 0 && self.non_utf8_sequences > 0)
                .then(|| format!("{} non-UTF-8 byte sequences replaced by U+FFFD", self.non_utf8_sequences)),
        ]
        .into_iter()
        .flatten()
        .map(|w| format!("{}: {w}", self.path))
        .collect()
    }
}

/// Reads a caption file, detecting its format from content and name unless `format` is given.
pub fn read_captions(
    path: impl AsRef<Path>,
    format: Option<CaptionFormat>,
) -> Result<(CaptionMap, ReadReport)> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let name = path.display().to_string();
    let format = match format {
        Some(f) => f,
        None => detect_format(&name, &bytes)?,
    };
    parse_captions(&name, &bytes, format)
}

/// Parses caption file contents already in memory; `name` is used in messages only.
pub fn parse_captions(name: &str, bytes: &[u8], format: CaptionFormat) -> Result<(CaptionMap, ReadReport)> {
    if format == CaptionFormat::KarpathyJson {
        let k = crate::data::split::parse_karpathy(name, bytes)?;
        if k.captions.is_empty() {
            return Err(Error::format(name, "no caption found (no `sentences[].raw` in any image)"));
        }
        return Ok((k.captions, k.caption_report));
    }
    let mut b = Builder::new(name, format);
    let mut header_seen = false;
    for (i, raw) in bytes.split(|&c| c == b'\n').enumerate() {
        let line_no = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let raw = if i == 0 { raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw) } else { raw };
        let (line, bad) = decode_lossy(raw);
        if line.trim().is_empty() {
            continue;
        }
        if bad > 0 {
            b.report.non_utf8.add(line_no);
            b.report.non_utf8_sequences += bad;
        }
        if !header_seen && format != CaptionFormat::Token {
            header_seen = true;
            check_header(name, format, &line, line_no)?;
            continue;
        }
        match parse_line(format, &line) {
            Parsed::Ok(image, caption) => b.push(image, caption, line_no),
            Parsed::Repaired(image, caption) => {
                b.report.repaired.add(line_no);
                b.push(image, caption, line_no)
            }
            Parsed::Malformed => b.report.malformed.add(line_no),
        }
    }
    b.finish()
}

/// Guesses the format from the first non-blank line, then from the file name.
pub fn detect_format(name: &str, bytes: &[u8]) -> Result<CaptionFormat> {
    let first = bytes
        .split(|&c| c == b'\n')
        .map(|l| decode_lossy(l).0)
        .find(|l| !l.trim().is_empty())
        .ok_or_else(|| Error::format(name, "the caption file is empty"))?;
    let first = first.trim_start_matches('\u{FEFF}').trim();
    if first.starts_with('{') {
        return Ok(CaptionFormat::KarpathyJson);
    }
    if let Some((a, b)) = split_kaggle(first) {
        if a.trim().eq_ignore_ascii_case("image") && b.trim().eq_ignore_ascii_case("caption") {
            return Ok(CaptionFormat::KaggleCsv);
        }
    }
    if first.split('|').next().is_some_and(|f| f.trim().eq_ignore_ascii_case("image_name")) {
        return Ok(CaptionFormat::Flickr30kCsv);
    }
    if let Parsed::Ok(..) = parse_token(first) {
        return Ok(CaptionFormat::Token);
    }
    let file = Path::new(name).file_name().map(|f| f.to_string_lossy().to_lowercase()).unwrap_or_default();
    if file.ends_with(".json") {
        Ok(CaptionFormat::KarpathyJson)
    } else if file.ends_with(".token") || file.ends_with(".token.txt") {
        Ok(CaptionFormat::Token)
    } else if file == "results.csv" || first.contains('|') {
        Ok(CaptionFormat::Flickr30kCsv)
    } else if file.ends_with(".csv") || file == "captions.txt" {
        Ok(CaptionFormat::KaggleCsv)
    } else {
        Err(Error::format(
            name,
            "cannot tell the caption format from its first line or its name; \
             name it with --caption-format kaggle|token|flickr30k|karpathy",
        ))
    }
}

/// Decodes one line, replacing each invalid UTF-8 sequence with U+FFFD; returns the text and the
/// number of sequences replaced.
fn decode_lossy(raw: &[u8]) -> (String, usize) {
    if let Ok(s) = std::str::from_utf8(raw) {
        return (s.to_string(), 0);
    }
    let mut out = String::with_capacity(raw.len() + 8);
    let mut bad = 0;
    for chunk in raw.utf8_chunks() {
        out.push_str(chunk.valid());
        if !chunk.invalid().is_empty() {
            out.push('\u{FFFD}');
            bad += 1;
        }
    }
    (out, bad)
}

fn check_header(name: &str, format: CaptionFormat, line: &str, line_no: usize) -> Result<()> {
    let line = line.trim_start_matches('\u{FEFF}').trim();
    let (ok, expected) = match format {
        CaptionFormat::KaggleCsv => (
            split_kaggle(line).is_some_and(|(a, b)| {
                a.trim().eq_ignore_ascii_case("image") && b.trim().eq_ignore_ascii_case("caption")
            }),
            "image,caption",
        ),
        CaptionFormat::Flickr30kCsv => {
            let f: Vec<&str> = line.split('|').map(str::trim).collect();
            let want = ["image_name", "comment_number", "comment"];
            (
                f.len() == 3 && f.iter().zip(want).all(|(a, b)| a.eq_ignore_ascii_case(b)),
                "image_name| comment_number| comment",
            )
        }
        CaptionFormat::Token | CaptionFormat::KarpathyJson => (true, ""),
    };
    if ok {
        return Ok(());
    }
    let shown: String = line.chars().take(60).collect();
    Err(Error::format(
        name,
        format!("line {line_no}: expected the {format} header `{expected}`, found `{shown}`"),
    ))
}

enum Parsed {
    Ok(String, String),
    Repaired(String, String),
    Malformed,
}

fn parse_line(format: CaptionFormat, line: &str) -> Parsed {
    match format {
        CaptionFormat::KaggleCsv => parse_kaggle(line),
        CaptionFormat::Token => parse_token(line),
        CaptionFormat::Flickr30kCsv => parse_flickr30k(line),
        CaptionFormat::KarpathyJson => Parsed::Malformed, // handled in split.rs
    }
}

/// Parses one CSV field starting at the beginning of `s`; returns the field and the rest after it
/// (starting at the separator, if any). `None` when a quoted field does not close or is followed by
/// something other than `,` / end of line.
fn csv_field(s: &str) -> Option<(String, &str)> {
    let t = s.trim_start_matches([' ', '\t']);
    if let Some(body) = t.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = body.char_indices();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if body[i + 1..].starts_with('"') {
                    out.push('"');
                    chars.next();
                } else {
                    let rest = body[i + 1..].trim_start_matches([' ', '\t']);
                    return (rest.is_empty() || rest.starts_with(',')).then_some((out, rest));
                }
            } else {
                out.push(c);
            }
        }
        None // unterminated quote
    } else {
        match s.find(',') {
            Some(k) => Some((s[..k].to_string(), &s[k..])),
            None => Some((s.to_string(), "")),
        }
    }
}

/// Splits a Kaggle line into (image, caption): the first CSV field, then the second — quoted, or
/// verbatim to the end of the line when unquoted.
fn split_kaggle(line: &str) -> Option<(String, String)> {
    let (image, rest) = csv_field(line)?;
    let rest = rest.strip_prefix(',')?;
    if rest.trim_start_matches([' ', '\t']).starts_with('"') {
        let (caption, after) = csv_field(rest)?;
        // A quoted caption must be the last field.
        after.trim().is_empty().then_some((image, caption))
    } else {
        Some((image, rest.to_string()))
    }
}

fn parse_kaggle(line: &str) -> Parsed {
    match split_kaggle(line) {
        Some((image, caption)) if !image.trim().is_empty() => Parsed::Ok(image, caption),
        _ => Parsed::Malformed,
    }
}

/// `name.jpg#k<TAB>caption`; the `#k` suffix is dropped.
fn parse_token(line: &str) -> Parsed {
    let (key, caption) = match line.split_once('\t') {
        Some(kc) => kc,
        None => {
            // Tolerate a space instead of the tab when the key clearly ends in `#<digits>`.
            let t = line.trim_start();
            match t.split_once(char::is_whitespace) {
                Some((k, c)) if has_index_suffix(k) => (k, c),
                _ => return Parsed::Malformed,
            }
        }
    };
    let key = key.trim();
    let image = match key.rsplit_once('#') {
        Some((name, k)) if !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return Parsed::Malformed,
        None => key,
    };
    if image.is_empty() || image.contains(char::is_whitespace) {
        return Parsed::Malformed;
    }
    Parsed::Ok(image.to_string(), caption.to_string())
}

fn has_index_suffix(key: &str) -> bool {
    key.rsplit_once('#')
        .is_some_and(|(n, k)| !n.is_empty() && !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
}

/// `image_name| comment_number| comment`.
fn parse_flickr30k(line: &str) -> Parsed {
    let fields: Vec<&str> = line.splitn(3, '|').collect();
    let image = fields[0].trim();
    if image.is_empty() || image.contains(char::is_whitespace) {
        return Parsed::Malformed;
    }
    match fields.len() {
        3 => {
            let num = fields[1].trim();
            if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
                return Parsed::Malformed;
            }
            Parsed::Ok(image.to_string(), fields[2].to_string())
        }
        2 => {
            // The known defect: `2199200615.jpg| 4 A dog runs across the grass .`
            let rest = fields[1].trim_start();
            let digits = rest.bytes().take_while(|b| b.is_ascii_digit()).count();
            let after = &rest[digits..];
            if digits > 0 && after.starts_with(char::is_whitespace) && !after.trim().is_empty() {
                Parsed::Repaired(image.to_string(), after.to_string())
            } else {
                Parsed::Malformed
            }
        }
        _ => Parsed::Malformed,
    }
}

/// Accumulates captions with the empty / duplicate bookkeeping shared by every format.
pub(crate) struct Builder {
    name: String,
    map: CaptionMap,
    seen: HashSet<(String, String)>,
    pub(crate) report: ReadReport,
}

impl Builder {
    pub(crate) fn new(name: &str, format: CaptionFormat) -> Self {
        Builder {
            name: name.to_string(),
            map: CaptionMap::new(),
            seen: HashSet::new(),
            report: ReadReport::new(name, format),
        }
    }

    /// Adds a caption (trimmed, inner whitespace runs kept as they are).
    pub(crate) fn push(&mut self, image: String, caption: String, line_no: usize) {
        let image = image.trim().to_string();
        let caption = caption.trim().to_string();
        if caption.is_empty() {
            self.report.empty.add(line_no);
            return;
        }
        if !self.seen.insert((image.clone(), caption.clone())) {
            self.report.duplicates.add(line_no);
            return;
        }
        self.map.entry(image).or_default().push(caption);
        self.report.captions += 1;
    }

    pub(crate) fn finish(self) -> Result<(CaptionMap, ReadReport)> {
        if self.map.is_empty() {
            let r = &self.report;
            let detail = match r.malformed.first_lines.first() {
                Some(l) => format!(" ({} malformed lines, the first at line {l})", r.malformed.count),
                None if r.empty.count > 0 => format!(" ({} empty captions)", r.empty.count),
                None => String::new(),
            };
            return Err(Error::format(&self.name, format!("no valid caption found{detail}")));
        }
        Ok(self.into_parts())
    }

    /// The map and report, even when empty.
    pub(crate) fn into_parts(mut self) -> (CaptionMap, ReadReport) {
        self.report.images = self.map.len();
        (self.map, self.report)
    }
}
