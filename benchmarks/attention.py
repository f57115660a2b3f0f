"""Attention backends on CPU: sdpa vs ProAttention's robust and proxy backends.

Part 1, the attention core (q, k, v of shape (batch 2, 6 heads, N tokens, head dim 64) on a √N×√N grid):
forward time (median of repeats) and peak memory for N = 256, 1024, 4096. Peak memory is measured, not
computed: the process's peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs before each
call) minus its resident size just before the call, so it covers every temporary the call allocates (output
included). It is taken in a first pass, one call each, with glibc set to return freed blocks ≥ 64 KiB to the OS at
once (otherwise reused heap memory hides allocations); "n/a" where /proc or glibc is missing. The timings
follow in a second pass with glibc's usual settings.
Part 2, full-model sampling: a small DiT (hidden 384, 6 heads of 64, depth 4, 64×64×3 input, patch 2 ->
1024 tokens), batch 2, a few DDIM steps, with each backend switched in on the same weights.

Single-threaded by default (`torch.set_num_threads(1)`, `--threads` to change). Every ratio printed is measured
in the same run. Usage:
    .venv/bin/python benchmarks/attention.py               # the full table, about 2 minutes
    .venv/bin/python benchmarks/attention.py --sizes 256,1024 --steps 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from efdit.diffusion import create_diffusion, sample  # noqa: E402
from efdit.models.attention import get_backend  # noqa: E402
from efdit.models.dit import DiT  # noqa: E402

# (label, backend name, kwargs)
BACKENDS = [
    ("sdpa", "sdpa", {}),
    ("math (explicit softmax)", "math", {}),
    ("robust mcp K=3", "robust", dict(penalty="mcp", iters=3)),
    ("proxy p=2 (M=N/4)", "proxy", dict(pool=2)),
    ("proxy p=4 (M=N/16)", "proxy", dict(pool=4)),
    ("proxy kv p=4", "proxy", dict(pool=4, proxy_mode="kv")),
]


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_memory(fn) -> tuple[object, int | None]:
    """Run fn() once; return its result and the peak extra resident memory in bytes (None off Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    except OSError:
        return fn(), None
    base = _status("VmRSS")
    out = fn()
    peak = _status("VmHWM")
    return out, None if base is None or peak is None else max(0, peak - base)


def timed(fn, min_total: float = 0.6, max_reps: int = 7) -> float:
    """Median seconds per call; the first call is a warm-up unless it is slow (> 5 s: then it is the timing)."""
    times = []
    while len(times) < 2 or sum(times[1:]) < min_total and len(times) < max_reps:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) == 1 and times[0] > 5.0:
            return times[0]
    return statistics.median(times[1:])


