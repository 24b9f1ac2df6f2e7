//! Reading PyTorch `.pth` state dicts (`torch.save(model.state_dict(), path)`, the zip format of
//! torch >= 1.6) without Python: a minimal zip reader and a *restricted* unpickler.
//!
//! The zip holds `<prefix>/data.pkl` (the pickled dict) and `<prefix>/data/<key>` (each storage's raw
//! little-endian bytes); torch stores every entry uncompressed. The pickle is a small program for a
//! stack machine; we run only the opcodes torch emits and call only three globals:
//! `collections.OrderedDict` (an empty dict), `torch._utils._rebuild_tensor_v2(storage, offset, size,
//! stride, ...)` and `torch._utils._rebuild_parameter(tensor, ...)`. Storages arrive as persistent ids
//! `('storage', torch.FloatStorage, key, location, numel)`. Any other global or opcode is an error, so
//! a malicious file cannot make us run anything (unlike Python's `torch.load` without
//! `weights_only`). Zip64 archives (entries over 4 GiB) are refused.

use std::collections::HashMap;
use std::path::Path;

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::TensorFile;

fn u16_at(b: &[u8], o: usize) -> Option<usize> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?) as usize)
}
fn u32_at(b: &[u8], o: usize) -> Option<usize> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?) as usize)
}

