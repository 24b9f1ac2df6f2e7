//! Reading and writing weights: safetensors (our own reader/writer, so every error names the file
//! and the problem precisely), torchvision state-dict names, and seeded random weights.
//!
//! # The safetensors format
//!
//! ```text
//! [u64 little-endian N][N bytes of UTF-8 JSON header, padded with spaces][data buffer]
//! ```
//!
//! The header maps each tensor name to `{"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}`
//! (offsets relative to the start of the data buffer) and may hold `"__metadata__": {string: string}`.
//!
//! # What the reader accepts (strict, decided here)
//!
//! - dtypes F32, F16, BF16, kept as such in the `Tensor` (kernels widen to f32). Any other dtype is
//!   an error naming the tensor, except tensors whose name ends in `num_batches_tracked` (torchvision's
//!   I64 batch-norm counters), which are skipped silently.
//! - each tensor's byte range must lie inside the data buffer and be exactly `numel * dtype size`.
//! - ranges must not overlap, and together they must cover the data buffer exactly: no holes and **no
//!   trailing bytes** after the last tensor. This matches the reference implementation's validation,
//!   so a file we accept is one the Python `safetensors` package accepts too, and an appended or
//!   truncated file is caught rather than read as garbage.

pub mod random;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// The tensors (and string metadata) of one safetensors file.
#[derive(Debug, Default)]
pub struct TensorFile {
    /// The file's path as given, for error messages.
    pub path: String,
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: BTreeMap<String, String>,
}

/// Upper bound on the JSON header (the reference implementation uses 100 MB too): a corrupt length
/// must not make us allocate gigabytes.
const MAX_HEADER: u64 = 100_000_000;

