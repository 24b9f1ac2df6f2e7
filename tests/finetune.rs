//! `capgen train --fine-tune-encoder` end to end on a tiny synthetic set (64x64 scenes, one object
//! each) with a narrow ResNet (Basic [1,1,1,1], width 8) whose starting weights are written by our own
//! exporter (`TrainResNet::save`, torchvision names): the loss falls; frozen encoder tensors are
//! bit-identical afterwards and the trained ones moved; an interrupted run resumed with `--resume`
//! ends with the same weights as an uninterrupted one (dropout on, so its RNG state is exercised);
//! `capgen caption` uses the fine-tuned encoder stored in the model; bad input gives one-line errors
//! or warnings with counts.
//!
//! Plus the finite-difference check of the joint chain (`joint_chain_gradients_vs_f64_fd`): see its
//! comment for the method and tolerance.

mod common;
use common::fd::{check, dot, rnd, to64};
use common::*;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use capgen::data::synth::{self, SynthOptions};
use capgen::model::checkpoint::Captioner;
use capgen::nn::resnet::{BlockKind, ResNetConfig};
use capgen::nn::train_resnet::TrainResNet;
use capgen::train::finetune::FineTuneConfig;
use capgen::train::{state_path, train, TrainConfig};
use capgen::weights::TensorFile;

const ENCODER: &str = "basic:1,1,1,1:8";
const SIZE: usize = 64;

fn encoder_cfg() -> ResNetConfig {
    ResNetConfig { block: BlockKind::Basic, layers: [1, 1, 1, 1], width: 8, num_classes: 10 }
}

/// The synthetic set and the starting weights, made once per test process.
struct Fixture {
    data: PathBuf,
    weights: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tmp("finetune-fixture");
        let data = dir.join("data");
        let mut opts = SynthOptions::new(&data, 100, 7, false);
        opts.image_size = SIZE as u32;
        opts.max_objects = 1;
        synth::generate_with(&opts, &|| {}).unwrap();
        let weights = dir.join("start.safetensors");
        TrainResNet::random(&encoder_cfg(), 11).save(&weights).unwrap();
        Fixture { data, weights }
    })
}

fn config(out: &Path) -> TrainConfig {
    let f = fixture();
    let mut cfg = TrainConfig::new(f.data.join(synth::CAPTIONS_FILE), PathBuf::new(), out.to_path_buf());
    cfg.split = Some(f.data.join(synth::SPLIT_FILE));
    let mut ft = FineTuneConfig::new(f.data.join(synth::IMAGES_DIR), f.weights.clone());
    ft.encoder = ENCODER.into();
    ft.image_size = SIZE;
    ft.lr = 1e-3;
    cfg.fine_tune = Some(ft);
    cfg.epochs = 3;
    cfg.batch = 32;
    cfg.lr = 4e-3;
    cfg.min_count = 1;
    cfg.max_len = 12;
    cfg.embed = 16;
    cfg.hidden = 32;
    cfg.att = 16;
    cfg.patience = 0;
    cfg
}

fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let f = TensorFile::load(path).unwrap();
    f.tensors.iter().map(|(n, t)| (n.clone(), t.to_f32_vec())).collect()
}

