//! The synthetic captioning world: small RGB scenes of one to three flat-coloured shapes on an
//! achromatic background, five captions per image from a small grammar, written in the Flickr8k
//! Kaggle layout so every reader and command that takes Flickr8k takes it too.
//!
//! ```text
//! DIR/Images/synth_000123.png   the scenes (96x96 RGB by default)
//! DIR/scenes.json               ground truth: every object's shape, colour, size and place
//! DIR/dataset_synth.json        Karpathy-style split (80/10/10) with raw captions and tokens
//! DIR/captions.txt              `image,caption` CSV, five captions per image (written last)
//! ```
//!
//! The world is designed so that a small CNN + LSTM trained from scratch can learn it, yet it is not
//! trivial:
//! - **Objects**: 5 shapes (circle, square, triangle, diamond, cross) x 6 saturated colours (red,
//!   green, blue, yellow, purple, orange) x 2 sizes (small: radius 0.075 of the image side, large:
//!   0.14; a clear 1.9x apart). Colours get a small per-channel jitter (±12), far below the distance
//!   between any two palette colours (≥ 80), so colour names are never ambiguous.
//! - **Places**: the image is a 3x3 grid. Each object sits near the centre of its own cell, and no
//!   two objects share a column, so "left of" is always well defined and the canonical (left to right)
//!   order of the objects is unambiguous. Placement is rejected and redrawn when two objects would
//!   overlap (centres closer than their summed radii + 1, or than 0.9 of their summed bounding
//!   radii), so each object's centre is always its own colour.
//! - **Backgrounds**: light or dark grey (the tone appears in some captions), plain, gradient, noise
//!   or stripes. Backgrounds are achromatic, so they never look like an object colour.
//! - **Captions**: the first of the five is canonical (objects left to right, primary words only:
//!   "a small red circle to the left of a large blue square"); the other four use different templates
//!   (relations, counts, background tone, position words) and sometimes synonyms (little / big, disk,
//!   block, rhombus, plus). Every caption names each object exactly once, colour before shape, so
//!   [`attribute_correct`] can check a caption against its scene. 54 words in all.
//!
//! Every image draws from its own seeded streams (`image/{i}`, `pixels/{i}`, `captions/{i}`), so
//! generation is parallel and the output is byte-identical for a given seed and size.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{json, Value};

use crate::data::split::{Split, DEFAULT_RATIOS};
use crate::data::tokenize::tokenize;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Default side of a scene, in pixels.
pub const DEFAULT_IMAGE_SIZE: u32 = 96;
/// Smallest side we draw: below this, small objects are a handful of pixels.
pub const MIN_IMAGE_SIZE: u32 = 32;
/// Captions per image (as in Flickr8k).
pub const CAPTIONS_PER_IMAGE: usize = 5;

/// The file names inside the output directory.
pub const IMAGES_DIR: &str = "Images";
pub const CAPTIONS_FILE: &str = "captions.txt";
pub const SPLIT_FILE: &str = "dataset_synth.json";
pub const SCENES_FILE: &str = "scenes.json";

// ---------------------------------------------------------------------------------------------
// The vocabulary of the world.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Diamond,
    Cross,
}

