//! Image preprocessing, torchvision's standard (DESIGN.md section 3, a contract):
//!
//! ```text
//! decode -> RGB (u8) -> resize shorter side to 256 (PIL's antialiased bilinear) -> centre-crop 224
//!        -> x / 255 -> (x - mean) / std, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)
//!        -> (3, 224, 224) f32, channel-major (NCHW once batched)
//! ```
//!
//! The resize reimplements the algorithm of PIL's `Image.resize(..., BILINEAR)` (which torchvision
//! uses on PIL images): a separable triangle filter whose support widens with the downscale factor
//! (so downscaling averages, i.e. antialiases), coefficients quantised to 22-bit fixed point, a
//! horizontal pass then a vertical pass, each rounding to u8. Following the same arithmetic gives
//! the *same bytes* as PIL for the same decoded pixels: on the PNG goldens of
//! `tests/preprocess_golden.rs` (up- and downscales up to 4.3x) our normalised output is bit-identical
//! to torchvision's (the test allows 1e-6 for f32 rounding). JPEGs are decoded by zune-jpeg here and
//! by libjpeg-turbo in PIL; their IDCT and chroma upsampling differ, so decoded pixels differ by up to
//! 1 level (grey, CMYK) or 4 levels (4:2:0 colour), rel. L2 1e-3 .. 1e-2 after normalisation.
//!
//! Colour conversions (our decisions, matching PIL's `convert("RGB")` where PIL is sensible):
//! - grey -> R = G = B; grey+alpha and RGBA -> alpha dropped (not composited), like PIL;
//! - palette PNGs -> expanded through the palette (transparency dropped);
//! - 16-bit PNGs -> the high byte of each sample (`v >> 8`). For 16-bit RGB(A) that is exactly what
//!   PIL does. For 16-bit grey PIL opens mode `I;16` and `convert("RGB")` *clips* values to 255,
//!   which turns almost every 16-bit grey photo white; we deliberately take the high byte instead;
//! - CMYK / grey JPEGs -> RGB as the JPEG decoder converts them;
//! - EXIF orientation is ignored, as PIL and torchvision ignore it unless asked.
//!
//! Size limits: an image is refused when width * height exceeds `MAX_PIXELS` (checked from the header
//! before any pixel is decoded, and the decoder's allocation limit is set too), so a crafted header
//! cannot exhaust memory. A 1x1 image is valid: it is upsampled to 256x256 like any small image.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageFormat, ImageReader, Limits};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The largest accepted image, in pixels (width * height): 100 megapixels, ~300 MB as RGB u8.
pub const MAX_PIXELS: u64 = 100_000_000;
/// The shorter side after resizing.
pub const RESIZE_SHORTER: usize = 256;
/// The side of the centre crop fed to the network.
pub const CROP: usize = 224;
/// ImageNet per-channel mean and standard deviation (torchvision's constants).
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];
/// File extensions (lower-case) that directory scans pick up.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// An 8-bit RGB image, row-major, interleaved: pixel (x, y) channel c is `data[(y * width + x) * 3 + c]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Reads and decodes an image file to RGB. Every failure names the file.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_rgb(&bytes, path)
}

fn format_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Png => "PNG",
        ImageFormat::Jpeg => "JPEG",
        _ => "image",
    }
}

