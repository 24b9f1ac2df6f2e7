//! Holds `capgen::data::image` preprocessing to torchvision's output on small committed images
//! (written, with the goldens, by tools/preprocess_golden.py; see there for the file layout).
//!
//! Tolerances:
//! - PNGs: same decoded bytes and the same resampling arithmetic as PIL, so the u8 pixels must agree
//!   exactly; the only difference left is f32 rounding in `/255`, `-mean`, `/std`, which we do in the
//!   same order as torch, so max |diff| <= 1e-6 (one ulp at |x| ~ 2.6 is 2.4e-7).
//! - JPEGs: zune-jpeg (ours) and libjpeg-turbo (PIL) use different IDCTs and chroma upsampling, so
//!   decoded pixels may differ by a few levels; one level is 1/255/0.225 = 0.0174 after
//!   normalisation. Measured: grey and CMYK JPEGs rel L2 1.2e-3 / 1.4e-3, max 1 level (IDCT rounding
//!   only); the 4:2:0 colour JPEG rel L2 1.0e-2, max 4 levels (chroma upsampling differs). We require
//!   relative L2 error <= 2e-2 and max |diff| <= 6 levels: tight enough that a wrong colour
//!   conversion, a shifted crop or a missing antialias (tens of levels) fails.

use std::path::{Path, PathBuf};

use capgen::data::image::{preprocess_file, CROP};

const SUB: usize = 16; // out[:, 5::14, 5::14]
const WIN: usize = 12; // out[:, 100:112, 100:112]

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/preprocess")
}

fn golden(name: &str) -> Vec<f32> {
    let stem = name.replace('.', "_");
    let bytes = std::fs::read(data_dir().join(format!("{stem}.f32"))).expect("golden file");
    let v: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(v.len(), 3 * SUB * SUB + 3 * WIN * WIN);
    v
}

/// Our output, sampled at the golden's positions.
fn ours(name: &str) -> Vec<f32> {
    let x = preprocess_file(&data_dir().join(name)).expect("preprocess");
    assert_eq!(x.len(), 3 * CROP * CROP);
    let at = |c: usize, y: usize, xx: usize| x[(c * CROP + y) * CROP + xx];
    let mut out = Vec::new();
    for c in 0..3 {
        for y in 0..SUB {
            for xx in 0..SUB {
                out.push(at(c, 5 + 14 * y, 5 + 14 * xx));
            }
        }
    }
    for c in 0..3 {
        for y in 0..WIN {
            for xx in 0..WIN {
                out.push(at(c, 100 + y, 100 + xx));
            }
        }
    }
    out
}

fn compare(name: &str) -> (f64, f32) {
    let (a, b) = (ours(name), golden(name));
    let num: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    let max = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    ((num / den).sqrt(), max)
}

#[test]
fn png_inputs_match_torchvision_exactly() {
    let pngs = ["rgb.png", "rgba.png", "greyalpha.png", "palette.png", "large.png", "grey16.png", "one.png"];
    for name in pngs {
        let (rel, max) = compare(name);
        eprintln!("{name}: rel L2 {rel:.2e}, max |diff| {max:.2e}");
        assert!(max <= 1e-6, "{name}: max |diff| {max:e} (rel L2 {rel:e})");
    }
}

#[test]
fn jpeg_inputs_match_torchvision_closely() {
    let level = 1.0 / 255.0 / 0.225;
    let results: Vec<_> = ["colour.jpg", "grey.jpg", "cmyk.jpg"].iter().map(|n| (n, compare(n))).collect();
    for (name, (rel, max)) in &results {
        eprintln!("{name}: rel L2 {rel:.2e}, max |diff| {:.2} levels", max / level);
    }
    for (name, (rel, max)) in results {
        assert!(rel <= 2e-2 && max <= 6.0 * level, "{name}: rel L2 {rel:e}, max |diff| {max}");
    }
}
