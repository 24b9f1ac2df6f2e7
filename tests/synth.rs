//! The synthetic world (`capgen synth`): determinism, the files read back with the Flickr8k readers,
//! captions are grounded in the scenes and the pixels, and the bad-input rules.
//!
//! Expected values here come from the world's definition (palette, grid, grammar rules), never from
//! a run of the generator: e.g. the centre-pixel test decodes the written PNG and compares it to the
//! palette colour the scene names.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use capgen::data::captions::{read_captions, CaptionFormat};
use capgen::data::split::{read_karpathy, read_split};
use capgen::data::synth::{
    attribute_accuracy, attribute_correct, generate, generate_with, image_name, load_scenes, Colour, Scene,
    Shape, SynthOptions, CAPTIONS_FILE, IMAGES_DIR, SCENES_FILE, SPLIT_FILE,
};
use capgen::data::tokenize::tokenize;
use capgen::data::vocab::Vocab;

/// A fresh, empty scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("synth").join(name);
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(d.parent().unwrap()).unwrap();
    d
}

/// Every file under `dir`, relative path → bytes.
fn all_files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// One generated set shared by the read-back tests (generated once per test, it takes well under a
/// second in release).
fn world(name: &str, n: usize, seed: u64) -> (PathBuf, BTreeMap<String, Scene>) {
    let dir = scratch(name);
    let s = generate(&dir, n, seed, false).unwrap();
    assert_eq!(s.images, n);
    assert_eq!(s.captions, 5 * n);
    let scenes = load_scenes(dir.join(SCENES_FILE)).unwrap();
    assert_eq!(scenes.len(), n);
    (dir, scenes)
}

#[test]
fn same_seed_same_bytes_other_seed_other_data() {
    let a = scratch("det_a");
    let b = scratch("det_b");
    let c = scratch("det_c");
    generate(&a, 60, 7, false).unwrap();
    generate(&b, 60, 7, false).unwrap();
    generate(&c, 60, 8, false).unwrap();
    let (fa, fb, fc) = (all_files(&a), all_files(&b), all_files(&c));
    // 60 images + 3 index files, no temporary file left behind.
    assert_eq!(fa.len(), 63, "{:?}", fa.keys().collect::<Vec<_>>());
    assert!(fa.keys().all(|k| !k.to_string_lossy().ends_with(".tmp")));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (k, v) in &fa {
        assert!(v == &fb[k], "{} differs between two runs with the same seed", k.display());
    }
    assert_ne!(fa[Path::new(CAPTIONS_FILE)], fc[Path::new(CAPTIONS_FILE)]);
    let img0 = Path::new(IMAGES_DIR).join(image_name(0));
    assert_ne!(fa[&img0], fc[&img0]);
}

