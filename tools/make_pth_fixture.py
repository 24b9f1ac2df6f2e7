"""Writes tests/data/pth_fixture.pth (a small torch.save'd state dict), the same in torch's legacy
(pre-1.6) format as tests/data/pth_fixture_legacy.pth, and
tests/data/pth_fixture.safetensors (the same tensors, contiguous, as the expected values) for the
.pth reader test in src/weights/pth.rs.

The .pth covers what real torchvision checkpoints contain: a module state dict with `_metadata`
and int64 `num_batches_tracked`, plus float16 / bfloat16 tensors, an nn.Parameter, and views that
share a storage (a transpose and a narrowed slice with a storage offset).

Rerun: python tools/make_pth_fixture.py   (from the repository root)
"""
import os

import torch
from safetensors.torch import save_file

torch.manual_seed(1234)
m = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
with torch.no_grad():
    for p in m.parameters():
        p.uniform_(-1, 1)
    m[1].running_mean.uniform_(-0.1, 0.1)
    m[1].running_var.uniform_(0.5, 1.5)
    m[1].num_batches_tracked.fill_(7)
sd = m.state_dict()
base = torch.randn(4, 6)
sd["extra.base"] = base
sd["extra.transposed"] = base.t()  # shares base's storage, non-contiguous
sd["extra.narrow"] = base[1:3]  # storage offset 6
sd["extra.half"] = torch.randn(4, 5).half()
sd["extra.bf16"] = torch.randn(3, 2).bfloat16()
sd["extra.param"] = torch.nn.Parameter(torch.randn(2, 2))

out = os.path.join(os.path.dirname(__file__), "..", "tests", "data")
torch.save(sd, os.path.join(out, "pth_fixture.pth"))
torch.save(sd, os.path.join(out, "pth_fixture_legacy.pth"), _use_new_zipfile_serialization=False)
expected = {k: v.detach().contiguous().clone() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
save_file(expected, os.path.join(out, "pth_fixture.safetensors"))
print("wrote", sorted(expected))
