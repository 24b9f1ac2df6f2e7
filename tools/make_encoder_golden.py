"""Writes the encoder golden files under tests/data/ from an independent reference (torch + torchvision).

Rerun (CPU only, no network, ~1-2 minutes):

    python tools/make_encoder_golden.py [--out tests/data]

torch 2.15 and torchvision 0.29 came from PyPI. The script builds
torchvision's resnet50 and vgg16 (weights=None, eval mode), fills every state-dict tensor with
`capgen_rng.init_tensor(name, shape, seed)` -- bit-identical to what `capgen` builds with
`--weights random` and the same seed (num_batches_tracked is left untouched; eval mode ignores it) --
and runs them in float64, so the stored values are the exact forward pass up to f64 rounding and a
Rust f32 forward pass can be held to them. (The metadata also records torch's own f32 error against
this f64 reference, for scale.)

Files written (all small; the inputs that come from the RNG are stored as a seed, not as values):

- encoder_photo.png                 scikit-image's `chelsea` photo (451x300 RGB), lossless.
- encoder_photo_input.safetensors   `input` (1,3,224,224): that PNG through torchvision's standard
                                    transform (Resize 256 bilinear, CenterCrop 224, ToTensor, Normalize).
- encoder_resnet50.safetensors      for a seeded random input `random.*` (2,3,64,96) -- non-square so a
                                    transposed H/W shows -- and for the photo `photo.*` (1,3,224,224):
                                    `{case}.{tap}` a few channels (N, c, H, W) of the taps conv1 (after
                                    BN+ReLU), maxpool, layer1..layer4, with `{case}.{tap}.channels` the
                                    channel indices (as f32); `{case}.pooled` (N,2048), `{case}.logits`
                                    (N,1000) in full; `photo.grid` (1,49,c) a few channels of the (49,2048)
                                    grid, with `photo.grid.channels`; `rng.{name}` the first values of a few
                                    weight tensors, to check the RNG mirror bit for bit.
- encoder_vgg16.safetensors         the same for VGG16: taps features.{1,4,9,16,23,30} (after ReLU or
                                    max-pool), fc6 and fc7 (after their ReLU; fc7 is `pooled`), logits,
                                    and `photo.grid` from features.30 (1,49,c).
- conv_layers.safetensors           per-layer cases `{case}.x`, `{case}.w`, `{case}.b`, ..., `{case}.y`:
                                    conv2d 1x1 s1, 1x1 s2, 3x3 s1 p1, 3x3 s2 p1, 7x7 s2 p3 (with bias),
                                    conv 3x3 + eval-mode batch-norm (`bn_*` tensors; `y` after BN, `y_relu`
                                    after ReLU), max-pool 3x3 s2 p1, adaptive average pools (3x3 from 5x7,
                                    7x7 from 2x3 -- the up-sampling case VGG meets below 224 -- and 1x1).
                                    Geometry is in the metadata as JSON.

Every file is rewritten byte for byte identically by a rerun (same torch / PIL versions).
Metadata of every encoder file (safetensors string metadata): seed, input_name, input_lo, input_hi,
input_dims (JSON), taps (JSON list), torch_f32_rel_l2_pooled_random, torch_f32_rel_l2_logits_photo.
The random input is `capgen::rng::uniform_vec(seed, input_name, n, input_lo, input_hi)` in NCHW order.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
import torchvision
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import capgen_rng  # noqa: E402

RESNET_SEED = 20240501
VGG_SEED = 20240502
RANDOM_DIMS = [2, 3, 64, 96]
INPUT_LO, INPUT_HI = -2.0, 2.0


def fill_seeded(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every state-dict tensor (but num_batches_tracked) with capgen's seeded init."""
    sd = model.state_dict()
    with torch.no_grad():
        for name, t in sd.items():
            if name.endswith("num_batches_tracked"):
                continue
            v = capgen_rng.init_tensor(name, list(t.shape), seed)
            t.copy_(torch.from_numpy(v))


def random_input(seed: int) -> np.ndarray:
    n = int(np.prod(RANDOM_DIMS))
    return capgen_rng.uniform_vec(seed, "input", n, INPUT_LO, INPUT_HI).reshape(RANDOM_DIMS)


def channels(c: int, k: int) -> np.ndarray:
    """k channel indices spread evenly over [0, c), always including the first and the last."""
    k = min(k, c)
    return np.unique(np.linspace(0, c - 1, k).round().astype(np.int64))