#[test]
fn captions_and_split_read_back_with_the_flickr_readers() {
    let n = 150;
    let (dir, scenes) = world("readback", n, 3);
    let (caps, report) = read_captions(dir.join(CAPTIONS_FILE), None).unwrap();
    assert_eq!(report.format, Some(CaptionFormat::KaggleCsv));
    assert!(report.is_clean(), "{:?}", report.warnings());
    assert_eq!(caps.len(), n);
    for (name, c) in &caps {
        assert_eq!(c.len(), 5, "{name}");
        assert!(dir.join(IMAGES_DIR).join(name).is_file(), "{name}");
        assert!(scenes.contains_key(name), "{name}");
    }
    // Captions with commas went through CSV quoting: three-object captions have them.
    assert!(caps.values().flatten().any(|c| c.contains(',')));

    let split = read_split(dir.join(SPLIT_FILE)).unwrap();
    assert_eq!((split.train.len(), split.val.len(), split.test.len()), (120, 15, 15));
    assert_eq!(split.duplicates, 0);
    let check = split.check(&caps);
    assert_eq!((check.missing, check.unassigned), ([0, 0, 0], 0));

    // The Karpathy file carries the same captions, and its tokens are the tokenizer's.
    let k = read_karpathy(dir.join(SPLIT_FILE)).unwrap();
    assert!(k.caption_report.is_clean(), "{:?}", k.caption_report.warnings());
    assert_eq!(k.captions, caps);
    let json: serde_json::Value = serde_json::from_slice(&fs::read(dir.join(SPLIT_FILE)).unwrap()).unwrap();
    for img in json["images"].as_array().unwrap() {
        for s in img["sentences"].as_array().unwrap() {
            let tokens: Vec<String> =
                s["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
            assert_eq!(tokens, tokenize(s["raw"].as_str().unwrap()));
        }
    }
}

#[test]
fn small_vocabulary_covered_at_min_count_5() {
    let (dir, _) = world("vocab", 200, 11);
    let (caps, _) = read_captions(dir.join(CAPTIONS_FILE), None).unwrap();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for c in caps.values().flatten() {
        for t in tokenize(c) {
            *counts.entry(t).or_default() += 1;
        }
    }
    assert!((40..=80).contains(&counts.len()), "{} words: {:?}", counts.len(), counts.keys());
    let rare: Vec<_> = counts.iter().filter(|(_, &n)| n < 5).collect();
    assert!(rare.is_empty(), "words seen fewer than 5 times in 200 images: {rare:?}");
    // A min-count-5 vocabulary therefore encodes every caption without <unk>.
    let vocab = Vocab::from_captions(caps.values().flatten().map(String::as_str), 5);
    let unk = vocab.id("<unk>");
    for c in caps.values().flatten() {
        for t in tokenize(c) {
            assert_ne!(vocab.id(&t), unk, "{t}");
        }
    }
}

#[test]
fn every_caption_names_exactly_its_scene_and_wrong_ones_fail() {
    let (dir, scenes) = world("attributes", 200, 5);
    let (caps, _) = read_captions(dir.join(CAPTIONS_FILE), None).unwrap();
    let mut counts = [0usize; 4];
    for (name, cs) in &caps {
        let scene = &scenes[name];
        counts[scene.objects.len()] += 1;
        for c in cs {
            assert!(attribute_correct(c, scene), "{name}: `{c}` vs {scene:?}");
        }
        // The first caption is canonical: objects named left to right with primary words.
        let named: Vec<(Colour, Shape)> = tokenize(&cs[0])
            .windows(3)
            .filter_map(|w| Some((Colour::from_word(&w[1])?, Shape::from_word(&w[2])?)))
            .collect();
        let want: Vec<(Colour, Shape)> = scene.objects.iter().map(|o| (o.colour, o.shape)).collect();
        assert_eq!(named, want, "{name}: `{}`", cs[0]);
        for w in scene.objects.windows(2) {
            assert!(w[0].x < w[1].x && w[0].column < w[1].column, "{name}: not left to right");
        }
        for o in &scene.objects {
            assert!(cs[0].contains(&format!("{} {} {}", o.size.name(), o.colour.name(), o.shape.name())));
        }

        // A wrong colour on one object fails.
        let o = &scene.objects[0];
        let other = Colour::ALL.iter().find(|&&c| c != o.colour).unwrap();
        let wrong = cs[0].replacen(
            &format!("{} {}", o.colour.name(), o.shape.name()),
            &format!("{} {}", other.name(), o.shape.name()),
            1,
        );
        assert_ne!(wrong, cs[0]);
        assert!(!attribute_correct(&wrong, scene), "{name}: `{wrong}`");
        // A wrong shape fails.
        let other_shape = Shape::ALL.iter().find(|&&s| s != o.shape).unwrap();
        let wrong = cs[0].replacen(o.shape.name(), other_shape.name(), 1);
        assert!(!attribute_correct(&wrong, scene), "{name}: `{wrong}`");
        // An extra object fails, and so does a missing one.
        assert!(!attribute_correct(&format!("{} and a small red cross", cs[0]), scene));
        let first_only = format!("a {} {}", o.colour.name(), o.shape.name());
        assert_eq!(attribute_correct(&first_only, scene), scene.objects.len() == 1, "{name}");
        // A colour without a shape, or a shape without a colour, fails.
        assert!(!attribute_correct(&format!("{} and a blue", cs[0]), scene));
        assert!(!attribute_correct(&format!("{} and a circle", cs[0]), scene));
    }
    // All scene sizes occur (1: 30%, 2 and 3: 35% each).
    assert!(counts[1] > 30 && counts[2] > 40 && counts[3] > 40, "{counts:?}");
}

#[test]
fn position_words_match_the_coordinates() {
    // Checked against the object centres in pixels (thirds of the 96-pixel image), not the grid
    // indices the generator used.
    let (dir, scenes) = world("positions", 200, 13);
    let (caps, _) = read_captions(dir.join(CAPTIONS_FILE), None).unwrap();
    let third = |v: f32| (v / 32.0).floor() as usize;
    let mut checked = [0usize; 3];
    for (name, cs) in &caps {
        let scene = &scenes[name];
        let o = &scene.objects;
        for c in cs {
            let t = tokenize(c);
            let has = |w: &str| t.iter().any(|x| x == w);
            let placed = ["left", "right", "top", "bottom", "center", "middle"].iter().any(|w| has(w));
            if o.len() == 1 && placed {
                // "left"/"right" only for the outer thirds, "top"/"bottom" likewise, "center" or
                // "middle" for the central cell.
                let central = third(o[0].x) == 1 && third(o[0].y) == 1;
                assert_eq!(has("center") || has("middle"), central, "{name}: `{c}` {:?}", o[0]);
                assert_eq!(has("left"), third(o[0].x) == 0, "{name}: `{c}` {:?}", o[0]);
                assert_eq!(has("right"), third(o[0].x) == 2, "{name}: `{c}` {:?}", o[0]);
                assert_eq!(has("top"), third(o[0].y) == 0, "{name}: `{c}` {:?}", o[0]);
                assert_eq!(has("bottom"), third(o[0].y) == 2, "{name}: `{c}` {:?}", o[0]);
                checked[0] += 1;
            }
            if o.len() == 2 && (has("above") || has("below")) {
                // "a A above a B" / "a A below a B": the first named object is higher / lower.
                let named: Vec<(Colour, Shape)> = t
                    .windows(2)
                    .filter_map(|w| Some((Colour::from_word(&w[0])?, Shape::from_word(&w[1])?)))
                    .collect();
                let first = if (o[0].colour, o[0].shape) == named[0] { &o[0] } else { &o[1] };
                let second = if std::ptr::eq(first, &o[0]) { &o[1] } else { &o[0] };
                if (o[0].colour, o[0].shape) != (o[1].colour, o[1].shape) {
                    assert_eq!(has("above"), first.y < second.y - 16.0, "{name}: `{c}` {o:?}");
                    assert_eq!(has("below"), first.y > second.y + 16.0, "{name}: `{c}` {o:?}");
                    checked[1] += 1;
                }
            }
            let left_of = t.windows(4).any(|w| w == ["to", "the", "left", "of"]);
            let right_of = t.windows(4).any(|w| w == ["to", "the", "right", "of"]);
            if o.len() == 2 && (left_of || right_of) && (o[0].colour, o[0].shape) != (o[1].colour, o[1].shape)
            {
                // "a A to the left of a B": A is the object with the smaller x; "right of" the other.
                let named: Vec<(Colour, Shape)> = t
                    .windows(2)
                    .filter_map(|w| Some((Colour::from_word(&w[0])?, Shape::from_word(&w[1])?)))
                    .collect();
                let (l, r) = if o[0].x < o[1].x { (&o[0], &o[1]) } else { (&o[1], &o[0]) };
                assert!(l.x + 16.0 < r.x, "{name}: {o:?}");
                let first = if left_of { l } else { r };
                assert_eq!(named[0], (first.colour, first.shape), "{name}: `{c}` {o:?}");
                checked[2] += 1;
            }
        }
    }
    assert!(checked.iter().all(|&n| n > 20), "{checked:?}");
}

#[test]
fn object_centres_have_their_colour_and_objects_do_not_overlap() {
    let (dir, scenes) = world("pixels", 120, 9);
    let mut seen_sizes = BTreeSet::new();
    for (name, scene) in &scenes {
        let img = image::open(dir.join(IMAGES_DIR).join(name)).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (96, 96), "{name}");
        for o in &scene.objects {
            let p = img.get_pixel(o.x.floor() as u32, o.y.floor() as u32).0;
            let (nearest, d2) = Colour::nearest(p);
            // The object is flat: its palette colour plus at most ±12 per channel (+1 rounding).
            assert_eq!(nearest, o.colour, "{name}: centre pixel {p:?} of {o:?}");
            assert!(d2 <= 3 * 13 * 13, "{name}: centre pixel {p:?} is {d2} from {:?}", o.colour.rgb());
            seen_sizes.insert(o.size);
            // Size words are grounded: small radius 0.075 x 96 = 7.2, large 0.14 x 96 = 13.4 (±10%).
            let nominal = match o.size.name() {
                "small" => 7.2,
                _ => 13.44,
            };
            assert!((o.radius / nominal - 1.0).abs() < 0.11, "{name}: {o:?}");
            // Inside the image, in its own grid cell's column.
            assert!(o.x > 0.0 && o.x < 96.0 && o.y > 0.0 && o.y < 96.0);
            assert_eq!((o.x / 32.0).floor() as usize, o.column, "{name}: {o:?}");
            assert_eq!((o.y / 32.0).floor() as usize, o.row, "{name}: {o:?}");
        }
        // No two objects closer than their radii (they may touch at the corners of squares only).
        for (i, a) in scene.objects.iter().enumerate() {
            for b in &scene.objects[i + 1..] {
                let d = ((a.x - b.x).powi(2) + (a.y - b.y).powi(2)).sqrt();
                assert!(d > a.radius + b.radius, "{name}: {a:?} and {b:?} overlap");
            }
        }
        // The background is grey, so a corner pixel far from every object is achromatic.
        let far = [(0u32, 0u32), (95, 0), (0, 95), (95, 95)].into_iter().find(|&(x, y)| {
            scene.objects.iter().all(|o| ((o.x - x as f32).powi(2) + (o.y - y as f32).powi(2)).sqrt() > 25.0)
        });
        if let Some((x, y)) = far {
            let p = img.get_pixel(x, y).0;
            assert!(p[0] == p[1] && p[1] == p[2], "{name}: background pixel {p:?} at ({x},{y}) is not grey");
        }
    }
    assert_eq!(seen_sizes.len(), 2);
}