impl Shape {
    pub const ALL: [Shape; 5] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Diamond, Shape::Cross];

    /// The primary word (used in canonical captions and in scenes.json).
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Diamond => "diamond",
            Shape::Cross => "cross",
        }
    }

    /// Every word a caption may use for this shape (primary first).
    pub fn words(self) -> &'static [&'static str] {
        match self {
            Shape::Circle => &["circle", "disk"],
            Shape::Square => &["square", "block"],
            Shape::Triangle => &["triangle"],
            Shape::Diamond => &["diamond", "rhombus"],
            Shape::Cross => &["cross", "plus"],
        }
    }

    pub fn from_word(w: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|s| s.words().contains(&w))
    }

    /// Radius of the circle around the centre that contains the shape, as a multiple of `r`.
    fn bound(self) -> f32 {
        match self {
            Shape::Circle | Shape::Diamond => 1.0,
            Shape::Square => 0.85 * std::f32::consts::SQRT_2,
            Shape::Triangle => 1.15,
            Shape::Cross => 1.06,
        }
    }

    /// Whether the point (dx, dy) relative to the centre (y down) lies inside the shape of radius `r`.
    /// - circle: dx² + dy² ≤ r²
    /// - square: axis-aligned, half side 0.85 r (about the circle's area)
    /// - triangle: equilateral, pointing up, circumradius 1.15 r around its centroid: the base is at
    ///   dy = 0.575 r, the apex at dy = -1.15 r, and the half width at height dy is (dy + 1.15 r)/√3
    /// - diamond: |dx| + |dy| ≤ r (a square turned 45°)
    /// - cross: two bars of half length r and half width 0.33 r
    fn contains(self, dx: f32, dy: f32, r: f32) -> bool {
        match self {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs() <= 0.85 * r && dy.abs() <= 0.85 * r,
            Shape::Triangle => {
                let c = 1.15 * r;
                dy <= 0.5 * c && dx.abs() <= (dy + c) * (1.0 / 3f32.sqrt())
            }
            Shape::Diamond => dx.abs() + dy.abs() <= r,
            Shape::Cross => {
                let t = 0.33 * r;
                (dx.abs() <= r && dy.abs() <= t) || (dy.abs() <= r && dx.abs() <= t)
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

impl Colour {
    pub const ALL: [Colour; 6] =
        [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow, Colour::Purple, Colour::Orange];

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
        }
    }

    pub fn from_word(w: &str) -> Option<Colour> {
        Colour::ALL.into_iter().find(|c| c.name() == w)
    }

    /// The palette colour (before jitter). Every pair is at least 80 apart in RGB (L2), the jitter
    /// moves a channel by at most 12 (at most ~21 in L2), so the nearest palette colour of any object
    /// pixel is its own colour.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [215, 40, 40],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [45, 85, 225],
            Colour::Yellow => [235, 215, 40],
            Colour::Purple => [145, 60, 195],
            Colour::Orange => [245, 135, 25],
        }
    }

    /// The palette colour nearest to `px` (squared RGB distance), and that squared distance.
    pub fn nearest(px: [u8; 3]) -> (Colour, u32) {
        let d = |c: Colour| {
            let q = c.rgb();
            (0..3).map(|k| (px[k] as i32 - q[k] as i32).pow(2) as u32).sum::<u32>()
        };
        Colour::ALL.into_iter().map(|c| (c, d(c))).min_by_key(|&(_, dist)| dist).unwrap()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }

    pub fn words(self) -> &'static [&'static str] {
        match self {
            Size::Small => &["small", "little"],
            Size::Large => &["large", "big"],
        }
    }

    fn from_name(w: &str) -> Option<Size> {
        [Size::Small, Size::Large].into_iter().find(|s| s.name() == w)
    }

    /// Nominal radius as a fraction of the image side.
    fn fraction(self) -> f32 {
        match self {
            Size::Small => 0.075,
            Size::Large => 0.14,
        }
    }
}

/// Background brightness: the word some captions use ("on a dark background").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tone {
    Light,
    Dark,
}

impl Tone {
    pub fn name(self) -> &'static str {
        match self {
            Tone::Light => "light",
            Tone::Dark => "dark",
        }
    }
    fn from_name(w: &str) -> Option<Tone> {
        [Tone::Light, Tone::Dark].into_iter().find(|t| t.name() == w)
    }
}

/// Background texture (not named in captions; it is there for variety).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pattern {
    Plain,
    Gradient,
    Noise,
    Stripes,
}

impl Pattern {
    const ALL: [Pattern; 4] = [Pattern::Plain, Pattern::Gradient, Pattern::Noise, Pattern::Stripes];
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Plain => "plain",
            Pattern::Gradient => "gradient",
            Pattern::Noise => "noise",
            Pattern::Stripes => "stripes",
        }
    }
    fn from_name(w: &str) -> Option<Pattern> {
        Pattern::ALL.into_iter().find(|p| p.name() == w)
    }
}

const COLUMNS: [&str; 3] = ["left", "middle", "right"];
const ROWS: [&str; 3] = ["top", "middle", "bottom"];

/// One object of a scene. `x`, `y` (pixels, y down) is its centre, `radius` its nominal radius.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    pub x: f32,
    pub y: f32,
    pub radius: f32,
    /// Grid column 0..3 (left, middle, right); distinct across the objects of a scene.
    pub column: usize,
    /// Grid row 0..3 (top, middle, bottom).
    pub row: usize,
}

/// The ground truth of one image. Objects are stored left to right (the canonical order).
#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    pub filename: String,
    pub tone: Tone,
    pub pattern: Pattern,
    pub objects: Vec<Object>,
}

// ---------------------------------------------------------------------------------------------
// Drawing a scene.