/// Name -> byte range of every stored entry, from the zip's central directory.
fn zip_entries(bytes: &[u8]) -> std::result::Result<HashMap<String, (usize, usize)>, String> {
    // The end-of-central-directory record is the last 22 bytes plus a comment of up to 64 KiB.
    let min = bytes.len().saturating_sub(22 + 65_535);
    let eocd = (min..=bytes.len().saturating_sub(22))
        .rev()
        .find(|&i| bytes[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or("zip end-of-directory record not found (truncated?)")?;
    let count = u16_at(bytes, eocd + 10).ok_or("bad zip directory")?;
    let mut pos = u32_at(bytes, eocd + 16).ok_or("bad zip directory")?;
    if count == 0xFFFF || pos == 0xFFFF_FFFF {
        return Err("zip64 archives are not supported".into());
    }
    let mut out = HashMap::new();
    for _ in 0..count {
        let bad = || format!("corrupt zip directory entry at byte {pos}");
        if bytes.get(pos..pos + 4) != Some(&[0x50, 0x4b, 0x01, 0x02]) {
            return Err(bad());
        }
        let method = u16_at(bytes, pos + 10).ok_or_else(bad)?;
        let csize = u32_at(bytes, pos + 20).ok_or_else(bad)?;
        let usize_ = u32_at(bytes, pos + 24).ok_or_else(bad)?;
        let (nlen, elen, clen) = (
            u16_at(bytes, pos + 28).ok_or_else(bad)?,
            u16_at(bytes, pos + 30).ok_or_else(bad)?,
            u16_at(bytes, pos + 32).ok_or_else(bad)?,
        );
        let local = u32_at(bytes, pos + 42).ok_or_else(bad)?;
        let name = bytes.get(pos + 46..pos + 46 + nlen).ok_or_else(bad)?;
        let name = String::from_utf8_lossy(name).into_owned();
        if csize == 0xFFFF_FFFF || local == 0xFFFF_FFFF {
            return Err("zip64 archives are not supported".into());
        }
        if method != 0 || csize != usize_ {
            return Err(format!(
                "zip entry {name} is compressed (method {method}); torch writes stored entries"
            ));
        }
        if bytes.get(local..local + 4) != Some(&[0x50, 0x4b, 0x03, 0x04]) {
            return Err(format!("zip entry {name}: bad local header"));
        }
        let start = local
            + 30
            + u16_at(bytes, local + 26).ok_or_else(bad)?
            + u16_at(bytes, local + 28).ok_or_else(bad)?;
        if start + csize > bytes.len() {
            return Err(format!("zip entry {name} runs past the end of the file (truncated?)"));
        }
        out.insert(name, (start, start + csize));
        pos += 46 + nlen + elen + clen;
    }
    Ok(out)
}

/// A value on the unpickler's stack.
#[derive(Clone, Debug)]
enum Val {
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Tuple(Vec<Val>),
    List(Vec<Val>),
    Dict(Vec<(Val, Val)>),
    Global(String),
    /// (dtype name as torch spells it, e.g. "FloatStorage"; key of the data entry)
    Storage(String, String),
    /// A rebuilt tensor: storage, element offset, size, stride.
    Tensor {
        storage: (String, String),
        offset: usize,
        size: Vec<usize>,
        stride: Vec<usize>,
    },
    Mark,
}

fn ints(v: &Val, what: &str) -> std::result::Result<Vec<usize>, String> {
    match v {
        Val::Tuple(xs) | Val::List(xs) => xs
            .iter()
            .map(|x| match x {
                Val::Int(i) if *i >= 0 => Ok(*i as usize),
                _ => Err(format!("{what}: expected non-negative integers")),
            })
            .collect(),
        _ => Err(format!("{what}: expected a tuple")),
    }
}

#[cfg(test)]
fn unpickle(p: &[u8]) -> std::result::Result<Val, String> {
    unpickle_at(p, 0).map(|(v, _)| v)
}

/// Runs the pickle program starting at byte `start`; returns the value and the byte after STOP.
fn unpickle_at(p: &[u8], start: usize) -> std::result::Result<(Val, usize), String> {
    let mut stack: Vec<Val> = Vec::new();
    let mut memo: HashMap<usize, Val> = HashMap::new();
    let mut i = start;
    let take = |i: &mut usize, n: usize| -> std::result::Result<&[u8], String> {
        let s = p.get(*i..*i + n).ok_or("pickle ends mid-instruction")?;
        *i += n;
        Ok(s)
    };
    fn pop_mark(stack: &mut Vec<Val>) -> std::result::Result<Vec<Val>, String> {
        let m = stack.iter().rposition(|v| matches!(v, Val::Mark)).ok_or("pickle MARK missing")?;
        let items = stack.split_off(m + 1);
        stack.pop();
        Ok(items)
    }
    let pop = |stack: &mut Vec<Val>| stack.pop().ok_or_else(|| "pickle stack underflow".to_string());
    loop {
        let op = *p.get(i).ok_or("pickle ends without STOP")?;
        i += 1;
        match op {
            0x80 => i += 1,                           // PROTO n
            0x95 => i += 8,                           // FRAME len
            b'.' => return Ok((pop(&mut stack)?, i)), // STOP
            b'}' => stack.push(Val::Dict(Vec::new())),
            b']' => stack.push(Val::List(Vec::new())),
            b')' => stack.push(Val::Tuple(Vec::new())),
            b'(' => stack.push(Val::Mark),
            b'N' => stack.push(Val::None),
            0x88 | 0x89 => stack.push(Val::Bool),
            b'K' => stack.push(Val::Int(take(&mut i, 1)?[0] as i64)),
            b'M' => stack.push(Val::Int(u16::from_le_bytes(take(&mut i, 2)?.try_into().unwrap()) as i64)),
            b'J' => stack.push(Val::Int(i32::from_le_bytes(take(&mut i, 4)?.try_into().unwrap()) as i64)),
            0x8a => {
                // LONG1: n-byte little-endian two's complement
                let n = take(&mut i, 1)?[0] as usize;
                let b = take(&mut i, n)?;
                if n > 8 {
                    return Err("pickle integer wider than 64 bits".into());
                }
                let mut v: i64 = 0;
                for (k, &byte) in b.iter().enumerate() {
                    v |= (byte as i64) << (8 * k);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Val::Int(v));
            }
            b'G' => {
                take(&mut i, 8)?;
                stack.push(Val::Float);
            }
            b'X' | 0x8c | b'T' | b'U' => {
                let n = match op {
                    b'X' | b'T' => u32::from_le_bytes(take(&mut i, 4)?.try_into().unwrap()) as usize,
                    _ => take(&mut i, 1)?[0] as usize,
                };
                let s = std::str::from_utf8(take(&mut i, n)?).map_err(|_| "pickle string is not UTF-8")?;
                stack.push(Val::Str(s.to_string()));
            }
            b'c' => {
                let rest = &p[i..];
                let mut lines = rest.splitn(3, |&b| b == b'\n');
                let (m, n) = (lines.next().unwrap_or(&[]), lines.next().ok_or("pickle GLOBAL unterminated")?);
                i += m.len() + n.len() + 2;
                stack.push(Val::Global(format!(
                    "{}.{}",
                    String::from_utf8_lossy(m),
                    String::from_utf8_lossy(n)
                )));
            }
            b'q' => {
                let k = take(&mut i, 1)?[0] as usize;
                memo.insert(k, stack.last().ok_or("pickle stack underflow")?.clone());
            }
            b'r' => {
                let k = u32::from_le_bytes(take(&mut i, 4)?.try_into().unwrap()) as usize;
                memo.insert(k, stack.last().ok_or("pickle stack underflow")?.clone());
            }
            0x94 => {
                let k = memo.len();
                memo.insert(k, stack.last().ok_or("pickle stack underflow")?.clone());
            }
            b'h' | b'j' => {
                let k = if op == b'h' {
                    take(&mut i, 1)?[0] as usize
                } else {
                    u32::from_le_bytes(take(&mut i, 4)?.try_into().unwrap()) as usize
                };
                stack.push(memo.get(&k).ok_or("pickle memo key missing")?.clone());
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Val::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err("pickle stack underflow".into());
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Val::Tuple(items));
            }
            b'a' | b'e' => {
                let items = if op == b'a' { vec![pop(&mut stack)?] } else { pop_mark(&mut stack)? };
                match stack.last_mut() {
                    Some(Val::List(l)) => l.extend(items),
                    _ => return Err("pickle APPEND to a non-list".into()),
                }
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    vec![k, v]
                } else {
                    pop_mark(&mut stack)?
                };
                if items.len() % 2 != 0 {
                    return Err("pickle SETITEMS with an odd count".into());
                }
                match stack.last_mut() {
                    Some(Val::Dict(d)) => {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                    _ => return Err("pickle SETITEM on a non-dict".into()),
                }
            }
            b'b' => {
                // BUILD: sets attributes (e.g. the state dict's `_metadata`); we ignore them.
                pop(&mut stack)?;
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                match pid {
                    Val::Tuple(t) if t.len() >= 3 => match (&t[0], &t[1], &t[2]) {
                        (Val::Str(s), Val::Global(g), Val::Str(key)) if s == "storage" => {
                            let ty = g.rsplit('.').next().unwrap_or(g).to_string();
                            stack.push(Val::Storage(ty, key.clone()));
                        }
                        _ => return Err("unsupported persistent id in pickle".into()),
                    },
                    _ => return Err("unsupported persistent id in pickle".into()),
                }
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let f = pop(&mut stack)?;
                let Val::Tuple(args) = args else {
                    return Err("pickle REDUCE arguments are not a tuple".into());
                };
                let Val::Global(g) = f else { return Err("pickle REDUCE of a non-global".into()) };
                stack.push(match g.as_str() {
                    "collections.OrderedDict" => Val::Dict(Vec::new()),
                    "torch._utils._rebuild_tensor_v2" => {
                        let (Some(Val::Storage(ty, key)), Some(Val::Int(off)), Some(size), Some(stride)) =
                            (args.first(), args.get(1), args.get(2), args.get(3))
                        else {
                            return Err("malformed _rebuild_tensor_v2 call".into());
                        };
                        Val::Tensor {
                            storage: (ty.clone(), key.clone()),
                            offset: usize::try_from(*off).map_err(|_| "negative storage offset")?,
                            size: ints(size, "tensor size")?,
                            stride: ints(stride, "tensor stride")?,
                        }
                    }
                    "torch._utils._rebuild_parameter" => {
                        args.into_iter().next().ok_or("malformed _rebuild_parameter call")?
                    }
                    other => {
                        return Err(format!(
                            "refusing pickle global {other} (only plain state dicts are read)"
                        ))
                    }
                });
            }
            other => return Err(format!("unsupported pickle opcode 0x{other:02x} at byte {}", i - 1)),
        }
    }
}

/// The first pickle of a legacy (pre-1.6, `_use_new_zipfile_serialization=False`) file: torch's
/// magic number 0x1950a86a20f9469cfc6c as a 10-byte LONG1.
pub const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19\x2e";

/// Reads a `.pth` state dict, zip or legacy format; every tensor keeps its dtype (F32, F16, BF16).
/// `num_batches_tracked` (int64) entries are skipped; any other non-float tensor is an error naming it.
pub fn load_pth(path: &Path, bytes: &[u8]) -> Result<TensorFile> {
    let bad = |msg: String| Error::format(path, msg);
    let (root, storages): (Val, HashMap<String, &[u8]>) = if bytes.starts_with(LEGACY_MAGIC) {
        legacy(bytes).map_err(|m| bad(format!("legacy .pth: {m}")))?
    } else {
        let entries = zip_entries(bytes).map_err(|m| bad(format!("not a readable .pth zip: {m}")))?;
        let pkl = entries
            .keys()
            .find(|k| k.ends_with("data.pkl"))
            .ok_or_else(|| bad("no data.pkl in the .pth archive".into()))?
            .clone();
        let prefix = format!("{}data/", pkl.trim_end_matches("data.pkl"));
        let (a, b) = entries[&pkl];
        let root = unpickle_at(&bytes[a..b], 0).map_err(|m| bad(format!("data.pkl: {m}")))?.0;
        let storages = entries
            .iter()
            .filter_map(|(k, &(s0, s1))| k.strip_prefix(&prefix).map(|key| (key.to_string(), &bytes[s0..s1])))
            .collect();
        (root, storages)
    };
    let Val::Dict(items) = root else {
        return Err(bad("the pickle is not a state dict (a dict of tensors)".into()));
    };
    let mut out = TensorFile { path: path.display().to_string(), ..Default::default() };
    for (k, v) in items {
        let Val::Str(name) = k else { return Err(bad("state dict key is not a string".into())) };
        let Val::Tensor { storage: (ty, key), offset, size, stride } = v else {
            return Err(bad(format!("{name} is not a tensor")));
        };
        let esize = match ty.as_str() {
            "FloatStorage" => 4,
            "HalfStorage" | "BFloat16Storage" => 2,
            _ if name.ends_with("num_batches_tracked") => continue,
            other => {
                return Err(bad(format!(
                    "tensor {name} has storage type {other}, unsupported (only float, half, bfloat16)"
                )))
            }
        };
        let data = *storages
            .get(&key)
            .ok_or_else(|| bad(format!("tensor {name}: storage {key} missing from the file")))?;
        let nstore = data.len() / esize;
        if size.len() != stride.len() {
            return Err(bad(format!("tensor {name}: size and stride ranks differ")));
        }
        // The furthest element must lie inside the storage.
        let numel: usize = size.iter().product();
        if numel > 0 {
            let last = offset + size.iter().zip(&stride).map(|(d, s)| (d - 1) * s).sum::<usize>();
            if last >= nstore {
                return Err(bad(format!(
                    "tensor {name}: view past the end of its storage ({nstore} elements)"
                )));
            }
        }
        // Storage indices in row-major order: a plain range when the view is contiguous (always, for
        // a saved state dict), else an explicit gather (no index vector for big tensors).
        let contiguous = crate::tensor::Shape::new(&size).contiguous_strides() == stride;
        let idx: Box<dyn Iterator<Item = usize>> = if contiguous {
            Box::new(offset..offset + numel)
        } else {
            let mut all = Vec::with_capacity(numel);
            let mut pos = vec![0usize; size.len()];
            for _ in 0..numel {
                all.push(offset + pos.iter().zip(&stride).map(|(p, s)| p * s).sum::<usize>());
                for d in (0..size.len()).rev() {
                    pos[d] += 1;
                    if pos[d] < size[d] {
                        break;
                    }
                    pos[d] = 0;
                }
            }
            Box::new(all.into_iter())
        };
        let h = |j: usize| u16::from_le_bytes([data[2 * j], data[2 * j + 1]]);
        let t = match ty.as_str() {
            "FloatStorage" => Tensor::from_vec(
                idx.map(|j| f32::from_le_bytes(data[4 * j..4 * j + 4].try_into().unwrap())).collect(),
                &size,
            ),
            "HalfStorage" => Tensor::from_f16(idx.map(|j| f16::from_bits(h(j))).collect(), &size),
            _ => Tensor::from_bf16(idx.map(|j| bf16::from_bits(h(j))).collect(), &size),
        }
        .map_err(|e| bad(format!("tensor {name}: {e}")))?;
        out.tensors.insert(name, t);
    }
    Ok(out)
}

/// The legacy layout: pickles of the magic number, the protocol version, system info, the object
/// and the sorted storage keys, then for each key an int64 element count and the raw bytes.
fn legacy(bytes: &[u8]) -> std::result::Result<(Val, HashMap<String, &[u8]>), String> {
    let mut i = LEGACY_MAGIC.len();
    for _ in 0..2 {
        i = unpickle_at(bytes, i)?.1; // protocol version, sys_info
    }
    let (root, next) = unpickle_at(bytes, i)?;
    // Element sizes of the storages, from the tensors that use them.
    let mut esize: HashMap<String, usize> = HashMap::new();
    if let Val::Dict(items) = &root {
        for (_, v) in items {
            if let Val::Tensor { storage: (ty, key), .. } = v {
                let e = match ty.as_str() {
                    "FloatStorage" | "IntStorage" => 4,
                    "HalfStorage" | "BFloat16Storage" | "ShortStorage" => 2,
                    "LongStorage" | "DoubleStorage" => 8,
                    "ByteStorage" | "CharStorage" | "BoolStorage" => 1,
                    other => return Err(format!("unknown storage type {other}")),
                };
                esize.insert(key.clone(), e);
            }
        }
    }
    let (keys, mut pos) = unpickle_at(bytes, next)?;
    let Val::List(keys) = keys else { return Err("storage key list missing".into()) };
    let mut out = HashMap::new();
    for k in keys {
        let Val::Str(k) = k else { return Err("storage key is not a string".into()) };
        let e = *esize.get(&k).ok_or_else(|| format!("storage {k} is used by no tensor"))?;
        let count = bytes.get(pos..pos + 8).ok_or("file ends before a storage (truncated?)")?;
        let n = u64::from_le_bytes(count.try_into().unwrap()) as usize;
        let end = n.checked_mul(e).and_then(|b| b.checked_add(pos + 8)).filter(|&end| end <= bytes.len());
        let end = end.ok_or_else(|| format!("storage {k} runs past the end of the file (truncated?)"))?;
        out.insert(k, &bytes[pos + 8..end]);
        pos = end;
    }
    Ok((root, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(name: &str) -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
    }

    #[test]
    fn pth_matches_the_same_tensors_saved_by_python_safetensors() {
        // Both files come from tools/make_pth_fixture.py; the .safetensors is written by the Python
        // `safetensors` package, so the expected values do not come from the code under test.
        let want = TensorFile::load(&data("pth_fixture.safetensors")).unwrap();
        for file in ["pth_fixture.pth", "pth_fixture_legacy.pth"] {
            let got = TensorFile::load(&data(file)).unwrap();
            assert_eq!(got.names().collect::<Vec<_>>(), want.names().collect::<Vec<_>>());
            assert!(got.get("1.num_batches_tracked").is_none());
            for (name, w) in &want.tensors {
                let g = got.get(name).unwrap();
                assert_eq!((g.dtype(), g.dims()), (w.dtype(), w.dims()), "{name}");
                assert_eq!(g.to_f32_vec(), w.to_f32_vec(), "{file} {name}: values must be bit-identical");
            }
        }
    }

    #[test]
    fn truncated_or_hostile_pth_is_refused() {
        let dir = std::env::temp_dir().join(format!("capgen-pth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["pth_fixture.pth", "pth_fixture_legacy.pth"] {
            let bytes = std::fs::read(data(file)).unwrap();
            for cut in [bytes.len() / 2, bytes.len() - 3] {
                let p = dir.join(format!("cut-{cut}.pth"));
                std::fs::write(&p, &bytes[..cut]).unwrap();
                let e = TensorFile::load(&p).unwrap_err().to_string();
                assert!(e.contains(&format!("cut-{cut}.pth")) && !e.contains('\n'), "{file}: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        // `os.system("echo hi")` as a pickle: the restricted unpickler refuses the global.
        let evil = b"\x80\x02cos\nsystem\nX\x07\x00\x00\x00echo hi\x85R.";
        let e = unpickle(evil).unwrap_err();
        assert!(e.contains("refusing pickle global os.system"), "{e}");
        assert!(unpickle(b"\x80\x02}q\x00(X\x01\x00\x00\x00a").is_err()); // ends mid-program
    }
}
