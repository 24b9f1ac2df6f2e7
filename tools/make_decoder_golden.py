"""Writes tests/data/decoder_golden.safetensors: PyTorch reference for the two decoders' building blocks.

Rerun (from the repository root):  python tools/make_decoder_golden.py

Contents (all float32; integer tensors -- tokens, targets, lengths -- are stored as exact float32 values):

1. `lstm.*`: a show-tell style sequence. x (B,T,I), h0/c0 (B,H), an nn.LSTM (batch_first, gates i,f,g,o)
   run on a packed batch with lengths sorted longest first (outputs past a row's length are 0),
   logits = fc(hs) (B,T,V), loss = cross-entropy over the vocabulary with <pad> = 0 ignored, mean over
   non-pad tokens, label smoothing 0.1. Saved: inputs, weights, hs, loss, and the gradient of the loss
   w.r.t. every input and weight (`lstm.grad.<name>`).
2. `att.*`: a Show-Attend-Tell decoder with teacher forcing. feats (B,L,D); h0 = mean_l(feats) W_h^T + b_h,
   c0 likewise (no tanh); each step t, on the rows still live (active batch size): additive attention
   (att1 = feats W_enc^T + b_enc, att2 = h W_dec^T + b_dec, e = relu(att1 + att2) w_full^T + b_full,
   alpha = softmax_L(e), ctx = sigmoid(h W_beta^T + b_beta) * sum_l alpha_l feats_l), an nn.LSTMCell on
   [embedding(token_t), ctx], logits = fc(h). Loss = CE (pad ignored, no smoothing) + alpha_c *
   mean_b sum_l (1 - sum_t alpha[b,t,l])^2. Saved: inputs, weights, logits, alphas, loss, every gradient.
3. `st.*`: the show-tell decoder: pooled feature f (B,D), h0 = tanh(f W_h^T + b_h), c0 = tanh(f W_c^T + b_c),
   embedding(tokens), packed nn.LSTM, fc, cross-entropy (pad ignored, label smoothing 0.1).

The reference is computed in float64 from float32-rounded inputs, so it is exact to ~1e-12.
"""

import os

import torch
from safetensors.torch import save_file

torch.manual_seed(1234)
D64 = torch.float64
OUT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "tests", "data", "decoder_golden.safetensors"))


def rand(*shape, scale=1.0):
    # float32 values, then float64 for the computation
    return ((torch.rand(*shape, dtype=torch.float32) * 2 - 1) * scale).to(D64)


tensors = {}


def put(name, t):
    tensors[name] = t.detach().to(torch.float32).contiguous()


# ---------------------------------------------------------------- 1. LSTM sequence (show-tell)
B, T, I, H, V = 3, 5, 8, 16, 11
lengths = [5, 4, 2]
lstm = torch.nn.LSTM(I, H, batch_first=True).to(D64)
fc = torch.nn.Linear(H, V).to(D64)
with torch.no_grad():
    for p in list(lstm.parameters()) + list(fc.parameters()):
        p.copy_(rand(*p.shape, scale=0.4))
x = rand(B, T, I).requires_grad_()
h0 = rand(B, H, scale=0.5).requires_grad_()
c0 = rand(B, H, scale=0.5).requires_grad_()
targets = torch.randint(1, V, (B, T))
for b, n in enumerate(lengths):
    targets[b, n:] = 0
packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), batch_first=True)
out, _ = lstm(packed, (h0.unsqueeze(0), c0.unsqueeze(0)))
hs, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
logits = fc(hs)
loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=0,
                                         label_smoothing=0.1)
loss.backward()
put("lstm.x", x)
put("lstm.h0", h0)
put("lstm.c0", c0)
put("lstm.targets", targets.to(D64))
put("lstm.lengths", torch.tensor(lengths, dtype=D64))
put("lstm.hs", hs)
put("lstm.loss", loss.reshape(1))
for name, t in [("x", x), ("h0", h0), ("c0", c0)]:
    put(f"lstm.grad.{name}", t.grad)
for name, p in [("w_ih", lstm.weight_ih_l0), ("w_hh", lstm.weight_hh_l0), ("b_ih", lstm.bias_ih_l0),
                ("b_hh", lstm.bias_hh_l0), ("fc_w", fc.weight), ("fc_b", fc.bias)]:
    put(f"lstm.{name}", p)
    put(f"lstm.grad.{name}", p.grad)

# ---------------------------------------------------------------- 2. attention decoder (teacher forcing)
B, T, L, D, E, H, A, V = 3, 5, 6, 10, 7, 16, 12, 11
alpha_c = 1.0
lengths = [5, 4, 2]
feats = rand(B, L, D).requires_grad_()
tokens = torch.randint(1, V, (B, T))
targets = torch.randint(1, V, (B, T))
for b, n in enumerate(lengths):
    tokens[b, n:] = 0
    targets[b, n:] = 0
