//! Tensors: a shape, strides, a dtype and storage on a device. No math lives here; kernels are in
//! `cpu/` (and later `wgpu/`, `cuda/`), reached through `crate::ops`.
//!
//! Storage is reference-counted, so `reshape`, `transpose` and `narrow` are views that share it;
//! `contiguous()` materialises a view into fresh row-major storage.

use std::fmt;
use std::sync::Arc;

use half::{bf16, f16};

use crate::error::{Error, Result};

mod shape;
pub use shape::Shape;

/// Element type of a tensor's storage. Compute is f32; f16/bf16 are storage formats that kernels
/// widen on load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
    /// The name safetensors uses.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// Where a tensor's storage lives and whose kernels run on it. The GPU backends add variants behind
/// their cargo features; models never match on this, they call `crate::ops`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
}

impl Device {
    /// Parses the CLI's `--device` value.
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "wgpu" => Err(Error::msg("--device wgpu: this build has no WGPU backend yet (build with --features wgpu once it lands)")),
            "cuda" => Err(Error::msg("--device cuda: this build has no CUDA backend yet (build with --features cuda once it lands)")),
            other => Err(Error::msg(format!("--device {other}: expected cpu, wgpu or cuda"))),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
        }
    }
}

/// Host storage, one variant per dtype.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn get_f32(&self, i: usize) -> f32 {
        match self {
            CpuStorage::F32(v) => v[i],
            CpuStorage::F16(v) => v[i].to_f32(),
            CpuStorage::BF16(v) => v[i].to_f32(),
        }
    }
}

#[derive(Clone, Debug)]
pub enum Storage {
    Cpu(CpuStorage),
}

/// An n-dimensional array: `element[i0, i1, ...] = storage[offset + sum(ik * strides[k])]`.
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    shape: Shape,
    strides: Vec<usize>,
    offset: usize,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({:?}, {}, {})", self.shape.dims(), self.dtype(), self.device())
    }
}

impl Tensor {
    fn from_storage(storage: Storage, shape: Shape) -> Tensor {
        let strides = shape.contiguous_strides();
        Tensor { storage: Arc::new(storage), shape, strides, offset: 0 }
    }

    /// A row-major f32 tensor on the CPU owning `data`; errors if `data.len()` is not the shape's size.
    pub fn from_vec(data: Vec<f32>, dims: &[usize]) -> Result<Tensor> {
        let shape = Shape::new(dims);
        if shape.numel() != data.len() {
            return Err(Error::shape(format!(
                "{} values cannot fill shape {:?} ({} elements)",
                data.len(),
                dims,
                shape.numel()
            )));
        }
        Ok(Tensor::from_storage(Storage::Cpu(CpuStorage::F32(data)), shape))
    }

    pub fn from_f16(data: Vec<f16>, dims: &[usize]) -> Result<Tensor> {
        let shape = Shape::new(dims);
        if shape.numel() != data.len() {
            return Err(Error::shape(format!("{} values cannot fill shape {:?}", data.len(), dims)));
        }
        Ok(Tensor::from_storage(Storage::Cpu(CpuStorage::F16(data)), shape))
    }

    pub fn from_bf16(data: Vec<bf16>, dims: &[usize]) -> Result<Tensor> {
        let shape = Shape::new(dims);
        if shape.numel() != data.len() {
            return Err(Error::shape(format!("{} values cannot fill shape {:?}", data.len(), dims)));
        }
        Ok(Tensor::from_storage(Storage::Cpu(CpuStorage::BF16(data)), shape))
    }