#[test]
fn non_empty_dir_refused_unless_force() {
    let dir = scratch("force");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("notes.txt"), b"mine").unwrap();
    let err = generate(&dir, 10, 1, false).unwrap_err().to_string();
    assert!(err.contains(&dir.display().to_string()) && err.contains("--force"), "{err}");
    assert!(!err.contains('\n'), "{err}");
    assert!(!dir.join(CAPTIONS_FILE).exists() && !dir.join(IMAGES_DIR).exists());

    // --force writes, leaves the user's own file alone; a smaller forced run drops the old images.
    generate(&dir, 30, 1, true).unwrap();
    generate(&dir, 20, 2, true).unwrap();
    assert_eq!(fs::read(dir.join("notes.txt")).unwrap(), b"mine");
    assert_eq!(fs::read_dir(dir.join(IMAGES_DIR)).unwrap().count(), 20);
    let (caps, report) = read_captions(dir.join(CAPTIONS_FILE), None).unwrap();
    assert!(report.is_clean());
    assert_eq!(caps.len(), 20);
    // Temporary files of an interrupted run are cleaned up by a forced run (an index the new run does
    // not write, so only the cleanup can remove it).
    fs::write(dir.join(IMAGES_DIR).join("synth_000099.png.tmp"), b"half").unwrap();
    generate(&dir, 20, 2, true).unwrap();
    assert!(!dir.join(IMAGES_DIR).join("synth_000099.png.tmp").exists());
    // And the result is the same as a fresh run with that seed.
    let fresh = scratch("force_fresh");
    generate(&fresh, 20, 2, false).unwrap();
    assert_eq!(fs::read(dir.join(CAPTIONS_FILE)).unwrap(), fs::read(fresh.join(CAPTIONS_FILE)).unwrap());
}