P = {
    "emb": rand(V, E), "w_h": rand(H, D, scale=0.3), "b_h": rand(H, scale=0.3), "w_c": rand(H, D, scale=0.3),
    "b_c": rand(H, scale=0.3), "w_enc": rand(A, D, scale=0.3), "b_enc": rand(A, scale=0.3),
    "w_dec": rand(A, H, scale=0.3), "b_dec": rand(A, scale=0.3), "w_full": rand(1, A, scale=0.3),
    "b_full": rand(1, scale=0.3), "w_beta": rand(D, H, scale=0.3), "b_beta": rand(D, scale=0.3),
    "w_ih": rand(4 * H, E + D, scale=0.3), "w_hh": rand(4 * H, H, scale=0.3), "b_ih": rand(4 * H, scale=0.3),
    "b_hh": rand(4 * H, scale=0.3), "fc_w": rand(V, H, scale=0.3), "fc_b": rand(V, scale=0.3),
}
F = torch.nn.functional
cell = torch.nn.LSTMCell(E + D, H).to(D64)
for name, attr in [("w_ih", "weight_ih"), ("w_hh", "weight_hh"), ("b_ih", "bias_ih"), ("b_hh", "bias_hh")]:
    setattr(cell, attr, torch.nn.Parameter(P[name]))
    P[name] = getattr(cell, attr)
for p in P.values():
    p.requires_grad_()
mean = feats.mean(1)
h = F.linear(mean, P["w_h"], P["b_h"])
c = F.linear(mean, P["w_c"], P["b_c"])
emb = F.embedding(tokens, P["emb"])
att1 = F.linear(feats, P["w_enc"], P["b_enc"])
logits = torch.zeros(B, T, V, dtype=D64)
alphas = torch.zeros(B, T, L, dtype=D64)
for t in range(T):
    bs = sum(n > t for n in lengths)
    hb = h[:bs]
    att2 = F.linear(hb, P["w_dec"], P["b_dec"])
    e = F.linear(F.relu(att1[:bs] + att2.unsqueeze(1)), P["w_full"], P["b_full"]).squeeze(2)
    alpha = F.softmax(e, dim=1)
    ctx = (feats[:bs] * alpha.unsqueeze(2)).sum(1) * torch.sigmoid(F.linear(hb, P["w_beta"], P["b_beta"]))
    xin = torch.cat([emb[:bs, t], ctx], dim=1)
    h, c = cell(xin, (hb, c[:bs]))
    logits = logits.index_put((torch.arange(bs), torch.full((bs,), t)), F.linear(h, P["fc_w"], P["fc_b"]))
    alphas = alphas.index_put((torch.arange(bs), torch.full((bs,), t)), alpha)
ce = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=0)
reg = alpha_c * ((1.0 - alphas.sum(1)) ** 2).sum(1).mean()
loss = ce + reg
loss.backward()
put("att.feats", feats)
put("att.tokens", tokens.to(D64))
put("att.targets", targets.to(D64))
put("att.lengths", torch.tensor(lengths, dtype=D64))
put("att.alpha_c", torch.tensor([alpha_c], dtype=D64))
put("att.logits", logits)
put("att.alphas", alphas)
put("att.ce", ce.reshape(1))
put("att.reg", reg.reshape(1))
put("att.grad.feats", feats.grad)
for name, p in P.items():
    put(f"att.{name}", p)
    put(f"att.grad.{name}", p.grad)

# ---------------------------------------------------------------- 3. show-tell decoder
B, T, D, E, H, V = 3, 5, 9, 7, 16, 11
lengths = [5, 5, 3]
f = rand(B, D)
tokens = torch.randint(1, V, (B, T))
targets = torch.randint(1, V, (B, T))
for b, n in enumerate(lengths):
    tokens[b, n:] = 0
    targets[b, n:] = 0
S = {"emb": rand(V, E), "w_h": rand(H, D, scale=0.3), "b_h": rand(H, scale=0.3), "w_c": rand(H, D, scale=0.3),
     "b_c": rand(H, scale=0.3)}
lstm = torch.nn.LSTM(E, H, batch_first=True).to(D64)
fc = torch.nn.Linear(H, V).to(D64)
with torch.no_grad():
    for p in list(lstm.parameters()) + list(fc.parameters()):
        p.copy_(rand(*p.shape, scale=0.4))
for p in S.values():
    p.requires_grad_()
h0 = torch.tanh(F.linear(f, S["w_h"], S["b_h"]))
c0 = torch.tanh(F.linear(f, S["w_c"], S["b_c"]))
packed = torch.nn.utils.rnn.pack_padded_sequence(F.embedding(tokens, S["emb"]), torch.tensor(lengths),
                                                 batch_first=True)
out, _ = lstm(packed, (h0.unsqueeze(0), c0.unsqueeze(0)))
hs, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
logits = fc(hs)
loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=0, label_smoothing=0.1)
loss.backward()
put("st.feats", f)
put("st.tokens", tokens.to(D64))
put("st.targets", targets.to(D64))
put("st.lengths", torch.tensor(lengths, dtype=D64))
put("st.logits", logits)
put("st.loss", loss.reshape(1))
S.update({"w_ih": lstm.weight_ih_l0, "w_hh": lstm.weight_hh_l0, "b_ih": lstm.bias_ih_l0, "b_hh": lstm.bias_hh_l0,
          "fc_w": fc.weight, "fc_b": fc.bias})
for name, p in S.items():
    put(f"st.{name}", p)
    put(f"st.grad.{name}", p.grad)

tmp = OUT + ".tmp"
save_file(tensors, tmp)
os.replace(tmp, OUT)
print(f"wrote {OUT}: {len(tensors)} tensors, {os.path.getsize(OUT)} bytes; lstm loss {tensors['lstm.loss'].item():.6f},"
      f" att ce {ce.item():.6f} reg {reg.item():.6f}")