/// Decodes an in-memory JPEG or PNG to RGB; `path` is only used in error messages.
pub fn decode_rgb(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::format(path, "empty file"));
    }
    // Probe the header with just the first 64 KiB: enough for PNG's IHDR and JPEG's SOF in practice;
    // fall back to the whole file if the header lies further in (e.g. big EXIF blocks).
    let head = &bytes[..bytes.len().min(1 << 16)];
    let guessed = ImageReader::new(Cursor::new(head))
        .with_guessed_format()
        .map_err(|e| Error::format(path, format!("cannot read ({e})")))?;
    let fmt = match guessed.format() {
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg)) => f,
        Some(other) => {
            return Err(Error::format(
                path,
                format!("unsupported image format {other:?} (expected JPEG or PNG)"),
            ))
        }
        None => return Err(Error::format(path, "not a JPEG or PNG image (unrecognised contents)")),
    };
    let name = format_name(fmt);
    // Decoder messages may span lines; the CLI contract is one line per error.
    let bad = |e: image::ImageError| {
        let msg = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        Error::format(path, format!("not a valid {name} ({msg})"))
    };
    let dims = match ImageReader::with_format(Cursor::new(head), fmt).into_dimensions() {
        Ok(d) => d,
        Err(_) => ImageReader::with_format(Cursor::new(bytes), fmt).into_dimensions().map_err(bad)?,
    };
    check_size(dims.0, dims.1).map_err(|m| Error::format(path, m))?;

    if fmt == ImageFormat::Jpeg && !jpeg_has_end(bytes) {
        // zune-jpeg fills a truncated scan with grey instead of failing; PIL refuses ("image file is
        // truncated"), and so do we: a half-grey photo would silently poison the features.
        return Err(Error::format(
            path,
            "not a valid JPEG (truncated: the data ends before the end-of-image marker)",
        ));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), fmt);
    let mut limits = Limits::default();
    limits.max_image_width = Some(dims.0);
    limits.max_image_height = Some(dims.1);
    // Worst case decoded buffer: 16-bit RGBA = 8 bytes per pixel, plus decoder scratch.
    limits.max_alloc = Some(MAX_PIXELS * 8 + (64 << 20));
    reader.limits(limits);
    let img = reader.decode().map_err(bad)?;
    Ok(to_rgb(img))
}

/// Whether a JPEG's marker structure reaches its end-of-image marker (FF D9) before the data runs
/// out. Walks the segments from SOI: each marker's length field skips its payload; after a
/// start-of-scan the entropy-coded data is skipped up to the next real marker (inside it an FF byte is
/// always followed by 00, a restart marker D0..D7 or fill FFs). Stops at the first EOI, so whatever a
/// camera appends after the image (a motion-photo video, an MPO second frame) is ignored, as PIL does.
/// Returns false only when the data ends before EOI; oddities in the structure are left to the decoder.
fn jpeg_has_end(bytes: &[u8]) -> bool {
    let n = bytes.len();
    if n < 2 || bytes[0] != 0xFF || bytes[1] != 0xD8 {
        return true; // not our business: the decoder reports it
    }
    let mut i = 2;
    loop {
        if i >= n {
            return false;
        }
        if bytes[i] != 0xFF {
            return true; // garbage where a marker belongs: the decoder's call
        }
        while i + 1 < n && bytes[i + 1] == 0xFF {
            i += 1; // fill bytes before a marker
        }
        if i + 1 >= n {
            return false;
        }
        let marker = bytes[i + 1];
        i += 2;
        match marker {
            0xD9 => return true,
            0x01 | 0xD0..=0xD8 => continue, // markers without a length field
            _ => {}
        }
        if i + 2 > n {
            return false;
        }
        let len = u16::from_be_bytes([bytes[i], bytes[i + 1]]) as usize;
        if len < 2 {
            return true;
        }
        i += len;
        if i > n {
            return false;
        }
        if marker == 0xDA {
            // Entropy-coded data: find the FF that starts the next marker.
            loop {
                match bytes[i..].iter().position(|&b| b == 0xFF) {
                    None => return false,
                    Some(k) => i += k,
                }
                if i + 1 >= n {
                    return false;
                }
                match bytes[i + 1] {
                    0x00 | 0xD0..=0xD7 => i += 2,
                    0xFF => i += 1,
                    _ => break,
                }
            }
        }
    }
}

/// Refuses images that are empty or larger than `MAX_PIXELS`.
fn check_size(w: u32, h: u32) -> std::result::Result<(), String> {
    if w == 0 || h == 0 {
        return Err(format!("image has no pixels ({w}x{h})"));
    }
    let px = w as u64 * h as u64;
    if px > MAX_PIXELS {
        return Err(format!(
            "image is {w}x{h} = {:.1} megapixels, above the limit of {} megapixels",
            px as f64 / 1e6,
            MAX_PIXELS / 1_000_000
        ));
    }
    Ok(())
}

