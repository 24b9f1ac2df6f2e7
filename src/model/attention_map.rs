//! Attention maps: a PNG grid of panels, one per generated word, each the (224x224 centre-cropped)
//! image dimmed where the word's attention is low, with the word written under the panel in a tiny
//! built-in 5x7 bitmap font (our own glyphs: a-z, 0-9, `<`, `>`, `-`, `'`).
//!
//! Overlay math, per panel: alpha (L) reshaped to a (S,S) grid (S = sqrt(L), 7 for 49 regions),
//! bilinearly upsampled to the panel (pixel centres, edges clamped), divided by its maximum so the
//! most attended region is 1: out = pixel * (0.25 + 0.75 * a).

use std::path::Path;

use crate::data::image::RgbImage;
use crate::error::{Error, Result};

/// Glyph rows (5 bits each, MSB = leftmost pixel), 7 rows per character.
fn glyph(c: char) -> Option<[u8; 7]> {
    Some(match c {
        'a' => [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x1E, 0x11, 0x11, 0x11, 0x1E],
        'c' => [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0F, 0x11, 0x11, 0x11, 0x0F],
        'e' => [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'g' => [0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'j' => [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0x00, 0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10],
        'q' => [0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x01],
        'r' => [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0x00, 0x00, 0x0F, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0x00, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'z' => [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '<' => [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02],
        '>' => [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '\'' => [0x04, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00],
        ' ' => [0; 7],
        _ => return None,
    })
}

/// Pixel scale of the font (each glyph pixel is SCALE x SCALE).
const SCALE: usize = 2;
/// Advance per character in font pixels (5 wide + 1 space).
const ADVANCE: usize = 6;
/// Height of the label strip under each panel.
const LABEL_H: usize = 7 * SCALE + 8;
/// Panels per row.
const COLUMNS: usize = 5;
/// Gap between panels.
const GAP: usize = 4;

/// Draws `text` (lower-cased; unknown characters as `?`-less blanks) in black at (x, y), clipped.
pub fn draw_text(img: &mut RgbImage, x: usize, y: usize, text: &str, color: [u8; 3]) {
    for (i, ch) in text.chars().flat_map(char::to_lowercase).enumerate() {
        let Some(g) = glyph(ch) else { continue };
        for (r, bits) in g.iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) == 0 {
                    continue;
                }
                for dy in 0..SCALE {
                    for dx in 0..SCALE {
                        let px = x + (i * ADVANCE + col) * SCALE + dx;
                        let py = y + r * SCALE + dy;
                        if px < img.width && py < img.height {
                            let o = (py * img.width + px) * 3;
                            img.data[o..o + 3].copy_from_slice(&color);
                        }
                    }
                }
            }
        }
    }
}

/// Bilinear upsampling of an (s,s) grid to (h,w), sampling at pixel centres with edges clamped.
pub fn upsample(grid: &[f32], s: usize, w: usize, h: usize) -> Vec<f32> {
    let mut out = vec![0.0; w * h];
    let coord = |o: usize, n: usize| {
        let c = ((o as f32 + 0.5) * s as f32 / n as f32 - 0.5).clamp(0.0, (s - 1) as f32);
        let i0 = c.floor() as usize;
        (i0, (i0 + 1).min(s - 1), c - i0 as f32)
    };
    for y in 0..h {
        let (y0, y1, fy) = coord(y, h);
        for x in 0..w {
            let (x0, x1, fx) = coord(x, w);
            let top = grid[y0 * s + x0] * (1.0 - fx) + grid[y0 * s + x1] * fx;
            let bot = grid[y1 * s + x0] * (1.0 - fx) + grid[y1 * s + x1] * fx;
            out[y * w + x] = top * (1.0 - fy) + bot * fy;
        }
    }
    out
}

/// The panel grid for one image: `words[k]` with attention `alphas[k*L..(k+1)*L]`.
pub fn render(image: &RgbImage, words: &[String], alphas: &[f32], regions: usize) -> Result<RgbImage> {
    let s = (regions as f64).sqrt().round() as usize;
    if s * s != regions || regions == 0 {
        return Err(Error::shape(format!("attention map: {regions} regions are not a square grid")));
    }
    if alphas.len() != words.len() * regions || words.is_empty() {
        return Err(Error::shape(format!(
            "attention map: {} attention values for {} words of {regions} regions",
            alphas.len(),
            words.len()
        )));
    }
    let (pw, ph) = (image.width, image.height);
    let cols = COLUMNS.min(words.len());
    let rows = words.len().div_ceil(cols);
    let (cw, chh) = (pw + GAP, ph + LABEL_H + GAP);
    let mut out = RgbImage { width: cols * cw + GAP, height: rows * chh + GAP, data: vec![] };
    out.data = vec![255; out.width * out.height * 3];
    for (k, word) in words.iter().enumerate() {
        let (x0, y0) = (GAP + (k % cols) * cw, GAP + (k / cols) * chh);
        let a = upsample(&alphas[k * regions..(k + 1) * regions], s, pw, ph);
        let max = a.iter().copied().fold(f32::MIN_POSITIVE, f32::max);
        for y in 0..ph {
            for x in 0..pw {
                let m = 0.25 + 0.75 * (a[y * pw + x] / max);
                for c in 0..3 {
                    let v = image.data[(y * pw + x) * 3 + c] as f32 * m;
                    out.data[((y0 + y) * out.width + x0 + x) * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
                }
            }
        }
        draw_text(&mut out, x0 + 2, y0 + ph + 4, word, [0, 0, 0]);
    }
    Ok(out)
}

/// Writes an RGB image as PNG, atomically.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    let buf = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data.clone())
        .ok_or_else(|| Error::msg("attention map: image buffer of the wrong size"))?;
    buf.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| Error::format(path, format!("cannot encode PNG: {e}")))?;
    crate::weights::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_promised_glyph_exists_and_is_distinct() {
        let chars: Vec<char> = ('a'..='z').chain('0'..='9').chain(['<', '>']).collect();
        let gs: Vec<[u8; 7]> = chars.iter().map(|&c| glyph(c).unwrap()).collect();
        for i in 0..gs.len() {
            assert!(gs[i].iter().all(|&r| r < 32), "{} wider than 5", chars[i]);
            assert!(gs[i].iter().any(|&r| r != 0), "{} blank", chars[i]);
            for j in 0..i {
                assert_ne!(gs[i], gs[j], "{} and {} look the same", chars[i], chars[j]);
            }
        }
    }

    #[test]
    fn upsample_keeps_constants_and_interpolates_between_centres() {
        assert!(upsample(&[0.3; 4], 2, 5, 3).iter().all(|&v| (v - 0.3).abs() < 1e-6));
        // 2 cells -> 4 pixels: centres of the cells at pixels 0.5 and 2.5 (clamped outside).
        let u = upsample(&[0.0, 1.0, 0.0, 1.0], 2, 4, 1);
        let want = [0.0, 0.25, 0.75, 1.0];
        for (a, b) in u.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{u:?}");
        }
    }

    #[test]
    fn render_dims_the_unattended_half() {
        let img = RgbImage { width: 14, height: 14, data: vec![200; 14 * 14 * 3] };
        // All attention on the left column of a 7x7 grid.
        let mut a = vec![0.0; 49];
        (0..7).for_each(|r| a[r * 7] = 1.0 / 7.0);
        let out = render(&img, &["a".into()], &a, 49).unwrap();
        let px = |x: usize, y: usize| out.data[((GAP + y) * out.width + GAP + x) * 3];
        assert_eq!(px(0, 7), 200);
        assert_eq!(px(13, 7), 50); // 200 * 0.25
        assert!(render(&img, &["a".into()], &a[..48], 48).is_err());
    }
}