/// Draws the content of the image called `filename` (objects and background kind) from `rng`.
/// Always terminates: see the comment on the rejection loop.
pub fn draw_scene(rng: &mut Rng, image_size: u32, max_objects: usize, filename: &str) -> Scene {
    let s = image_size as f32;
    // One object 30%, two 35%, three 35%; then capped at `max_objects` (1..=3).
    let k = match rng.below(20) {
        0..=5 => 1,
        6..=12 => 2,
        _ => 3,
    }
    .min(max_objects.clamp(1, 3));
    let tone = if rng.below(2) == 0 { Tone::Light } else { Tone::Dark };
    let pattern = Pattern::ALL[rng.below(4)];
    let mut columns = [0usize, 1, 2];
    rng.shuffle(&mut columns);
    let mut columns = columns[..k].to_vec();
    columns.sort_unstable();
    let kinds: Vec<(Shape, Colour)> =
        (0..k).map(|_| (Shape::ALL[rng.below(5)], Colour::ALL[rng.below(6)])).collect();
    let mut sizes: Vec<Size> =
        (0..k).map(|_| if rng.below(2) == 0 { Size::Small } else { Size::Large }).collect();
    let scales: Vec<f32> = (0..k).map(|_| rng.uniform(0.95, 1.1)).collect();
    let cell = s / 3.0;
    let jitter = 0.05 * s;
    // Rejection sampling of rows and jitter; after 40 failed tries the largest remaining large
    // object (rightmost first) is made small, which always fits (small objects in adjacent columns
    // are at least cell - 2 * jitter = 0.23 s apart > 0.9 * 2 * 1.2 * 0.0825 s).
    let mut tries = 0;
    loop {
        let objects: Vec<Object> = (0..k)
            .map(|j| {
                let (shape, colour) = kinds[j];
                let radius = sizes[j].fraction() * s * scales[j];
                let row = rng.below(3);
                let ext = radius * shape.bound().max(1.0) + 1.0;
                let x = ((columns[j] as f32 + 0.5) * cell + rng.uniform(-jitter, jitter)).clamp(ext, s - ext);
                let y = ((row as f32 + 0.5) * cell + rng.uniform(-jitter, jitter)).clamp(ext, s - ext);
                Object { shape, colour, size: sizes[j], x, y, radius, column: columns[j], row }
            })
            .collect();
        let apart = |a: &Object, b: &Object| {
            let d = ((a.x - b.x).powi(2) + (a.y - b.y).powi(2)).sqrt();
            d >= 0.9 * (a.radius * a.shape.bound() + b.radius * b.shape.bound())
                && d >= a.radius + b.radius + 1.0
        };
        let ok = (0..k).all(|i| (i + 1..k).all(|j| apart(&objects[i], &objects[j])));
        if ok {
            return Scene { filename: filename.to_string(), tone, pattern, objects };
        }
        tries += 1;
        if tries % 40 == 0 {
            if let Some(j) = (0..k).rev().find(|&j| sizes[j] == Size::Large) {
                sizes[j] = Size::Small;
            }
        }
    }
}

/// Renders a scene as `image_size`² RGB bytes (row-major, 3 bytes a pixel). Background texture and
/// colour jitter come from `rng`. Object edges are anti-aliased with 4x4 supersampling.
pub fn render(scene: &Scene, image_size: u32, rng: &mut Rng) -> Vec<u8> {
    let n = image_size as usize;
    let s = image_size as f32;
    // Background: a grey level per pixel (achromatic, so it never looks like an object colour).
    let base = match scene.tone {
        Tone::Light => rng.uniform(175.0, 215.0),
        Tone::Dark => rng.uniform(25.0, 70.0),
    };
    // A unit direction for gradients and stripes: horizontal, vertical or one of the diagonals.
    let (ux, uy) = match rng.below(4) {
        0 => (1.0, 0.0),
        1 => (0.0, 1.0),
        2 => (std::f32::consts::FRAC_1_SQRT_2, std::f32::consts::FRAC_1_SQRT_2),
        _ => (std::f32::consts::FRAC_1_SQRT_2, -std::f32::consts::FRAC_1_SQRT_2),
    };
    let amplitude = rng.uniform(12.0, 22.0);
    let period = rng.uniform(0.08, 0.16) * s;
    let mut grey = vec![base; n * n];
    for y in 0..n {
        for x in 0..n {
            let t = (x as f32 * ux + y as f32 * uy) / s; // roughly in [-0.7, 1.4]
            grey[y * n + x] += match scene.pattern {
                Pattern::Plain => 0.0,
                Pattern::Gradient => amplitude * (2.0 * t - 1.0),
                Pattern::Noise => rng.uniform(-amplitude, amplitude),
                Pattern::Stripes => {
                    if ((t * s / period).floor() as i64).rem_euclid(2) == 0 {
                        amplitude
                    } else {
                        -amplitude
                    }
                }
            };
        }
    }
    let mut rgb: Vec<f32> = grey.iter().flat_map(|&g| [g, g, g]).collect();
    // Objects: coverage by 4x4 subsamples, then blend the jittered colour over what is there.
    for o in &scene.objects {
        let base = o.colour.rgb();
        let col: Vec<f32> =
            (0..3).map(|k| (base[k] as f32 + rng.uniform(-12.0, 12.0)).clamp(0.0, 255.0)).collect();
        let ext = o.radius * o.shape.bound() + 1.0;
        let x0 = (o.x - ext).floor().max(0.0) as usize;
        let y0 = (o.y - ext).floor().max(0.0) as usize;
        let x1 = ((o.x + ext).ceil() as usize).min(n);
        let y1 = ((o.y + ext).ceil() as usize).min(n);
        for py in y0..y1 {
            for px in x0..x1 {
                let mut hits = 0;
                for sy in 0..4 {
                    for sx in 0..4 {
                        let dx = px as f32 + (sx as f32 + 0.5) / 4.0 - o.x;
                        let dy = py as f32 + (sy as f32 + 0.5) / 4.0 - o.y;
                        hits += o.shape.contains(dx, dy, o.radius) as u32;
                    }
                }
                if hits > 0 {
                    let a = hits as f32 / 16.0;
                    for k in 0..3 {
                        let v = &mut rgb[(py * n + px) * 3 + k];
                        *v = *v * (1.0 - a) + col[k] * a;
                    }
                }
            }
        }
    }
    rgb.iter().map(|&v| v.round().clamp(0.0, 255.0) as u8).collect()
}