/// Converts any decoded image to 8-bit RGB by the rules in the module comment.
fn to_rgb(img: DynamicImage) -> RgbImage {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let n = width * height;
    let mut data = Vec::with_capacity(n * 3);
    // `ch`: channels per pixel of the source; `grey`: whether channel 0 is a luma to replicate.
    fn push<T: Copy>(data: &mut Vec<u8>, src: &[T], ch: usize, grey: bool, to8: impl Fn(T) -> u8) {
        for px in src.chunks_exact(ch) {
            if grey {
                let v = to8(px[0]);
                data.extend_from_slice(&[v, v, v]);
            } else {
                data.extend_from_slice(&[to8(px[0]), to8(px[1]), to8(px[2])]);
            }
        }
    }
    let hi = |v: u16| (v >> 8) as u8;
    match &img {
        DynamicImage::ImageLuma8(b) => push(&mut data, b.as_raw(), 1, true, |v| v),
        DynamicImage::ImageLumaA8(b) => push(&mut data, b.as_raw(), 2, true, |v| v),
        DynamicImage::ImageRgb8(b) => data.extend_from_slice(b.as_raw()),
        DynamicImage::ImageRgba8(b) => push(&mut data, b.as_raw(), 4, false, |v| v),
        DynamicImage::ImageLuma16(b) => push(&mut data, b.as_raw(), 1, true, hi),
        DynamicImage::ImageLumaA16(b) => push(&mut data, b.as_raw(), 2, true, hi),
        DynamicImage::ImageRgb16(b) => push(&mut data, b.as_raw(), 3, false, hi),
        DynamicImage::ImageRgba16(b) => push(&mut data, b.as_raw(), 4, false, hi),
        // Float images do not come out of the JPEG/PNG decoders; the crate's own conversion is fine.
        other => data = other.to_rgb8().into_raw(),
    }
    debug_assert_eq!(data.len(), n * 3);
    RgbImage { width, height, data }
}

/// torchvision's `Resize(256)` output size for a (w, h) image: the shorter side becomes `shorter`,
/// the longer one `int(shorter * long / short)` (truncated, as Python's `int()` does).
pub fn resized_size(w: usize, h: usize, shorter: usize) -> (usize, usize) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    // Both operands are exact in f64 and the division is correctly rounded, like Python's `/`.
    let new_long = ((shorter * long) as f64 / short as f64) as usize;
    if w <= h {
        (shorter, new_long)
    } else {
        (new_long, shorter)
    }
}

/// torchvision's `CenterCrop` offset: `int(round((size - crop) / 2))` with Python's round-half-even.
pub fn crop_offset(size: usize, crop: usize) -> usize {
    ((size - crop) as f64 / 2.0).round_ties_even() as usize
}

/// Fixed-point bits of the resampling coefficients (PIL: 32 - 8 - 2, room for 8-bit values and sign).
const PRECISION_BITS: u32 = 22;