    pub fn zeros(dims: &[usize]) -> Tensor {
        let n = Shape::new(dims).numel();
        Tensor::from_vec(vec![0.0; n], dims).expect("size matches by construction")
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }
    pub fn rank(&self) -> usize {
        self.shape.rank()
    }
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn dtype(&self) -> DType {
        match &*self.storage {
            Storage::Cpu(s) => s.dtype(),
        }
    }
    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cpu(_) => Device::Cpu,
        }
    }

    pub fn is_contiguous(&self) -> bool {
        self.strides == self.shape.contiguous_strides()
    }

    /// The f32 values of a contiguous CPU tensor, without copying.
    pub fn as_f32_slice(&self) -> Result<&[f32]> {
        if !self.is_contiguous() {
            return Err(Error::msg("as_f32_slice needs a contiguous tensor; call contiguous() first"));
        }
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(&v[self.offset..self.offset + self.numel()]),
            Storage::Cpu(s) => Err(Error::msg(format!("expected an F32 tensor, got {}", s.dtype()))),
        }
    }

    /// Mutable access to a contiguous f32 CPU tensor; copies the storage first if it is shared.
    pub fn as_f32_slice_mut(&mut self) -> Result<&mut [f32]> {
        if !self.is_contiguous() {
            return Err(Error::msg("as_f32_slice_mut needs a contiguous tensor"));
        }
        let (off, n) = (self.offset, self.numel());
        match Arc::make_mut(&mut self.storage) {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(&mut v[off..off + n]),
            Storage::Cpu(s) => Err(Error::msg(format!("expected an F32 tensor, got {}", s.dtype()))),
        }
    }

    /// All elements in row-major order as f32 (widening f16/bf16), whatever the strides.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let Storage::Cpu(s) = &*self.storage;
        if self.is_contiguous() {
            if let CpuStorage::F32(v) = s {
                return v[self.offset..self.offset + self.numel()].to_vec();
            }
        }
        let mut out = Vec::with_capacity(self.numel());
        self.for_each_index(|i| out.push(s.get_f32(i)));
        out
    }

    /// Calls `f` with the storage index of every element, in row-major order.
    fn for_each_index(&self, mut f: impl FnMut(usize)) {
        let dims = self.shape.dims();
        if dims.contains(&0) {
            return;
        }
        let mut idx = vec![0usize; dims.len()];
        loop {
            let pos: usize = self.offset + idx.iter().zip(&self.strides).map(|(i, s)| i * s).sum::<usize>();
            f(pos);
            let mut k = dims.len();
            loop {
                if k == 0 {
                    return;
                }
                k -= 1;
                idx[k] += 1;
                if idx[k] < dims[k] {
                    break;
                }
                idx[k] = 0;
            }
        }
    }

    /// Converts to another dtype (always copies into contiguous storage).
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        let v = self.to_f32_vec();
        let storage = match dtype {
            DType::F32 => CpuStorage::F32(v),
            DType::F16 => CpuStorage::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => CpuStorage::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
        };
        Tensor::from_storage(Storage::Cpu(storage), self.shape.clone())
    }

    /// Same elements in fresh row-major storage (a cheap clone if already contiguous).
    pub fn contiguous(&self) -> Tensor {
        if self.is_contiguous() {
            return self.clone();
        }
        let Storage::Cpu(s) = &*self.storage;
        let storage = match s {
            CpuStorage::F32(v) => {
                let mut out = Vec::with_capacity(self.numel());
                self.for_each_index(|i| out.push(v[i]));
                CpuStorage::F32(out)
            }
            CpuStorage::F16(v) => {
                let mut out = Vec::with_capacity(self.numel());
                self.for_each_index(|i| out.push(v[i]));
                CpuStorage::F16(out)
            }
            CpuStorage::BF16(v) => {
                let mut out = Vec::with_capacity(self.numel());
                self.for_each_index(|i| out.push(v[i]));
                CpuStorage::BF16(out)
            }
        };
        Tensor::from_storage(Storage::Cpu(storage), self.shape.clone())
    }

    /// A view with new dims (the tensor must be contiguous; one dim may be `usize::MAX` = inferred).
    pub fn reshape(&self, dims: &[usize]) -> Result<Tensor> {
        let t = self.contiguous();
        let dims = t.shape.resolve(dims)?;
        let shape = Shape::new(&dims);
        let strides = shape.contiguous_strides();
        Ok(Tensor { storage: t.storage, shape, strides, offset: t.offset })
    }

    /// A view with dims `a` and `b` swapped.
    pub fn transpose(&self, a: usize, b: usize) -> Result<Tensor> {
        if a >= self.rank() || b >= self.rank() {
            return Err(Error::shape(format!("transpose({a}, {b}) of a rank-{} tensor", self.rank())));
        }
        let mut dims = self.dims().to_vec();
        let mut strides = self.strides.clone();
        dims.swap(a, b);
        strides.swap(a, b);
        Ok(Tensor { storage: self.storage.clone(), shape: Shape::new(&dims), strides, offset: self.offset })
    }

    /// A view of `len` entries along `dim` starting at `start`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        if dim >= self.rank() || start + len > self.dims()[dim] {
            return Err(Error::shape(format!(
                "narrow(dim {dim}, {start}..{}) of {:?}",
                start + len,
                self.dims()
            )));
        }
        let mut dims = self.dims().to_vec();
        dims[dim] = len;
        Ok(Tensor {
            storage: self.storage.clone(),
            shape: Shape::new(&dims),
            strides: self.strides.clone(),
            offset: self.offset + start * self.strides[dim],
        })
    }

    /// Errors unless the dims are exactly `expected`; `what` names the tensor in the message.
    pub fn expect_dims(&self, what: &str, expected: &[usize]) -> Result<()> {
        if self.dims() != expected {
            return Err(Error::shape(format!("{what}: expected {:?}, got {:?}", expected, self.dims())));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_share_storage_and_index_correctly() {
        let t = Tensor::from_vec((0..24).map(|x| x as f32).collect(), &[2, 3, 4]).unwrap();
        let tt = t.transpose(1, 2).unwrap();
        assert_eq!(tt.dims(), &[2, 4, 3]);
        assert!(!tt.is_contiguous());
        let v = tt.to_f32_vec();
        // element [1, 2, 0] of the transpose is element [1, 0, 2] of t = 12 + 2
        assert_eq!(v[12 + 2 * 3], 14.0);
        let n = t.narrow(2, 1, 2).unwrap();
        assert_eq!(n.to_f32_vec(), vec![1., 2., 5., 6., 9., 10., 13., 14., 17., 18., 21., 22.]);
        assert!(t.reshape(&[5, 5]).is_err());
        assert_eq!(t.reshape(&[6, usize::MAX]).unwrap().dims(), &[6, 4]);
    }

    #[test]
    fn half_round_trip() {
        let t = Tensor::from_vec(vec![1.0, -2.5, 0.333, 65504.0], &[4]).unwrap();
        let h = t.to_dtype(DType::F16);
        assert_eq!(h.dtype(), DType::F16);
        let back = h.to_f32_vec();
        assert_eq!(back[1], -2.5);
        assert!((back[2] - 0.333).abs() < 1e-3);
        let b = t.to_dtype(DType::BF16).to_f32_vec();
        assert!((b[2] - 0.333).abs() < 2e-3);
    }
}
