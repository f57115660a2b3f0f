"""efdit's DiT against diffusers' `DiTTransformer2DModel`, measured side by side in one run (CPU, fp32).

    .venv/bin/python benchmarks/peers.py            # full table -> benchmarks/RESULTS.md (about 20-30 min on 2 cores)
    .venv/bin/python benchmarks/peers.py --quick    # smoke test on a tiny DiT, well under 2 minutes, prints only

Needs the `bench` extra (diffusers), installed without touching torch:
    .venv/bin/pip install -c constraints.txt "diffusers==0.42.1"

Same configuration for both models: depth / width / heads / patch / learn_sigma (8 output channels for 4 input
channels), 1000 classes + the null class, random weights (N(0, 0.02) everywhere, so adaLN-Zero does not leave
the blocks as identities). diffusers gives every block its own copy of the timestep/label embedder; here the
copies are tied to block 0's so both models have exactly the same parameters (asserted). The per-block
recomputation of the embedding that diffusers does is kept: that is how it runs.

Measured, all in one process except the memory:
  * matmul rate: a 2048 x 2048 fp32 matmul, best of several, at the start, between parts and at the end;
  * forward img/s (torch.inference_mode) of DiT-S/2 and DiT-B/2 on 32x32x4 latents, batch 8 and 32:
    efdit eager, diffusers eager, efdit with torch.compile (through efdit's own `maybe_compile`);
  * training step img/s: forward + ε-MSE loss + backward + AdamW(lr 1e-4), label dropout on, the same loss
    for both models (efdit's own hybrid loss adds a VLB term that has nothing to do with the network):
    efdit eager, diffusers eager, efdit compiled, efdit with gradient checkpointing;
  * training memory: each configuration in a fresh subprocess (numbers never bleed between them), glibc told
    to hand freed blocks >= 64 KiB back at once; the peak resident set (VmHWM, reset through
    /proc/self/clear_refs) during one training step minus the resident set just before it (model, optimizer,
    inputs), per image: activations + gradients + temporaries. Peak RSS of the process is reported too;
  * 50-step DDIM sampling with classifier-free guidance (scale 4, the null class): efdit's sampler (one batched
    forward for both branches, inference mode) vs a plain DDIM loop over the diffusers model that doubles the
    batch for CFG under torch.no_grad, as diffusers' DiTPipeline does; same respaced schedule. Beside them the
    fastest efdit settings that kept DDIM-50's FD in the quality-matched table (DPM-Solver++(2M) 10 steps,
    DDIM-50 + TaylorSeer), on the same model, labels and noise; 3 chains each, interleaved.

Timings interleave the models (a, b, c, a, b, c, ...) after a warm-up call each and keep the best call, so a
load spike on a shared machine hits both sides alike and is not mistaken for speed.

FLOPs are counted analytically, 2 per multiply-add, for one image of T = (H/p)(W/p) tokens, width D, depth L,
MLP width 4D, C_in input and C_out output channels (see `dit_flops`):
    per block   24·T·D²  (qkv 6TD², proj 2TD², MLP 16TD²)  +  4·T²·D  (QKᵀ and A·V over all heads)  +  12·D²  (adaLN)
    embedding   2·T·C_in·p²·D  (patch conv)  +  2·(256·D + D²)  (timestep MLP)
    final layer 4·D²  (adaLN shift/scale)  +  2·T·D·p²·C_out
A training step counts 3x the forward (the backward is two matmuls per forward matmul); gradient checkpointing
recomputes the forward but is still credited 3x (useful work only). Sampling counts 2 forwards (both CFG branches) per image per model call.
Element-wise work (LayerNorm, GELU, softmax, adds) is not counted: it is the gap to the matmul rate.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from efdit.diffusion import Guidance, create_diffusion, sample  # noqa: E402
from efdit.diffusion.hooks.cache import build_accel  # noqa: E402
from efdit.models.compiled import maybe_compile  # noqa: E402
from efdit.models.dit import DiT, DiT_models  # noqa: E402

NUM_CLASSES, IN_CH = 1000, 4
QUICK_ARCH = dict(depth=2, hidden_size=128, num_heads=2, patch_size=2)


# ---- FLOPs ------------------------------------------------------------------------------------------------------
def dit_flops(depth: int, hidden_size: int, patch_size: int, input_size: int, in_ch: int = IN_CH,
              out_ch: int = 2 * IN_CH, mlp_ratio: float = 4.0, freq: int = 256) -> float:
    """FLOPs (2 per multiply-add) of one DiT forward for ONE image; the formula of the module docstring."""
    D, p = hidden_size, patch_size
    T = (input_size // p) ** 2
    block = 2 * T * D * 3 * D + 2 * T * D * D + 2 * 2 * T * D * int(mlp_ratio * D) + 4 * T * T * D + 2 * D * 6 * D
    embed = 2 * T * in_ch * p * p * D + 2 * (freq * D + D * D)
    final = 2 * D * 2 * D + 2 * T * D * p * p * out_ch
    return float(depth * block + embed + final)


# ---- models -----------------------------------------------------------------------------------------------------
def sizes_of(arch: str) -> dict:
    return dict(QUICK_ARCH) if arch == "tiny" else dict(DiT_models[arch])


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def build_efdit(arch: str, input_size: int, grad_checkpointing: bool = False) -> DiT:
    m = DiT(input_size=input_size, in_channels=IN_CH, num_classes=NUM_CLASSES, learn_sigma=True, **sizes_of(arch))
    m.grad_checkpointing = grad_checkpointing
    return randomize_(m)


def build_diffusers(arch: str, input_size: int, grad_checkpointing: bool = False, tie_embedders: bool = True):
    from diffusers import DiTTransformer2DModel
    s = sizes_of(arch)
    m = DiTTransformer2DModel(num_attention_heads=s["num_heads"], attention_head_dim=s["hidden_size"] // s["num_heads"],
                              in_channels=IN_CH, out_channels=2 * IN_CH, num_layers=s["depth"],
                              sample_size=input_size, patch_size=s["patch_size"], num_embeds_ada_norm=NUM_CLASSES)
    if tie_embedders:  # one timestep/label embedder, as in DiT (diffusers keeps one copy per block)
        for block in m.transformer_blocks[1:]:
            block.norm1.emb = m.transformer_blocks[0].norm1.emb
    if grad_checkpointing:
        m.enable_gradient_checkpointing()
    return randomize_(m)


def n_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n != "pos_embed")  # efdit's frozen sin-cos table


def check_same_size(arch: str, input_size: int) -> tuple[int, int]:
    a, b = n_params(build_efdit(arch, input_size)), n_params(build_diffusers(arch, input_size))
    assert a == b, f"{arch}: efdit has {a:,} parameters, diffusers {b:,}: the configs do not match"
    untied = n_params(build_diffusers(arch, input_size, tie_embedders=False))
    return a, untied


def caller(kind: str, model):
    """A uniform (x, t, y) -> output for each model."""
    if kind == "diffusers":
        return lambda x, t, y: model(x, t, y).sample
    return lambda x, t, y: model(x, t, y)


def make_variant(variant: str, arch: str, input_size: int):
    """variant: efdit | efdit-compile | efdit-ckpt | diffusers | diffusers-ckpt -> (module, callable)."""
    if variant.startswith("diffusers"):
        m = build_diffusers(arch, input_size, grad_checkpointing=variant.endswith("ckpt"))
        return m, caller("diffusers", m)
    m = build_efdit(arch, input_size, grad_checkpointing=variant.endswith("ckpt"))
    if variant == "efdit-compile":
        torch._dynamo.reset()
        return m, caller("efdit", maybe_compile(m, True, dynamic=False))
    return m, caller("efdit", m)


# ---- timing -----------------------------------------------------------------------------------------------------
def interleaved(fns: dict, min_time: float, max_rounds: int, min_rounds: int = 3, warmup: bool = True) -> dict:
    """Best seconds per call of each fn; a warm-up call each (its time is returned as `warmup`), then rounds in
    which every fn runs once: at least `min_rounds`, until each has run `min_time` seconds in all (at most
    `max_rounds`). Three rounds at least: with one timed call each, a ratio on this shared VM moved by ±10 %."""
    warm, times = {k: None for k in fns}, {k: [] for k in fns}
    for k, fn in (fns.items() if warmup else ()):
        t0 = time.perf_counter()
        fn()
        warm[k] = time.perf_counter() - t0
    for r in range(max(max_rounds, min_rounds)):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        if r + 1 >= min_rounds and all(sum(v) >= min_time for v in times.values()):
            break
    return {k: {"best": min(v), "median": sorted(v)[len(v) // 2], "n": len(v), "warmup": warm[k]}
            for k, v in times.items()}


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- the measurements -------------------------------------------------------------------------------------------
def bench_forward(arch, input_size, batch, variants, args) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, IN_CH, input_size, input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    fns = {}
    for v in variants:
        m, call = make_variant(v, arch, input_size)
        m.eval()
        fns[v] = (lambda call=call: call(x, t, y))
    with torch.inference_mode():
        return interleaved(fns, args.min_time, args.max_rounds)


def bench_train(arch, input_size, batch, variants, args) -> dict:
    diffusion = create_diffusion()
    fns = {}
    for v in variants:
        m, call = make_variant(v, arch, input_size)
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(batch, IN_CH, input_size, input_size, generator=g)
        y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)

        def step(m=m, call=call, opt=opt, x0=x0, y=y, g=g):
            t = torch.randint(0, 1000, (batch,), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            out = call(diffusion.q_sample(x0, t, noise), t, y)
            F.mse_loss(out[:, :IN_CH], noise).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        fns[v] = step
    return interleaved(fns, args.min_time, args.max_rounds)


# Sampling settings beside DDIM-50: the fastest ones that kept DDIM-50's FD in the quality-matched table
# (benchmarks/sampling_quality.py; RESULTS.md, "Quality-matched sampling"): variant -> (method, steps, accel, kwargs)
FAST_SAMPLERS = {
    "efdit-dpmpp10": ("dpmpp2m", 10, "none", {}),
    "efdit-taylorseer": ("ddim", None, "taylorseer", {"interval": 3, "order": 2}),
}


def bench_sampling(arch, input_size, batch, steps, variants, args) -> dict:
    """`steps`-step DDIM with CFG scale 4 for `batch` labels -> seconds per image per variant (best and median of
    `args.sample_rounds` interleaved chains). Each variant first runs a 2-step chain (warm-up; compiles the compiled
    variant). FAST_SAMPLERS variants run their own sampler / hook on the same model, labels and noise."""
    diffusion, warm = create_diffusion(str(steps)), create_diffusion("2")
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    x_T = torch.randn(batch, IN_CH, input_size, input_size, generator=g)
    guidance = Guidance("cfg", 4.0)
    runs, calls, n_steps = {}, {}, {}
    for v in variants:
        method, v_steps, accel, kw = FAST_SAMPLERS.get(v, ("ddim", steps, "none", {}))
        v_steps = v_steps or steps
        n_steps[v] = v_steps
        m, _ = make_variant("efdit" if v in FAST_SAMPLERS else v, arch, input_size)
        m.eval()
        if v.startswith("diffusers"):
            run = (lambda d, m=m: ddim_cfg_loop(m, labels, x_T, d, 4.0))
        else:
            fwd = maybe_compile(m, True, dynamic=False) if v == "efdit-compile" else m
            calls[v] = []  # the batch of every forward call: one call per step, both CFG branches in it
            m.register_forward_pre_hook(lambda mod, a, c=calls[v]: c.append(a[0].shape[0]))
            hooks = [h for h in [build_accel(accel, kw)] if h is not None]
            run = (lambda d, fwd=fwd, method=method, hooks=hooks: _efdit_sample(fwd, labels, x_T, d, guidance,
                                                                                method, hooks))
        t0 = time.perf_counter()
        run(warm)
        if v == "efdit-compile":
            args.compile_seconds["sampling warm-up (2 steps)"] = time.perf_counter() - t0
        d_v = diffusion if v_steps == steps else create_diffusion(str(v_steps))
        runs[v] = (lambda run=run, d_v=d_v: run(d_v))
        if v in calls:
            calls[v].clear()
    timed = interleaved(runs, 0.0, args.sample_rounds, min_rounds=args.sample_rounds, warmup=False)
    res = {}
    for v in runs:
        res[v] = {"s_per_img": timed[v]["best"] / batch, "median_s_per_img": timed[v]["median"] / batch,
                  "chains": timed[v]["n"], "steps": n_steps[v]}
        if v in calls:
            res[v]["forwards_per_step"] = len(calls[v]) / (n_steps[v] * timed[v]["n"])
            res[v]["forward_batch"] = max(calls[v])
            res[v]["forwards"] = len(calls[v]) / timed[v]["n"]
    return res


def _efdit_sample(fwd, labels, x_T, diffusion, guidance, method="ddim", hooks=()):
    with torch.inference_mode():
        return sample(fwd, labels, diffusion, method=method, guidance=guidance, hooks=hooks, x_T=x_T, clip_x0=False,
                      progress=False)


@torch.no_grad()
def ddim_cfg_loop(model, labels, x_T, diffusion, scale: float) -> torch.Tensor:
    """The peers' setting, by hand: DDIM (η = 0) over the diffusers model, CFG by doubling the batch, guidance
    on all 4 ε channels, the learned-Σ half discarded (as DiTPipeline does)."""
    x = x_T
    y = torch.cat([labels, torch.full_like(labels, NUM_CLASSES)])  # the null class
    ab = diffusion.alphas_cumprod
    ab_prev = diffusion.alphas_cumprod_prev
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((2 * x.shape[0],), int(diffusion.timestep_map[i]), dtype=torch.long)
        eps = model(torch.cat([x, x]), t, y).sample[:, :IN_CH]
        eps_c, eps_u = eps.chunk(2)
        eps = eps_u + scale * (eps_c - eps_u)
        a, a_prev = float(ab[i]), float(ab_prev[i])
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


# ---- memory, one fresh process per configuration ----------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def memory_child(arch: str, input_size: int, batch: int, variant: str, threads: int) -> dict:
    """Runs in a fresh process: one training step of `variant`; peak extra resident memory."""
    torch.set_num_threads(threads)
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD: big blocks are mmap'ed, so freeing returns them at once
        libc.mallopt(-1, 64 << 10)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass
    rss_start = _status_kib("VmRSS")
    m, call = make_variant(variant, arch, input_size)
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    diffusion = create_diffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, IN_CH, input_size, input_size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    rss_model = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    rss_before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = call(diffusion.q_sample(x0, t, noise), t, y)
    F.mse_loss(out[:, :IN_CH], noise).backward()
    del out
    opt.step()
    opt.zero_grad(set_to_none=True)
    secs = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    import resource
    return {"variant": variant, "batch": batch, "rss_start_mib": rss_start / 1024, "rss_model_mib": rss_model / 1024,
            "peak_rss_mib": peak / 1024, "step_mib": (peak - rss_before) / 1024 if hwm_reset else None,
            "step_mib_per_img": (peak - rss_before) / 1024 / batch if hwm_reset else None,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": secs}


def bench_memory(arch, input_size, batch, variants, threads) -> dict:
    out = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--_memory-child", json.dumps([arch, input_size, batch, v, threads])]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            out[v] = {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
            continue
        out[v] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


# ---- machine info and report ------------------------------------------------------------------------------------
def machine_info(threads: int) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
        flags = open("/proc/cpuinfo").read()
        simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if re.search(rf"\b{f}\b", flags)]
    except OSError:
        simd = []
    try:
        import diffusers
        dver = diffusers.__version__
    except ImportError:
        dver = "missing"
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "simd": simd, "torch": torch.__version__,
            "diffusers": dver, "python": platform.python_version(), "threads": threads,
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "load_before": os.getloadavg()}


def fmt(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}"


def report(R: dict) -> str:
    mi, rate = R["machine"], R["matmul_rate"]
    L = [f"Command: `{R['command']}` — {R['total_min']:.1f} min in all.",
         "",
         f"Machine: {mi['cpu']}, {mi['logical_cpus']} logical CPUs ({', '.join(mi['simd']) or 'no AVX2'}), "
         f"torch {mi['torch']}, diffusers {mi['diffusers']}, Python {mi['python']}, **{mi['threads']} threads**, "
         f"{mi['date']}. Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in mi['load_before'])}; "
         f"after: {', '.join(f'{v:.2f}' for v in R['load_after'])}. The machine is shared with other jobs, so "
         f"absolute numbers carry tens of percent of noise; the ratios come from interleaved calls of the same run.",
         "",
         f"2048² fp32 matmul, measured at the start, before the memory and sampling parts and at the end: "
         f"{', '.join(f'{v:.1f}' for v in R['matmul'])} GFLOP/s; shares below are of the best, **{rate:.1f} GFLOP/s** "
         f"(a conservative share).",
         "",
         "Parameters (asserted equal, diffusers' per-block embedder copies tied): "
         + "; ".join(f"{a} {n:,} (diffusers as shipped, untied: {u:,})" for a, (n, u) in R["params"].items()) + ".",
         ""]
    names = {"efdit": "efdit", "diffusers": "diffusers", "efdit-compile": "efdit compile", "efdit-ckpt": "efdit ckpt"}

    def table(title, rows, unit_flops):
        if not rows:
            return
        L.extend([f"{title} (img/s, best call; share of the matmul rate in brackets)", ""])
        cols = [v for v in names if any(v in r["t"] for r in rows)]
        L.append("| model | batch | GFLOP/img | " + " | ".join(names[c] for c in cols) +
                 " | efdit / diffusers | compile / diffusers |")
        L.append("|---|---:|---:|" + "---:|" * len(cols) + "---:|---:|")
        for r in rows:
            fl = r["flops"] * unit_flops
            cells = []
            for c in cols:
                if c in r["t"]:
                    ips = r["batch"] / r["t"][c]["best"]
                    cells.append(f"{ips:.2f} ({100 * ips * fl / 1e9 / rate:.0f} %)")
                else:
                    cells.append("—")
            d = r["t"].get("diffusers", {}).get("best")
            ratio = lambda c: f"{d / r['t'][c]['best']:.2f}×" if d and c in r["t"] else "—"
            L.append(f"| {r['arch']} | {r['batch']} | {fl / 1e9:.2f} | " + " | ".join(cells) +
                     f" | {ratio('efdit')} | {ratio('efdit-compile')} |")
        L.append("")

    table("**Forward** (torch.inference_mode)", R["forward"], 1)
    table("**Training step** (forward + ε-MSE + backward + AdamW; FLOPs = 3× forward)", R["train"], 3)
    if R.get("compile_seconds"):
        L.append("Compile warm-up (first call, includes compiling): " +
                 "; ".join(f"{k}: {v:.0f} s" for k, v in R["compile_seconds"].items()) + ".")
        L.append("")
    for (arch, batch), mem in R["memory"].items():
        L.extend([f"**Training memory**, {arch}, batch {batch} (one step in a fresh process; step memory = peak "
                  f"RSS during the step − RSS just before it)", "",
                  "| model | step MiB | step MiB / image | vs diffusers | peak RSS MiB | step s (mmap'ed, slower) |",
                  "|---|---:|---:|---:|---:|---:|"])
        ref = mem.get("diffusers", {}).get("step_mib_per_img")
        for v, m in mem.items():
            if "error" in m:
                L.append(f"| {v} | error: {m['error']} | | | | |")
                continue
            rel = f"{m['step_mib_per_img'] / ref:.2f}×" if ref and m["step_mib_per_img"] else "—"
            L.append(f"| {v} | {fmt(m['step_mib'], 0)} | {fmt(m['step_mib_per_img'], 1)} | {rel} | "
                     f"{m['peak_rss_mib']:.0f} | {m['seconds']:.1f} |")
        L.append("")
    s = R.get("sampling")
    if not s:
        return "\n".join(L)
    L.extend([f"**Sampling**, {s['arch']}, CFG scale 4 (both branches), {s['batch']} images per chain, "
              f"{s['rounds']} chains per sampler interleaved after a warm-up chain (best and median)", "",
              "| sampler | steps | s / image (best) | median | vs diffusers DDIM | model forwards / chain | "
              "forward batch | share of matmul rate |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"])
    ref = s["res"].get("diffusers", {}).get("s_per_img")
    labels = {"efdit": "efdit DDIM", "diffusers": "diffusers DDIM (loop by hand)", "efdit-compile": "efdit DDIM, compiled",
              "efdit-dpmpp10": "efdit DPM-Solver++(2M)", "efdit-taylorseer": "efdit DDIM + TaylorSeer m=2 N=3"}
    for v, m in s["res"].items():
        fwds = m.get("forwards", m["steps"])  # the diffusers loop: one doubled-batch forward per step
        fl = fwds * m.get("forward_batch", 2 * s["batch"]) * s["flops_per_forward_img"] / s["batch"]
        L.append(f"| {labels.get(v, v)} | {m['steps']} | {m['s_per_img']:.2f} | {m['median_s_per_img']:.2f} | "
                 f"{ref / m['s_per_img']:.2f}× | {fmt(fwds, 1)} | {m.get('forward_batch', 2 * s['batch'])} | "
                 f"{100 * fl / m['s_per_img'] / 1e9 / rate:.0f} % |")
    L.append("")
    L.append("A cached TaylorSeer step skips the blocks (only the embedders and the final layer run), so its share "
             "counts the full forward it replaces.")
    L.append("")
    return "\n".join(L)


def quality_matched() -> dict:
    """Which FAST_SAMPLERS settings kept DDIM-50's FD in benchmarks/sampling_quality.json (the quality table)."""
    path = ROOT / "benchmarks" / "sampling_quality.json"
    if not path.is_file():
        return {}
    q = json.loads(path.read_text())
    names = {"efdit-dpmpp10": "DPM-Solver++ 10", "efdit-taylorseer": "DDIM-50 + TaylorSeer m=2 N=3"}
    rows = {r["name"]: r for r in q["rows"]}
    return {v: {"name": n, "fd": rows[n]["fd"], "within": rows[n]["within"], "fd_ddim50": q["fd_ddim50"],
                "tolerance": q["tolerance"], "model": q["model"]} for v, n in names.items() if n in rows}