#[test]
fn bad_arguments_are_clear_errors() {
    let dir = scratch("zero");
    let err = generate(&dir, 0, 1, false).unwrap_err().to_string();
    assert!(err.contains("--images"), "{err}");
    let mut opts = SynthOptions::new(scratch("tiny"), 5, 1, false);
    opts.image_size = 8;
    let err = generate_with(&opts, &|| {}).unwrap_err().to_string();
    assert!(err.contains("image size 8"), "{err}");
    let mut opts = SynthOptions::new(scratch("many"), 5, 1, false);
    opts.max_objects = 4;
    let err = generate_with(&opts, &|| {}).unwrap_err().to_string();
    assert!(err.contains("1, 2 or 3"), "{err}");
    // A file where the directory should be.
    let file = scratch("a_file");
    fs::write(&file, b"x").unwrap();
    let err = generate(&file, 5, 1, true).unwrap_err().to_string();
    assert!(err.contains("not a directory"), "{err}");
}

#[test]
fn load_scenes_rejects_bad_files() {
    let dir = scratch("bad_scenes");
    fs::create_dir_all(&dir).unwrap();
    let p = dir.join("scenes.json");
    for (content, want) in [
        ("not json", "not valid JSON"),
        ("{}", "no `images` array"),
        (r#"{"images": []}"#, "no scene"),
        (
            r#"{"images": [{"filename": "a.png", "background": {"tone": "dark", "pattern": "plain"},
                "objects": [{"shape": "hexagon", "colour": "red", "size": "small", "x": 1, "y": 1,
                             "radius": 7, "column": "left", "row": "top"}]}]}"#,
            "unknown shape `hexagon`",
        ),
    ] {
        fs::write(&p, content).unwrap();
        let err = load_scenes(&p).unwrap_err().to_string();
        assert!(err.contains("scenes.json") && err.contains(want), "{err}");
    }
    let err = load_scenes(dir.join("missing.json")).unwrap_err().to_string();
    assert!(err.contains("missing.json"), "{err}");
}

