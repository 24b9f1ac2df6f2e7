//! The training curve: a small raster plot drawn pixel by pixel with the `image` crate.
//!
//! Layout (640x400, white): a plot box with the epoch on x (1..N); on the left scale (0..max loss,
//! grey grid lines at each fifth) the train loss (blue) and validation loss (red); on the right scale
//! (0..max BLEU-4) the validation BLEU-4 (green). Each point has a small square marker. No text: the
//! colours are the legend, documented in the README.

use std::io::Cursor;
use std::path::Path;

use image::{ImageFormat, Rgb, RgbImage};

use crate::error::{Error, Result};
use crate::train::EpochRecord;
use crate::weights::write_atomic;

pub const WIDTH: u32 = 640;
pub const HEIGHT: u32 = 400;
const LEFT: i64 = 50;
const RIGHT: i64 = WIDTH as i64 - 50;
const TOP: i64 = 20;
const BOTTOM: i64 = HEIGHT as i64 - 40;

pub const TRAIN_COLOUR: Rgb<u8> = Rgb([31, 119, 180]);
pub const VAL_COLOUR: Rgb<u8> = Rgb([214, 39, 40]);
pub const BLEU_COLOUR: Rgb<u8> = Rgb([44, 160, 44]);
const AXIS: Rgb<u8> = Rgb([0, 0, 0]);
const GRID: Rgb<u8> = Rgb([220, 220, 220]);

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && x < img.width() as i64 && y < img.height() as i64 {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// Bresenham line, 2 pixels thick (the pixel below each point too).
fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        put(img, x, y, c);
        put(img, x, y + 1, c);
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

fn marker(img: &mut RgbImage, (x, y): (i64, i64), c: Rgb<u8>) {
    for dy in -2..=2 {
        for dx in -2..=2 {
            put(img, x + dx, y + dy, c);
        }
    }
}

/// Draws the curve of `history` (any length, including 0 or 1 epochs).
pub fn render(history: &[EpochRecord]) -> RgbImage {
    let mut img = RgbImage::from_pixel(WIDTH, HEIGHT, Rgb([255, 255, 255]));
    // Grid lines at each fifth of the height, then the axes (left, right, bottom).
    for k in 1..=5 {
        let y = BOTTOM - (BOTTOM - TOP) * k / 5;
        line(&mut img, (LEFT, y), (RIGHT, y), GRID);
    }
    line(&mut img, (LEFT, TOP), (LEFT, BOTTOM), AXIS);
    line(&mut img, (RIGHT, TOP), (RIGHT, BOTTOM), AXIS);
    line(&mut img, (LEFT, BOTTOM), (RIGHT, BOTTOM), AXIS);
    let n = history.len();
    // A tick per epoch (at most every pixel).
    let x_of = |i: usize| {
        if n <= 1 {
            (LEFT + RIGHT) / 2
        } else {
            LEFT + (RIGHT - LEFT) * i as i64 / (n as i64 - 1)
        }
    };
    for i in 0..n {
        line(&mut img, (x_of(i), BOTTOM), (x_of(i), BOTTOM + 4), AXIS);
    }
    let finite_max = |f: &dyn Fn(&EpochRecord) -> f64| {
        history.iter().map(f).filter(|v| v.is_finite()).fold(0.0f64, f64::max).max(1e-12)
    };
    let loss_max = finite_max(&|r| r.train_loss.max(r.val_loss)) * 1.05;
    let bleu_max = finite_max(&|r| r.bleu4) * 1.05;
    let y_of = |v: f64, max: f64| {
        let v = if v.is_finite() { v.clamp(0.0, max) } else { 0.0 };
        BOTTOM - ((BOTTOM - TOP) as f64 * v / max).round() as i64
    };
    type Series<'a> = (&'a dyn Fn(&EpochRecord) -> f64, f64, Rgb<u8>);
    let series: [Series; 3] = [
        (&|r| r.train_loss, loss_max, TRAIN_COLOUR),
        (&|r| r.val_loss, loss_max, VAL_COLOUR),
        (&|r| r.bleu4, bleu_max, BLEU_COLOUR),
    ];
    for (f, max, c) in series {
        let pts: Vec<(i64, i64)> =
            history.iter().enumerate().map(|(i, r)| (x_of(i), y_of(f(r), max))).collect();
        for w in pts.windows(2) {
            line(&mut img, w[0], w[1], c);
        }
        for &p in &pts {
            marker(&mut img, p, c);
        }
    }
    img
}

/// Renders and writes the curve PNG atomically.
pub fn write_curve(path: &Path, history: &[EpochRecord]) -> Result<()> {
    let img = render(history);
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .map_err(|e| Error::format(path, format!("cannot encode PNG: {e}")))?;
    write_atomic(path, &bytes)
}
