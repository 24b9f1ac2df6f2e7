//! The `capgen` command line (contract: DESIGN.md section 4). Each subcommand lives in its own file;
//! errors come back as `crate::Error` and are printed as one line on stderr with a non-zero exit.

pub mod bench;
pub mod caption;
pub mod classify;
pub mod demo;
pub mod evaluate;
pub mod extract;
pub mod progress;
pub mod score;
pub mod synth;
pub mod train;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::error::Result;

#[derive(Parser, Debug)]
#[command(name = "capgen", version, about = "A from-scratch tensor engine and CNN-LSTM image captioner")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the largest variant (train's options) does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Synthetic world, end to end, no download.
    Demo(DemoArgs),
    /// Write a synthetic captioning set in Flickr8k layout.
    Synth(SynthArgs),
    /// Run an encoder over images and write their features to a safetensors file.
    Extract(ExtractArgs),
    /// Classify an image with a ResNet-50 (ImageNet classes).
    Classify(ClassifyArgs),
    /// Train a caption decoder on extracted features (or, with --fine-tune-encoder, with the encoder on images).
    Train(TrainArgs),
    /// Caption a split with a trained model and score it.
    Evaluate(EvaluateArgs),
    /// Caption image files.
    Caption(CaptionArgs),
    /// Score captions against references (BLEU-1..4, CIDEr-D, ROUGE-L).
    Score(ScoreArgs),
    /// Benchmark kernels and models.
    Bench(BenchArgs),
}

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long)]
    pub json: bool,
    #[arg(long)]
    pub quick: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// tuning aids: override the plan's epochs / images / image size / encoder width
    #[arg(long, hide = true)]
    pub epochs: Option<usize>,
    #[arg(long, hide = true)]
    pub images: Option<usize>,
    #[arg(long, hide = true)]
    pub image_size: Option<u32>,
    #[arg(long, hide = true)]
    pub width: Option<usize>,
    #[arg(long, hide = true)]
    pub batch: Option<usize>,
    #[arg(long, hide = true)]
    pub lr: Option<f32>,
}

#[derive(clap::Args, Debug)]
pub struct SynthArgs {
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1000)]
    pub images: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Args, Debug)]
pub struct ExtractArgs {
    /// resnet50 or vgg16
    #[arg(long)]
    pub encoder: String,
    /// pooled or grid
    #[arg(long)]
    pub layer: String,
    /// safetensors file with torchvision names, or `random` for seeded random weights
    #[arg(long)]
    pub weights: String,
    /// image files or directories
    #[arg(long, num_args = 1.., required = true)]
    pub images: Vec<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// carry on past unreadable images and list them at the end
    #[arg(long)]
    pub skip_bad: bool,
}

#[derive(clap::Args, Debug)]
pub struct ClassifyArgs {
    #[arg(long)]
    pub weights: String,
    #[arg(long)]
    pub image: PathBuf,
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    #[arg(long)]
    pub captions: PathBuf,
    /// extracted features (not with --fine-tune-encoder, which reads --images)
    #[arg(long)]
    pub features: Option<PathBuf>,
    #[arg(long)]
    pub split: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "attention")]
    pub decoder: String,
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[arg(long, default_value_t = 4e-4)]
    pub lr: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub resume: bool,
    /// longest caption in words (training truncates, validation generation stops there)
    #[arg(long, default_value_t = 30)]
    pub max_len: usize,
    /// words seen fewer times in the training captions become <unk>
    #[arg(long, default_value_t = 5)]
    pub min_count: usize,
    /// stop after this many epochs without a better validation BLEU-4 (0: never)
    #[arg(long, default_value_t = 5)]
    pub patience: usize,
    /// clip gradients to this global L2 norm (0: off)
    #[arg(long, default_value_t = 5.0)]
    pub clip: f32,
    /// weight of the doubly stochastic attention regulariser (attention decoder)
    #[arg(long, default_value_t = 1.0)]
    pub alpha_c: f32,
    #[arg(long, default_value_t = 512)]
    pub embed: usize,
    #[arg(long, default_value_t = 512)]
    pub hidden: usize,
    /// attention layer width (attention decoder)
    #[arg(long, default_value_t = 512)]
    pub att_dim: usize,
    /// caption file format (default: detected): kaggle, token, flickr30k, karpathy
    #[arg(long)]
    pub caption_format: Option<String>,
    /// testing aid: abort without writing anything after N optimiser steps (as if killed)
    #[arg(long, hide = true)]
    pub abort_after_steps: Option<u64>,
    /// dropout probability on the LSTM output before the output layer (0: off; 0.5 in Show-Attend-Tell)
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f32,
    /// start the decoder (and its vocabulary and sizes) from this trained model
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// also train the encoder's last blocks, from --images with --weights (attention decoder)
    #[arg(long)]
    pub fine_tune_encoder: bool,
    /// directory of the caption file's images (with --fine-tune-encoder)
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// torchvision-named encoder weights to fine-tune (with --fine-tune-encoder)
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// encoder to fine-tune: resnet18..resnet152, or basic|bottleneck:L1,L2,L3,L4:WIDTH
    #[arg(long, default_value = "resnet50")]
    pub encoder: String,
    /// encoder learning rate (with --fine-tune-encoder)
    #[arg(long, default_value_t = 1e-4)]
    pub encoder_lr: f32,
    /// residual blocks of the encoder trained, from the end (default: the last stage)
    #[arg(long)]
    pub fine_tune_blocks: Option<usize>,
    /// square image side for --fine-tune-encoder (resized shorter side: side * 256/224, then centre crop)
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
}