def targets(R: dict) -> str:
    rate = R["matmul_rate"]
    L = ["**Targets**", ""]

    def best_ratio(rows, arch=None):
        out = []
        for r in rows:
            if arch and r["arch"] != arch:
                continue
            t = r["t"]
            if "diffusers" in t:
                out.append((r["arch"], r["batch"], t["diffusers"]["best"] / t["efdit"]["best"],
                            t["diffusers"]["best"] / t["efdit-compile"]["best"] if "efdit-compile" in t else None,
                            r["batch"] / t["efdit"]["best"] * r["flops"] / 1e9 / rate))
        return out
    for name, rows, mult in (("forward", R["forward"], 1), ("training step", R["train"], 3)):
        for arch, b, eager, comp, share in best_ratio(rows):
            share *= mult
            L.append(f"- {name} {arch} batch {b}: efdit / diffusers eager **{eager:.2f}×** (target ≥ 0.95: "
                     f"{'met' if eager >= 0.95 else 'not met'}); compiled {fmt(comp)}× (target ≥ 1.1: "
                     f"{('met' if comp >= 1.1 else 'not met') if comp else 'not measured'}); efdit eager at **{100 * share:.0f} %** of the "
                     f"matmul rate" + (f" (target ≥ 85 % for B/2: {'met' if share >= 0.85 else 'not met'})"
                                       if "B/2" in arch else ""))
    for (arch, batch), mem in R["memory"].items():
        ref = mem.get("diffusers", {}).get("step_mib_per_img")
        ck = mem.get("efdit-ckpt", {}).get("step_mib_per_img")
        if ref and ck:
            L.append(f"- training memory {arch} batch {batch}: efdit with checkpointing / diffusers (no "
                     f"checkpointing, as shipped) **{ck / ref:.2f}×** per image (target ≤ 0.6: "
                     f"{'met' if ck / ref <= 0.6 else 'not met'})")
    smp = R.get("sampling")
    if smp and "diffusers" in smp["res"]:
        ref = smp["res"]["diffusers"]["s_per_img"]
        for v, q in smp.get("quality", {}).items():
            if v not in smp["res"]:
                continue
            sp = ref / smp["res"][v]["s_per_img"]
            L.append(f"- sampling, {q['name']} vs the peers' {smp['steps']}-step DDIM: **{sp:.2f}×** fewer s/img "
                     f"(target ≥ 2.5: {'met' if sp >= 2.5 else 'not met'}); quality from the quality-matched table "
                     f"({q['model']}): FD {q['fd']:.0f} vs DDIM-50 {q['fd_ddim50']:.0f} + tolerance {q['tolerance']:.0f}"
                     f" → {'within' if q['within'] else 'outside'}")
    return "\n".join(L) + "\n"