#[test]
fn fine_tuning_learns_freezes_the_rest_and_captions() {
    let dir = tmp("finetune-learns");
    let out = dir.join("model.safetensors");
    let mut cfg = config(&out);
    cfg.epochs = 6;
    cfg.batch = 16;
    cfg.lr = 6e-3;
    let sum = train(&cfg).unwrap();
    let h = &sum.history;
    assert_eq!(h.len(), 6);
    // Mean train loss per epoch (nats/token): it must fall clearly, not drift.
    assert!(
        h[5].train_loss < 0.7 * h[0].train_loss,
        "loss {:?}",
        h.iter().map(|r| r.train_loss).collect::<Vec<_>>()
    );
    assert!(h[5].val_loss < h[0].val_loss, "val loss did not fall");

    // The model carries the fine-tuned encoder; default K = the last stage = layer4's one block.
    let file = TensorFile::load(&cfg.out).unwrap();
    let model = Captioner::from_file(&file).unwrap();
    assert!(model.hyper["fine_tuned_encoder"].is_object(), "{}", model.hyper);
    let enc = Captioner::embedded_encoder(&file).expect("an embedded encoder");
    let tuned = TrainResNet::from_tensor_file(&encoder_cfg(), &enc).unwrap();
    let start = TrainResNet::from_tensor_file(&encoder_cfg(), &TensorFile::load(&fixture().weights).unwrap())
        .unwrap();
    let (mut moved, mut kept) = (0, 0);
    for (a, b) in tuned.params.iter().zip(&start.params) {
        if a.name.starts_with("layer4.") {
            assert_ne!(a.data, b.data, "{} should have been trained", a.name);
            moved += 1;
        } else {
            // Bit-identical: compare the bits, not approximate values.
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.data), bits(&b.data), "{} is frozen", a.name);
            kept += 1;
        }
    }
    assert!(moved >= 6 && kept >= 20, "moved {moved}, kept {kept}");
    // Frozen batch-norm statistics everywhere, the trained blocks included.
    assert_eq!(tuned.stats, start.stats);

    // `capgen caption` with no --weights uses the encoder inside the model.
    let imgs = fixture().data.join(synth::IMAGES_DIR);
    let mut names: Vec<_> = std::fs::read_dir(&imgs).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    let (a, b) = (s(&names[0]).to_string(), s(&names[1]).to_string());
    let (rc, stdout, err) = capgen(&["caption", "--model", s(&cfg.out), "--image", &a, &b, "--beam", "2"]);
    assert_eq!(rc, 0, "caption failed: {err}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for (l, p) in lines.iter().zip([&a, &b]) {
        let cap = l.strip_prefix(&format!("{p}: ")).unwrap_or_else(|| panic!("{l}"));
        assert!(!cap.trim().is_empty(), "empty caption: {l}");
    }
    // With --weights too, a note says which encoder is used; the captions are the same.
    let (rc, stdout2, err) = capgen(&[
        "caption",
        "--model",
        s(&cfg.out),
        "--weights",
        s(&fixture().weights),
        "--image",
        &a,
        &b,
        "--beam",
        "2",
    ]);
    assert_eq!(rc, 0, "{err}");
    assert!(err.contains("fine-tuned encoder"), "{err}");
    assert_eq!(stdout, stdout2);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn resume_after_interruption_gives_the_same_weights() {
    let dir = tmp("finetune-resume");
    // Dropout on: its mask stream must be restored exactly too.
    let mut a = config(&dir.join("a.safetensors"));
    a.epochs = 2;
    a.dropout = 0.3;
    train(&a).unwrap();

    let mut b = config(&dir.join("b.safetensors"));
    b.epochs = 2;
    b.dropout = 0.3;
    // 400 training captions / 32 = 13 steps an epoch (the synth split has ~80 training images):
    // abort in the middle of epoch 2, after epoch 1's state was written.
    let per_epoch = train(&TrainConfig { epochs: 1, out: dir.join("probe.safetensors"), ..b.clone() })
        .map(|_| TensorFile::load(&state_path(&dir.join("probe.safetensors"))).unwrap())
        .unwrap()
        .metadata["adam_step"]
        .parse::<u64>()
        .unwrap();
    b.abort_after_steps = Some(per_epoch + per_epoch / 2);
    let e = train(&b).unwrap_err().to_string();
    assert!(e.contains("aborted"), "{e}");
    let mid = tensors(&state_path(&b.out));
    b.abort_after_steps = None;
    b.resume = true;
    train(&b).unwrap();

    let (ta, tb) = (tensors(&state_path(&a.out)), tensors(&state_path(&b.out)));
    assert_eq!(ta.len(), tb.len());
    assert!(ta.iter().any(|(n, _)| n.starts_with("enc_adam_m.layer4.")), "encoder moments in the state");
    for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert!(va == vb, "{na} differs after resume");
    }
    assert_ne!(mid, tb, "the resumed run must have trained on");
    assert_eq!(tensors(&a.out), tensors(&b.out), "best models differ");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_images_are_skipped_with_a_count() {
    let dir = tmp("finetune-missing");
    // A copy of the image directory without 5 of the images.
    let src = fixture().data.join(synth::IMAGES_DIR);
    let imgs = dir.join("Images");
    std::fs::create_dir_all(&imgs).unwrap();
    let mut names: Vec<_> = std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    for n in &names[5..] {
        std::fs::copy(src.join(n), imgs.join(n)).unwrap();
    }
    let mut cfg = config(&dir.join("m.safetensors"));
    cfg.epochs = 1;
    cfg.fine_tune.as_mut().unwrap().images = imgs;
    let sum = train(&cfg).unwrap();
    let warned: usize = sum
        .log
        .iter()
        .filter(|l| l.contains("have no image file"))
        .map(|l| l.split(": ").nth(2).unwrap().split(' ').next().unwrap().parse::<usize>().unwrap())
        .sum();
    // The 5 removed images are in the train or val part (or the unused test part).
    assert!(warned <= 5, "{:?}", sum.log);
    let test_part =
        capgen::data::split::read_karpathy(fixture().data.join(synth::SPLIT_FILE)).unwrap().split.test;
    let removed_used =
        names[..5].iter().filter(|n| !test_part.contains(&n.to_string_lossy().into_owned())).count();
    assert_eq!(warned, removed_used, "{:?}", sum.log);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_gives_one_line_errors() {
    let f = fixture();
    let dir = tmp("finetune-bad");
    let caps = f.data.join(synth::CAPTIONS_FILE);
    let split = f.data.join(synth::SPLIT_FILE);
    let imgs = f.data.join(synth::IMAGES_DIR);
    let out = dir.join("m.safetensors");
    let base = ["train", "--captions", s(&caps), "--split", s(&split), "--out", s(&out), "--epochs", "1"];
    let with = |extra: &[&str]| -> Vec<String> { base.iter().chain(extra).map(|x| x.to_string()).collect() };
    let run = |extra: &[&str], needles: &[&str]| {
        let args = with(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_one_line_error(&refs, needles);
    };
    run(&["--fine-tune-encoder", "--weights", s(&f.weights)], &["--images"]);
    run(&["--fine-tune-encoder", "--images", s(&imgs)], &["--weights"]);
    run(&["--images", s(&imgs), "--weights", s(&f.weights)], &["--fine-tune-encoder"]);
    // Weights of width 8 read as a width-16 net: names the file and what does not fit.
    run(
        &[
            "--fine-tune-encoder",
            "--images",
            s(&imgs),
            "--weights",
            s(&f.weights),
            "--encoder",
            "basic:1,1,1,1:16",
        ],
        &["start.safetensors", "wrong shape"],
    );
    run(
        &["--fine-tune-encoder", "--images", s(&imgs), "--weights", s(&f.weights), "--encoder", "resnet50"],
        &["start.safetensors"],
    );
    run(&["--fine-tune-encoder", "--images", s(&dir.join("nope")), "--weights", s(&f.weights)], &["nope"]);
    run(
        &[
            "--fine-tune-encoder",
            "--images",
            s(&imgs),
            "--weights",
            s(&f.weights),
            "--encoder",
            ENCODER,
            "--fine-tune-blocks",
            "9",
        ],
        &["--fine-tune-blocks 9"],
    );
    run(
        &[
            "--fine-tune-encoder",
            "--images",
            s(&imgs),
            "--weights",
            s(&f.weights),
            "--encoder",
            ENCODER,
            "--decoder",
            "show-tell",
        ],
        &["attention"],
    );
    run(&["--features", s(&f.weights), "--dropout", "1.5"], &["--dropout"]);
    // Images none of which exist under --images.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let args = with(&[
        "--fine-tune-encoder",
        "--images",
        s(&empty),
        "--weights",
        s(&f.weights),
        "--encoder",
        ENCODER,
    ]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (rc, _, err) = capgen(&refs);
    assert_ne!(rc, 0);
    assert!(!err.contains("panicked"), "{err}");
    // Warnings with counts for the training and validation parts, then the error.
    assert!(err.contains("training images have no image file"), "{err}");
    assert!(err.trim_end().lines().last().unwrap().contains("none of the"), "{err}");
    // caption without --weights for a model that holds no encoder.
    let plain = dir.join("plain.safetensors");
    let vocab = capgen::data::vocab::Vocab::from_captions(["a b"].into_iter(), 1);
    let d = capgen::model::decoder::DecoderDims {
        vocab: vocab.len(),
        embed: 2,
        feat: 4,
        regions: 1,
        hidden: 3,
        att: 2,
    };
    Captioner::init(capgen::model::checkpoint::DecoderKind::ShowTell, d, vocab, 5, 0)
        .unwrap()
        .save(&plain)
        .unwrap();
    let img = std::fs::read_dir(&imgs).unwrap().next().unwrap().unwrap().path();
    assert_one_line_error(&["caption", "--model", s(&plain), "--image", s(&img)], &["--weights"]);
    assert!(!out.exists(), "nothing written on bad input");
    std::fs::remove_dir_all(&dir).ok();
}
