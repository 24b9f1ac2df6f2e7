//! A small, exactly reproducible random number generator (SplitMix64).
//!
//! It is our own so that `tools/capgen_rng.py` can mirror it bit for bit: a network built from a seed
//! in Rust has the same weights as the one the Python reference builds from the same seed, so golden
//! tests need not ship full-size weights.
//!
//! Spec (mirrored in Python, do not change without regenerating every golden file):
//! - state advances by `0x9E3779B97F4A7C15` (wrapping); output is the SplitMix64 finaliser;
//! - `next_f32() = (next_u64() >> 40) as f32 * 2^-24`, in [0, 1);
//! - `uniform(lo, hi) = lo + (hi - lo) * next_f32()`, all in f32;
//! - `seed_for(seed, name)` = FNV-1a-64 of the UTF-8 name, xor `seed`, so each named tensor has its
//!   own stream and the order in which tensors are built does not matter.

#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// The stream for the tensor called `name` under the global `seed`.
    pub fn for_name(seed: u64, name: &str) -> Self {
        Rng::new(seed_for(seed, name))
    }

    pub fn state(&self) -> u64 {
        self.state
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 24 bits of precision.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / 16_777_216.0)
    }

    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.next_f32()
    }

    /// Uniform integer in [0, n); n > 0. (Modulo bias is negligible for the small n we use.)
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Standard normal via Box-Muller (f64 internally). Not used for golden weights, whose
    /// reproducibility across languages must not depend on libm's last bit.
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / 9_007_199_254_740_992.0);
        let u2 = (self.next_u64() >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0);
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    pub fn fill_uniform(&mut self, out: &mut [f32], lo: f32, hi: f32) {
        for v in out {
            *v = self.uniform(lo, hi);
        }
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i + 1);
            xs.swap(i, j);
        }
    }
}

/// FNV-1a-64 of `name`, xor `seed`.
pub fn seed_for(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in name.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h ^ seed
}

/// `n` values uniform in [lo, hi) from the stream named `name`.
pub fn uniform_vec(seed: u64, name: &str, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut rng = Rng::for_name(seed, name);
    let mut v = vec![0.0; n];
    rng.fill_uniform(&mut v, lo, hi);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_reference_values() {
        // First outputs of SplitMix64 seeded with 1234567, from the reference C implementation
        // (Vigna, splitmix64.c), which `tools/capgen_rng.py` reproduces independently.
        let mut r = Rng::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
        assert_eq!(r.next_u64(), 9817491932198370423);
    }

    #[test]
    fn uniform_in_range_and_spread() {
        let v = uniform_vec(7, "x", 10_000, -2.0, 3.0);
        assert!(v.iter().all(|&x| (-2.0..3.0).contains(&x)));
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        assert!((mean - 0.5).abs() < 0.1, "mean {mean}");
    }
}