def run_traced(model, hooks: dict, x: np.ndarray, dtype) -> dict:
    """Forward x through model in dtype; returns {tap: activation as float64 numpy}."""
    acts = {}
    handles = []
    for tap, module in hooks.items():

        def hook(_m, _inp, out, tap=tap):
            acts[tap] = out.detach().clone().to(torch.float64).numpy()

        handles.append(module.register_forward_hook(hook))
    m = model.to(dtype)
    with torch.no_grad():
        acts["logits"] = m(torch.from_numpy(x).to(dtype)).to(torch.float64).numpy()
    for h in handles:
        h.remove()
    return acts


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


def store_case(out: dict, case: str, acts: dict, plan: dict) -> None:
    """plan: tap -> number of channels to keep (None = keep all; for rank-2 taps always all)."""
    for tap, k in plan.items():
        a = acts[tap]
        if a.ndim == 4 and k is not None:
            idx = channels(a.shape[1], k)
            out[f"{case}.{tap}"] = np.ascontiguousarray(a[:, idx].astype(np.float32))
            out[f"{case}.{tap}.channels"] = idx.astype(np.float32)
        else:
            out[f"{case}.{tap}"] = np.ascontiguousarray(a.astype(np.float32))


def store_grid(out: dict, case: str, last: np.ndarray, k: int) -> None:
    """Grid (N, H*W, C) row-major over space (DESIGN.md section 3), k channels of it."""
    n, c, h, w = last.shape
    grid = last.reshape(n, c, h * w).transpose(0, 2, 1)
    idx = channels(c, k)
    out[f"{case}.grid"] = np.ascontiguousarray(grid[:, :, idx].astype(np.float32))
    out[f"{case}.grid.channels"] = idx.astype(np.float32)


