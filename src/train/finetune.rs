//! The encoder side of `capgen train --fine-tune-encoder`: a `TrainResNet` started from
//! torchvision-named weights, its last K pieces (residual blocks) trained together with the decoder
//! from images rather than cached features.
//!
//! One step, for a loader batch of R caption rows over U distinct images:
//! ```text
//! U image files -> decode + resize (shorter side) + centre crop + normalise, in parallel -> x (U,3,S,S)
//! x -> frozen pieces, forward only (eval-mode BN, nothing kept) -> trainable blocks (kept for backward)
//!   -> grid features (U,L,C) -> repeated per caption row (R,L,C) -> attention decoder forward/backward
//! dL/dfeats (R,L,C) summed over each image's rows (U,L,C) -> TrainResNet::backward (trainable blocks)
//! one global-norm clip over decoder and encoder gradients; Adam on each with its own learning rate
//! ```
//!
//! Batch-norm in the trainable blocks runs in eval mode (running statistics kept from the pretrained
//! weights, gamma and beta trained): caption batches hold a few dozen images of very correlated
//! content, too few for stable batch statistics, and eval mode keeps training and inference the same
//! function, as the usual fine-tuning recipes do.
//!
//! Default K: the last stage (layer4: 3 blocks of ResNet-50). It holds most of the task-specific
//! capacity (the grid features the decoder attends to) while costing only its own backward; earlier
//! stages hold generic edges and textures that captioning data this small would mostly overfit.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use rayon::prelude::*;
use serde_json::{json, Value};

use crate::cpu::adam::{Adam, AdamConfig};
use crate::data::image::{load_rgb, resize_center_crop, MEAN, STD};
use crate::error::{Error, Result};
use crate::nn::resnet::{BlockKind, ResNetConfig};
use crate::nn::train_resnet::{TrainCache, TrainResNet};
use crate::nn::FeatureLayer;
use crate::tensor::Tensor;
use crate::train::e2e::normalize;
use crate::weights::TensorFile;

/// Options of `--fine-tune-encoder`.
#[derive(Clone, Debug)]
pub struct FineTuneConfig {
    /// Directory the caption file's image names are relative to.
    pub images: PathBuf,
    /// Torchvision-named safetensors (or `.pth`) weights of the encoder to start from.
    pub weights: PathBuf,
    /// `resnet18` .. `resnet152`, or a narrow net `basic:L1,L2,L3,L4:WIDTH` / `bottleneck:...`.
    pub encoder: String,
    /// Residual blocks trained, counted from the end (the stem counts as one more piece); None: the
    /// last stage.
    pub blocks: Option<usize>,
    pub lr: f32,
    /// Square side the images are cropped to (224 for torchvision nets).
    pub image_size: usize,
}

impl FineTuneConfig {
    /// Defaults: ResNet-50 at 224, encoder learning rate 1e-4 (a quarter of the decoder's 4e-4, as
    /// in Show-Attend-Tell fine-tuning), the last stage trained.
    pub fn new(images: PathBuf, weights: PathBuf) -> Self {
        FineTuneConfig {
            images,
            weights,
            encoder: "resnet50".into(),
            blocks: None,
            lr: 1e-4,
            image_size: 224,
        }
    }
}

/// The shorter side images are resized to before the centre crop to `size`: torchvision's 256 for
/// 224, the same ratio otherwise.
pub fn resize_for(size: usize) -> usize {
    (size * 256 + 112) / 224
}

/// Parses `--encoder`: a torchvision name, or `basic|bottleneck:L1,L2,L3,L4:WIDTH` (narrow test nets).
/// `num_classes` is the length of the weights' `fc.bias` (the head is exported but never trained).
pub fn parse_encoder(spec: &str, num_classes: usize) -> Result<ResNetConfig> {
    if let Some(mut c) = ResNetConfig::by_name(spec) {
        c.num_classes = num_classes;
        return Ok(c);
    }
    let bad = || {
        Error::msg(format!(
            "--encoder `{spec}`: expected resnet18|resnet34|resnet50|resnet101|resnet152 or \
             basic|bottleneck:L1,L2,L3,L4:WIDTH (e.g. basic:1,1,1,1:16)"
        ))
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let [kind, layers, width] = parts[..] else { return Err(bad()) };
    let block = match kind {
        "basic" => BlockKind::Basic,
        "bottleneck" => BlockKind::Bottleneck,
        _ => return Err(bad()),
    };
    let layers: Vec<usize> = layers
        .split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| bad())?;
    let layers: [usize; 4] = layers.try_into().map_err(|_| bad())?;
    let width: usize = width.parse().map_err(|_| bad())?;
    if width == 0 || width > 4096 || layers.iter().any(|&l| l == 0 || l > 64) {
        return Err(bad());
    }
    Ok(ResNetConfig { block, layers, width, num_classes })
}

