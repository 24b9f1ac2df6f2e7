"""ResNet-50 latency: onnxruntime (CPU) side by side with `capgen bench resnet50`. Writes nothing kept.

Rerun (no network needed; the ONNX model lives in a temporary directory that is deleted afterwards):

    python tools/bench_onnxruntime.py [--capgen target/release/capgen] \
        [--batches 1,8] [--runs 10] [--warmup 3] [--threads 2] [--rounds 1] [--json]
    python tools/bench_onnxruntime.py --profile [--batches 1,8] [--runs 10]   # per-node times

It exports torchvision's resnet50 (weights=None, filled with capgen's seeded random weights through
tools/capgen_rng.py, so both engines run the very same network) to ONNX, runs onnxruntime's CPU
provider with intra_op_num_threads=THREADS and inter_op_num_threads=1 (sequential execution, all graph
optimisations) on NCHW 224x224 inputs at each batch size, and takes the median of RUNS timed runs after
WARMUP untimed ones. If the capgen binary exists it then runs
`capgen bench resnet50 --batch B --threads THREADS --json` and reads its `ms_median` (DESIGN.md section
4; capgen picks its own repetitions, --runs/--warmup apply to onnxruntime), printing both latencies
per batch and the ratio capgen / onnxruntime (below 1 means capgen is faster). With --rounds R the two
engines are timed alternately R times and the medians over rounds are reported.
Run it on an otherwise idle machine: both engines use THREADS cores and any other load skews both.
torch, onnx, onnxscript and onnxruntime come from PyPI.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import capgen_rng  # noqa: E402

SEED = 0  # the network's weights; latency does not depend on them (no denormals at this scale)
GFLOP_PER_IMAGE = 8.18  # ResNet-50 at 224: 4.09 GMAC (DESIGN.md section 5)


def export_resnet50(path: str) -> None:
    import torch
    import torchvision

    model = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not name.endswith("num_batches_tracked"):
                t.copy_(torch.from_numpy(capgen_rng.init_tensor(name, list(t.shape), SEED)))
    x = torch.zeros(1, 3, 224, 224)
    kw = dict(input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the legacy exporter's notice
    try:
        # The TorchScript exporter: one self-contained file with a dynamic batch axis.
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, **kw)
    except Exception as e:  # pragma: no cover - depends on the torch version
        print(f"note: TorchScript ONNX export failed ({e}); trying the dynamo exporter", file=sys.stderr)
        batch = torch.export.Dim("n", min=1, max=64)
        torch.onnx.export(model, (x,), path, dynamo=True, external_data=False,
                          dynamic_shapes={"x": {0: batch}}, input_names=["input"], output_names=["logits"])


def make_session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def time_ort(sess, batch: int, runs: int, warmup: int) -> float:
    x = capgen_rng.uniform_vec(SEED, "bench_input", batch * 3 * 224 * 224, -2.0, 2.0).reshape(batch, 3, 224, 224)
    name = sess.get_inputs()[0].name
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile_ort(path: str, threads: int, batch: int, runs: int) -> None:
    """Per-node times (onnxruntime's own profiler), summed over nodes of the same op and shapes, in
    graph order, ms per run: the counterpart of `capgen bench resnet50 --layers`."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "ort")
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        x = capgen_rng.uniform_vec(SEED, "bench_input", batch * 3 * 224 * 224, -2.0, 2.0).reshape(batch, 3, 224, 224)
        name = sess.get_inputs()[0].name
        for _ in range(3):
            sess.run(None, {name: x})
        t0 = time.perf_counter()
        for _ in range(runs):
            sess.run(None, {name: x})
        wall = (time.perf_counter() - t0) * 1e3 / runs
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    # The last `runs` runs' worth of node events (the warm-up runs come first).
    per_run = len(nodes) // (runs + 3)
    nodes = nodes[-per_run * runs:]
    rows = {}
    for e in nodes:
        a = e.get("args", {})
        shapes = [list(d.values())[0] for d in a.get("input_type_shape", [])]
        key = f"{a.get('op_name', '?')} in {shapes[0] if shapes else '?'} w {shapes[1] if len(shapes) > 1 else '-'}"
        r = rows.setdefault(key, [0, 0.0])
        r[0] += 1
        r[1] += e["dur"] / 1e3  # microseconds
    total = sum(r[1] for r in rows.values()) / runs
    print(f"onnxruntime per-node profile, batch {batch}, {threads} threads, mean of {runs} runs "
          f"(wall {wall:.2f} ms per run with the profiler on; nodes sum to {total:.2f} ms)")
    for key, (count, ms) in rows.items():
        print(f"{key:<70} x{count // runs:<3} {ms / runs:8.3f} ms")


def time_capgen(binary: str, batch: int, threads: int):
    """capgen's ms_median for resnet50 at this batch, or None (with the reason on stderr)."""
    cmd = [binary, "bench", "resnet50", "--batch", str(batch), "--threads", str(threads), "--json"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"capgen: {' '.join(cmd)} failed: {e}", file=sys.stderr)
        return None
    if res.returncode != 0:
        print(f"capgen: {' '.join(cmd)} exited {res.returncode}: {res.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    for line in res.stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("bench") == "resnet50" and int(rec.get("batch", batch)) == batch:
            return float(rec["ms_median"])
    print(f"capgen: no resnet50 JSON line for batch {batch} in: {res.stdout.strip()[-500:]}", file=sys.stderr)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description="ResNet-50: onnxruntime vs capgen, side by side")
    ap.add_argument("--capgen", default="target/release/capgen", help="capgen binary (skipped if missing)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="alternate the two engines this many times")
    ap.add_argument("--json", action="store_true", help="one JSON object per batch size on stdout")
    ap.add_argument("--profile", action="store_true",
                    help="instead: onnxruntime's per-node times at each batch (compare with "
                         "`capgen bench resnet50 --layers`)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.profile:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "resnet50.onnx")
            export_resnet50(path)
            for b in batches:
                profile_ort(path, args.threads, b, args.runs)
        return
    have_capgen = os.path.isfile(args.capgen) and os.access(args.capgen, os.X_OK)
    if not have_capgen:
        print(f"note: {args.capgen} not found or not executable; timing onnxruntime only", file=sys.stderr)

    # Each round times onnxruntime then capgen at every batch size, back to back, so slow drifts in
    # the machine's load hit both engines alike; the result is the median over rounds.
    ort_t = {b: [] for b in batches}
    cap_t = {b: [] for b in batches}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "resnet50.onnx")
        export_resnet50(path)
        sess = make_session(path, args.threads)
        for _ in range(args.rounds):
            for b in batches:
                ort_t[b].append(time_ort(sess, b, args.runs, args.warmup))
                c = time_capgen(args.capgen, b, args.threads) if have_capgen else None
                if c is not None:
                    cap_t[b].append(c)
    rows = [(b, statistics.median(ort_t[b]), statistics.median(cap_t[b]) if cap_t[b] else None) for b in batches]
    # Per-round ratios (each round times both engines back to back): robust to slow drifts of the
    # machine's speed, which on a shared VM can exceed the difference being measured.
    ratios = {b: sorted(c / o for o, c in zip(ort_t[b], cap_t[b])) for b in batches}

    if args.json:
        for b, o, c in rows:
            r = ratios[b]
            print(json.dumps({"bench": "resnet50", "batch": b, "threads": args.threads, "ort_ms_median": o,
                              "capgen_ms_median": c, "ratio_capgen_over_ort": None if c is None else c / o,
                              "ratio_per_round_median": statistics.median(r) if r else None,
                              "ratio_per_round": r}))
        return
    print(f"ResNet-50 224x224, {args.threads} threads, median of {args.runs} runs after {args.warmup} warm-up"
          f" (median over {args.rounds} alternating round(s))")
    print(f"{'batch':>5} {'onnxruntime ms':>15} {'GFLOP/s':>8} {'capgen ms':>10} {'GFLOP/s':>8} {'capgen/ort':>11}"
          f"  per-round ratios (min, median, max)")
    for b, o, c in rows:
        og = GFLOP_PER_IMAGE * b / (o / 1e3)
        if c is None:
            print(f"{b:>5} {o:>15.1f} {og:>8.1f} {'-':>10} {'-':>8} {'-':>11}")
        else:
            cg = GFLOP_PER_IMAGE * b / (c / 1e3)
            r = ratios[b]
            print(f"{b:>5} {o:>15.1f} {og:>8.1f} {c:>10.1f} {cg:>8.1f} {c / o:>11.2f}"
                  f"  {r[0]:.2f}, {statistics.median(r):.2f}, {r[-1]:.2f}")


if __name__ == "__main__":
    main()
