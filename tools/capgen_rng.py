"""Bit-exact Python mirror of src/rng.rs (SplitMix64 streams) and src/weights/random.rs (init_tensor).

Writes nothing. Imported by the other tools/ scripts so that a network built here from a seed has the
same weights, bit for bit, as the one `capgen` builds with `--weights random` and the same seed; the
golden files can then ship a seed instead of 100 MB of weights.

Run it directly for the self-check (exits non-zero on any mismatch):

    python tools/capgen_rng.py

The spec (from src/rng.rs, which must not change without regenerating every golden file):
- state advances by 0x9E3779B97F4A7C15 (wrapping); output is the SplitMix64 finaliser;
- next_f32 = (next_u64 >> 40) as f32 * 2^-24;
- uniform(lo, hi) = lo + (hi - lo) * next_f32, every operation in f32 (numpy float32 here, which rounds
  each operation to nearest-even exactly as Rust does; Rust does not contract a*b+c into an FMA);
- seed_for(seed, name) = FNV-1a-64(name as UTF-8) xor seed.

Since the i-th state of a stream is simply seed + i * gamma (mod 2^64), streams are generated
vectorised with numpy uint64 arithmetic (which wraps), in chunks to bound memory.
"""

import sys

import numpy as np

GAMMA = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
MASK64 = (1 << 64) - 1
CHUNK = 1 << 22


def seed_for(seed: int, name: str) -> int:
    """FNV-1a-64 of the UTF-8 name, xor seed (src/rng.rs `seed_for`)."""
    h = 0xCBF29CE484222325
    for b in name.encode("utf-8"):
        h ^= b
        h = (h * 0x100000001B3) & MASK64
    return h ^ (seed & MASK64)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return z ^ (z >> np.uint64(31))


def next_u64s(state: int, n: int) -> np.ndarray:
    """The first n outputs of `Rng::new(state)`.next_u64(), as uint64."""
    out = np.empty(n, dtype=np.uint64)
    s0 = np.uint64(state & MASK64)
    with np.errstate(over="ignore"):
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            idx = np.arange(start + 1, start + m + 1, dtype=np.uint64)
            out[start : start + m] = _mix(s0 + idx * GAMMA)
    return out


def next_f32s(state: int, n: int) -> np.ndarray:
    """The first n outputs of next_f32(): 24-bit uniforms in [0, 1), float32 (exact)."""
    return (next_u64s(state, n) >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / 16777216.0)


def uniform(state: int, n: int, lo: float, hi: float) -> np.ndarray:
    """n values of `Rng::new(state).uniform(lo, hi)`, computed in float32 like the Rust code."""
    lo32, hi32 = np.float32(lo), np.float32(hi)
    span = np.float32(hi32 - lo32)
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        # The state after `start` draws is state + start * gamma.
        st = (state + start * 0x9E3779B97F4A7C15) & MASK64
        x = next_f32s(st, m)
        out[start : start + m] = lo32 + span * x
    return out


def uniform_vec(seed: int, name: str, n: int, lo: float, hi: float) -> np.ndarray:
    """src/rng.rs `uniform_vec`: n values in [lo, hi) from the stream named `name`."""
    return uniform(seed_for(seed, name), n, lo, hi)


def init_range(name: str, dims) -> tuple:
    """src/weights/random.rs `init_range`, returning float32 bounds."""
    if name.endswith("running_var"):
        return np.float32(0.5), np.float32(1.5)
    if name.endswith("running_mean"):
        return np.float32(-0.1), np.float32(0.1)
    if name.endswith(".weight") and len(dims) == 1:
        return np.float32(0.5), np.float32(1.5)
    if name.endswith(".bias"):
        return np.float32(-0.1), np.float32(0.1)
    if name.endswith(".weight") and len(dims) >= 2:
        fan_in = int(np.prod(dims[1:]))
        # Rust: (3.0f32 / fan_in as f32).sqrt(), both correctly rounded f32 operations.
        b = np.sqrt(np.float32(3.0) / np.float32(fan_in), dtype=np.float32)
        return np.float32(-b), np.float32(b)
    return np.float32(-0.1), np.float32(0.1)


def init_tensor(name: str, dims, seed: int) -> np.ndarray:
    """src/weights/random.rs `init_tensor`, reshaped to dims (row-major), float32."""
    dims = [int(d) for d in dims]
    n = int(np.prod(dims)) if dims else 1
    lo, hi = init_range(name, dims)
    return uniform_vec(seed, name, n, lo, hi).reshape(dims)


def _scalar_splitmix(state: int, n: int) -> list:
    """A plain-int SplitMix64, independent of the vectorised path, for the self-check."""
    out = []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        out.append(z ^ (z >> 31))
    return out


def self_check() -> None:
    # The values in src/rng.rs's unit test `splitmix64_reference_values` (Vigna's splitmix64.c).
    expected = [6457827717110365317, 3203168211198807973, 9817491932198370423]
    got = [int(v) for v in next_u64s(1234567, 3)]
    assert got == expected, f"next_u64 mismatch: {got} != {expected}"
    assert _scalar_splitmix(1234567, 3) == expected
    # The vectorised, chunked path agrees with the scalar one across a chunk boundary.
    st = seed_for(42, "layer1.0.conv1.weight")
    v = next_u64s(st, CHUNK + 5)
    assert [int(x) for x in v[CHUNK - 2 : CHUNK + 3]] == _scalar_splitmix(st, CHUNK + 3)[CHUNK - 2 :]
    u = uniform(st, CHUNK + 5, -1.0, 1.0)
    s = _scalar_splitmix(st, CHUNK + 3)[-1]
    x = np.float32(s >> 40) * np.float32(1.0 / 16777216.0)
    assert u[CHUNK + 2] == np.float32(-1.0) + np.float32(2.0) * x
    # FNV-1a-64 test vectors (Fowler/Noll/Vo): "" -> cbf29ce484222325, "a" -> af63dc4c8601ec8c.
    assert seed_for(0, "") == 0xCBF29CE484222325
    assert seed_for(0, "a") == 0xAF63DC4C8601EC8C
    assert seed_for(0, "foobar") == 0x85944171F73967E8
    # Ranges: conv weights have variance 1/fan_in; BN gamma/var in [0.5, 1.5).
    w = init_tensor("layer1.0.conv2.weight", [64, 64, 3, 3], 7)
    b = float(np.sqrt(3.0 / 576.0))
    assert w.dtype == np.float32 and w.shape == (64, 64, 3, 3)
    assert np.all(np.abs(w) <= b) and abs(float(w.var()) * 576 - 1.0) < 0.05
    g = init_tensor("bn1.weight", [64], 7)
    assert np.all((g >= 0.5) & (g < 1.5))
    print("capgen_rng self-check passed")


if __name__ == "__main__":
    self_check()
    sys.exit(0)
