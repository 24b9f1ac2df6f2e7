//! The `capgen` binary end to end: `--help`, bad input (one line on stderr naming the file, non-zero
//! exit, no panic), and `extract` on a few small committed images with seeded random weights.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use capgen::weights::TensorFile;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/preprocess").join(name)
}

/// CRC-32 (IEEE, reflected, polynomial 0xEDB88320), as PNG chunks need.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A PNG whose header claims `w` x `h` RGB pixels, followed by a tiny (insufficient) IDAT and IEND.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let chunk = |out: &mut Vec<u8>, kind: &[u8; 4], body: &[u8]| {
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        let mut c = kind.to_vec();
        c.extend_from_slice(body);
        out.extend_from_slice(&c);
        out.extend_from_slice(&crc32(&c).to_be_bytes());
    };
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, no filter, no interlace
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(&mut png, b"IEND", &[]);
    png
}

#[test]
fn help_works_for_each_command() {
    for cmd in ["extract", "classify", "bench"] {
        let (code, out, err) = capgen(&[cmd, "--help"]);
        assert_eq!(code, 0, "{cmd} --help: {err}");
        assert!(out.contains("Usage"), "{cmd} --help: {out}");
    }
}

#[test]
fn bad_images_give_one_line_naming_the_file() {
    let d = tmp("bad-images");
    let missing = d.join("missing.jpg");
    let empty = d.join("empty.jpg");
    std::fs::write(&empty, b"").unwrap();
    let text = d.join("notes.jpg");
    std::fs::write(&text, b"this is not a picture\n").unwrap();
    let jpeg = std::fs::read(data("colour.jpg")).unwrap();
    let trunc = d.join("trunc.jpg");
    std::fs::write(&trunc, &jpeg[..jpeg.len() / 3]).unwrap();
    let huge = d.join("huge.png");
    std::fs::write(&huge, png_header_only(30000, 30000)).unwrap();

    // `classify` reads the image before the weights, so these fail on the image whatever the encoder.
    let cases: [(&Path, &str); 5] = [
        (&missing, "No such file"),
        (&empty, "empty file"),
        (&text, "not a JPEG or PNG"),
        (&trunc, "not a valid JPEG"),
        (&huge, "megapixels"),
    ];
    for (path, what) in cases {
        assert_one_line_error(&["classify", "--weights", "random", "--image", s(path)], &[s(path), what]);
    }
}

#[test]
fn bad_arguments_and_inputs_give_one_line() {
    let d = tmp("bad-args");
    let out = d.join("feats.safetensors");
    let no_images = d.join("no-images");
    std::fs::create_dir_all(&no_images).unwrap();
    std::fs::write(no_images.join("readme.txt"), b"hi").unwrap();
    let extract = |images: &str, encoder: &str, weights: &str| {
        vec![
            "extract".to_string(),
            "--encoder".into(),
            encoder.into(),
            "--layer".into(),
            "pooled".into(),
            "--weights".into(),
            weights.into(),
            "--images".into(),
            images.into(),
            "--out".into(),
            s(&out).into(),
        ]
    };
    let run = |args: Vec<String>, needles: &[&str]| {
        let a: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
        assert_one_line_error(&a, needles);
    };
    let imgs = data("one.png");
    run(extract(s(&no_images), "resnet50", "random"), &[s(&no_images), "no images"]);
    run(extract(s(&imgs), "foo", "random"), &["--encoder foo"]);

    // Two inputs with the same file name would collide in the features file.
    let other = d.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(&imgs, other.join("one.png")).unwrap();
    let mut dup = extract(s(&imgs), "resnet50", "random");
    dup.insert(9, s(&other.join("one.png")).to_string());
    run(dup, &["one.png", "same file name"]);

    // A safetensors file cut short: its header claims more bytes than the file has.
    let w = d.join("weights.safetensors");
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"conv1.weight\"");
    std::fs::write(&w, &bytes).unwrap();
    run(extract(s(&imgs), "resnet50", s(&w)), &[s(&w)]);
    assert!(!out.exists(), "nothing may be written on error");

    // --out naming a directory is refused up front.
    let mut to_dir = extract(s(&imgs), "resnet50", "random");
    *to_dir.last_mut().unwrap() = s(&d).to_string();
    run(to_dir, &[s(&d), "is a directory"]);

    let (code, _, err) = capgen(&["bench", "foo"]);
    assert!(code != 0 && err.contains("bench foo: expected gemm"), "{err}");
}

#[test]
fn extract_writes_one_tensor_per_image_and_skips_bad_ones() {
    let d = tmp("extract");
    let imgs = d.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    for n in ["one.png", "greyalpha.png", "grey.jpg"] {
        std::fs::copy(data(n), imgs.join(n)).unwrap();
    }
    std::fs::write(imgs.join("broken.png"), b"\x89PNG\r\n\x1a\n garbage").unwrap();
    std::fs::write(imgs.join("notes.txt"), b"ignored: not an image extension").unwrap();
    let out = d.join("feats.safetensors");
    let args = |skip: bool| {
        let mut a = vec!["extract", "--encoder", "resnet50", "--layer", "pooled", "--weights", "random"];
        a.extend(["--images", s(&imgs), "--out", s(&out), "--batch", "2"]);
        if skip {
            a.push("--skip-bad");
        }
        a
    };

    // Without --skip-bad the broken file aborts the run and nothing is written.
    assert_one_line_error(&args(false), &["broken.png", "not a valid PNG"]);
    assert!(!out.exists());

    let (code, _, err) = capgen(&args(true));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("skipped 1 bad image") && err.contains("broken.png"), "{err}");
    let f = TensorFile::load(&out).unwrap();
    let names: Vec<&str> = f.names().collect();
    assert_eq!(names.len(), 3, "{names:?}");
    for n in ["one.png", "greyalpha.png", "grey.jpg"] {
        let t = f.require(n, &[2048]).unwrap();
        let v = t.to_f32_vec();
        // Pooled ResNet features follow a ReLU: non-negative, finite, not all zero.
        assert!(v.iter().all(|x| x.is_finite() && *x >= 0.0) && v.iter().any(|x| *x > 0.0), "{n}");
    }
}

#[test]
fn bench_gemm_json_has_the_contract_keys() {
    let (code, out, err) =
        capgen(&["bench", "gemm", "--size", "64", "--reps", "2", "--threads", "1", "--json"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    for k in ["bench", "case", "device", "threads", "batch", "ms_median", "gflops", "peak_gflops"] {
        assert!(v.get(k).is_some(), "missing {k}: {v}");
    }
    assert_eq!(v["bench"], "gemm");
    assert_eq!(v["threads"], 1);
    assert!(v["ms_median"].as_f64().unwrap() > 0.0);
    assert!(v["peak_gflops"].as_f64().unwrap() > 0.0, "peak measured in the same run: {v}");
}