/// The trainable encoder, its optimiser and how it reads images.
pub struct ImageEncoder {
    pub net: TrainResNet,
    pub adam: Adam,
    pub dir: PathBuf,
    pub size: usize,
    pub resize: usize,
    /// Trained pieces, counted from the end.
    pub blocks: usize,
    /// Image names (as in the captions) whose files exist.
    pub available: BTreeSet<String>,
}

impl ImageEncoder {
    /// Loads the weights, freezes all but the last `cfg.blocks` pieces, freezes BN statistics, and
    /// lists which of `names` have an image file. Errors name the weights file or the directory.
    pub fn new(cfg: &FineTuneConfig, names: &BTreeSet<String>) -> Result<ImageEncoder> {
        if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
            return Err(Error::msg(format!("--encoder-lr {}: must be positive", cfg.lr)));
        }
        if cfg.image_size < 16 || cfg.image_size > 1024 {
            return Err(Error::msg(format!("--image-size {}: use 16 to 1024", cfg.image_size)));
        }
        match std::fs::metadata(&cfg.images) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(Error::format(&cfg.images, "--images must be a directory")),
            Err(e) => return Err(Error::io(&cfg.images, e)),
        }
        let file = TensorFile::load(&cfg.weights)?;
        let num_classes = file.get("fc.bias").map(|t| t.dims().iter().product()).ok_or_else(|| {
            Error::format(&cfg.weights, "has no `fc.bias`: not a torchvision ResNet state dict")
        })?;
        let rc = parse_encoder(&cfg.encoder, num_classes)?;
        let mut net = TrainResNet::from_tensor_file(&rc, &file)?;
        let last_stage = rc.layers[3];
        let blocks = cfg.blocks.unwrap_or(last_stage);
        if blocks == 0 || blocks > net.num_pieces() {
            return Err(Error::msg(format!(
                "--fine-tune-blocks {blocks}: {} has {} blocks plus the stem (use 1 to {})",
                rc.name(),
                net.num_pieces() - 1,
                net.num_pieces()
            )));
        }
        prepare(&mut net, blocks);
        let sizes: Vec<usize> = net.trainable_params().iter().map(|(_, p, _)| p.len()).collect();
        let adam = Adam::new(AdamConfig { lr: cfg.lr, ..AdamConfig::default() }, &sizes);
        let available: BTreeSet<String> =
            names.par_iter().filter(|n| cfg.images.join(n).is_file()).cloned().collect();
        Ok(ImageEncoder {
            net,
            adam,
            dir: cfg.images.clone(),
            size: cfg.image_size,
            resize: resize_for(cfg.image_size),
            blocks,
            available,
        })
    }

    /// (N,3,S,S): the images decoded and preprocessed in parallel.
    pub fn load(&self, names: &[String]) -> Result<Vec<f32>> {
        let parts: Vec<Vec<f32>> = names
            .par_iter()
            .map(|n| {
                let img = load_rgb(&self.dir.join(n))?;
                Ok(normalize(&resize_center_crop(&img, self.resize, self.size), MEAN, STD))
            })
            .collect::<Result<_>>()?;
        Ok(parts.concat())
    }

    /// Grid features (N,L,C) in eval mode.
    pub fn features_eval(&self, names: &[String]) -> Result<Vec<f32>> {
        let x = self.load(names)?;
        self.net.forward_eval(&x, names.len(), self.size, self.size, FeatureLayer::Grid)
    }

    /// Training forward of `names` (distinct images): grid features (N,L,C) and the cache.
    pub fn forward_train(&mut self, names: &[String]) -> Result<(Vec<f32>, TrainCache)> {
        let x = self.load(names)?;
        let (s, n) = (self.size, names.len());
        self.net.forward_train(&x, n, s, s, FeatureLayer::Grid)
    }

    /// (regions, channels) of the grid at this image size.
    pub fn grid_dims(&self) -> Result<(usize, usize)> {
        let s = self.size;
        let f = self.net.forward_eval(&vec![0.0; 3 * s * s], 1, s, s, FeatureLayer::Grid)?;
        let c = self.net.cfg.feature_dim();
        Ok((f.len() / c, c))
    }

    /// What a resume must find the same: architecture, trained pieces, image size and lr.
    pub fn describe(&self) -> String {
        json!({"encoder": self.net.cfg.name(), "blocks": self.blocks, "image_size": self.size,
               "resize": self.resize, "lr": self.adam.cfg.lr, "bn": "frozen"})
        .to_string()
    }

    /// The model's `hyper` entries that `capgen caption` reads (encoder config and preprocessing).
    pub fn hyper(&self) -> Value {
        let pre = crate::cli::demo::Preprocess {
            encoder: self.net.cfg.clone(),
            image_size: self.size,
            mean: MEAN,
            std: STD,
        };
        let mut h = pre.to_json();
        h["preprocess"]["resize"] = json!(self.resize);
        h["fine_tuned_encoder"] = json!({"blocks": self.blocks, "encoder_lr": self.adam.cfg.lr});
        h
    }

    /// Resume-state tensors: the whole state dict as `enc.NAME`, Adam moments of the trained
    /// parameters as `enc_adam_m.NAME` / `enc_adam_v.NAME`.
    pub fn state_tensors(&mut self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> =
            self.net.state_dict().into_iter().map(|(n, t)| (format!("enc.{n}"), t)).collect();
        let names: Vec<String> = self.net.trainable_params().iter().map(|(n, _, _)| n.to_string()).collect();
        for (k, name) in names.iter().enumerate() {
            let dims = self.net.param(name).expect("a trainable parameter").dims.clone();
            out.push((format!("enc_adam_m.{name}"), Tensor::from_vec(self.adam.m[k].clone(), &dims)?));
            out.push((format!("enc_adam_v.{name}"), Tensor::from_vec(self.adam.v[k].clone(), &dims)?));
        }
        Ok(out)
    }

    /// (name, shape) of every tensor `state_tensors` writes.
    pub fn state_shapes(&mut self) -> Vec<(String, Vec<usize>)> {
        let mut out: Vec<(String, Vec<usize>)> =
            self.net.state_dict().into_iter().map(|(n, t)| (format!("enc.{n}"), t.dims().to_vec())).collect();
        let names: Vec<String> = self.net.trainable_params().iter().map(|(n, _, _)| n.to_string()).collect();
        for name in names {
            let dims = self.net.param(&name).expect("a trainable parameter").dims.clone();
            out.push((format!("enc_adam_m.{name}"), dims.clone()));
            out.push((format!("enc_adam_v.{name}"), dims));
        }
        out
    }

    /// Restores weights, running statistics and Adam moments from a resume state (shapes already
    /// checked by the caller against `state_shapes`); `step` is the shared Adam step.
    pub fn restore(&mut self, file: &TensorFile, step: u64) -> Result<()> {
        let mut sd = BTreeMap::new();
        for (name, t) in self.net.state_dict() {
            sd.insert(name.clone(), file.require(&format!("enc.{name}"), t.dims())?.clone());
        }
        let f = TensorFile { path: file.path.clone(), tensors: sd, metadata: BTreeMap::new() };
        self.net = TrainResNet::from_tensor_file(&self.net.cfg, &f)?;
        prepare(&mut self.net, self.blocks);
        let names: Vec<String> = self.net.trainable_params().iter().map(|(n, _, _)| n.to_string()).collect();
        for (k, name) in names.iter().enumerate() {
            let dims = self.net.param(name).expect("a trainable parameter").dims.clone();
            self.adam.m[k] = file.require_f32(&format!("enc_adam_m.{name}"), &dims)?;
            self.adam.v[k] = file.require_f32(&format!("enc_adam_v.{name}"), &dims)?;
        }
        self.adam.t = step;
        Ok(())
    }
}

