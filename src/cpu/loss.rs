//! Losses: sparse softmax cross-entropy over the vocabulary (fused forward + backward, in place) and
//! the doubly stochastic attention regulariser.
//!
//! Cross-entropy math, for logits x (N,V), targets y (N), label smoothing eps, `<pad>` rows ignored:
//!
//! ```text
//! logp[n,k] = x[n,k] - logsumexp_k x[n,:]
//! q[n,k]    = (1 - eps) [k == y_n] + eps / V            (PyTorch's label smoothing)
//! loss      = (1 / M) sum_{n: y_n != pad} -sum_k q[n,k] logp[n,k]     M = number of non-pad rows
//! dx[n,k]   = dloss / M * (softmax(x[n,:])_k - q[n,k])   for non-pad rows, 0 for pad rows
//! ```
//!
//! The fused version overwrites the logits with dlogits, so the (N,V) buffer exists once.
//!
//! Doubly stochastic regulariser (Show, Attend and Tell), alphas (B,T,L), row b live for len_b steps:
//!
//! ```text
//! S[b,l] = sum_{t < len_b} alpha[b,t,l]
//! R      = alpha_c / B * sum_{b,l} (1 - S[b,l])^2
//! dR/dalpha[b,t,l] = alpha_c / B * 2 (S[b,l] - 1)   for t < len_b, 0 otherwise
//! ```

use rayon::prelude::*;

/// Loss value and the number of tokens it averages over.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CeOutput {
    /// Mean loss over the non-pad tokens (0 when there are none).
    pub loss: f32,
    /// Number of non-pad tokens.
    pub count: usize,
}

/// e^x in f32 without a library call, so loops over it vectorise: x = n ln2 + r with |r| <= ln2/2,
/// e^r by a degree-7 polynomial (1 + r + r^2 P(r), P the classic Cephes `expf` minimax fit), 2^n
/// put straight into the exponent bits. Relative error a few ulp (<= 4e-7, tested against f64
/// `exp`) for x in [-87, 88]; below -87 (e^x < 2e-38) it returns 0, above 88 it saturates at e^88.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 * 2^23: adding it rounds to an integer (round-to-nearest), held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // ln 2 in two parts, so n * LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.0, 88.0);
    let k = xc * LOG2E + ROUND;
    let n = k - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5; // (the fit's 5.0000001e-1 rounds to 0.5 in f32)
    let y = 1.0 + r + r * r * p;
    // k's low mantissa bits hold n + 2^22; (n + 127) << 23 is 2^n as an f32.
    let ni = (k.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits(((ni + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        y * scale
    }
}

/// Lanes of the independent partial sums / maxima below (see `cpu::attention`: a serial f32
/// reduction does not vectorise).
const LANES: usize = 16;

/// row[k] = exp(row[k] - m) (f32), returning their sum in f64 (LANES interleaved partial sums, so
/// the result is the same for every vector width).
#[inline(always)]
fn exp_sum_body(row: &mut [f32], m: f32) -> f64 {
    let mut se = [0.0f64; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            let e = exp_f32(c[j] - m);
            c[j] = e;
            se[j] += e as f64;
        }
    }
    let mut s = se.iter().sum::<f64>();
    for x in chunks.into_remainder() {
        *x = exp_f32(*x - m);
        s += *x as f64;
    }
    s
}

/// `exp_sum_body` compiled for AVX-512F (16 lanes per instruction instead of SSE2's 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp_sum_avx512(row: &mut [f32], m: f32) -> f64 {
    exp_sum_body(row, m)
}

/// `exp_sum_body` compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_sum_avx2(row: &mut [f32], m: f32) -> f64 {
    exp_sum_body(row, m)
}