// ---------------------------------------------------------------------------------------------
// Captions.

/// Where a single object is, as a phrase: "on the left", "at the top", "in the top right corner", ...
fn position_phrase(o: &Object, rng: &mut Rng) -> String {
    match (o.column, o.row) {
        (1, 1) => pick(rng, &["in the center", "in the middle"]).to_string(),
        (c, 1) => format!("on the {}", COLUMNS[c]),
        (1, r) => format!("at the {}", ROWS[r]),
        (c, r) => format!("in the {} {} corner", ROWS[r], COLUMNS[c]),
    }
}

fn canonical_position(o: &Object) -> String {
    match (o.column, o.row) {
        (1, 1) => "in the center".to_string(),
        (c, 1) => format!("on the {}", COLUMNS[c]),
        (1, r) => format!("at the {}", ROWS[r]),
        (c, r) => format!("in the {} {} corner", ROWS[r], COLUMNS[c]),
    }
}

fn pick<'a>(rng: &mut Rng, words: &[&'a str]) -> &'a str {
    words[rng.below(words.len())]
}

/// The primary words with probability 1 - `p_syn`, otherwise a synonym.
fn word<'a>(rng: &mut Rng, words: &[&'a str], p_syn: f32) -> &'a str {
    if words.len() > 1 && rng.next_f32() < p_syn {
        words[1 + rng.below(words.len() - 1)]
    } else {
        words[0]
    }
}

/// How an object is named: "small red circle" (no article). `sized` = false drops the size word.
fn noun_phrase(o: &Object, rng: &mut Rng, synonyms: bool, sized: bool) -> String {
    let p = if synonyms { 0.35 } else { 0.0 };
    let shape = word(rng, o.shape.words(), p);
    let colour = o.colour.name();
    if sized {
        format!("{} {colour} {shape}", word(rng, o.size.words(), p))
    } else {
        format!("{colour} {shape}")
    }
}