SECTION = "## Peer benchmark"
QUALITY = "## Quality-matched sampling"


def write_results(path: Path, body: str) -> None:
    """Replace only the 'Peer benchmark' section (up to the next '## ' heading); create the file if needed."""
    section = f"{SECTION}\n\n{body.rstrip()}\n"
    if path.is_file():
        text = path.read_text()
        m = re.search(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
        text = text[:m.start()] + section + "\n" + text[m.end():] if m else text.rstrip() + "\n\n" + section
    else:
        text = (f"# Benchmark results\n\nWritten by the benchmark scripts; rerun them to refresh a section.\n\n"
                f"{section}\n{QUALITY}\n\n(to be filled by the quality-matched sampling benchmark)\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- main -------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: a tiny DiT, few repeats, prints only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--compile", action="store_true", help="--quick: include the torch.compile variants (slow)")
    p.add_argument("--parts", default="forward,train,memory,sampling", help="which measurements (comma-separated)")
    p.add_argument("--out", default="", help="results file (default: benchmarks/RESULTS.md in full mode)")
    p.add_argument("--json", default="", help="also write the raw numbers here")
    p.add_argument("--_memory-child", dest="memory_child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(*json.loads(args.memory_child))))
        return {}
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64
    t_start = time.time()
    shown = " ".join(sys.argv[1:] if argv is None else argv)
    shown = re.sub(r"--(json|out)[ =]\S+", "", shown).split()
    R = {"machine": machine_info(args.threads), "command": " ".join([".venv/bin/python benchmarks/peers.py", *shown])}
    if args.quick:
        archs, inp, fwd_batches = ["tiny"], 16, [2]
        train_cfgs, mem_cfg, samp = [("tiny", 2)], ("tiny", 2), ("tiny", 1, 3)
        args.min_time, args.max_rounds, args.sample_rounds = 0.0, 2, 1
    else:
        archs, inp, fwd_batches = ["DiT-S/2", "DiT-B/2"], 32, [8, 32]
        train_cfgs, mem_cfg, samp = [("DiT-S/2", 32), ("DiT-B/2", 8)], ("DiT-S/2", 32), ("DiT-S/2", 2, 50)
        args.min_time, args.max_rounds, args.sample_rounds = 5.0, 4, 3
    compile_on = not args.no_compile and (args.compile or not args.quick)
    parts = set(args.parts.split(","))
    R["matmul"] = [matmul_gflops()]
    print(f"matmul 2048²: {R['matmul'][0]:.1f} GFLOP/s", flush=True)
    R["params"] = {a: check_same_size(a, inp) for a in archs}
    R["compile_seconds"] = args.compile_seconds = {}

    R["forward"], R["train"], R["memory"] = [], [], {}
    if "forward" in parts:
        for arch in archs:
            s = sizes_of(arch)
            for b in fwd_batches:
                variants = ["efdit", "diffusers"] + (["efdit-compile"] if compile_on else [])
                t = bench_forward(arch, inp, b, variants, args)
                fl = dit_flops(s["depth"], s["hidden_size"], s["patch_size"], inp)
                R["forward"].append({"arch": arch, "batch": b, "flops": fl, "t": t})
                if "efdit-compile" in t:
                    R["compile_seconds"][f"forward {arch} b{b}"] = t["efdit-compile"]["warmup"]
                print(f"forward {arch} b{b}: " + ", ".join(f"{k} {b / v['best']:.2f} img/s" for k, v in t.items()),
                      flush=True)

    if "train" in parts:
        for arch, b in train_cfgs:
            s = sizes_of(arch)
            variants = ["efdit", "diffusers"] + (["efdit-compile"] if compile_on else []) + \
                (["efdit-ckpt"] if arch == mem_cfg[0] else [])
            t = bench_train(arch, inp, b, variants, args)
            fl = dit_flops(s["depth"], s["hidden_size"], s["patch_size"], inp)
            R["train"].append({"arch": arch, "batch": b, "flops": fl, "t": t})
            if "efdit-compile" in t:
                R["compile_seconds"][f"train {arch} b{b}"] = t["efdit-compile"]["warmup"]
            print(f"train {arch} b{b}: " + ", ".join(f"{k} {b / v['best']:.2f} img/s" for k, v in t.items()), flush=True)

    if "memory" in parts:
        R["matmul"].append(matmul_gflops())
        arch, b = mem_cfg
        mem_variants = ["efdit-ckpt", "diffusers"] if args.quick else ["efdit", "efdit-ckpt", "diffusers", "diffusers-ckpt"]
        mem = bench_memory(arch, inp, b, mem_variants, args.threads)
        R["memory"] = {(arch, b): mem}
        for v, m in mem.items():
            print(f"memory {arch} b{b} {v}: " + (m["error"] if "error" in m else
                                                 f"{fmt(m['step_mib_per_img'], 1)} MiB/img, peak {m['peak_rss_mib']:.0f} MiB"),
                  flush=True)

    if "sampling" in parts:
        R["matmul"].append(matmul_gflops())
        arch, b, steps = samp
        s = sizes_of(arch)
        variants = ["efdit", "diffusers"] + (["efdit-compile"] if compile_on else []) + list(FAST_SAMPLERS)
        res = bench_sampling(arch, inp, b, steps, variants, args)
        R["sampling"] = {"arch": arch, "batch": b, "steps": steps, "rounds": args.sample_rounds, "res": res,
                         "flops_per_forward_img": dit_flops(s["depth"], s["hidden_size"], s["patch_size"], inp),
                         "quality": quality_matched()}
        print(f"sampling {arch} {steps} steps: " + ", ".join(f"{k} {v['s_per_img']:.2f} s/img" for k, v in res.items()),
              flush=True)

    R["matmul"].append(matmul_gflops())
    R["matmul_rate"] = max(R["matmul"])
    R["load_after"] = os.getloadavg()
    R["total_min"] = (time.time() - t_start) / 60
    body = report(R) + "\n" + targets(R)
    print("\n" + body)
    out = args.out or ("" if args.quick else str(ROOT / "benchmarks" / "RESULTS.md"))
    if out:
        write_results(Path(out), body)
        print(f"-> {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({**R, "memory": {f"{a} b{b}": m for (a, b), m in R["memory"].items()}},
                                              indent=1, default=str))
    return R


if __name__ == "__main__":
    main()