/// The exponential pass of the softmax, on the widest vector unit the GEMM uses (`detect_isa`,
/// which also honours `CAPGEN_ISA`): it is compute-bound (a row of 8000 floats sits in L1/L2).
fn exp_sum(row: &mut [f32], m: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    use crate::cpu::gemm::Isa;
    match crate::cpu::gemm::detect_isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: detect_isa only returns Avx512 when the CPU supports it (`Isa::supported`,
        // checked at run time: AVX-512F among others); the function has no other precondition.
        Isa::Avx512 => unsafe { exp_sum_avx512(row, m) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, Avx2Fma only when the CPU has AVX2 and FMA.
        Isa::Avx2Fma => unsafe { exp_sum_avx2(row, m) },
        _ => exp_sum_body(row, m),
    }
}

/// Row loss -sum_k q_k logp_k. The row is scratch: when `grad_scale` is given it is overwritten
/// with grad_scale * (p - q), otherwise with intermediate values.
///
/// One pass writes e_k = exp(x_k - max) (f32, `exp_f32`) into the row and sums them in f64; the
/// gradient is then g (e_k / s - q_k). The loss uses the saved x_y and the f64 sums.
fn ce_row(row: &mut [f32], y: usize, eps: f32, grad_scale: Option<f32>) -> f64 {
    let v = row.len();
    let mut mx = [f32::NEG_INFINITY; LANES];
    for c in row.chunks_exact(LANES) {
        for j in 0..LANES {
            mx[j] = mx[j].max(c[j]);
        }
    }
    let tail = v - v % LANES;
    let m = row[tail..].iter().chain(&mx).fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let xy = row[y];
    let mut sum_x = 0.0f64;
    if eps > 0.0 {
        let mut sx = [0.0f64; LANES];
        for c in row.chunks_exact(LANES) {
            for j in 0..LANES {
                sx[j] += c[j] as f64;
            }
        }
        sum_x = sx.iter().sum::<f64>() + row[tail..].iter().map(|&x| x as f64).sum::<f64>();
    }
    let s = exp_sum(row, m);
    let lse = m as f64 + s.ln();
    let nll = lse - xy as f64;
    // -mean_k logp_k = lse - mean_k x_k
    let smooth = lse - sum_x / v as f64;
    let loss = (1.0 - eps as f64) * nll + eps as f64 * smooth;
    if let Some(g) = grad_scale {
        let (gs, off) = ((g as f64 / s) as f32, g * eps / v as f32);
        row.iter_mut().for_each(|x| *x = gs * *x - off);
        row[y] -= g * (1.0 - eps);
    }
    loss
}

fn ce_impl(
    logits: &mut [f32],
    targets: &[u32],
    v: usize,
    eps: f32,
    pad: Option<u32>,
    dloss: Option<f32>,
) -> CeOutput {
    assert_eq!(logits.len(), targets.len() * v, "cross_entropy: logits are not (N,V)");
    assert!((0.0..1.0).contains(&eps), "cross_entropy: label smoothing {eps} not in [0,1)");
    let count = targets.iter().filter(|&&y| Some(y) != pad).count();
    let scale = dloss.map(|d| if count > 0 { d / count as f32 } else { 0.0 });
    let total: f64 = logits
        .par_chunks_mut(v)
        .zip(targets.par_iter())
        .with_min_len((16384 / v.max(1)).max(1))
        .map(|(row, &y)| {
            if Some(y) == pad {
                if scale.is_some() {
                    row.fill(0.0);
                }
                return 0.0;
            }
            assert!((y as usize) < v, "cross_entropy: target {y} >= vocabulary size {v}");
            ce_row(row, y as usize, eps, scale)
        })
        .sum();
    let loss = if count > 0 { (total / count as f64) as f32 } else { 0.0 };
    CeOutput { loss, count }
}

/// Fused forward + backward: returns the mean loss and overwrites `logits` (N,V) with
/// dloss * dL/dlogits (pad rows become 0). `eps` is the label smoothing in [0,1).
pub fn cross_entropy_fused(
    logits: &mut [f32],
    targets: &[u32],
    v: usize,
    eps: f32,
    pad: Option<u32>,
    dloss: f32,
) -> CeOutput {
    ce_impl(logits, targets, v, eps, pad, Some(dloss))
}

/// Forward only (validation): the logits are left untouched.
pub fn cross_entropy_forward(
    logits: &[f32],
    targets: &[u32],
    v: usize,
    eps: f32,
    pad: Option<u32>,
) -> CeOutput {
    assert_eq!(logits.len(), targets.len() * v, "cross_entropy: logits are not (N,V)");
    let count = targets.iter().filter(|&&y| Some(y) != pad).count();
    let total: f64 = logits
        .par_chunks(v)
        .zip(targets.par_iter())
        .filter(|(_, &y)| Some(y) != pad)
        .map(|(row, &y)| {
            assert!((y as usize) < v, "cross_entropy: target {y} >= vocabulary size {v}");
            let mut r = row.to_vec();
            ce_row(&mut r, y as usize, eps, None)
        })
        .sum();
    let loss = if count > 0 { (total / count as f64) as f32 } else { 0.0 };
    CeOutput { loss, count }
}

/// Doubly stochastic attention regulariser over alphas (B,T,L) with per-row lengths (B); returns R
/// and, if `dalpha` (B,T,L) is given, accumulates dR/dalpha into it.
pub fn attention_reg(
    dalpha: Option<&mut [f32]>,
    alphas: &[f32],
    lengths: &[usize],
    alpha_c: f32,
    t: usize,
    l: usize,
) -> f32 {
    let b = lengths.len();
    assert_eq!(alphas.len(), b * t * l, "attention_reg: alphas are not (B,T,L)");
    if b == 0 {
        return 0.0;
    }
    let mut total = 0.0f64;
    let mut coef = vec![0.0f32; b * l]; // (B,L) dR/dalpha for the live steps
    for (bi, &len) in lengths.iter().enumerate() {
        assert!(len <= t, "attention_reg: length {len} > {t} steps");
        for k in 0..l {
            let s: f64 = (0..len).map(|s| alphas[(bi * t + s) * l + k] as f64).sum();
            total += (1.0 - s) * (1.0 - s);
            coef[bi * l + k] = (alpha_c as f64 / b as f64 * 2.0 * (s - 1.0)) as f32;
        }
    }
    if let Some(d) = dalpha {
        assert_eq!(d.len(), b * t * l, "attention_reg: dalpha is not (B,T,L)");
        for (bi, &len) in lengths.iter().enumerate() {
            for s in 0..len {
                let row = &mut d[(bi * t + s) * l..(bi * t + s + 1) * l];
                row.iter_mut().zip(&coef[bi * l..(bi + 1) * l]).for_each(|(x, c)| *x += c);
            }
        }
    }
    (alpha_c as f64 * total / b as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// exp_f32 against f64 exp on random arguments over its whole range, and the edges. Tolerance:
    /// 4e-7 relative = ~3 ulp of f32 (the polynomial's own error is ~1 ulp, the range reduction and
    /// final scaling add up to ~2 more roundings); a wrong coefficient or exponent is off by >1e-4.
    #[test]
    fn exp_f32_matches_f64_exp() {
        let mut rng = Rng::new(11);
        let mut worst = 0.0f64;
        for _ in 0..200_000 {
            let x = rng.uniform(-87.0, 88.0);
            let want = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64 - want) / want).abs());
        }
        for x in [0.0f32, -0.0, 1.0, -1.0, 1e-8, -1e-8, 0.3466, -0.3466, 88.0, -87.0] {
            let want = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64 - want) / want).abs());
        }
        eprintln!("exp_f32 worst relative error {worst:.3e}");
        assert!(worst <= 4e-7, "exp_f32 worst relative error {worst:.3e}");
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    /// The AVX2 / AVX-512 builds of the exponential pass do the same operations in the same order
    /// (explicit lanes, no FMA contraction in Rust): bitwise equal to the portable build.
    #[test]
    fn exp_sum_same_on_every_isa() {
        let mut rng = Rng::new(13);
        let row: Vec<f32> = (0..8003).map(|_| rng.uniform(-20.0, 5.0)).collect();
        let mut want = row.clone();
        let sw = exp_sum_body(&mut want, 5.0);
        #[cfg(target_arch = "x86_64")]
        for isa in crate::cpu::gemm::available_isas() {
            let mut got = row.clone();
            // SAFETY: available_isas lists only ISAs this CPU supports.
            let sg = match isa {
                crate::cpu::gemm::Isa::Avx512 => unsafe { exp_sum_avx512(&mut got, 5.0) },
                crate::cpu::gemm::Isa::Avx2Fma => unsafe { exp_sum_avx2(&mut got, 5.0) },
                _ => exp_sum_body(&mut got, 5.0),
            };
            assert_eq!((sg, &got), (sw, &want), "{}", isa.name());
        }
    }

    /// The fused row loss/gradient against an f64 evaluation of the formulas in the module comment,
    /// on random logits (V not a multiple of the lane count, with and without smoothing). Tolerance
    /// 1e-6 relative: f32 exponentials (~3 ulp) and the f32 gradient rounding.
    #[test]
    fn ce_row_matches_f64() {
        let mut rng = Rng::new(12);
        for &(v, eps) in &[(37usize, 0.0f32), (1000, 0.1), (8000, 0.0), (5, 0.3)] {
            let x: Vec<f32> = (0..v).map(|_| rng.uniform(-8.0, 8.0)).collect();
            let y = rng.below(v);
            let m = x.iter().fold(f64::NEG_INFINITY, |m, &t| m.max(t as f64));
            let s: f64 = x.iter().map(|&t| (t as f64 - m).exp()).sum();
            let lse = m + s.ln();
            let (e, vf) = (eps as f64, v as f64);
            let want_loss: f64 = x
                .iter()
                .enumerate()
                .map(|(k, &t)| -((1.0 - e) * f64::from(k == y) + e / vf) * (t as f64 - lse))
                .sum();
            let g = 0.7f64;
            let want_grad: Vec<f32> = x
                .iter()
                .enumerate()
                .map(|(k, &t)| (g * ((t as f64 - lse).exp() - (1.0 - e) * f64::from(k == y) - e / vf)) as f32)
                .collect();
            let mut row = x.clone();
            let loss = ce_row(&mut row, y, eps, Some(g as f32));
            assert!(((loss - want_loss) / want_loss).abs() < 1e-6, "V {v}: loss {loss} vs {want_loss}");
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for (a, b) in row.iter().zip(&want_grad) {
                num += (*a as f64 - *b as f64).powi(2);
                den += (*b as f64).powi(2);
            }
            let rel = (num / den).sqrt();
            assert!(rel < 1e-6, "V {v}: gradient relative L2 {rel:.3e}");
        }
    }
}