/// Dtype names of the format that we recognise but do not load.
const KNOWN_UNSUPPORTED: &[&str] =
    &["F64", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL", "F8_E4M3", "F8_E5M2"];

impl TensorFile {
    /// Reads a whole safetensors file. Every defect (missing file, truncated, header length past the
    /// end, bad JSON, unknown dtype, offsets out of range or overlapping) is one `Error` naming the file.
    pub fn load(path: &Path) -> Result<TensorFile> {
        let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, &bytes)
    }

    /// Parses the bytes of a safetensors file; `path` is only used in error messages.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<TensorFile> {
        let bad = |msg: String| Error::format(path, msg);
        if bytes.len() < 8 {
            return Err(bad(format!(
                "not a safetensors file: {} bytes, shorter than the 8-byte header length",
                bytes.len()
            )));
        }
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        let avail = (bytes.len() - 8) as u64;
        if n > avail {
            return Err(bad(format!(
                "safetensors header length {n} is larger than the rest of the file ({avail} bytes); truncated or not safetensors"
            )));
        }
        if n > MAX_HEADER {
            return Err(bad(format!("safetensors header length {n} exceeds the {MAX_HEADER}-byte limit")));
        }
        let n = n as usize;
        let header = std::str::from_utf8(&bytes[8..8 + n])
            .map_err(|e| bad(format!("safetensors header is not valid UTF-8 ({e})")))?;
        let json: Value = serde_json::from_str(header)
            .map_err(|e| bad(format!("safetensors header is not valid JSON ({e})")))?;
        let Value::Object(entries) = json else {
            return Err(bad("safetensors header is not a JSON object".into()));
        };
        let data = &bytes[8 + n..];

        let mut out = TensorFile { path: path.display().to_string(), ..Default::default() };
        // (begin, end, name) of every range, including skipped tensors, for the coverage check.
        let mut ranges: Vec<(usize, usize, String)> = Vec::new();
        for (name, entry) in &entries {
            if name == "__metadata__" {
                let Value::Object(m) = entry else {
                    return Err(bad("__metadata__ is not a JSON object of strings".into()));
                };
                for (k, v) in m {
                    let Value::String(s) = v else {
                        return Err(bad(format!("__metadata__ entry {k:?} is not a string")));
                    };
                    out.metadata.insert(k.clone(), s.clone());
                }
                continue;
            }
            let info = parse_entry(name, entry).map_err(&bad)?;
            if info.end > data.len() {
                return Err(bad(format!(
                    "tensor {name}: data_offsets [{}, {}] run past the end of the data ({} bytes); file truncated?",
                    info.begin,
                    info.end,
                    data.len()
                )));
            }
            ranges.push((info.begin, info.end, name.clone()));
            let dtype = match info.dtype.as_str() {
                "F32" => DType::F32,
                "F16" => DType::F16,
                "BF16" => DType::BF16,
                _ if name.ends_with("num_batches_tracked") => continue,
                d if KNOWN_UNSUPPORTED.contains(&d) => {
                    return Err(bad(format!(
                        "tensor {name} has dtype {d}, unsupported (only F32, F16, BF16)"
                    )))
                }
                d => return Err(bad(format!("tensor {name} has unknown dtype {d:?}"))),
            };
            let numel = info
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("tensor {name}: shape {:?} overflows", info.shape)))?;
            let want = numel.saturating_mul(dtype.size_in_bytes());
            if info.end - info.begin != want {
                return Err(bad(format!(
                    "tensor {name}: data_offsets [{}, {}] hold {} bytes but shape {:?} of {dtype} needs {want}",
                    info.begin,
                    info.end,
                    info.end - info.begin,
                    info.shape
                )));
            }
            let raw = &data[info.begin..info.end];
            let t = match dtype {
                DType::F32 => Tensor::from_vec(
                    raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
                    &info.shape,
                ),
                DType::F16 => Tensor::from_f16(
                    raw.chunks_exact(2).map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect(),
                    &info.shape,
                ),
                DType::BF16 => Tensor::from_bf16(
                    raw.chunks_exact(2).map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect(),
                    &info.shape,
                ),
            }
            .map_err(|e| bad(format!("tensor {name}: {e}")))?;
            out.tensors.insert(name.clone(), t);
        }

        // The ranges must tile the data buffer exactly (see the module comment).
        ranges.sort();
        let mut pos = 0usize;
        for (b, e, name) in &ranges {
            if *b < pos {
                return Err(bad(format!("tensor {name}: data_offsets [{b}, {e}] overlap another tensor")));
            }
            if *b > pos {
                return Err(bad(format!(
                    "tensor {name}: data_offsets start at {b}, leaving a hole at {pos}"
                )));
            }
            pos = *e;
        }
        if pos != data.len() {
            return Err(bad(format!(
                "{} trailing bytes after the last tensor (data ends at {pos}, file data is {} bytes)",
                data.len() - pos,
                data.len()
            )));
        }
        Ok(out)
    }

    /// The tensor `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// The tensor `name`, which must have exactly `dims`; the error names the file and the tensor.
    pub fn require(&self, name: &str, dims: &[usize]) -> Result<&Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::format(&self.path, format!("missing tensor {name}")))?;
        if t.dims() != dims {
            return Err(Error::format(
                &self.path,
                format!("tensor {name} has shape {:?}, expected {:?}", t.dims(), dims),
            ));
        }
        Ok(t)
    }

    /// `require` widened to f32 values (row-major).
    pub fn require_f32(&self, name: &str, dims: &[usize]) -> Result<Vec<f32>> {
        Ok(self.require(name, dims)?.to_f32_vec())
    }

    /// Checks that the file holds exactly the tensors `expected` (name, dims) — no more, no fewer, each
    /// with its shape. One error lists every problem compactly (`what` names the model):
    /// `W.safetensors: does not fit resnet50: missing [a, b]; unexpected [c]; wrong shape [d [1] (want [2])]`.
    pub fn check_exact(&self, expected: &[(String, Vec<usize>)], what: &str) -> Result<()> {
        let mut missing = Vec::new();
        let mut wrong = Vec::new();
        for (name, dims) in expected {
            match self.tensors.get(name) {
                None => missing.push(name.clone()),
                Some(t) if t.dims() != dims.as_slice() => {
                    wrong.push(format!("{name} {:?} (want {:?})", t.dims(), dims))
                }
                Some(_) => {}
            }
        }
        let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        let unexpected: Vec<String> =
            self.tensors.keys().filter(|n| !known.contains(n.as_str())).cloned().collect();
        if missing.is_empty() && unexpected.is_empty() && wrong.is_empty() {
            return Ok(());
        }
        let mut parts = Vec::new();
        for (label, list) in [("missing", &missing), ("unexpected", &unexpected), ("wrong shape", &wrong)] {
            if !list.is_empty() {
                parts.push(format!("{label} {}", compact_list(list)));
            }
        }
        Err(Error::format(&self.path, format!("does not fit {what}: {}", parts.join("; "))))
    }
}

