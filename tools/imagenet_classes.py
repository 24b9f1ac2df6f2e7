"""Writes src/data/imagenet_classes.txt: the 1000 ImageNet class names, one per line, in class-index
order, taken from torchvision's weight metadata (ResNet50_Weights.IMAGENET1K_V1.meta["categories"]).
`capgen classify` embeds the file.

Rerun: python tools/imagenet_classes.py
"""

from pathlib import Path

from torchvision.models import ResNet50_Weights

names = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
assert len(names) == 1000
assert all("\n" not in n for n in names)
out = Path(__file__).resolve().parent.parent / "src" / "data" / "imagenet_classes.txt"
out.write_text("\n".join(names) + "\n")
print(f"wrote {out} ({len(names)} names)")