/// Five distinct captions for a scene. The first is canonical (objects left to right, primary words,
/// no synonyms); the other four come from four different templates, with synonyms now and then.
/// Every caption names each object once, its colour right before its shape word.
pub fn captions_for(scene: &Scene, rng: &mut Rng) -> Vec<String> {
    let o = &scene.objects;
    let tone = scene.tone.name();
    let np = |i: usize, rng: &mut Rng| noun_phrase(&o[i], rng, true, true);
    let canon = |i: usize| {
        let mut r = Rng::new(0);
        noun_phrase(&o[i], &mut r, false, true)
    };
    let things = |rng: &mut Rng| pick(rng, &["shapes", "objects"]).to_string();
    // Each template is a closure over the scene; they differ in fixed words, so no two templates can
    // produce the same string for one scene.
    type Template<'a> = Box<dyn Fn(&mut Rng) -> String + 'a>;
    let (first, mut rest): (String, Vec<Template>) = match o.len() {
        1 => (
            format!("a {} {}", canon(0), canonical_position(&o[0])),
            vec![
                Box::new(|r| format!("there is a {} {}", np(0, r), position_phrase(&o[0], r))),
                Box::new(|r| format!("a {} on a {tone} background", np(0, r))),
                Box::new(|r| {
                    format!("a {tone} background with a {} {}", np(0, r), position_phrase(&o[0], r))
                }),
                Box::new(|r| format!("a single {} {}", np(0, r), position_phrase(&o[0], r))),
                Box::new(|r| {
                    format!("a {} {}", noun_phrase(&o[0], r, true, false), position_phrase(&o[0], r))
                }),
                Box::new(|r| format!("{} there is a {}", position_phrase(&o[0], r), np(0, r))),
                Box::new(|r| format!("one {} on its own", np(0, r))),
            ],
        ),
        2 => {
            let mut t: Vec<Template> = vec![
                Box::new(|r| format!("a {} to the right of a {}", np(1, r), np(0, r))),
                Box::new(|r| format!("two {}: a {} and a {}", things(r), np(0, r), np(1, r))),
                Box::new(|r| format!("a {} and a {} on a {tone} background", np(0, r), np(1, r))),
                Box::new(|r| format!("a {} left of a {}", np(0, r), np(1, r))),
                Box::new(|r| {
                    format!(
                        "there are two {}: a {} on the left and a {} on the right",
                        things(r),
                        np(0, r),
                        np(1, r)
                    )
                }),
                Box::new(|r| format!("a {} next to a {}", np(0, r), np(1, r))),
            ];
            if o[0].row != o[1].row {
                let (up, down) = if o[0].row < o[1].row { (0, 1) } else { (1, 0) };
                t.push(Box::new(move |r| format!("a {} above a {}", np(up, r), np(down, r))));
                t.push(Box::new(move |r| format!("a {} below a {}", np(down, r), np(up, r))));
            }
            (format!("a {} to the left of a {}", canon(0), canon(1)), t)
        }
        _ => (
            format!("a {}, a {} and a {}", canon(0), canon(1), canon(2)),
            vec![
                Box::new(|r| {
                    format!("three {}: a {}, a {} and a {}", things(r), np(0, r), np(1, r), np(2, r))
                }),
                Box::new(|r| {
                    format!("from left to right: a {}, a {} and a {}", np(0, r), np(1, r), np(2, r))
                }),
                Box::new(|r| {
                    format!("a {} in the center between a {} and a {}", np(1, r), np(0, r), np(2, r))
                }),
                Box::new(|r| {
                    format!(
                        "a {} on the left, a {} in the middle and a {} on the right",
                        np(0, r),
                        np(1, r),
                        np(2, r)
                    )
                }),
                Box::new(|r| format!("a {} and a {} with a {} on the right", np(0, r), np(1, r), np(2, r))),
                Box::new(|r| {
                    format!(
                        "three {} on a {tone} background: a {}, a {} and a {}",
                        things(r),
                        np(0, r),
                        np(1, r),
                        np(2, r)
                    )
                }),
                Box::new(|r| format!("a {} to the right of a {} and a {}", np(2, r), np(0, r), np(1, r))),
            ],
        ),
    };
    rng.shuffle(&mut rest);
    let mut out = vec![first];
    out.extend(rest.iter().take(CAPTIONS_PER_IMAGE - 1).map(|t| t(rng)));
    debug_assert_eq!(out.iter().collect::<BTreeSet<_>>().len(), CAPTIONS_PER_IMAGE, "{out:?}");
    out
}

/// True when `caption` names every object of `scene` with its right colour and shape, and no other
/// object. A mention is a colour word followed (possibly after a size word) by a shape word
/// (synonyms count); the caption's mentions must equal the scene's objects as a multiset, in any
/// order. A shape without exactly one colour before it, or a colour without a shape after it, fails.
pub fn attribute_correct(caption: &str, scene: &Scene) -> bool {
    let mut mentions: Vec<(Colour, Shape)> = Vec::new();
    let mut colours: Vec<Colour> = Vec::new();
    for tok in tokenize(caption) {
        if let Some(c) = Colour::from_word(&tok) {
            colours.push(c);
        } else if let Some(s) = Shape::from_word(&tok) {
            if colours.len() != 1 {
                return false;
            }
            mentions.push((colours[0], s));
            colours.clear();
        }
    }
    if !colours.is_empty() {
        return false;
    }
    let mut want: Vec<(Colour, Shape)> = scene.objects.iter().map(|o| (o.colour, o.shape)).collect();
    mentions.sort_unstable();
    want.sort_unstable();
    mentions == want
}

// ---------------------------------------------------------------------------------------------
// Scenes file.

fn round2(v: f32) -> f64 {
    (v as f64 * 100.0).round() / 100.0
}

