"""Writes small test images to tests/data/preprocess/*.{png,jpg} and, for each, torchvision's
preprocessing output (Resize(256), CenterCrop(224), ToTensor(), Normalize(ImageNet mean/std) on
`Image.open(p).convert("RGB")`) to tests/data/preprocess/NAME.f32, which tests/preprocess_golden.rs
compares with capgen::data::image.

Each .f32 file is raw little-endian f32: first out[:, 5::14, 5::14] (3 x 16 x 16, a subsample of the
whole crop), then out[:, 100:112, 100:112] (3 x 12 x 12, a dense window to catch off-by-one shifts).

16-bit grey PNG: PIL opens it as mode I;16 and convert("RGB") clips at 255 (nearly all white); capgen
deliberately takes the high byte instead (see src/data/image.rs), so the reference here is computed
from PIL's raw 16-bit samples >> 8 as an 8-bit "L" image, then the same torchvision pipeline.

Rerun: python tools/preprocess_golden.py   (deterministic)
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "preprocess"
OUT.mkdir(parents=True, exist_ok=True)


def pattern(w, h, phase):
    """Smooth rings and gradients with a few hard edges (exercise the filter), values in [0, 1]."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r2 = ((x - w * 0.4) ** 2 + (y - h * 0.6) ** 2) / (min(w, h) ** 2)
    v = 0.5 + 0.35 * np.sin(40 * r2 + phase) + 0.1 * (x / w)
    v[(x // max(w // 7, 1) + y // max(h // 5, 1)) % 4 == 0] *= 0.5  # blocky edges
    return np.clip(v, 0, 1)


def rgb(w, h):
    return np.stack([pattern(w, h, p) for p in (0.0, 1.3, 2.6)], axis=-1)


def u8(a):
    return (a * 255 + 0.5).astype(np.uint8)


images = {}
images["colour.jpg"] = Image.fromarray(u8(rgb(320, 480)), "RGB")
images["grey.jpg"] = Image.fromarray(u8(pattern(400, 300, 0.7)), "L")
images["cmyk.jpg"] = Image.fromarray(u8(rgb(260, 300)), "RGB").convert("CMYK")
images["rgb.png"] = Image.fromarray(u8(rgb(400, 290)), "RGB")
images["rgba.png"] = Image.fromarray(u8(np.concatenate([rgb(150, 100), pattern(150, 100, 2.0)[..., None]], -1)), "RGBA")
images["greyalpha.png"] = Image.fromarray(u8(np.stack([pattern(64, 70, 0.3), pattern(64, 70, 1.0)], -1)), "LA")
images["palette.png"] = Image.fromarray(u8(rgb(90, 120)), "RGB").quantize(colors=64)
# A large downscale (1100 -> 256, filter support 4.3 pixels): palette-quantised so the file stays small.
images["large.png"] = Image.fromarray(u8(rgb(1500, 1100)), "RGB").quantize(colors=16)
images["one.png"] = Image.fromarray(np.array([[[200, 100, 50]]], dtype=np.uint8), "RGB")
grey16 = (pattern(220, 160, 1.7) * 65535 + 0.5).astype(np.uint16)

for name, im in images.items():
    if name.endswith(".jpg"):
        im.save(OUT / name, quality=90)
    else:
        im.save(OUT / name)
Image.fromarray(grey16).save(OUT / "grey16.png")  # uint16 -> mode I;16

tf = T.Compose([
    T.Resize(256),
    T.CenterCrop(224),
    T.ToTensor(),
    T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
])


def write(name, x: torch.Tensor):
    assert x.shape == (3, 224, 224), x.shape
    a = x[:, 5::14, 5::14].numpy()
    b = x[:, 100:112, 100:112].numpy()
    data = np.concatenate([a.ravel(), b.ravel()]).astype("<f4")
    (OUT / (Path(name).stem + "_" + Path(name).suffix[1:] + ".f32")).write_bytes(data.tobytes())


for name in list(images) + ["grey16.png"]:
    im = Image.open(OUT / name)
    if name == "grey16.png":
        assert im.mode == "I;16", im.mode
        im = Image.fromarray((np.array(im).astype(np.uint16) >> 8).astype(np.uint8), "L")
    write(name, tf(im.convert("RGB")))
    print("wrote", name)