/// The fine-tuning setup of a freshly loaded net: the last `blocks` pieces trainable, BN statistics
/// frozen, frozen pieces folded for speed.
fn prepare(net: &mut TrainResNet, blocks: usize) {
    net.freeze_all_but_last(blocks);
    net.set_bn_frozen(true);
    net.fold_frozen();
}

/// Image names of `rows` deduplicated in first-seen order, and each row's index into them.
pub fn distinct(rows: &[String]) -> (Vec<String>, Vec<usize>) {
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    let mut names = Vec::new();
    let of_row = rows
        .iter()
        .map(|n| {
            *index.entry(n.as_str()).or_insert_with(|| {
                names.push(n.clone());
                names.len() - 1
            })
        })
        .collect();
    (names, of_row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoder_specs() {
        assert_eq!(parse_encoder("resnet50", 1000).unwrap(), ResNetConfig::resnet50());
        let c = parse_encoder("basic:1,1,1,1:8", 10).unwrap();
        assert_eq!(
            c,
            ResNetConfig { block: BlockKind::Basic, layers: [1, 1, 1, 1], width: 8, num_classes: 10 }
        );
        for bad in ["vgg16", "basic:1,1,1:8", "basic:1,1,1,1:0", "tiny:1,1,1,1:8", "basic:1,x,1,1:8"] {
            assert!(parse_encoder(bad, 10).is_err(), "{bad}");
        }
        assert_eq!(resize_for(224), 256);
    }

    #[test]
    fn distinct_keeps_first_seen_order() {
        let rows: Vec<String> = ["b", "a", "b", "c", "a"].iter().map(|s| s.to_string()).collect();
        let (names, of_row) = distinct(&rows);
        assert_eq!(names, vec!["b", "a", "c"]);
        assert_eq!(of_row, vec![0, 1, 0, 2, 1]);
    }
}