def safetensors_bytes(tensors: dict, meta: dict) -> bytes:
    """A plain safetensors file (F32 only), written by hand so that it is byte-for-byte reproducible:
    the `safetensors` package keeps metadata in a hash map, whose order changes from run to run.
    Layout: u64 little-endian header length, JSON header (keys sorted, padded with spaces to a multiple
    of 8), then the tensors' little-endian data in name order."""
    header = {"__metadata__": {k: str(v) for k, v in sorted(meta.items())}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        blobs.append(a.tobytes())
        offset += a.nbytes
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + b"".join(blobs)


def write(path: str, tensors: dict, meta: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(safetensors_bytes(tensors, meta))
    os.replace(tmp, path)
    # Read back with the reference reader: the hand-written file must be valid safetensors.
    from safetensors.numpy import load_file

    back = load_file(path)
    assert sorted(back) == sorted(tensors) and all(np.array_equal(back[k], tensors[k]) for k in tensors)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB, {len(tensors)} tensors)")


def make_photo(out_dir: str) -> np.ndarray:
    import skimage.data

    png = os.path.join(out_dir, "encoder_photo.png")
    img = Image.fromarray(skimage.data.chelsea())
    img.save(png + ".tmp.png", optimize=True)
    os.replace(png + ".tmp.png", png)
    print(f"wrote {png} ({os.path.getsize(png) / 1024:.0f} KiB)")
    from torchvision import transforms

    tf = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    x = tf(Image.open(png).convert("RGB")).unsqueeze(0).numpy().astype(np.float32)
    write(
        os.path.join(out_dir, "encoder_photo_input.safetensors"),
        {"input": np.ascontiguousarray(x)},
        {"source": "skimage.data.chelsea via encoder_photo.png", "transform": "Resize(256) CenterCrop(224)"},
    )
    return x


def rng_checks(out: dict, seed: int, names: dict) -> None:
    for name, shape in names.items():
        out[f"rng.{name}"] = capgen_rng.init_tensor(name, shape, seed).ravel()[:64].copy()


def make_resnet(out_dir: str, photo: np.ndarray) -> None:
    model = torchvision.models.resnet50(weights=None).eval()
    fill_seeded(model, RESNET_SEED)
    sd = model.state_dict()
    hooks = {
        "conv1": model.relu,
        "maxpool": model.maxpool,
        "layer1": model.layer1,
        "layer2": model.layer2,
        "layer3": model.layer3,
        "layer4": model.layer4,
        "pooled": model.avgpool,
    }
    out = {}
    meta = {
        "seed": RESNET_SEED,
        "input_name": "input",
        "input_lo": INPUT_LO,
        "input_hi": INPUT_HI,
        "input_dims": json.dumps(RANDOM_DIMS),
        "taps": json.dumps(["conv1", "maxpool", "layer1", "layer2", "layer3", "layer4"]),
    }
    xr = random_input(RESNET_SEED)
    a64 = run_traced(model, hooks, xr, torch.float64)
    a64["pooled"] = a64["pooled"].reshape(a64["pooled"].shape[0], -1)
    a32 = run_traced(model, hooks, xr, torch.float32)
    meta["torch_f32_rel_l2_pooled_random"] = rel_l2(a32["pooled"].reshape(2, -1), a64["pooled"])
    meta["torch_f32_rel_l2_logits_random"] = rel_l2(a32["logits"], a64["logits"])
    plan = {"conv1": 4, "maxpool": 4, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": None}
    plan.update({"pooled": None, "logits": None})
    store_case(out, "random", a64, plan)

    p64 = run_traced(model, hooks, photo, torch.float64)
    p64["pooled"] = p64["pooled"].reshape(1, -1)
    p32 = run_traced(model, hooks, photo, torch.float32)
    meta["torch_f32_rel_l2_logits_photo"] = rel_l2(p32["logits"], p64["logits"])
    plan = {"conv1": 2, "maxpool": 2, "layer1": 2, "layer2": 4, "layer3": 8, "layer4": 16}
    plan.update({"pooled": None, "logits": None})
    store_case(out, "photo", p64, plan)
    store_grid(out, "photo", p64["layer4"], 64)
    rng_checks(out, RESNET_SEED, {n: list(sd[n].shape) for n in ["conv1.weight", "bn1.running_var",
                                                                  "layer1.0.conv2.weight", "fc.bias"]})
    write(os.path.join(out_dir, "encoder_resnet50.safetensors"), out, meta)
    print("  resnet50", {k: v for k, v in meta.items() if k.startswith("torch")})


def make_vgg(out_dir: str, photo: np.ndarray) -> None:
    model = torchvision.models.vgg16(weights=None).eval()
    fill_seeded(model, VGG_SEED)
    sd = model.state_dict()
    feat = [1, 4, 9, 16, 23, 30]
    hooks = {f"features.{i}": model.features[i] for i in feat}
    hooks.update({"fc6": model.classifier[1], "fc7": model.classifier[4]})
    out = {}
    meta = {
        "seed": VGG_SEED,
        "input_name": "input",
        "input_lo": INPUT_LO,
        "input_hi": INPUT_HI,
        "input_dims": json.dumps(RANDOM_DIMS),
        "taps": json.dumps([f"features.{i}" for i in feat] + ["fc6", "fc7"]),
    }
    xr = random_input(VGG_SEED)
    a64 = run_traced(model, hooks, xr, torch.float64)
    a32 = run_traced(model, hooks, xr, torch.float32)
    meta["torch_f32_rel_l2_pooled_random"] = rel_l2(a32["fc7"], a64["fc7"])
    meta["torch_f32_rel_l2_logits_random"] = rel_l2(a32["logits"], a64["logits"])
    plan = {"features.1": 2, "features.4": 4, "features.9": 4, "features.16": 8, "features.23": 16}
    plan.update({"features.30": None, "fc6": None, "fc7": None, "logits": None})
    store_case(out, "random", a64, plan)

    p64 = run_traced(model, hooks, photo, torch.float64)
    p32 = run_traced(model, hooks, photo, torch.float32)
    meta["torch_f32_rel_l2_logits_photo"] = rel_l2(p32["logits"], p64["logits"])
    plan = {"features.1": 1, "features.4": 2, "features.9": 2, "features.16": 4, "features.23": 8}
    plan.update({"features.30": 16, "fc6": None, "fc7": None, "logits": None})
    store_case(out, "photo", p64, plan)
    store_grid(out, "photo", p64["features.30"], 64)
    rng_checks(out, VGG_SEED, {n: list(sd[n].shape) for n in ["features.0.weight", "classifier.0.weight",
                                                               "classifier.6.bias"]})
    write(os.path.join(out_dir, "encoder_vgg16.safetensors"), out, meta)
    print("  vgg16", {k: v for k, v in meta.items() if k.startswith("torch")})


def make_layers(out_dir: str) -> None:
    """Per-layer cases; each input drawn from capgen_rng (stored anyway), reference in float64."""
    import torch.nn.functional as F

    seed = 77
    out, geo = {}, {}

    def rnd(name, shape, lo=-1.0, hi=1.0):
        n = int(np.prod(shape))
        return capgen_rng.uniform_vec(seed, name, n, lo, hi).reshape(shape)

    def t64(a):
        return torch.from_numpy(a).to(torch.float64)

    convs = {
        # case: (x dims, (K, R), stride, pad, bias)
        "conv1x1_s1": ([2, 16, 9, 7], (24, 1), 1, 0, True),
        "conv1x1_s2": ([2, 16, 9, 7], (24, 1), 2, 0, False),
        "conv3x3_s1": ([2, 8, 10, 11], (12, 3), 1, 1, True),
        "conv3x3_s2": ([1, 8, 11, 10], (16, 3), 2, 1, True),
        "conv7x7_s2": ([1, 3, 23, 19], (8, 7), 2, 3, True),
    }
    for case, (xd, (k, r), stride, pad, bias) in convs.items():
        x = rnd(f"{case}.x", xd)
        c = xd[1]
        w = rnd(f"{case}.w", [k, c, r, r], -float(np.sqrt(3.0 / (c * r * r))), float(np.sqrt(3.0 / (c * r * r))))
        b = rnd(f"{case}.b", [k], -0.5, 0.5) if bias else None
        y = F.conv2d(t64(x), t64(w), None if b is None else t64(b), stride=stride, padding=pad).numpy()
        out[f"{case}.x"], out[f"{case}.w"] = x, w
        if b is not None:
            out[f"{case}.b"] = b
        out[f"{case}.y"] = y.astype(np.float32)
        geo[case] = {"stride": stride, "pad": pad, "bias": bias}

    # conv 3x3 s1 p1 (no bias, as in ResNet) followed by eval-mode batch-norm, eps 1e-5.
    case = "conv_bn"
    xd, k = [2, 8, 9, 10], 12
    x = rnd(f"{case}.x", xd)
    bound = float(np.sqrt(3.0 / (8 * 9)))
    w = rnd(f"{case}.w", [k, 8, 3, 3], -bound, bound)
    gamma, beta = rnd(f"{case}.bn_weight", [k], 0.5, 1.5), rnd(f"{case}.bn_bias", [k], -0.5, 0.5)
    mean, var = rnd(f"{case}.bn_running_mean", [k], -0.5, 0.5), rnd(f"{case}.bn_running_var", [k], 0.1, 2.0)
    z = F.conv2d(t64(x), t64(w), None, stride=1, padding=1)
    y = F.batch_norm(z, t64(mean), t64(var), t64(gamma), t64(beta), training=False, eps=1e-5)
    out.update({f"{case}.x": x, f"{case}.w": w, f"{case}.bn_weight": gamma, f"{case}.bn_bias": beta})
    out.update({f"{case}.bn_running_mean": mean, f"{case}.bn_running_var": var})
    out[f"{case}.y"] = y.numpy().astype(np.float32)
    out[f"{case}.y_relu"] = torch.relu(y).numpy().astype(np.float32)
    geo[case] = {"stride": 1, "pad": 1, "bias": False, "eps": 1e-5}

    # Max-pool 3x3 s2 p1 on mostly negative values: a zero-padded (instead of -inf) border shows.
    case = "maxpool3x3_s2"
    x = rnd(f"{case}.x", [2, 5, 11, 12], -2.0, 0.5)
    out[f"{case}.x"] = x
    out[f"{case}.y"] = F.max_pool2d(t64(x), 3, stride=2, padding=1).numpy().astype(np.float32)
    geo[case] = {"kernel": 3, "stride": 2, "pad": 1}

    for case, xd, o in [("adaptive_avg_3x3", [2, 6, 5, 7], [3, 3]), ("adaptive_avg_7x7", [1, 4, 2, 3], [7, 7]),
                        ("adaptive_avg_1x1", [2, 6, 5, 7], [1, 1])]:
        x = rnd(f"{case}.x", xd)
        out[f"{case}.x"] = x
        out[f"{case}.y"] = F.adaptive_avg_pool2d(t64(x), o).numpy().astype(np.float32)
        geo[case] = {"out": o}

    out = {k: np.ascontiguousarray(v.astype(np.float32)) for k, v in out.items()}
    write(os.path.join(out_dir, "conv_layers.safetensors"), out, {"seed": seed, "cases": json.dumps(geo)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    capgen_rng.self_check()
    os.makedirs(args.out, exist_ok=True)
    make_layers(args.out)
    photo = make_photo(args.out)
    make_resnet(args.out, photo)
    make_vgg(args.out, photo)


if __name__ == "__main__":
    main()