#[derive(clap::Args, Debug)]
pub struct EvaluateArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// extracted features of the images
    #[arg(long)]
    pub features: Option<PathBuf>,
    /// instead of --features: the images, run through the fine-tuned encoder inside the model
    #[arg(long)]
    pub images: Option<PathBuf>,
    #[arg(long)]
    pub captions: PathBuf,
    #[arg(long)]
    pub split: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub beam: usize,
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct CaptionArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// encoder weights (not needed for a model with a fine-tuned encoder inside)
    #[arg(long, default_value = "")]
    pub weights: String,
    #[arg(long, num_args = 1.., required = true)]
    pub image: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub beam: usize,
    #[arg(long)]
    pub attention_map: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    /// {"image id": ["caption", ...], ...}
    #[arg(long)]
    pub refs: PathBuf,
    /// [{"image_id": "...", "caption": "..."}, ...]
    #[arg(long)]
    pub hyps: PathBuf,
    /// coco (pycocoevalcap) or nltk (corpus_bleu)
    #[arg(long, default_value = "coco")]
    pub bleu: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// gemm, conv, resnet50, lstm or train-step
    pub what: String,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// worker threads (default: all cores)
    #[arg(long)]
    pub threads: Option<usize>,
    /// `bench gemm`: measure one square size
    #[arg(long)]
    pub size: Option<usize>,
    /// weights for model benches: a safetensors file or `random`
    #[arg(long, default_value = "random")]
    pub weights: String,
    /// one JSON object per measured case on stdout
    #[arg(long)]
    pub json: bool,
    /// timed repetitions per case
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// `bench resnet50`: also time every op inside the forward (per conv shape and method, summed
    /// over the blocks that share it; one more case per op with --json)
    #[arg(long)]
    pub layers: bool,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo(a) => demo::run(&a),
        Command::Synth(a) => synth::run(a),
        Command::Extract(a) => extract::run(&a),
        Command::Classify(a) => classify::run(&a),
        Command::Train(a) => train::run(&a),
        Command::Evaluate(a) => evaluate::run(&a),
        Command::Caption(a) => caption::run(&a),
        Command::Score(a) => score::run(&a),
        Command::Bench(a) => bench::run(&a),
    }
}

/// Parses arguments, runs, prints any error as one line; returns the process exit code.
///
/// The command runs ON a rayon worker (`install`), not on the main thread: every parallel kernel
/// called from outside the pool would otherwise hand its work over and put the caller to sleep
/// until it is done, a wake-up per call (ResNet-50 batch 1 forward on 2 cores: 54 -> 45 ms).
pub fn main() -> i32 {
    let cli = Cli::parse();
    let result = match rayon::ThreadPoolBuilder::new().stack_size(8 << 20).build() {
        Ok(pool) => pool.install(|| run(cli)),
        // No pool (e.g. threads cannot be spawned): run on this thread with the global one.
        Err(_) => run(cli),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