fn scene_json(s: &Scene) -> Value {
    let objects: Vec<Value> = s
        .objects
        .iter()
        .map(|o| {
            json!({
                "shape": o.shape.name(),
                "colour": o.colour.name(),
                "size": o.size.name(),
                "x": round2(o.x),
                "y": round2(o.y),
                "radius": round2(o.radius),
                "column": COLUMNS[o.column],
                "row": ROWS[o.row],
            })
        })
        .collect();
    json!({
        "filename": s.filename,
        "background": {"tone": s.tone.name(), "pattern": s.pattern.name()},
        "objects": objects,
    })
}

/// The share of `predictions` (image file name, generated caption) that pass [`attribute_correct`]
/// against their scene: the demo's attribute accuracy. An image without a scene is an error naming
/// it; no predictions gives 0.
pub fn attribute_accuracy<'a>(
    predictions: impl IntoIterator<Item = (&'a str, &'a str)>,
    scenes: &BTreeMap<String, Scene>,
) -> Result<f64> {
    let (mut right, mut total) = (0usize, 0usize);
    for (image, caption) in predictions {
        let scene = scenes
            .get(image)
            .ok_or_else(|| Error::msg(format!("{image}: no such image in the scenes file")))?;
        right += attribute_correct(caption, scene) as usize;
        total += 1;
    }
    Ok(if total == 0 { 0.0 } else { right as f64 / total as f64 })
}

/// Reads `scenes.json` back: image file name → its scene (objects left to right). Coordinates come
/// back rounded to 0.01 pixel.
pub fn load_scenes(path: impl AsRef<Path>) -> Result<BTreeMap<String, Scene>> {
    let path = path.as_ref();
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let v: Value =
        serde_json::from_slice(&bytes).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
    let images = v
        .get("images")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::format(path, "no `images` array (expected a capgen scenes.json)"))?;
    let mut out = BTreeMap::new();
    for (i, img) in images.iter().enumerate() {
        let bad = |what: &str| Error::format(path, format!("images[{i}]: {what}"));
        let str_field = |v: &Value, key: &str| -> Result<String> {
            v.get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(&format!("missing or non-string `{key}`")))
        };
        let num_field = |v: &Value, key: &str| -> Result<f32> {
            v.get(key)
                .and_then(Value::as_f64)
                .map(|x| x as f32)
                .ok_or_else(|| bad(&format!("missing or non-numeric `{key}`")))
        };
        let filename = str_field(img, "filename")?;
        let bg = img.get("background").ok_or_else(|| bad("missing `background`"))?;
        let tone_s = str_field(bg, "tone")?;
        let tone = Tone::from_name(&tone_s).ok_or_else(|| bad(&format!("unknown tone `{tone_s}`")))?;
        let pat_s = str_field(bg, "pattern")?;
        let pattern = Pattern::from_name(&pat_s).ok_or_else(|| bad(&format!("unknown pattern `{pat_s}`")))?;
        let objs =
            img.get("objects").and_then(Value::as_array).ok_or_else(|| bad("missing `objects` array"))?;
        let mut objects = Vec::with_capacity(objs.len());
        for o in objs {
            let shape_s = str_field(o, "shape")?;
            let colour_s = str_field(o, "colour")?;
            let size_s = str_field(o, "size")?;
            let col_s = str_field(o, "column")?;
            let row_s = str_field(o, "row")?;
            objects.push(Object {
                shape: Shape::ALL
                    .into_iter()
                    .find(|s| s.name() == shape_s)
                    .ok_or_else(|| bad(&format!("unknown shape `{shape_s}`")))?,
                colour: Colour::from_word(&colour_s)
                    .ok_or_else(|| bad(&format!("unknown colour `{colour_s}`")))?,
                size: Size::from_name(&size_s).ok_or_else(|| bad(&format!("unknown size `{size_s}`")))?,
                x: num_field(o, "x")?,
                y: num_field(o, "y")?,
                radius: num_field(o, "radius")?,
                column: COLUMNS
                    .iter()
                    .position(|c| *c == col_s)
                    .ok_or_else(|| bad(&format!("unknown column `{col_s}`")))?,
                row: ROWS
                    .iter()
                    .position(|r| *r == row_s)
                    .ok_or_else(|| bad(&format!("unknown row `{row_s}`")))?,
            });
        }
        if objects.is_empty() {
            return Err(bad("no objects"));
        }
        if out
            .insert(filename.clone(), Scene { filename: filename.clone(), tone, pattern, objects })
            .is_some()
        {
            return Err(bad(&format!("image {filename} listed twice")));
        }
    }
    if out.is_empty() {
        return Err(Error::format(path, "no scene in `images`"));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Writing a data set.

/// What to generate.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub out_dir: PathBuf,
    pub images: usize,
    pub seed: u64,
    /// Write into a non-empty directory (replacing our files there).
    pub force: bool,
    pub image_size: u32,
    /// At most this many objects per scene, 1..=3 (default 3): a difficulty knob for the demo.
    pub max_objects: usize,
}

