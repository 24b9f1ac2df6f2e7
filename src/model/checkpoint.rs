//! The model checkpoint: one self-describing safetensors file (DESIGN.md section 3, contract).
//!
//! Tensors: the decoder's parameters under their field names in `model::decoder` (`emb`, `w_h`, ...,
//! `fc_w`, `fc_b`), F32, shapes in PyTorch layouts (see [`param_shapes`]). Metadata (all strings):
//!
//! ```text
//! format    "capgen-captioner"
//! version   "1"
//! decoder   "show-tell" | "attention"
//! dims      {"vocab":V,"embed":E,"feat":D,"regions":L,"hidden":H,"att":A}
//! vocab     {"min_count":5,"words":["<pad>","<start>","<end>","<unk>",...]}   (data::vocab JSON)
//! max_len   longest generated caption in words (a generation default)
//! encoder   encoder of the features it was trained on (from the features file), "" if unknown
//! layer     "pooled" | "grid"
//! hyper     JSON object of the training hyper-parameters (informational only)
//! ```
//!
//! A model whose encoder was fine-tuned (`capgen train --fine-tune-encoder`) also holds the
//! encoder's torchvision state dict under `encoder.NAME` (see [`ENCODER_PREFIX`]), and its `hyper`
//! records the encoder config and preprocessing, so the file still describes the whole captioner.
//!
//! The training state (Adam moments, step, epoch, RNG, history) lives in a separate resume file
//! (`train::state`), so a model file holds nothing but the model.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::data::vocab::Vocab;
use crate::error::{Error, Result};
use crate::model::decoder::{AttentionParams, DecoderDims, ShowTellParams};
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::weights::{save_safetensors, TensorFile};

/// Prefix of the fine-tuned encoder's tensors in a model checkpoint.
pub const ENCODER_PREFIX: &str = "encoder.";

/// The `format` metadata value of a model checkpoint.
pub const FORMAT: &str = "capgen-captioner";
/// The `version` metadata value written (and the only one read).
pub const VERSION: &str = "1";

/// Which decoder a captioner uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecoderKind {
    /// Show and Tell: pooled features (D) initialise the LSTM.
    ShowTell,
    /// Show, Attend and Tell: soft attention over grid features (L, D).
    Attention,
}

impl DecoderKind {
    pub fn name(self) -> &'static str {
        match self {
            DecoderKind::ShowTell => "show-tell",
            DecoderKind::Attention => "attention",
        }
    }

    /// The features layer this decoder reads (`pooled` or `grid`).
    pub fn layer(self) -> &'static str {
        match self {
            DecoderKind::ShowTell => "pooled",
            DecoderKind::Attention => "grid",
        }
    }

    pub fn parse(s: &str) -> Result<DecoderKind> {
        match s {
            "show-tell" | "showtell" | "show_tell" => Ok(DecoderKind::ShowTell),
            "attention" | "show-attend-tell" => Ok(DecoderKind::Attention),
            _ => Err(Error::msg(format!("unknown decoder `{s}` (expected show-tell or attention)"))),
        }
    }
}

/// The parameters of either decoder.
#[derive(Clone, Debug, PartialEq)]
pub enum DecoderParams {
    ShowTell(ShowTellParams),
    Attention(AttentionParams),
}

impl DecoderParams {
    /// Zero-filled parameters of the right shapes.
    pub fn zeros(kind: DecoderKind, d: &DecoderDims) -> Self {
        match kind {
            DecoderKind::ShowTell => DecoderParams::ShowTell(ShowTellParams::zeros(d)),
            DecoderKind::Attention => DecoderParams::Attention(AttentionParams::zeros(d)),
        }
    }

    pub fn kind(&self) -> DecoderKind {
        match self {
            DecoderParams::ShowTell(_) => DecoderKind::ShowTell,
            DecoderParams::Attention(_) => DecoderKind::Attention,
        }
    }

    /// (name, values) in the decoder's fixed order.
    pub fn named(&self) -> Vec<(&'static str, &[f32])> {
        match self {
            DecoderParams::ShowTell(p) => p.named(),
            DecoderParams::Attention(p) => p.named(),
        }
    }

