//! The kernel boundary: tensor-level ops that check shapes and dispatch on the tensor's device.
//! Models call these; each backend implements them. Adding a backend adds match arms here and
//! nothing in `nn` or `model`.
//!
//! Every op comes in two forms: `op(..) -> Tensor` allocates its output, `op_into(.., out)` writes
//! into a caller-supplied tensor of the right shape (so models can recycle activation buffers, see
//! `crate::nn::pool`). Shape mistakes are `Error::Shape`; inputs must be f32 (weights stored as
//! f16/bf16 are widened at load).

use crate::cpu;
use crate::cpu::conv::{ConvParams, ConvWeights};
use crate::cpu::gemm::{Epilogue, MatRef};
use crate::cpu::pool::PoolParams;
use crate::error::{Error, Result};
use crate::tensor::{Device, Tensor};

fn dims4(x: &Tensor, what: &str) -> Result<(usize, usize, usize, usize)> {
    match *x.dims() {
        [n, c, h, w] => Ok((n, c, h, w)),
        _ => Err(Error::shape(format!("{what}: expected an (N, C, H, W) input, got {:?}", x.dims()))),
    }
}

/// The f32 data of an input, made contiguous if needed.
fn input(x: &Tensor) -> Result<std::borrow::Cow<'_, [f32]>> {
    if x.is_contiguous() {
        Ok(std::borrow::Cow::Borrowed(x.as_f32_slice()?))
    } else {
        Ok(std::borrow::Cow::Owned(x.contiguous().as_f32_slice()?.to_vec()))
    }
}

fn check_out(out: &Tensor, what: &str, dims: &[usize]) -> Result<()> {
    if out.dims() != dims {
        return Err(Error::shape(format!("{what}: output is {:?}, expected {:?}", out.dims(), dims)));
    }
    Ok(())
}

/// Output shape of `conv2d` for input dims (N, C, H, W).
pub fn conv2d_out_dims(x: &[usize], w: &ConvWeights, p: &ConvParams) -> Result<Vec<usize>> {
    let [n, c, h, wd] = *x else {
        return Err(Error::shape(format!("conv2d: expected an (N, C, H, W) input, got {x:?}")));
    };
    if c != w.c {
        return Err(Error::shape(format!("conv2d: input has {c} channels, weight expects {}", w.c)));
    }
    let (oh, ow) = p.out_hw(h, wd, w.r, w.s).ok_or_else(|| {
        Error::shape(format!(
            "conv2d: input {h}x{wd} is smaller than the {}x{} kernel (pad {:?})",
            w.r, w.s, p.pad
        ))
    })?;
    Ok(vec![n, w.k, oh, ow])
}

/// y = act(conv2d(x, w) + bias + residual). x (N, C, H, W) -> (N, K, P, Q); residual like the output.
pub fn conv2d(
    x: &Tensor,
    w: &ConvWeights,
    p: &ConvParams,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    let mut out = Tensor::zeros(&conv2d_out_dims(x.dims(), w, p)?);
    conv2d_into(x, w, p, residual, relu, &mut out)?;
    Ok(out)
}

/// `conv2d` writing into `out` (which must already have the output shape).
pub fn conv2d_into(
    x: &Tensor,
    w: &ConvWeights,
    p: &ConvParams,
    residual: Option<&Tensor>,
    relu: bool,
    out: &mut Tensor,
) -> Result<()> {
    let od = conv2d_out_dims(x.dims(), w, p)?;
    check_out(out, "conv2d", &od)?;
    if let Some(r) = residual {
        if r.dims() != od.as_slice() {
            return Err(Error::shape(format!("conv2d: residual is {:?}, output is {:?}", r.dims(), od)));
        }
    }
    let (n, _, h, wd) = dims4(x, "conv2d")?;
    match x.device() {
        Device::Cpu => {
            let xs = input(x)?;
            let rs = residual.map(input).transpose()?;
            cpu::conv::conv2d_forward(&xs, n, h, wd, w, p, rs.as_deref(), relu, out.as_f32_slice_mut()?);
        }
    }
    Ok(())
}