/// `[a, b, c, ... and 7 more]`: at most 6 names, so one error stays one readable line.
fn compact_list(items: &[String]) -> String {
    const SHOW: usize = 6;
    let mut s = items.iter().take(SHOW).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > SHOW {
        s.push_str(&format!(", ... and {} more", items.len() - SHOW));
    }
    format!("[{s}]")
}

struct EntryInfo {
    dtype: String,
    shape: Vec<usize>,
    begin: usize,
    end: usize,
}

/// One header entry; errors are messages without the path (the caller adds it).
fn parse_entry(name: &str, entry: &Value) -> std::result::Result<EntryInfo, String> {
    let obj = entry.as_object().ok_or_else(|| format!("tensor {name}: header entry is not an object"))?;
    let dtype = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("tensor {name}: missing or non-string dtype"))?
        .to_string();
    let uints = |key: &str| -> std::result::Result<Vec<usize>, String> {
        let arr = obj
            .get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| format!("tensor {name}: missing or non-array {key}"))?;
        arr.iter()
            .map(|v| v.as_u64().and_then(|u| usize::try_from(u).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| format!("tensor {name}: {key} must hold non-negative integers"))
    };
    let shape = uints("shape")?;
    let offs = uints("data_offsets")?;
    if offs.len() != 2 || offs[0] > offs[1] {
        return Err(format!(
            "tensor {name}: data_offsets {offs:?} is not a [begin, end] pair with begin <= end"
        ));
    }
    Ok(EntryInfo { dtype, shape, begin: offs[0], end: offs[1] })
}

