//! Reading and writing weights: safetensors (our own reader/writer, so every error names the file
//! and the problem precisely), torchvision state-dict names, and seeded random weights.

pub mod random;

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The tensors (and string metadata) of one safetensors file.
#[derive(Debug, Default)]
pub struct TensorFile {
    /// The file's path as given, for error messages.
    pub path: String,
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: BTreeMap<String, String>,
}

impl TensorFile {
    /// Reads a whole safetensors file. Every defect (missing file, truncated, header length past the
    /// end, bad JSON, unknown dtype, offsets out of range or overlapping) is one `Error` naming the file.
    pub fn load(path: &Path) -> Result<TensorFile> {
        Err(Error::format(path, "safetensors reading is not implemented yet"))
    }

    /// The tensor `name`, which must have exactly `dims`; the error names the file and the tensor.
    pub fn require(&self, name: &str, dims: &[usize]) -> Result<&Tensor> {
        let _ = dims;
        Err(Error::format(&self.path, format!("missing tensor {name}")))
    }
}

/// Writes a safetensors file atomically (temp file in the same directory, then rename).
pub fn save_safetensors(
    path: &Path,
    tensors: &[(&str, &Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let _ = (tensors, metadata);
    Err(Error::format(path, "safetensors writing is not implemented yet"))
}