#[test]
fn cli_synth_writes_and_refuses() {
    let exe = env!("CARGO_BIN_EXE_capgen");
    let dir = scratch("cli");
    let out = Command::new(exe)
        .args(["synth", "--out", dir.to_str().unwrap(), "--images", "12", "--seed", "4"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("wrote 12 images and 60 captions"), "{stdout}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");

    // Again into the now non-empty directory: refused, one line on stderr, non-zero exit.
    let out =
        Command::new(exe).args(["synth", "--out", dir.to_str().unwrap(), "--images", "12"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");

    let out = Command::new(exe)
        .args(["synth", "--out", dir.to_str().unwrap(), "--images", "12", "--force"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let out =
        Command::new(exe).args(["synth", "--out", dir.to_str().unwrap(), "--images", "0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--images must be at least 1"));
}

#[test]
fn attribute_accuracy_counts_correct_captions() {
    let (dir, scenes) = world("accuracy", 20, 17);
    let (caps, _) = read_captions(dir.join(CAPTIONS_FILE), None).unwrap();
    // Every image's own first caption: all correct. Each image given the next image's caption: only
    // those whose (colour, shape) multisets happen to agree, which the scenes tell us independently.
    let names: Vec<&String> = caps.keys().collect();
    let own: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), caps[*n][0].as_str())).collect();
    assert_eq!(attribute_accuracy(own, &scenes).unwrap(), 1.0);
    let key = |s: &Scene| {
        let mut v: Vec<(Colour, Shape)> = s.objects.iter().map(|o| (o.colour, o.shape)).collect();
        v.sort();
        v
    };
    let shifted: Vec<(&str, &str)> = (0..names.len())
        .map(|i| (names[i].as_str(), caps[names[(i + 1) % names.len()]][0].as_str()))
        .collect();
    let same = (0..names.len())
        .filter(|&i| key(&scenes[names[i]]) == key(&scenes[names[(i + 1) % names.len()]]))
        .count();
    let acc = attribute_accuracy(shifted, &scenes).unwrap();
    assert!((acc - same as f64 / names.len() as f64).abs() < 1e-12, "{acc} vs {same}");
    assert!(acc < 0.5);
    let err = attribute_accuracy([("nope.png", "a red circle")], &scenes).unwrap_err().to_string();
    assert!(err.contains("nope.png"), "{err}");
}

#[test]
fn options_image_size_and_max_objects() {
    let mut opts = SynthOptions::new(scratch("options"), 40, 2, false);
    opts.image_size = 64;
    opts.max_objects = 2;
    generate_with(&opts, &|| {}).unwrap();
    let scenes = load_scenes(opts.out_dir.join(SCENES_FILE)).unwrap();
    assert!(scenes.values().all(|s| (1..=2).contains(&s.objects.len())));
    assert!(scenes.values().any(|s| s.objects.len() == 2));
    for (name, scene) in &scenes {
        let img = image::open(opts.out_dir.join(IMAGES_DIR).join(name)).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (64, 64));
        for o in &scene.objects {
            let p = img.get_pixel(o.x.floor() as u32, o.y.floor() as u32).0;
            assert_eq!(Colour::nearest(p).0, o.colour, "{name}: {o:?}");
        }
    }
}