/// Writes a safetensors file atomically (temp file in the same directory, then rename).
///
/// Each tensor is stored in its own dtype (F32, F16 or BF16), row-major whatever its strides; the
/// header is padded with spaces to a multiple of 8 bytes, as the format recommends. Names must be
/// unique and not `__metadata__`.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(&str, &Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut header = Map::new();
    if !metadata.is_empty() {
        let m: Map<String, Value> =
            metadata.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        header.insert("__metadata__".into(), Value::Object(m));
    }
    let mut data: Vec<u8> = Vec::new();
    for (name, t) in tensors {
        if *name == "__metadata__" || header.contains_key(*name) {
            return Err(Error::format(
                path,
                format!("cannot save: duplicate or reserved tensor name {name:?}"),
            ));
        }
        let begin = data.len();
        let v = t.to_f32_vec();
        match t.dtype() {
            DType::F32 => v.iter().for_each(|x| data.extend_from_slice(&x.to_le_bytes())),
            // f16/bf16 -> f32 -> f16/bf16 is exact, so widening to read the values loses nothing.
            DType::F16 => v.iter().for_each(|&x| data.extend_from_slice(&f16::from_f32(x).to_le_bytes())),
            DType::BF16 => v.iter().for_each(|&x| data.extend_from_slice(&bf16::from_f32(x).to_le_bytes())),
        }
        let mut e = Map::new();
        e.insert("dtype".into(), Value::String(t.dtype().safetensors_name().into()));
        e.insert("shape".into(), Value::Array(t.dims().iter().map(|&d| Value::from(d as u64)).collect()));
        e.insert(
            "data_offsets".into(),
            Value::Array(vec![Value::from(begin as u64), Value::from(data.len() as u64)]),
        );
        header.insert((*name).to_string(), Value::Object(e));
    }
    let mut json = serde_json::to_string(&Value::Object(header))
        .map_err(|e| Error::format(path, format!("cannot encode header: {e}")))?;
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut bytes = Vec::with_capacity(8 + json.len() + data.len());
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(json.as_bytes());
    bytes.extend_from_slice(&data);
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path.tmp-<pid>` in the same directory, fsyncs, then renames over `path`, so a
/// reader never sees a half-written file. The temp file is removed on failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::msg(format!("{}: not a file path", path.display())))?
        .to_string_lossy()
        .into_owned();
    let tmp: PathBuf = path.with_file_name(format!("{file_name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::uniform_vec;

    /// A fresh directory under the system temp dir, unique per test.
    pub(crate) fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("capgen-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn round_trip_all_dtypes_and_metadata() {
        let dir = temp_dir("st-rt");
        let path = dir.join("w.safetensors");
        let a = Tensor::from_vec(uniform_vec(1, "a", 24, -3.0, 3.0), &[2, 3, 4]).unwrap();
        let b = Tensor::from_vec(uniform_vec(2, "b", 10, -3.0, 3.0), &[10]).unwrap().to_dtype(DType::F16);
        let c = Tensor::from_vec(uniform_vec(3, "c", 6, -3.0, 3.0), &[3, 2]).unwrap().to_dtype(DType::BF16);
        let at = a.transpose(0, 2).unwrap(); // non-contiguous: saved row-major
        let scalar = Tensor::from_vec(vec![7.5], &[]).unwrap();
        let mut meta = BTreeMap::new();
        meta.insert("vocab".to_string(), "[\"a\", \"b\"]".to_string());
        meta.insert("format".to_string(), "pt".to_string());
        save_safetensors(&path, &[("a", &a), ("b.x", &b), ("c", &c), ("at", &at), ("s", &scalar)], &meta)
            .unwrap();
        let bytes = fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0, "header padded to 8 bytes");
        let f = TensorFile::load(&path).unwrap();
        assert_eq!(f.metadata, meta);
        assert_eq!(f.names().collect::<Vec<_>>(), vec!["a", "at", "b.x", "c", "s"]);
        for (name, t) in [("a", &a), ("b.x", &b), ("c", &c), ("at", &at), ("s", &scalar)] {
            let g = f.get(name).unwrap();
            assert_eq!(g.dtype(), t.dtype(), "{name}");
            assert_eq!(g.dims(), t.dims(), "{name}");
            // Exact: the bytes are copied, never rounded.
            assert_eq!(g.to_f32_vec(), t.to_f32_vec(), "{name}");
        }
        assert!(f.require("a", &[2, 3, 4]).is_ok());
        let e = f.require("a", &[2, 3]).unwrap_err().to_string();
        assert!(e.contains("w.safetensors") && e.contains("tensor a"), "{e}");
        let e = f.require("zz", &[1]).unwrap_err().to_string();
        assert!(e.contains("w.safetensors") && e.contains("missing tensor zz"), "{e}");
        // No temp file left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn num_batches_tracked_is_skipped_other_i64_refused() {
        let data: Vec<u8> =
            [1.0f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).chain(5i64.to_le_bytes()).collect();
        let h = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"bn.num_batches_tracked":{"dtype":"I64","shape":[],"data_offsets":[8,16]}}"#;
        let f = TensorFile::parse(Path::new("x.safetensors"), &raw_file(h, &data)).unwrap();
        assert_eq!(f.names().collect::<Vec<_>>(), vec!["w"]);
        assert_eq!(f.get("w").unwrap().to_f32_vec(), vec![1.0, 2.0]);
        let h2 = h.replace("bn.num_batches_tracked", "steps");
        let e = TensorFile::parse(Path::new("x.safetensors"), &raw_file(&h2, &data)).unwrap_err().to_string();
        assert!(e.starts_with("x.safetensors:") && e.contains("steps") && e.contains("I64"), "{e}");
    }

    #[test]
    fn corrupt_files_give_one_line_errors_naming_the_file() {
        let dir = temp_dir("st-bad");
        let good_data: Vec<u8> = [1.0f32, 2.0, 3.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let hdr = |dtype: &str, shape: &str, offs: &str| {
            format!(r#"{{"t":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offs}}}}}"#)
        };
        let mut big_len = raw_file(&hdr("F32", "[3]", "[0,12]"), &good_data);
        big_len[..8].copy_from_slice(&1000u64.to_le_bytes());
        let mut bad_utf8 = raw_file("{\"t\":1}", &[]);
        bad_utf8[9] = 0xff;
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", vec![], "shorter than the 8-byte"),
            ("short", vec![1, 2, 3], "shorter than the 8-byte"),
            ("biglen", big_len, "larger than the rest of the file"),
            ("utf8", bad_utf8, "UTF-8"),
            ("json", raw_file("{not json", &[]), "not valid JSON"),
            ("notobj", raw_file("[1,2]", &[]), "not a JSON object"),
            ("i64", raw_file(&hdr("I64", "[3]", "[0,24]"), &[0; 24]), "unsupported"),
            ("unknown", raw_file(&hdr("Q7", "[3]", "[0,12]"), &good_data), "unknown dtype"),
            ("range", raw_file(&hdr("F32", "[3]", "[0,12]"), &good_data[..8]), "run past the end"),
            ("size", raw_file(&hdr("F32", "[2]", "[0,12]"), &good_data), "needs 8"),
            (
                "trailing",
                raw_file(&hdr("F32", "[3]", "[0,12]"), &[&good_data[..], &[0u8; 4]].concat()),
                "trailing",
            ),
            ("offs", raw_file(&hdr("F32", "[3]", "[12,0]"), &good_data), "begin <= end"),
            ("neg", raw_file(&hdr("F32", "[-3]", "[0,12]"), &good_data), "non-negative"),
            (
                "overlap",
                raw_file(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                    &good_data,
                ),
                "overlap",
            ),
            ("meta", raw_file(r#"{"__metadata__":{"k":3}}"#, &[]), "not a string"),
        ];
        for (tag, bytes, want) in cases {
            let p = dir.join(format!("{tag}.safetensors"));
            fs::write(&p, &bytes).unwrap();
            let e = TensorFile::load(&p).expect_err(tag).to_string();
            assert!(e.contains(&format!("{tag}.safetensors")), "{tag}: {e}");
            assert!(e.contains(want), "{tag}: {e}");
            assert!(!e.contains('\n'), "{tag}: one line: {e}");
        }
        let e = TensorFile::load(&dir.join("nope.safetensors")).unwrap_err().to_string();
        assert!(e.contains("nope.safetensors"), "{e}");
        // The good file parses (so the cases above fail for the stated reason only).
        let ok = raw_file(&hdr("F32", "[3]", "[0,12]"), &good_data);
        assert_eq!(
            TensorFile::parse(Path::new("ok"), &ok).unwrap().get("t").unwrap().to_f32_vec(),
            [1., 2., 3.]
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn check_exact_lists_every_problem() {
        let mut f = TensorFile { path: "m.safetensors".into(), ..Default::default() };
        f.tensors.insert("a".into(), Tensor::zeros(&[2]));
        f.tensors.insert("b".into(), Tensor::zeros(&[3]));
        f.tensors.insert("extra".into(), Tensor::zeros(&[1]));
        let want = vec![("a".to_string(), vec![2]), ("b".to_string(), vec![4]), ("c".to_string(), vec![1])];
        let e = f.check_exact(&want, "net").unwrap_err().to_string();
        assert!(e.starts_with("m.safetensors: does not fit net"), "{e}");
        assert!(
            e.contains("missing [c]") && e.contains("unexpected [extra]") && e.contains("b [3] (want [4])"),
            "{e}"
        );
        f.tensors.remove("extra");
        f.tensors.insert("b".into(), Tensor::zeros(&[4]));
        f.tensors.insert("c".into(), Tensor::zeros(&[1]));
        f.check_exact(&want, "net").unwrap();
    }
}