/// Output shape of `conv2d_cn_into`: channel-major (C, N, H, W) -> (K, N, P, Q).
pub fn conv2d_cn_out_dims(x: &[usize], w: &ConvWeights, p: &ConvParams) -> Result<Vec<usize>> {
    let &[c, n, h, wd] = x else {
        return Err(Error::shape(format!("conv2d: expected a (C, N, H, W) input, got {x:?}")));
    };
    // Same checks and output size as the NCHW case with the two leading axes swapped.
    let d = conv2d_out_dims(&[n, c, h, wd], w, p)?;
    Ok(vec![d[1], d[0], d[2], d[3]])
}

/// `conv2d_into` on channel-major activations: x (C, N, H, W) -> out (K, N, P, Q), residual like
/// out; the whole batch is one GEMM (`cpu::conv::conv2d_forward_cn`).
pub fn conv2d_cn_into(
    x: &Tensor,
    w: &ConvWeights,
    p: &ConvParams,
    residual: Option<&Tensor>,
    relu: bool,
    out: &mut Tensor,
) -> Result<()> {
    let od = conv2d_cn_out_dims(x.dims(), w, p)?;
    check_out(out, "conv2d", &od)?;
    if let Some(r) = residual {
        if r.dims() != od.as_slice() {
            return Err(Error::shape(format!("conv2d: residual is {:?}, output is {:?}", r.dims(), od)));
        }
    }
    let (_, n, h, wd) = dims4(x, "conv2d")?;
    match x.device() {
        Device::Cpu => {
            let xs = input(x)?;
            let rs = residual.map(input).transpose()?;
            cpu::conv::conv2d_forward_cn(&xs, n, h, wd, w, p, rs.as_deref(), relu, out.as_f32_slice_mut()?);
        }
    }
    Ok(())
}

/// Output shape of `max_pool2d`.
pub fn max_pool2d_out_dims(x: &[usize], p: &PoolParams) -> Result<Vec<usize>> {
    let [n, c, h, w] = *x else {
        return Err(Error::shape(format!("max_pool2d: expected an (N, C, H, W) input, got {x:?}")));
    };
    if p.kernel.0 == 0 || p.kernel.1 == 0 {
        return Err(Error::shape(format!("max_pool2d: kernel {:?} is empty", p.kernel)));
    }
    // PyTorch's rule; it guarantees every window holds at least one real pixel.
    if 2 * p.pad.0 > p.kernel.0 || 2 * p.pad.1 > p.kernel.1 {
        return Err(Error::shape(format!(
            "max_pool2d: padding {:?} exceeds half the kernel {:?}",
            p.pad, p.kernel
        )));
    }
    let (oh, ow) = p
        .out_hw(h, w)
        .ok_or_else(|| Error::shape(format!("max_pool2d: input {h}x{w} is smaller than the window {p:?}")))?;
    Ok(vec![n, c, oh, ow])
}

/// Max-pool (PyTorch semantics, padding = -inf). x (N, C, H, W) -> (N, C, P, Q).
pub fn max_pool2d(x: &Tensor, p: &PoolParams) -> Result<Tensor> {
    let mut out = Tensor::zeros(&max_pool2d_out_dims(x.dims(), p)?);
    max_pool2d_into(x, p, &mut out)?;
    Ok(out)
}

pub fn max_pool2d_into(x: &Tensor, p: &PoolParams, out: &mut Tensor) -> Result<()> {
    check_out(out, "max_pool2d", &max_pool2d_out_dims(x.dims(), p)?)?;
    let (n, c, h, w) = dims4(x, "max_pool2d")?;
    match x.device() {
        Device::Cpu => cpu::pool::max_pool2d(&input(x)?, n, c, h, w, p, out.as_f32_slice_mut()?),
    }
    Ok(())
}

/// Adaptive average pool to (oh, ow). x (N, C, H, W) -> (N, C, oh, ow).
pub fn adaptive_avg_pool2d(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (n, c, _, _) = dims4(x, "adaptive_avg_pool2d")?;
    let mut out = Tensor::zeros(&[n, c, oh, ow]);
    adaptive_avg_pool2d_into(x, oh, ow, &mut out)?;
    Ok(out)
}

pub fn adaptive_avg_pool2d_into(x: &Tensor, oh: usize, ow: usize, out: &mut Tensor) -> Result<()> {
    let (n, c, h, w) = dims4(x, "adaptive_avg_pool2d")?;
    if oh == 0 || ow == 0 || h == 0 || w == 0 {
        return Err(Error::shape(format!("adaptive_avg_pool2d: {h}x{w} -> {oh}x{ow} has an empty side")));
    }
    check_out(out, "adaptive_avg_pool2d", &[n, c, oh, ow])?;
    match x.device() {
        Device::Cpu => {
            cpu::pool::adaptive_avg_pool2d(&input(x)?, n, c, h, w, oh, ow, out.as_f32_slice_mut()?)
        }
    }
    Ok(())
}