/// The triangle (bilinear) kernel, support 1.
fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Resampling coefficients for one axis: output index `o` (of `out_size`, only `o` in `range` are
/// computed) reads input `start[o]..start[o] + weights[o].len()`. The filter is stretched by the
/// downscale factor when shrinking (antialiasing); weights are normalised to sum 1, then quantised.
struct AxisCoeffs {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

fn axis_coeffs(in_size: usize, out_size: usize, range: std::ops::Range<usize>) -> AxisCoeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // triangle support (1) * filterscale
    let inv = 1.0 / filterscale;
    let mut start = Vec::with_capacity(range.len());
    let mut weights = Vec::with_capacity(range.len());
    for o in range {
        // Centre of output pixel `o` in input coordinates (pixel centres at i + 0.5).
        let center = (o as f64 + 0.5) * scale;
        // `as i64` truncates toward zero, like C's (int) cast in PIL's arithmetic.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let mut k: Vec<f64> = (lo..hi).map(|i| triangle((i as f64 - center + 0.5) * inv)).collect();
        let sum: f64 = k.iter().sum();
        if sum != 0.0 {
            k.iter_mut().for_each(|v| *v /= sum);
        }
        let one = (1u32 << PRECISION_BITS) as f64;
        let q = k
            .iter()
            .map(|&v| if v < 0.0 { (-0.5 + v * one) as i32 } else { (0.5 + v * one) as i32 })
            .collect();
        start.push(lo);
        weights.push(q);
    }
    AxisCoeffs { start, weights }
}

/// Rounds a fixed-point accumulator (which started at one half) to u8, clamping.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes `img` to (out_w, out_h) with PIL's antialiased bilinear filter and returns only the
/// window `x0..x0+crop_w`, `y0..y0+crop_h` of the result (identical to resizing fully and cropping,
/// because each output pixel depends only on its own coordinates; much cheaper).
pub fn resize_bilinear_crop(
    img: &RgbImage,
    out_w: usize,
    out_h: usize,
    (x0, y0, crop_w, crop_h): (usize, usize, usize, usize),
) -> RgbImage {
    assert!(x0 + crop_w <= out_w && y0 + crop_h <= out_h, "crop window outside the resized image");
    let half = 1i32 << (PRECISION_BITS - 1);
    // Horizontal pass (skipped when the width does not change, as PIL skips it): rows y_lo..y_hi of
    // the input, the only ones the vertical pass reads.
    let vc = (out_h != img.height).then(|| axis_coeffs(img.height, out_h, y0..y0 + crop_h));
    let (y_lo, y_hi) = match &vc {
        Some(c) => {
            let lo = c.start[0];
            let hi = c.start.iter().zip(&c.weights).map(|(s, w)| s + w.len()).max().unwrap_or(lo);
            (lo, hi.max(lo + 1).min(img.height))
        }
        None => (y0, y0 + crop_h),
    };
    let rows = y_hi - y_lo;
    let mut tmp = vec![0u8; rows * crop_w * 3]; // (rows, crop_w, 3)
    if out_w != img.width {
        let hc = axis_coeffs(img.width, out_w, x0..x0 + crop_w);
        tmp.par_chunks_mut(crop_w * 3).enumerate().for_each(|(r, out_row)| {
            let src = &img.data[(y_lo + r) * img.width * 3..(y_lo + r + 1) * img.width * 3];
            for (o, px) in out_row.chunks_exact_mut(3).enumerate() {
                let s = hc.start[o];
                let mut acc = [half; 3];
                for (i, &k) in hc.weights[o].iter().enumerate() {
                    let p = &src[(s + i) * 3..(s + i) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += p[c] as i32 * k;
                    }
                }
                for c in 0..3 {
                    px[c] = clip8(acc[c]);
                }
            }
        });
    } else {
        for r in 0..rows {
            let src = &img.data[((y_lo + r) * img.width + x0) * 3..][..crop_w * 3];
            tmp[r * crop_w * 3..(r + 1) * crop_w * 3].copy_from_slice(src);
        }
    }
    // Vertical pass.
    let mut out = vec![0u8; crop_h * crop_w * 3];
    match &vc {
        Some(vc) => out.par_chunks_mut(crop_w * 3).enumerate().for_each(|(o, out_row)| {
            let s = vc.start[o] - y_lo;
            for (x, px) in out_row.iter_mut().enumerate() {
                let mut acc = half;
                for (i, &k) in vc.weights[o].iter().enumerate() {
                    acc += tmp[(s + i) * crop_w * 3 + x] as i32 * k;
                }
                *px = clip8(acc);
            }
        }),
        None => out.copy_from_slice(&tmp),
    }
    RgbImage { width: crop_w, height: crop_h, data: out }
}

/// torchvision's `Resize(256)` then `CenterCrop(224)` on an RGB image.
pub fn resize_center_crop(img: &RgbImage, shorter: usize, crop: usize) -> RgbImage {
    let (w, h) = resized_size(img.width, img.height, shorter);
    let (x0, y0) = (crop_offset(w, crop), crop_offset(h, crop));
    resize_bilinear_crop(img, w, h, (x0, y0, crop, crop))
}

/// `ToTensor` + `Normalize`: (H, W, 3) u8 -> (3, H, W) f32, `(v / 255 - mean[c]) / std[c]`, computed
/// in f32 in the same order as torch so the values agree to the last bit.
pub fn normalize_chw(img: &RgbImage) -> Vec<f32> {
    let hw = img.width * img.height;
    let mut out = vec![0.0f32; 3 * hw];
    for c in 0..3 {
        let plane = &mut out[c * hw..(c + 1) * hw];
        for (i, v) in plane.iter_mut().enumerate() {
            *v = (img.data[i * 3 + c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    out
}

/// The whole pipeline for one file: (3, 224, 224) f32.
pub fn preprocess_file(path: &Path) -> Result<Vec<f32>> {
    let img = load_rgb(path)?;
    Ok(normalize_chw(&resize_center_crop(&img, RESIZE_SHORTER, CROP)))
}

/// Preprocesses files in parallel (rayon); one result per path, in order.
pub fn preprocess_batch(paths: &[PathBuf]) -> Vec<Result<Vec<f32>>> {
    paths.par_iter().map(|p| preprocess_file(p)).collect()
}

/// Stacks preprocessed images, each (3, 224, 224), into one (N, 3, 224, 224) tensor.
pub fn stack(images: &[Vec<f32>]) -> Result<Tensor> {
    let per = 3 * CROP * CROP;
    let mut data = Vec::with_capacity(images.len() * per);
    for im in images {
        if im.len() != per {
            return Err(Error::shape(format!("image of {} values, expected {per}", im.len())));
        }
        data.extend_from_slice(im);
    }
    Tensor::from_vec(data, &[images.len(), 3, CROP, CROP])
}

/// Whether `p` has one of `IMAGE_EXTENSIONS` (case-insensitive).
pub fn has_image_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// Expands the command line's inputs: a file is taken as is (whatever its extension); a directory
/// contributes its non-hidden files with image extensions, sorted by name (not recursive). A missing
/// input or a directory without images is an error naming it.
pub fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|e| Error::io(input, e))?;
        if meta.is_dir() {
            let mut found = Vec::new();
            for entry in std::fs::read_dir(input).map_err(|e| Error::io(input, e))? {
                let p = entry.map_err(|e| Error::io(input, e))?.path();
                // Hidden files (e.g. macOS's "._x.jpg" resource forks in unpacked zips) are skipped.
                let hidden = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
                if !hidden && p.is_file() && has_image_extension(&p) {
                    found.push(p);
                }
            }
            if found.is_empty() {
                return Err(Error::format(
                    input,
                    format!("directory has no images (looked for .{})", IMAGE_EXTENSIONS.join(", .")),
                ));
            }
            found.sort();
            out.extend(found);
        } else {
            out.push(input.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random_image(w: usize, h: usize, seed: u64) -> RgbImage {
        let mut rng = Rng::new(seed);
        let data = (0..w * h * 3).map(|_| rng.below(256) as u8).collect();
        RgbImage { width: w, height: h, data }
    }

    #[test]
    fn output_size_follows_torchvision() {
        // Hand-computed: int(256 * 500 / 375) = 341; int(256 * 333 / 500)... shorter side is 333.
        assert_eq!(resized_size(500, 375, 256), (341, 256));
        assert_eq!(resized_size(333, 500, 256), (256, 384));
        assert_eq!(resized_size(1, 1, 256), (256, 256));
        // Python: round(0.5) == 0, round(1.5) == 2, round(2.5) == 2.
        assert_eq!(crop_offset(225, 224), 0);
        assert_eq!(crop_offset(227, 224), 2);
        assert_eq!(crop_offset(229, 224), 2);
        assert_eq!(crop_offset(256, 224), 16);
    }

    #[test]
    fn coefficients_sum_to_one_and_cover_the_support() {
        for (i, o) in [(1000, 256), (256, 256), (3, 256), (257, 256), (1, 256)] {
            let c = axis_coeffs(i, o, 0..o);
            for (s, w) in c.start.iter().zip(&c.weights) {
                let sum: i64 = w.iter().map(|&v| v as i64).sum();
                // Each quantised weight is off by at most 1/2 unit.
                assert!((sum - (1 << PRECISION_BITS)).abs() <= w.len() as i64, "{i}->{o}: {sum}");
                assert!(s + w.len() <= i);
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage { width: 37, height: 1000, data: vec![77; 37 * 1000 * 3] };
        let out = resize_center_crop(&img, 256, 224);
        assert!(out.data.iter().all(|&v| v == 77));
    }

    #[test]
    fn crop_window_equals_full_resize_then_crop() {
        let img = random_image(301, 211, 3);
        let (w, h) = resized_size(301, 211, 256);
        let full = resize_bilinear_crop(&img, w, h, (0, 0, w, h));
        let (x0, y0) = (crop_offset(w, 224), crop_offset(h, 224));
        let part = resize_bilinear_crop(&img, w, h, (x0, y0, 224, 224));
        for y in 0..224 {
            let a = &full.data[((y + y0) * w + x0) * 3..][..224 * 3];
            assert_eq!(a, &part.data[y * 224 * 3..(y + 1) * 224 * 3]);
        }
    }

    #[test]
    fn one_pixel_image_upsamples() {
        let img = RgbImage { width: 1, height: 1, data: vec![10, 20, 30] };
        let out = resize_center_crop(&img, 256, 224);
        assert_eq!((out.width, out.height), (224, 224));
        assert!(out.data.chunks(3).all(|p| p == [10, 20, 30]));
    }

    #[test]
    fn normalisation_matches_formula() {
        let img = RgbImage { width: 1, height: 1, data: vec![0, 128, 255] };
        let v = normalize_chw(&img);
        assert_eq!(v[0], -0.485 / 0.229);
        assert!((v[1] - (128.0 / 255.0 - 0.456) / 0.224).abs() < 1e-6);
        assert!((v[2] - (1.0 - 0.406) / 0.225).abs() < 1e-6);
    }

    #[test]
    fn size_limit_is_checked() {
        assert!(check_size(30000, 30000).is_err());
        assert!(check_size(10000, 10000).is_ok());
        assert!(check_size(0, 5).is_err());
        assert!(check_size(1, 1).is_ok());
    }

    #[test]
    fn colour_conversions_follow_the_documented_rules() {
        use image::{ImageBuffer, Luma, LumaA, Rgb, Rgba};
        let g16 = ImageBuffer::<Luma<u16>, _>::from_raw(2, 1, vec![0x12ff, 0xff00]).unwrap();
        assert_eq!(to_rgb(DynamicImage::ImageLuma16(g16)).data, [0x12, 0x12, 0x12, 0xff, 0xff, 0xff]);
        let rgba16 = ImageBuffer::<Rgba<u16>, _>::from_raw(1, 1, vec![0x0100, 0x02ff, 0x0380, 7]).unwrap();
        assert_eq!(to_rgb(DynamicImage::ImageRgba16(rgba16)).data, [1, 2, 3]);
        let la = ImageBuffer::<LumaA<u8>, _>::from_raw(1, 1, vec![9, 0]).unwrap();
        assert_eq!(to_rgb(DynamicImage::ImageLumaA8(la)).data, [9, 9, 9]);
        let rgba = ImageBuffer::<Rgba<u8>, _>::from_raw(1, 1, vec![4, 5, 6, 0]).unwrap();
        assert_eq!(to_rgb(DynamicImage::ImageRgba8(rgba)).data, [4, 5, 6]);
        let rgb = ImageBuffer::<Rgb<u8>, _>::from_raw(1, 1, vec![4, 5, 6]).unwrap();
        assert_eq!(to_rgb(DynamicImage::ImageRgb8(rgb)).data, [4, 5, 6]);
    }

    #[test]
    fn jpeg_truncation_is_detected_and_trailing_data_allowed() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/preprocess");
        for name in ["colour.jpg", "grey.jpg", "cmyk.jpg"] {
            let whole = std::fs::read(dir.join(name)).unwrap();
            assert!(jpeg_has_end(&whole), "{name}");
            // Data appended after EOI, full of scan and end markers, is ignored.
            let appended = [&whole[..], &[0xFF, 0xDA, 0, 4, 1, 2, 0xFF, 0xD9, 0xFF, 0xDA, 9, 9]].concat();
            assert!(jpeg_has_end(&appended), "{name} + trailing data");
            // Cut anywhere (headers, scan data, the last byte), it is truncated.
            for cut in [3, 20, 200, whole.len() / 3, whole.len() / 2, whole.len() - 2, whole.len() - 1] {
                assert!(!jpeg_has_end(&whole[..cut]), "{name} cut at {cut}");
            }
        }
    }
}