impl SynthOptions {
    pub fn new(out_dir: impl Into<PathBuf>, images: usize, seed: u64, force: bool) -> Self {
        SynthOptions {
            out_dir: out_dir.into(),
            images,
            seed,
            force,
            image_size: DEFAULT_IMAGE_SIZE,
            max_objects: 3,
        }
    }
}

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthSummary {
    pub images: usize,
    pub captions: usize,
    /// Images in train / val / test.
    pub parts: [usize; 3],
    /// Distinct tokens over all captions.
    pub words: usize,
}

/// The file name of image `i`.
pub fn image_name(i: usize) -> String {
    format!("synth_{i:06}.png")
}

/// Generates a data set of `n_images` 96x96 scenes under `out_dir` (see the module docs).
pub fn generate(out_dir: impl AsRef<Path>, n_images: usize, seed: u64, force: bool) -> Result<SynthSummary> {
    generate_with(&SynthOptions::new(out_dir.as_ref(), n_images, seed, force), &|| {})
}

/// Like [`generate`], with every option; `progress` is called once per image written (from worker
/// threads).
pub fn generate_with(opts: &SynthOptions, progress: &(dyn Fn() + Sync)) -> Result<SynthSummary> {
    let dir = &opts.out_dir;
    if opts.images == 0 {
        return Err(Error::msg(format!("{}: --images must be at least 1", dir.display())));
    }
    if !(1..=3).contains(&opts.max_objects) {
        return Err(Error::msg(format!(
            "{}: at most {} objects per scene asked for; it must be 1, 2 or 3",
            dir.display(),
            opts.max_objects
        )));
    }
    if opts.image_size < MIN_IMAGE_SIZE {
        return Err(Error::msg(format!(
            "{}: image size {} is below the minimum of {MIN_IMAGE_SIZE}",
            dir.display(),
            opts.image_size
        )));
    }
    prepare_dir(dir, opts.force)?;
    let images_dir = dir.join(IMAGES_DIR);
    fs::create_dir_all(&images_dir).map_err(|e| Error::io(&images_dir, e))?;

    // Images first, each written atomically; the index files are written after all of them.
    let size = opts.image_size;
    let rows: Vec<(Scene, Vec<String>)> = (0..opts.images)
        .into_par_iter()
        .map(|i| {
            let name = image_name(i);
            let scene = draw_scene(
                &mut Rng::for_name(opts.seed, &format!("image/{i}")),
                size,
                opts.max_objects,
                &name,
            );
            let pixels = render(&scene, size, &mut Rng::for_name(opts.seed, &format!("pixels/{i}")));
            let caps = captions_for(&scene, &mut Rng::for_name(opts.seed, &format!("captions/{i}")));
            let path = images_dir.join(&name);
            let png = encode_png(&pixels, size).map_err(|e| Error::format(&path, e))?;
            write_atomic(&path, &png, false)?;
            progress();
            Ok((scene, caps))
        })
        .collect::<Result<_>>()?;
    remove_stale_images(&images_dir, opts.images)?;

    let names: Vec<String> = rows.iter().map(|(s, _)| s.filename.clone()).collect();
    let split = Split::by_ratio(names.iter(), DEFAULT_RATIOS, opts.seed)?;
    let part_of: HashMap<&str, &str> = [("train", &split.train), ("val", &split.val), ("test", &split.test)]
        .into_iter()
        .flat_map(|(p, v)| v.iter().map(move |n| (n.as_str(), p)))
        .collect();

    let mut words = BTreeSet::new();
    let mut karpathy = Vec::with_capacity(rows.len());
    let mut csv = String::from("image,caption\n");
    for (i, (scene, caps)) in rows.iter().enumerate() {
        let sentences: Vec<Value> = caps
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let tokens = tokenize(c);
                words.extend(tokens.iter().cloned());
                json!({"raw": c, "tokens": tokens, "imgid": i, "sentid": i * CAPTIONS_PER_IMAGE + k})
            })
            .collect();
        karpathy.push(json!({
            "filename": scene.filename,
            "imgid": i,
            "split": part_of[scene.filename.as_str()],
            "sentids": (0..caps.len()).map(|k| i * CAPTIONS_PER_IMAGE + k).collect::<Vec<_>>(),
            "sentences": sentences,
        }));
        for c in caps {
            csv.push_str(&scene.filename);
            csv.push(',');
            csv.push_str(&csv_quote(c));
            csv.push('\n');
        }
    }
    let scenes = json!({
        "image_size": size,
        "seed": opts.seed,
        "images": rows.iter().map(|(s, _)| scene_json(s)).collect::<Vec<_>>(),
    });
    let dataset = json!({"dataset": "synth", "images": karpathy});
    write_atomic(&dir.join(SCENES_FILE), to_json_bytes(&scenes).as_slice(), true)?;
    write_atomic(&dir.join(SPLIT_FILE), to_json_bytes(&dataset).as_slice(), true)?;
    // Last: a directory with a captions.txt is complete.
    write_atomic(&dir.join(CAPTIONS_FILE), csv.as_bytes(), true)?;
    Ok(SynthSummary {
        images: rows.len(),
        captions: rows.iter().map(|(_, c)| c.len()).sum(),
        parts: [split.train.len(), split.val.len(), split.test.len()],
        words: words.len(),
    })
}