/// Global average pool. x (N, C, H, W) -> (N, C).
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let (n, c, _, _) = dims4(x, "global_avg_pool")?;
    let mut out = Tensor::zeros(&[n, c]);
    global_avg_pool_into(x, &mut out)?;
    Ok(out)
}

pub fn global_avg_pool_into(x: &Tensor, out: &mut Tensor) -> Result<()> {
    let (n, c, h, w) = dims4(x, "global_avg_pool")?;
    if h == 0 || w == 0 {
        return Err(Error::shape("global_avg_pool: empty spatial dims"));
    }
    check_out(out, "global_avg_pool", &[n, c])?;
    match x.device() {
        Device::Cpu => cpu::pool::global_avg_pool(&input(x)?, n, c, h, w, out.as_f32_slice_mut()?),
    }
    Ok(())
}

fn linear_dims(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<(usize, usize, usize)> {
    let (&[n, i], &[o, wi]) = (x.dims(), w.dims()) else {
        return Err(Error::shape(format!("linear: x {:?} and weight {:?} must be 2-D", x.dims(), w.dims())));
    };
    if i != wi {
        return Err(Error::shape(format!(
            "linear: x is {:?} but weight is {:?} (out, in)",
            x.dims(),
            w.dims()
        )));
    }
    if let Some(b) = b {
        if b.dims() != [o] {
            return Err(Error::shape(format!("linear: bias is {:?}, expected [{o}]", b.dims())));
        }
    }
    Ok((n, i, o))
}

/// y = act(x W^T + b). x (N, I), W (O, I), b (O) -> (N, O).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, relu: bool) -> Result<Tensor> {
    let (n, _, o) = linear_dims(x, w, b)?;
    let mut out = Tensor::zeros(&[n, o]);
    linear_into(x, w, b, relu, &mut out)?;
    Ok(out)
}

pub fn linear_into(x: &Tensor, w: &Tensor, b: Option<&Tensor>, relu: bool, out: &mut Tensor) -> Result<()> {
    let (n, i, o) = linear_dims(x, w, b)?;
    check_out(out, "linear", &[n, o])?;
    match x.device() {
        Device::Cpu => {
            let (xs, ws) = (input(x)?, input(w)?);
            let bs = b.map(input).transpose()?;
            // C (N x O) = X (N x I) * W^T (I x O); the bias runs along columns.
            let epi = Epilogue { col_bias: bs.as_deref(), relu, ..Default::default() };
            cpu::gemm::sgemm(
                MatRef::row_major(&xs, n, i),
                MatRef::row_major(&ws, o, i).t(),
                out.as_f32_slice_mut()?,
                o,
                &epi,
            );
        }
    }
    Ok(())
}

/// `linear_into` with the weights packed once for inference (`cpu::linear::PackedLinear`):
/// out (N, O) = act(x (N, I) W^T + b).
pub fn linear_packed_into(
    x: &Tensor,
    w: &cpu::linear::PackedLinear,
    relu: bool,
    out: &mut Tensor,
) -> Result<()> {
    let (n, i) = match *x.dims() {
        [n, i] if i == w.in_features() => (n, i),
        _ => {
            return Err(Error::shape(format!(
                "linear: x is {:?} but the layer takes {} inputs",
                x.dims(),
                w.in_features()
            )))
        }
    };
    check_out(out, "linear", &[n, w.out_features()])?;
    debug_assert_eq!(x.numel(), n * i);
    match x.device() {
        Device::Cpu => cpu::linear::linear_forward_packed(out.as_f32_slice_mut()?, &input(x)?, w, n, relu),
    }
    Ok(())
}

/// max(x, 0), any shape.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    let mut out = x.contiguous().to_dtype(crate::tensor::DType::F32);
    relu_inplace(&mut out)?;
    Ok(out)
}

/// max(x, 0) in place (copies first if the storage is shared).
pub fn relu_inplace(x: &mut Tensor) -> Result<()> {
    match x.device() {
        Device::Cpu => cpu::activation::relu_inplace(x.as_f32_slice_mut()?),
    }
    Ok(())
}

