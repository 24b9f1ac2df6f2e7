"""Writes tests/data/resnet_train_golden.safetensors: one PyTorch training-mode forward/backward of a
small ResNet, replayed by tests/resnet_train_golden.rs against capgen's TrainResNet.

Rerun (from the repository root):  python tools/make_resnet_train_golden.py

The network: torchvision's ResNet layout (BasicBlock, v1.5) with blocks [1, 1, 1, 1] and base width 8
(channels 8/16/32/64), written out here as plain nn.Modules with torchvision's state-dict names, since
torchvision's own ResNet fixes the width at 64. Weights and BN running stats are
`capgen_rng.init_tensor(name, dims, SEED)` -- bit-identical to `TrainResNet::random(cfg, SEED)` -- so
no weights are stored. Input x (2, 3, 48, 48) = uniform_vec(SEED, "x", ., -2, 2); the loss is
L = sum(grid * R) with grid = layer4 output as (N, h*w, C) (2, 4, 64) and R = uniform_vec(SEED, "r", ., -1, 1).
BN runs in training mode (batch statistics, momentum 0.1, eps 1e-5).

Stored (float32): `grid`; `grad.<param>` for every conv weight and BN weight/bias; `grad.x` (input
gradient); `<bn>.running_mean` / `<bn>.running_var` after the one forward. Computed in float64 from
the float32 weights and inputs, so the reference is exact to ~1e-12.
"""

import os
import sys

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from capgen_rng import init_tensor, uniform_vec  # noqa: E402

SEED = 7
N, H, W = 2, 48, 48
WIDTH = 8
OUT = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "tests", "data", "resnet_train_golden.safetensors")
)


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        idt = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + idt)


class Net(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = w
        for li in range(4):
            planes = w << li
            setattr(self, f"layer{li + 1}", nn.Sequential(BasicBlock(inplanes, planes, 1 if li == 0 else 2)))
            inplanes = planes

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for li in range(4):
            x = getattr(self, f"layer{li + 1}")(x)
        return x


def main():
    net = Net(WIDTH)
    sd = {}
    for name, t in net.state_dict().items():
        if name.endswith("num_batches_tracked"):
            sd[name] = t
            continue
        sd[name] = torch.from_numpy(init_tensor(name, list(t.shape), SEED).copy())
    net.load_state_dict(sd)
    net = net.double().train()
    x = torch.from_numpy(uniform_vec(SEED, "x", N * 3 * H * W, -2.0, 2.0).reshape(N, 3, H, W))
    x = x.double().requires_grad_(True)
    feat = net(x)  # (N, C, h, w)
    n, c, h, w = feat.shape
    grid = feat.reshape(n, c, h * w).transpose(1, 2)  # (N, hw, C)
    r = torch.from_numpy(uniform_vec(SEED, "r", grid.numel(), -1.0, 1.0).reshape(grid.shape)).double()
    loss = (grid * r).sum()
    loss.backward()

    out = {"grid": grid.detach().float().contiguous(), "grad.x": x.grad.float().contiguous()}
    for name, p in net.named_parameters():
        out[f"grad.{name}"] = p.grad.float().contiguous()
    for name, b in net.named_buffers():
        if "running" in name:
            out[name] = b.float().contiguous()
    save_file(out, OUT)
    size = os.path.getsize(OUT)
    print(f"wrote {OUT}: {len(out)} tensors, {size} bytes, grid {tuple(grid.shape)}, loss {loss.item():.6f}")
    assert size < 500_000


if __name__ == "__main__":
    main()