    /// Mutable views in the order of `named`.
    pub fn named_mut(&mut self) -> Vec<(&'static str, &mut [f32])> {
        match self {
            DecoderParams::ShowTell(p) => p.named_mut(),
            DecoderParams::Attention(p) => p.named_mut(),
        }
    }

    /// A zero copy (a gradient buffer).
    pub fn zeros_like(&self) -> Self {
        match self {
            DecoderParams::ShowTell(p) => DecoderParams::ShowTell(p.zeros_like()),
            DecoderParams::Attention(p) => DecoderParams::Attention(p.zeros_like()),
        }
    }

    pub fn zero(&mut self) {
        match self {
            DecoderParams::ShowTell(p) => p.zero(),
            DecoderParams::Attention(p) => p.zero(),
        }
    }
}

/// (name, shape) of every parameter of `kind` with `d`, in the order of `DecoderParams::named`.
pub fn param_shapes(kind: DecoderKind, d: &DecoderDims) -> Vec<(&'static str, Vec<usize>)> {
    let (v, e, f, h, a) = (d.vocab, d.embed, d.feat, d.hidden, d.att);
    let head =
        [("emb", vec![v, e]), ("w_h", vec![h, f]), ("b_h", vec![h]), ("w_c", vec![h, f]), ("b_c", vec![h])];
    let tail = |i: usize| {
        [
            ("w_ih", vec![4 * h, i]),
            ("w_hh", vec![4 * h, h]),
            ("b_ih", vec![4 * h]),
            ("b_hh", vec![4 * h]),
            ("fc_w", vec![v, h]),
            ("fc_b", vec![v]),
        ]
    };
    let mut out: Vec<(&'static str, Vec<usize>)> = head.into_iter().collect();
    match kind {
        DecoderKind::ShowTell => out.extend(tail(e)),
        DecoderKind::Attention => {
            out.extend([
                ("w_enc", vec![a, f]),
                ("b_enc", vec![a]),
                ("w_dec", vec![a, h]),
                ("b_dec", vec![a]),
                ("w_full", vec![1, a]),
                ("b_full", vec![1]),
                ("w_beta", vec![f, h]),
                ("b_beta", vec![f]),
            ]);
            out.extend(tail(e + f));
        }
    }
    out
}

/// A trained (or freshly initialised) caption decoder with its vocabulary.
#[derive(Clone, Debug, PartialEq)]
pub struct Captioner {
    pub dims: DecoderDims,
    pub params: DecoderParams,
    pub vocab: Vocab,
    /// Longest caption to generate, in words.
    pub max_len: usize,
    /// Encoder of the training features (`resnet50`, `vgg16`), empty when the features file did not say.
    pub encoder: String,
    /// Training hyper-parameters (informational; a JSON object).
    pub hyper: Value,
}

impl Captioner {
    pub fn kind(&self) -> DecoderKind {
        self.params.kind()
    }

    /// Seeded initialisation, as PyTorch's defaults and Show-Attend-Tell: the embedding and the
    /// output weights uniform(-0.1, 0.1), the output bias 0; every other weight and bias
    /// uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) (nn.Linear / nn.LSTM defaults; LSTM fan_in = H).
    /// Each tensor draws from its own stream `Rng::for_name(seed, "decoder/NAME")`.
    pub fn init(
        kind: DecoderKind,
        dims: DecoderDims,
        vocab: Vocab,
        max_len: usize,
        seed: u64,
    ) -> Result<Self> {
        if vocab.len() != dims.vocab {
            return Err(Error::shape(format!(
                "captioner: vocabulary of {} words but dims.vocab = {}",
                vocab.len(),
                dims.vocab
            )));
        }
        let mut params = DecoderParams::zeros(kind, &dims);
        let shapes = param_shapes(kind, &dims);
        for ((name, p), (_, shape)) in params.named_mut().into_iter().zip(&shapes) {
            let fan_in = match name {
                "w_h" | "w_c" | "w_enc" => dims.feat,
                "b_h" | "b_c" | "b_enc" => dims.feat,
                "w_dec" | "b_dec" | "w_beta" | "b_beta" => dims.hidden,
                "w_ih" | "w_hh" | "b_ih" | "b_hh" => dims.hidden,
                "w_full" | "b_full" => dims.att,
                _ => 0,
            };
            let bound = match name {
                "emb" | "fc_w" => 0.1,
                "fc_b" => 0.0,
                _ => 1.0 / (fan_in.max(1) as f32).sqrt(),
            };
            debug_assert_eq!(p.len(), shape.iter().product::<usize>());
            if bound > 0.0 {
                Rng::for_name(seed, &format!("decoder/{name}")).fill_uniform(p, -bound, bound);
            }
        }
        Ok(Captioner { dims, params, vocab, max_len, encoder: String::new(), hyper: json!({}) })
    }

    /// The metadata written with the tensors.
    fn metadata(&self) -> BTreeMap<String, String> {
        let d = &self.dims;
        let mut m = BTreeMap::new();
        m.insert("format".into(), FORMAT.into());
        m.insert("version".into(), VERSION.into());
        m.insert("decoder".into(), self.kind().name().into());
        m.insert(
            "dims".into(),
            json!({"vocab": d.vocab, "embed": d.embed, "feat": d.feat, "regions": d.regions,
                   "hidden": d.hidden, "att": d.att})
            .to_string(),
        );
        m.insert("vocab".into(), self.vocab.to_json_string());
        m.insert("max_len".into(), self.max_len.to_string());
        m.insert("encoder".into(), self.encoder.clone());
        m.insert("layer".into(), self.kind().layer().into());
        m.insert("hyper".into(), self.hyper.to_string());
        m
    }

    /// The parameters as (name, tensor) with their shapes.
    pub fn tensors(&self) -> Result<Vec<(&'static str, Tensor)>> {
        let shapes = param_shapes(self.kind(), &self.dims);
        self.params
            .named()
            .into_iter()
            .zip(shapes)
            .map(|((name, v), (_, shape))| Ok((name, Tensor::from_vec(v.to_vec(), &shape)?)))
            .collect()
    }

    /// Writes the checkpoint atomically (temp file + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors = self.tensors()?;
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        save_safetensors(path, &refs, &self.metadata())
    }

    /// Writes the checkpoint with a fine-tuned encoder's state dict (torchvision names) stored as
    /// `encoder.NAME`, atomically.
    pub fn save_with_encoder(&self, path: &Path, encoder: &[(String, Tensor)]) -> Result<()> {
        let tensors = self.tensors()?;
        let names: Vec<String> = encoder.iter().map(|(n, _)| format!("{ENCODER_PREFIX}{n}")).collect();
        let mut refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        refs.extend(names.iter().zip(encoder).map(|(n, (_, t))| (n.as_str(), t)));
        save_safetensors(path, &refs, &self.metadata())
    }

    /// The fine-tuned encoder stored in a checkpoint file (names without the prefix), if any; its
    /// `path` is the checkpoint's, so weight errors name that file.
    pub fn embedded_encoder(file: &TensorFile) -> Option<TensorFile> {
        let tensors: BTreeMap<String, Tensor> = file
            .tensors
            .iter()
            .filter_map(|(n, t)| n.strip_prefix(ENCODER_PREFIX).map(|k| (k.to_string(), t.clone())))
            .collect();
        (!tensors.is_empty()).then(|| TensorFile {
            path: file.path.clone(),
            tensors,
            metadata: BTreeMap::new(),
        })
    }

    /// Reads a checkpoint. Errors name the file: not a capgen checkpoint, unknown version or decoder,
    /// bad dims/vocab JSON, a missing, unexpected or misshapen tensor.
    pub fn load(path: &Path) -> Result<Captioner> {
        Self::from_file(&TensorFile::load(path)?)
    }

    /// Builds a captioner from an already-read file.
    pub fn from_file(file: &TensorFile) -> Result<Captioner> {
        let src = file.path.as_str();
        let meta = |key: &str| -> Result<&str> {
            file.metadata.get(key).map(String::as_str).ok_or_else(|| {
                Error::format(src, format!("not a capgen model checkpoint (no `{key}` in its metadata)"))
            })
        };
        if meta("format")? != FORMAT {
            return Err(Error::format(
                src,
                format!("not a capgen model checkpoint (format is `{}`)", meta("format")?),
            ));
        }
        if meta("version")? != VERSION {
            return Err(Error::format(
                src,
                format!(
                    "checkpoint version `{}` is not supported (this capgen reads {VERSION})",
                    meta("version")?
                ),
            ));
        }
        let kind = DecoderKind::parse(meta("decoder")?).map_err(|e| Error::format(src, e.to_string()))?;
        let dims_json: Value = serde_json::from_str(meta("dims")?)
            .map_err(|e| Error::format(src, format!("`dims` metadata is not valid JSON: {e}")))?;
        let dim = |k: &str| -> Result<usize> {
            dims_json
                .get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| Error::format(src, format!("`dims` metadata has no integer `{k}`")))
        };
        let dims = DecoderDims {
            vocab: dim("vocab")?,
            embed: dim("embed")?,
            feat: dim("feat")?,
            regions: dim("regions")?,
            hidden: dim("hidden")?,
            att: dim("att")?,
        };
        let vocab = Vocab::from_json_str(src, meta("vocab")?)?;
        if vocab.len() != dims.vocab {
            return Err(Error::format(
                src,
                format!("vocabulary has {} words but dims say {}", vocab.len(), dims.vocab),
            ));
        }
        let max_len = meta("max_len")?
            .parse::<usize>()
            .map_err(|_| Error::format(src, "`max_len` metadata is not a non-negative integer"))?;
        let encoder = file.metadata.get("encoder").cloned().unwrap_or_default();
        let hyper = match file.metadata.get("hyper") {
            Some(s) => serde_json::from_str(s)
                .map_err(|e| Error::format(src, format!("`hyper` metadata is not valid JSON: {e}")))?,
            None => json!({}),
        };
        let shapes = param_shapes(kind, &dims);
        let mut expected: Vec<(String, Vec<usize>)> =
            shapes.iter().map(|(n, s)| (n.to_string(), s.clone())).collect();
        // A fine-tuned encoder's tensors are checked when the encoder is built (`embedded_encoder`).
        expected.extend(
            file.tensors
                .iter()
                .filter(|(n, _)| n.starts_with(ENCODER_PREFIX))
                .map(|(n, t)| (n.clone(), t.dims().to_vec())),
        );
        file.check_exact(&expected, &format!("a {} decoder with dims {}", kind.name(), dims_json))?;
        let mut params = DecoderParams::zeros(kind, &dims);
        for ((name, p), (_, shape)) in params.named_mut().into_iter().zip(&shapes) {
            p.copy_from_slice(&file.require_f32(name, shape)?);
        }
        Ok(Captioner { dims, params, vocab, max_len, encoder, hyper })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(n: usize) -> Vocab {
        let caps: Vec<String> = (0..n).map(|i| format!("w{i}")).collect();
        Vocab::from_captions(caps.iter().map(String::as_str), 1)
    }

    #[test]
    fn shapes_match_zeros_for_both_decoders() {
        let d = DecoderDims { vocab: 7, embed: 3, feat: 5, regions: 4, hidden: 6, att: 2 };
        for kind in [DecoderKind::ShowTell, DecoderKind::Attention] {
            let p = DecoderParams::zeros(kind, &d);
            let shapes = param_shapes(kind, &d);
            assert_eq!(p.named().len(), shapes.len());
            for ((n, v), (m, s)) in p.named().iter().zip(&shapes) {
                assert_eq!(n, m);
                assert_eq!(v.len(), s.iter().product::<usize>(), "{n}");
            }
        }
    }

    #[test]
    fn init_checks_vocab_size() {
        let d = DecoderDims { vocab: 9, embed: 3, feat: 5, regions: 1, hidden: 6, att: 2 };
        assert!(Captioner::init(DecoderKind::ShowTell, d, vocab(3), 10, 0).is_err());
        let d = DecoderDims { vocab: 7, ..d };
        let c = Captioner::init(DecoderKind::ShowTell, d, vocab(3), 10, 0).unwrap();
        // fc_b starts at 0, everything else random (non-zero somewhere).
        for (n, v) in c.params.named() {
            if n == "fc_b" {
                assert!(v.iter().all(|&x| x == 0.0));
            } else {
                assert!(v.iter().any(|&x| x != 0.0), "{n}");
            }
        }
    }
}