/// Softmax over the last dim, any rank >= 1.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let cols = *x.dims().last().ok_or_else(|| Error::shape("softmax of a scalar"))?;
    if cols == 0 {
        return Err(Error::shape(format!("softmax over an empty last dim {:?}", x.dims())));
    }
    let mut out = x.contiguous().to_dtype(crate::tensor::DType::F32);
    match x.device() {
        Device::Cpu => cpu::activation::softmax_rows(out.as_f32_slice_mut()?, cols),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::uniform_vec;

    fn rand(seed: u64, dims: &[usize]) -> Tensor {
        Tensor::from_vec(uniform_vec(seed, "t", dims.iter().product(), -1.0, 1.0), dims).unwrap()
    }

    fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den).sqrt()
    }

    #[test]
    fn linear_matches_f64_loop() {
        let (x, w, b) = (rand(1, &[3, 5]), rand(2, &[4, 5]), rand(3, &[4]));
        let y = linear(&x, &w, Some(&b), false).unwrap();
        let (xv, wv, bv) = (x.to_f32_vec(), w.to_f32_vec(), b.to_f32_vec());
        let mut want = vec![0.0f32; 12];
        for n in 0..3 {
            for o in 0..4 {
                let s: f64 = (0..5).map(|i| xv[n * 5 + i] as f64 * wv[o * 5 + i] as f64).sum();
                want[n * 4 + o] = (s + bv[o] as f64) as f32;
            }
        }
        // f32 dot products of length 5 vs f64: a few ulps.
        assert!(rel_l2(&y.to_f32_vec(), &want) < 1e-6);
        let yr = linear(&x, &w, Some(&b), true).unwrap().to_f32_vec();
        assert!(yr.iter().zip(&y.to_f32_vec()).all(|(r, v)| *r == v.max(0.0)));
    }

    #[test]
    fn shape_errors_are_errors() {
        let x = rand(1, &[2, 3, 8, 8]);
        let cw = ConvWeights::new(uniform_vec(1, "w", 4 * 2 * 9, -1., 1.), None, 4, 2, 3, 3);
        assert!(matches!(conv2d(&x, &cw, &ConvParams::new(1, 1), None, false), Err(Error::Shape(_))));
        assert!(matches!(linear(&rand(1, &[2, 3]), &rand(2, &[4, 5]), None, false), Err(Error::Shape(_))));
        assert!(matches!(max_pool2d(&rand(1, &[2, 3]), &PoolParams::new(3, 2, 1)), Err(Error::Shape(_))));
        assert!(matches!(max_pool2d(&x, &PoolParams::new(2, 2, 2)), Err(Error::Shape(_))));
        assert!(matches!(max_pool2d(&x, &PoolParams::new(0, 1, 0)), Err(Error::Shape(_))));
        let mut wrong = Tensor::zeros(&[2, 3, 3, 3]);
        assert!(matches!(max_pool2d_into(&x, &PoolParams::new(3, 2, 1), &mut wrong), Err(Error::Shape(_))));
        assert!(matches!(softmax(&Tensor::zeros(&[2, 0])), Err(Error::Shape(_))));
    }

    #[test]
    fn conv2d_op_matches_reference_and_accepts_views() {
        let x = rand(4, &[1, 5, 6, 2]).transpose(2, 3).unwrap(); // non-contiguous (1, 5, 2, 6)
        let cw =
            ConvWeights::new(uniform_vec(5, "w", 3 * 5 * 9, -1., 1.), Some(vec![0.1, -0.2, 0.3]), 3, 5, 3, 3);
        let p = ConvParams::new(1, 1);
        let res = rand(6, &[1, 3, 2, 6]);
        let y = conv2d(&x, &cw, &p, Some(&res), true).unwrap();
        assert_eq!(y.dims(), &[1, 3, 2, 6]);
        let mut want = vec![0.0; 36];
        cpu::conv::conv2d_reference(
            &x.to_f32_vec(),
            1,
            2,
            6,
            &cw,
            &p,
            Some(&res.to_f32_vec()),
            true,
            &mut want,
        );
        // Same math, possibly a different summation order once the fast kernel lands.
        assert!(rel_l2(&y.to_f32_vec(), &want) < 1e-5);
        let s = softmax(&rand(7, &[2, 3, 4])).unwrap().to_f32_vec();
        for row in s.chunks(4) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }
}
