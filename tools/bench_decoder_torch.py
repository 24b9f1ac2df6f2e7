"""Times one decoder training step in PyTorch on 2 threads, for side-by-side comparison with
`capgen bench train-step` / `capgen bench lstm` (issue 3, Performance section).

Writes nothing; prints one line per case (median ms of the timed steps after warm-up) and, when given
the capgen binary, runs `capgen bench train-step --json --threads 2` and `capgen bench lstm --json
--threads 2` too and prints our median next to PyTorch's with the ratio ours / torch.

Sizes (same as capgen's DECODER_BENCH): batch 64, 20 steps, embedding 512, hidden 512, attention 512,
vocabulary 8000, 49x2048 grid features (attention) or 2048 pooled features (show-tell); every caption
20 tokens long; forward, cross-entropy loss (+ doubly stochastic regulariser for attention), backward,
Adam. The attention decoder is the same math as src/cpu/attention.rs (relu additive attention, sigmoid
gate f_beta, h0/c0 linear from the mean feature) with an nn.LSTMCell loop; show-tell uses tanh-linear
h0/c0 and nn.LSTM (and, as a second case, an nn.LSTMCell loop).

Rerun:  python tools/bench_decoder_torch.py [--capgen target/release/capgen] [--steps 15]
"""

import argparse
import json
import subprocess
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

B, T, E, H, A, V, L, D = 64, 20, 512, 512, 512, 8000, 49, 2048


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.init_h, self.init_c = nn.Linear(D, H), nn.Linear(D, H)
        self.enc, self.dec, self.full = nn.Linear(D, A), nn.Linear(H, A), nn.Linear(A, 1)
        self.beta = nn.Linear(H, D)
        self.cell = nn.LSTMCell(E + D, H)
        self.fc = nn.Linear(H, V)

    def forward(self, feats, tokens):
        mean = feats.mean(1)
        h, c = self.init_h(mean), self.init_c(mean)
        att1 = self.enc(feats)  # (B,L,A)
        x = self.emb(tokens)  # (B,T,E)
        logits, alphas = [], []
        for t in range(tokens.shape[1]):
            e = self.full(F.relu(att1 + self.dec(h)[:, None, :])).squeeze(2)  # (B,L)
            alpha = e.softmax(1)
            z = (alpha[:, :, None] * feats).sum(1)  # (B,D)
            ctx = torch.sigmoid(self.beta(h)) * z
            h, c = self.cell(torch.cat([x[:, t], ctx], 1), (h, c))
            logits.append(self.fc(h))
            alphas.append(alpha)
        return torch.stack(logits, 1), torch.stack(alphas, 1)


class ShowTell(nn.Module):
    def __init__(self, cell_loop):
        super().__init__()
        self.cell_loop = cell_loop
        self.emb = nn.Embedding(V, E)
        self.init_h, self.init_c = nn.Linear(D, H), nn.Linear(D, H)
        if cell_loop:
            self.cell = nn.LSTMCell(E, H)
        else:
            self.lstm = nn.LSTM(E, H, batch_first=True)
        self.fc = nn.Linear(H, V)

    def forward(self, feats, tokens):
        h, c = torch.tanh(self.init_h(feats)), torch.tanh(self.init_c(feats))
        x = self.emb(tokens)
        if self.cell_loop:
            hs = []
            for t in range(tokens.shape[1]):
                h, c = self.cell(x[:, t], (h, c))
                hs.append(h)
            hs = torch.stack(hs, 1)
        else:
            hs, _ = self.lstm(x, (h[None], c[None]))
        return self.fc(hs), None


def time_case(model, feats, steps):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, V, (B, T), generator=g)
    targets = torch.randint(4, V, (B, T), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=4e-4)

    def step():
        opt.zero_grad(set_to_none=False)
        logits, alphas = model(feats, tokens)
        loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=0)
        if alphas is not None:
            loss = loss + ((1.0 - alphas.sum(1)) ** 2).mean()
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    ms = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        ms.append((time.perf_counter() - t0) * 1e3)
    ms.sort()
    n = len(ms)
    return ms[n // 2] if n % 2 else 0.5 * (ms[n // 2 - 1] + ms[n // 2])


def capgen_cases(binary):
    out = {}
    for what in ["train-step", "lstm"]:
        res = subprocess.run([binary, "bench", what, "--json", "--threads", "2"], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"capgen bench {what} failed: {res.stderr.strip()}")
        for line in res.stdout.splitlines():
            row = json.loads(line)
            out[row["case"]] = row["ms_median"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--capgen", help="path to the capgen binary to compare with")
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    grid = torch.rand(B, L, D)
    pooled = torch.rand(B, D)
    torch_ms = {
        "attention train step B64 T20": time_case(Attention(), grid, args.steps),
        "show-tell train step B64 T20": time_case(ShowTell(False), pooled, args.steps),
        "show-tell (LSTMCell loop) train step B64 T20": time_case(ShowTell(True), pooled, args.steps),
    }
    ours = capgen_cases(args.capgen) if args.capgen else {}
    print(f"{'case':<46} {'torch ms':>10} {'capgen ms':>10} {'ratio':>7}")
    for case, t in torch_ms.items():
        o = ours.get(case)
        if o is None:
            print(f"{case:<46} {t:>10.1f} {'-':>10} {'-':>7}")
        else:
            print(f"{case:<46} {t:>10.1f} {o:>10.1f} {o / t:>7.2f}")


if __name__ == "__main__":
    main()