def set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """glibc's mmap and trim thresholds (fixing them also turns off glibc's dynamic mmap threshold)."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, mmap_bytes)) and bool(libc.mallopt(-1, trim_bytes))  # M_MMAP_ / M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def core_flops(name: str, kw: dict, B: int, H: int, N: int, d: int) -> float:
    """Multiply-adds ×2 of the attention matmuls (pooling and softmax left out)."""
    if name in ("sdpa", "math"):
        return 4.0 * B * H * N * N * d                               # QKᵀ, AV
    if name == "robust":
        return 4.0 * B * H * N * N * d * (1 + kw.get("iters", 3))   # + per IRLS step: z·vᵀ, (A⊙W)V
    p = kw.get("pool", 2)
    M = math.ceil(math.isqrt(N) / p) ** 2
    return 4.0 * B * H * N * M * d * (1 if kw.get("proxy_mode") == "kv" else 2)


def bench_core(sizes, B=2, H=6, d=64):
    inputs = {}
    for N in sizes:
        g = torch.Generator().manual_seed(N)
        inputs[N] = tuple(torch.randn(B, H, N, d, generator=g) for _ in range(3))
    cases = [(N, label, name, kw) for N in sizes for label, name, kw in BACKENDS]
    rows = []
    # pass 1, peak memory: every block of ≥ 64 KiB is mmap'ed and handed back on free, so no freed heap memory
    # can hide an allocation from the resident-set peak
    eager = set_malloc_thresholds(1 << 16, 1 << 16)
    with torch.no_grad():
        for N, label, name, kw in cases:
            q, k, v = inputs[N]
            fn = get_backend(name, **kw)
            out, mem = peak_memory(lambda: fn(q, k, v, grid=(math.isqrt(N),) * 2)) if eager else (None, None)
            del out
            rows.append(dict(N=N, backend=label, name=name, peak_bytes=mem,
                             gflop=core_flops(name, kw, B, H, N, d) / 1e9))
        # pass 2, time: blocks below 32 MiB come from (and go back to) the heap, as glibc's default settles on
        set_malloc_thresholds(32 << 20, 64 << 20)
        for row, (N, label, name, kw) in zip(rows, cases):
            q, k, v = inputs[N]
            fn = get_backend(name, **kw)
            row["seconds"] = timed(lambda: fn(q, k, v, grid=(math.isqrt(N),) * 2))
            print(f"  N={N:5d} {label:24s} {row['seconds'] * 1e3:9.2f} ms  peak {fmt_mb(row['peak_bytes'])}",
                  flush=True)
    return rows


def fmt_mb(b):
    return "   n/a" if b is None else f"{b / 2 ** 20:7.1f} MB"


def bench_model(steps: int, tokens_side: int = 32, B: int = 2):
    model = DiT(input_size=2 * tokens_side, patch_size=2, in_channels=3, hidden_size=384, depth=4, num_heads=6,
                num_classes=10).eval()
    diffusion = create_diffusion(str(steps))
    labels = torch.arange(B)
    rows = []
    for label, name, kw in [b for b in BACKENDS if b[1] != "math"]:
        model.set_attention_backend(name, **kw)
        run = lambda: sample(model, labels, diffusion, method="ddim", progress=False,  # noqa: E731
                             generator=torch.Generator().manual_seed(0))
        times = []
        while not times or len(times) < 2 and times[0] < 10.0:  # best of two, one run if it is slow
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        sec = min(times)
        rows.append(dict(backend=label, seconds=sec, steps=steps, tokens=tokens_side ** 2))
        print(f"  model {label:24s} {sec:7.2f} s for {steps} steps", flush=True)
    model.set_attention_backend("sdpa")
    return rows


def table_core(rows):
    out = ["| N | backend | GFLOP (matmuls) | forward ms | speed-up vs sdpa | peak MB | memory vs sdpa |",
           "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = next(x for x in rows if x["N"] == r["N"] and x["name"] == "sdpa")
        mem_ratio = (f"{r['peak_bytes'] / ref['peak_bytes']:.2f}×"
                     if r["peak_bytes"] is not None and ref["peak_bytes"] else "n/a")
        mem = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2 ** 20:.1f}"
        out.append(f"| {r['N']} | {r['backend']} | {r['gflop']:.2f} | {r['seconds'] * 1e3:.1f} | "
                   f"{ref['seconds'] / r['seconds']:.2f}× | {mem} | {mem_ratio} |")
    return "\n".join(out)


def table_model(rows):
    ref = rows[0]["seconds"]
    out = [f"| backend | sampling s ({rows[0]['steps']} DDIM steps, {rows[0]['tokens']} tokens, batch 2) | "
           f"speed-up vs sdpa |", "|---|---:|---:|"]
    out += [f"| {r['backend']} | {r['seconds']:.2f} | {ref / r['seconds']:.2f}× |" for r in rows]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="256,1024,4096", help="token counts (perfect squares)")
    ap.add_argument("--steps", type=int, default=4, help="DDIM steps of the model benchmark (0 = skip it)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the raw numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {load}", flush=True)
    start = time.perf_counter()
    core = bench_core(sizes)
    model = bench_model(args.steps) if args.steps > 0 else []
    print("\n## Attention core: batch 2, 6 heads, head dim 64, forward only, float32\n")
    print(table_core(core))
    if model:
        print("\n## Full-model sampling (DiT hidden 384, depth 4, 6 heads)\n")
        print(table_model(model))
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(core=core, model=model, threads=args.threads, load=load), f, indent=1)


if __name__ == "__main__":
    main()