/// Refuses a non-empty directory unless `force`; with `force`, first removes our index files so an
/// interrupted forced run cannot leave an old captions.txt describing new images.
fn prepare_dir(dir: &Path, force: bool) -> Result<()> {
    match fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err(Error::msg(format!("{}: exists and is not a directory", dir.display()))),
        Ok(_) => {
            let mut entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            if entries.next().is_some() {
                if !force {
                    return Err(Error::msg(format!(
                        "{}: directory is not empty; pass --force to write into it anyway",
                        dir.display()
                    )));
                }
                let ours = [CAPTIONS_FILE, SPLIT_FILE, SCENES_FILE];
                for p in ours.iter().flat_map(|f| [dir.join(f), dir.join(format!("{f}.tmp"))]) {
                    match fs::remove_file(&p) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(Error::io(&p, e)),
                    }
                }
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
        }
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// Removes `synth_NNNNNN.png` files from an earlier, larger run, and temporary files an interrupted
/// run left behind (only names we write; nothing else).
fn remove_stale_images(images_dir: &Path, n: usize) -> Result<()> {
    for entry in fs::read_dir(images_dir).map_err(|e| Error::io(images_dir, e))? {
        let entry = entry.map_err(|e| Error::io(images_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_tmp = name.starts_with("synth_") && name.ends_with(".png.tmp");
        let index = name
            .strip_prefix("synth_")
            .and_then(|r| r.strip_suffix(".png"))
            .filter(|d| d.len() >= 6 && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<usize>().ok());
        if is_tmp || index.is_some_and(|i| i >= n || image_name(i) != name) {
            fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
        }
    }
    Ok(())
}

/// Quotes a CSV field when it holds a comma or a quote (doubling the quotes).
fn csv_quote(s: &str) -> String {
    if s.contains([',', '"']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn to_json_bytes(v: &Value) -> Vec<u8> {
    let mut b = serde_json::to_vec(v).expect("serialising a JSON value cannot fail");
    b.push(b'\n');
    b
}

fn encode_png(rgb: &[u8], size: u32) -> std::result::Result<Vec<u8>, String> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(rgb, size, size, image::ExtendedColorType::Rgb8)
        .map_err(|e| format!("cannot encode PNG: {e}"))?;
    Ok(out)
}

/// Writes `bytes` to `path` via a temporary file in the same directory and a rename, so readers
/// never see a half-written file. `durable` also syncs the data to disk before the rename (for the
/// index files; the images skip it, as 2000 fsyncs would dominate the run time).
fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> Result<()> {
    let mut tmp_name = path.file_name().map(|f| f.to_os_string()).unwrap_or_default();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let res = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)
    })();
    res.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palette_colours_are_far_apart() {
        // The jitter is at most 12 per channel (≤ 21 in L2), so 80 leaves a wide margin.
        for a in Colour::ALL {
            for b in Colour::ALL {
                if a != b {
                    let (pa, pb) = (a.rgb(), b.rgb());
                    let d2: i32 = (0..3).map(|k| (pa[k] as i32 - pb[k] as i32).pow(2)).sum();
                    assert!(d2 >= 80 * 80, "{a:?} vs {b:?}: {}", (d2 as f64).sqrt());
                }
            }
        }
    }

    #[test]
    fn shapes_contain_their_centre_but_not_far_points() {
        for s in Shape::ALL {
            assert!(s.contains(0.0, 0.0, 10.0), "{s:?}");
            assert!(!s.contains(10.0 * s.bound() + 0.5, 0.0, 10.0), "{s:?}");
            assert!(!s.contains(0.0, 10.0 * s.bound() + 0.5, 10.0), "{s:?}");
        }
    }

    #[test]
    fn csv_quoting() {
        assert_eq!(csv_quote("a b"), "a b");
        assert_eq!(csv_quote("a, b"), "\"a, b\"");
        assert_eq!(csv_quote("a \"b\", c"), "\"a \"\"b\"\", c\"");
    }
}
