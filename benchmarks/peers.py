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
  * 50-step DDIM sampling with classifier-free guidance (scale 4, the null class) of DiT-S/2: efdit's sampler (one
    batched forward for both branches, inference mode) vs a plain DDIM loop over the diffusers model that doubles
    the batch for CFG under torch.no_grad, as diffusers' DiTPipeline does; same respaced schedule; 3 chains each,
    interleaved (the loops at parity);
  * the fastest quality-matched efdit setting against the peers' DDIM-50 on the same teacher model (part "fast"):
    the setting is read from benchmarks/sampling_quality.json (`fastest_setting`: the highest paired speed-up
    among the settings whose FD stayed within DDIM-50's tolerance, a guidance-distilled student's own model file
    included; DPM-Solver++(2M) 10 steps, efdit's documented rule, when nothing was measured); the teacher's weights
    are copied into a diffusers `DiTTransformer2DModel` (`efdit_to_diffusers`, the layout of diffusers' own DiT
    conversion script) and sampled with the hand-written DDIM-50 CFG loop; the same labels (one per subclass), the
    same initial noise (seed 0) and the teacher's guidance scale for all three: diffusers DDIM-50, efdit DDIM-50,
    efdit's fastest setting; chains interleaved after a warm-up chain each, best and median; the ratio to the
    peers and the ≥ 10× target.

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


def bench_sampling(arch, input_size, batch, steps, variants, args) -> dict:
    """`steps`-step DDIM with CFG scale 4 for `batch` labels -> seconds per image per variant (best and median of
    `args.sample_rounds` interleaved chains). Each variant first runs a 2-step chain (warm-up; compiles the compiled
    variant)."""
    diffusion, warm = create_diffusion(str(steps)), create_diffusion("2")
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    x_T = torch.randn(batch, IN_CH, input_size, input_size, generator=g)
    guidance = Guidance("cfg", 4.0)
    runs, calls, n_steps = {}, {}, {}
    for v in variants:
        method, v_steps, accel, kw = "ddim", steps, "none", {}
        n_steps[v] = v_steps
        m, _ = make_variant(v, arch, input_size)
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
def ddim_cfg_loop(model, labels, x_T, diffusion, scale: float, null_class: int = NUM_CLASSES) -> torch.Tensor:
    """The peers' setting, by hand: DDIM (η = 0) over the diffusers model, CFG by doubling the batch, guidance
    on all ε channels, the learned-Σ half discarded (as DiTPipeline does)."""
    x = x_T
    y = torch.cat([labels, torch.full_like(labels, null_class)])  # the null class
    ab = diffusion.alphas_cumprod
    ab_prev = diffusion.alphas_cumprod_prev
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((2 * x.shape[0],), int(diffusion.timestep_map[i]), dtype=torch.long)
        eps = model(torch.cat([x, x]), t, y).sample[:, :x.shape[1]]
        eps_c, eps_u = eps.chunk(2)
        eps = eps_u + scale * (eps_c - eps_u)
        a, a_prev = float(ab[i]), float(ab_prev[i])
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


# ---- the fastest quality-matched setting on the teacher model ---------------------------------------------------
QUALITY_JSON = ROOT / "benchmarks" / "sampling_quality.json"
SETTING_KEYS = ("sampler", "steps", "eta", "accel", "accel_kwargs", "guidance_interval")


def efdit_to_diffusers(model: DiT):
    """A diffusers `DiTTransformer2DModel` holding an efdit DiT's weights (flat labels with a null row, square input,
    MLP ratio 4, no PEFT extras), in the layout of diffusers' `scripts/convert_dit_to_diffusers.py`: every block gets
    its own copy of the timestep / label embedder (diffusers as shipped), the fused qkv split into q, k, v. diffusers'
    sinusoidal timestep features divide by (half − 1) where DiT divides by half, so outputs agree closely, not
    exactly (`conversion_gap` measures it: 1.9 % of the output range on fmnist-base, 8e-5 with DiT's frequencies
    put into diffusers' `time_proj`); the timing does not depend on it."""
    from diffusers import DiTTransformer2DModel
    emb = model.y_embedder
    problems = [why for bad, why in (
        (type(emb).__name__ != "LabelEmbedder" or not getattr(emb, "has_null", False),
         "a flat label embedder with a null class"),
        (model.input_size[0] != model.input_size[1], "a square input"),
        (getattr(model, "w_embedder", None) is not None, "no guidance embedding (a teacher, not a student)"),
        (any(b.gamma_attn is not None or b.gamma_mlp is not None for b in model.blocks), "no DiffFit scales"),
        (model.blocks[0].mlp.fc1.out_features != 4 * model.hidden_size, "MLP ratio 4")) if bad]
    if problems:
        raise ValueError("diffusers' DiT needs " + ", ".join(problems))
    depth, D = len(model.blocks), model.hidden_size
    peer = DiTTransformer2DModel(num_attention_heads=model.num_heads, attention_head_dim=D // model.num_heads,
                                 in_channels=model.in_channels, out_channels=model.out_channels, num_layers=depth,
                                 sample_size=model.input_size[0], patch_size=model.patch_size,
                                 num_embeds_ada_norm=emb.num_classes)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    new = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
           "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"]}
    for i in range(depth):
        b, o = f"blocks.{i}.", f"transformer_blocks.{i}."
        e = o + "norm1.emb."
        new.update({e + "timestep_embedder.linear_1.weight": sd["t_embedder.mlp.0.weight"],
                    e + "timestep_embedder.linear_1.bias": sd["t_embedder.mlp.0.bias"],
                    e + "timestep_embedder.linear_2.weight": sd["t_embedder.mlp.2.weight"],
                    e + "timestep_embedder.linear_2.bias": sd["t_embedder.mlp.2.bias"],
                    e + "class_embedder.embedding_table.weight": sd["y_embedder.embedding_table.weight"],
                    o + "norm1.linear.weight": sd[b + "adaLN_modulation.1.weight"],
                    o + "norm1.linear.bias": sd[b + "adaLN_modulation.1.bias"],
                    o + "attn1.to_out.0.weight": sd[b + "attn.proj.weight"],
                    o + "attn1.to_out.0.bias": sd[b + "attn.proj.bias"],
                    o + "ff.net.0.proj.weight": sd[b + "mlp.fc1.weight"], o + "ff.net.0.proj.bias": sd[b + "mlp.fc1.bias"],
                    o + "ff.net.2.weight": sd[b + "mlp.fc2.weight"], o + "ff.net.2.bias": sd[b + "mlp.fc2.bias"]})
        for part, w, bias in zip(("to_q", "to_k", "to_v"), sd[b + "attn.qkv.weight"].chunk(3),
                                 sd[b + "attn.qkv.bias"].chunk(3)):
            new[o + f"attn1.{part}.weight"], new[o + f"attn1.{part}.bias"] = w, bias
    peer.load_state_dict(new, strict=True)
    return peer.eval()


@torch.no_grad()
def conversion_gap(model: DiT, peer, labels: torch.Tensor, x: torch.Tensor) -> float:
    """max |diffusers − efdit| / max |efdit| of one forward on the same input (t from 100 to 900)."""
    t = torch.linspace(100, 900, len(labels)).long()
    a = model(x, t, labels)
    b = peer(x, t, labels).sample
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def fastest_setting(path: Path = QUALITY_JSON) -> dict:
    """The fastest quality-matched efdit setting of the quality table (benchmarks/sampling_quality.py): its row
    (name, model file, who, sampler, steps, …, FD with interval, ΔFD, verdict) with the table's DDIM-50 FD,
    tolerance, teacher and date; efdit's documented rule (DPM-Solver++(2M) 10 steps, `source` "rule") when the
    table is missing or names none."""
    from efdit.engine.fast_sampling import RULE, fastest_matched
    q = json.loads(path.read_text()) if path.is_file() else {}
    rows = q.get("rows", [])
    key = q.get("fastest_key", "paired_speedup")
    name = (q.get("fastest") or {}).get("overall")
    row = next((r for r in rows if r["name"] == name), None) if name else fastest_matched(rows, key)
    if row is None:
        return {"name": "DPM-Solver++ 10 (efdit's rule, not measured)", "who": "teacher", "source": "rule",
                "model_file": q.get("model", ""), "teacher": q.get("model"), **RULE}
    out = {k: row.get(k, d) for k, d in (("eta", 0.0), ("accel", "none"), ("accel_kwargs", ""),
                                          ("guidance_interval", ""))}
    out.update({k: row[k] for k in ("name", "sampler", "steps", "fd", "within")})
    out.update(who=row.get("who", "teacher"), model_file=row.get("model_file", q.get("model", "")),
               fd_interval=row.get("fd_interval"), delta_fd=row.get("delta_fd"), verdict=row.get("verdict"),
               paired_speedup=row.get(key), forward_rows=row.get("forward_rows"), source="measured",
               fd_ddim50=q.get("fd_ddim50"), tolerance=q.get("tolerance"), teacher=q.get("model"),
               teacher_sha256=q.get("model_sha256"), n=q.get("n"), date=q.get("date", ""), json=_rel(path))
    return out


def _rel(path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _resolve(path) -> Path:
    from efdit.engine.paths import model_file
    p = Path(path)
    return model_file(p if p.is_absolute() or p.exists() else ROOT / p)


def bench_fast(args) -> dict:
    """diffusers DDIM-50 (the teacher's weights), efdit DDIM-50 and efdit's fastest quality-matched setting on the
    same labels (one per subclass, `args.fast_batch` in all), noise (seed 0) and guidance scale; a first chain of
    each (warm-up, its forward rows counted), then `args.sample_rounds` interleaved chains -> s/img (best, median)
    and forward rows per image of each."""
    import copy

    from efdit.data.base import to_uint8
    from efdit.engine.build import build_diffusion
    from efdit.engine.fast_sampling import describe_settings, with_setting
    from efdit.engine.files import load_model
    from efdit.engine.generate import check_sampling, generate
    from efdit.models.checkpoint import file_sha256
    fast = fastest_setting(Path(args.quality_json))
    teacher_path = _resolve(args.teacher or fast.get("teacher") or ROOT / "efdit/assets/fmnist-base.safetensors")
    teacher, tcfg, h, _ = load_model(teacher_path)
    sha = file_sha256(teacher_path)
    if fast.get("teacher_sha256") and sha != fast["teacher_sha256"]:
        print(f"note: {teacher_path} (sha256 {sha}) is not the file the quality table measured "
              f"({fast['teacher']}, {fast['teacher_sha256']}); it may have been re-recorded since", flush=True)
    if fast["who"] == "student":
        fast_path = _resolve(fast["model_file"])
        fast_model, fcfg, _, _ = load_model(fast_path)
    else:
        fast_path, fast_model, fcfg = teacher_path, teacher, tcfg
    cfg50 = with_setting(copy.deepcopy(tcfg), {"sampler": "ddim", "steps": "50"})
    cfg_fast = with_setting(copy.deepcopy(fcfg), {k: fast[k] for k in SETTING_KEYS})
    cfg_fast.sample.cfg_scale, cfg_fast.sample.clip_x0 = tcfg.sample.cfg_scale, tcfg.sample.clip_x0
    check_sampling(cfg_fast)
    one_each = torch.arange(h.num_sub) if tcfg.model.condition_on == "sub" else h.parent[torch.arange(h.num_sub)]
    labels = one_each.repeat(-(-args.fast_batch // len(one_each)))[:args.fast_batch]
    shape = (len(labels), teacher.in_channels, *teacher.input_size)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))  # what generate(seed=0) draws
    peer = efdit_to_diffusers(teacher)
    gap = conversion_gap(teacher, peer, labels, x_T)
    d50 = build_diffusion(tcfg, "50")
    out, counts = {}, {}
    runs = {"diffusers": lambda: out.__setitem__("diffusers", ddim_cfg_loop(peer, labels, x_T, d50,
                                                                            tcfg.sample.cfg_scale,
                                                                            teacher.y_embedder.null_id)),
            "efdit": lambda: out.__setitem__("efdit", generate(teacher, cfg50, labels, progress=False, seed=0)),
            "efdit-fast": lambda: out.__setitem__("efdit-fast", generate(fast_model, cfg_fast, labels,
                                                                         progress=False, seed=0))}

    def count(mod, a, kw):
        counts[id(mod)] = counts.get(id(mod), 0) + int((a[0] if a else next(iter(kw.values()))).shape[0])
    handles = [m.register_forward_pre_hook(count, with_kwargs=True)
               for m in {id(teacher): teacher, id(fast_model): fast_model}.values()]

    def rows_per_img(key, mod) -> float:
        before = counts.get(id(mod), 0)
        runs[key]()
        return (counts.get(id(mod), 0) - before) / len(labels)
    counted = {"efdit": rows_per_img("efdit", teacher), "efdit-fast": rows_per_img("efdit-fast", fast_model)}
    for hd in handles:
        hd.remove()
    runs["diffusers"]()
    counted["diffusers"] = 2.0 * d50.num_timesteps  # one doubled-batch forward per step
    timed = interleaved(runs, 0.0, args.sample_rounds, min_rounds=args.sample_rounds, warmup=False)
    res = {v: {"s_per_img": t["best"] / len(labels), "median_s_per_img": t["median"] / len(labels),
               "chains": t["n"], "forward_rows_per_img": counted[v]} for v, t in timed.items()}
    pixel_gap = float((to_uint8(out["diffusers"]).float() - out["efdit"].float()).abs().mean())
    return {"res": res, "fast": fast, "teacher": _rel(teacher_path), "teacher_sha256": sha,
            "fast_model": _rel(fast_path), "batch": len(labels), "rounds": args.sample_rounds,
            "cfg_scale": tcfg.sample.cfg_scale, "conversion_gap": gap, "pixel_gap_ddim50": pixel_gap,
            "setting_text": describe_settings(cfg_fast), "ddim50_text": describe_settings(cfg50)}


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
        return "\n".join(L + fast_report(R))
    L.extend([f"**Sampling**, {s['arch']}, CFG scale 4 (both branches), {s['batch']} images per chain, "
              f"{s['rounds']} chains per sampler interleaved after a warm-up chain (best and median)", "",
              "| sampler | steps | s / image (best) | median | vs diffusers DDIM | model forwards / chain | "
              "forward batch | share of matmul rate |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"])
    ref = s["res"].get("diffusers", {}).get("s_per_img")
    labels = {"efdit": "efdit DDIM", "diffusers": "diffusers DDIM (loop by hand)", "efdit-compile": "efdit DDIM, compiled"}
    for v, m in s["res"].items():
        fwds = m.get("forwards", m["steps"])  # the diffusers loop: one doubled-batch forward per step
        fl = fwds * m.get("forward_batch", 2 * s["batch"]) * s["flops_per_forward_img"] / s["batch"]
        L.append(f"| {labels.get(v, v)} | {m['steps']} | {m['s_per_img']:.2f} | {m['median_s_per_img']:.2f} | "
                 f"{ref / m['s_per_img']:.2f}× | {fmt(fwds, 1)} | {m.get('forward_batch', 2 * s['batch'])} | "
                 f"{100 * fl / m['s_per_img'] / 1e9 / rate:.0f} % |")
    L.append("")
    return "\n".join(L + fast_report(R))


def fast_report(R: dict) -> list[str]:
    """The fastest quality-matched efdit setting against the peers' DDIM-50 on the teacher: table and quality."""
    f = R.get("fast")
    if not f:
        return []
    q, res = f["fast"], f["res"]
    ref = res["diffusers"]["s_per_img"]
    where = (f"the student `{f['fast_model']}`" if q["who"] == "student" else f"the teacher `{f['fast_model']}`")
    L = [f"**Fastest quality-matched sampling vs the peers' DDIM-50**, on the teacher `{f['teacher']}` (sha256 "
         f"{f['teacher_sha256']}): the same {f['batch']} labels (one per subclass in turn), the same initial noise "
         f"(seed 0) and guidance scale ×{f['cfg_scale']:g} for all; a warm-up chain each, then {f['rounds']} "
         f"chain(s) of each interleaved (best and median). The diffusers model holds the teacher's weights "
         f"(`efdit_to_diffusers`; one forward differs from efdit's by {100 * f['conversion_gap']:.2f} % of its "
         f"range: diffusers' timestep frequencies; the two DDIM-50 loops' images differ by "
         f"{f['pixel_gap_ddim50']:.2f}/255 on average, efdit clipping x̂0 as the model's config says, the peers' loop "
         f"not).", "",
         "| sampler | model file | s / image (best) | median | vs diffusers DDIM-50 | forward rows / image |",
         "|---|---|---:|---:|---:|---:|"]
    names = {"diffusers": ("diffusers DDIM-50 (loop by hand, CFG by batch doubling)", f["teacher"]),
             "efdit": (f"efdit {f['ddim50_text']}", f["teacher"]),
             "efdit-fast": (f"efdit **{q['name']}**: {f['setting_text']}", f["fast_model"])}
    for v in ("diffusers", "efdit", "efdit-fast"):
        m = res[v]
        L.append(f"| {names[v][0]} | `{names[v][1]}` | {m['s_per_img']:.4f} | {m['median_s_per_img']:.4f} | "
                 f"{ref / m['s_per_img']:.2f}× | {m['forward_rows_per_img']:.0f} |")
    L.append("")
    if q.get("source") == "measured":
        d, iv = q.get("delta_fd") or {}, q.get("fd_interval")
        when = ", ".join(x for x in (q.get("json"), q.get("date"), f"N = {q.get('n')}") if x)
        L.append(f"Quality ({when}): {q['name']} on {where}: FD {q['fd']:.1f}"
                 + (f" [{iv[0]:.1f}, {iv[1]:.1f}]" if iv else "") + f" vs the teacher's DDIM-50 {q['fd_ddim50']:.1f} + tolerance "
                 f"{q['tolerance']:.1f} → {'within' if q['within'] else 'outside'}"
                 + (f" (ΔFD {d['value']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}], {q.get('verdict')})" if d else "")
                 + ".")
    else:
        L.append("Quality: no quality-matched setting in benchmarks/sampling_quality.json: efdit's documented rule "
                 "(DPM-Solver++(2M), 10 steps) is timed, its FD not measured on this model.")
    L.append("")
    return L


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
    if smp and "diffusers" in smp["res"] and "efdit" in smp["res"]:
        sp = smp["res"]["diffusers"]["s_per_img"] / smp["res"]["efdit"]["s_per_img"]
        L.append(f"- sampling {smp['arch']}, efdit DDIM-{smp['steps']} / the peers' loop: **{sp:.2f}×** "
                 f"(target ≥ 0.95: {'met' if sp >= 0.95 else 'not met'})")
    f = R.get("fast")
    if f:
        q, res = f["fast"], f["res"]
        sp = res["diffusers"]["s_per_img"] / res["efdit-fast"]["s_per_img"]
        quality = (f"FD {q['fd']:.1f} vs DDIM-50 {q['fd_ddim50']:.1f} + tolerance {q['tolerance']:.1f} → "
                   f"{'within' if q['within'] else 'outside'}" if q.get("source") == "measured" else
                   "quality not measured (the documented rule)")
        L.append(f"- sampling, efdit's fastest quality-matched setting ({q['name']}, `{f['fast_model']}`) vs the "
                 f"peers' DDIM-50 on the same teacher (`{f['teacher']}`): **{sp:.2f}×** fewer s/img (target ≥ 10: "
                 f"{'met' if sp >= 10 else 'not met'}); {quality}")
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
    p.add_argument("--parts", default="forward,train,memory,sampling,fast",
                   help="which measurements (comma-separated): forward, train, memory, sampling (DiT-S/2 DDIM-50 "
                        "loops), fast (the fastest quality-matched setting vs the peers' DDIM-50 on the teacher)")
    p.add_argument("--teacher", default="", help="fast: the teacher model file (default: the one "
                                                 "sampling_quality.json measured, else the shipped fmnist base)")
    p.add_argument("--quality-json", default=str(ROOT / "benchmarks" / "sampling_quality.json"),
                   help="fast: the quality table that names the fastest quality-matched setting")
    p.add_argument("--fast-batch", type=int, default=0, help="fast: images per chain (default 10; --quick 2)")
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
        variants = ["efdit", "diffusers"] + (["efdit-compile"] if compile_on else [])
        res = bench_sampling(arch, inp, b, steps, variants, args)
        R["sampling"] = {"arch": arch, "batch": b, "steps": steps, "rounds": args.sample_rounds, "res": res,
                         "flops_per_forward_img": dit_flops(s["depth"], s["hidden_size"], s["patch_size"], inp)}
        print(f"sampling {arch} {steps} steps: " + ", ".join(f"{k} {v['s_per_img']:.2f} s/img" for k, v in res.items()),
              flush=True)

    if "fast" in parts:
        args.fast_batch = args.fast_batch or (2 if args.quick else 10)
        R["fast"] = f = bench_fast(args)
        print(f"fast, on {f['teacher']}: " + ", ".join(f"{k} {v['s_per_img']:.4f} s/img" for k, v in f["res"].items())
              + f" -> {f['res']['diffusers']['s_per_img'] / f['res']['efdit-fast']['s_per_img']:.2f}x the peers' "
              f"DDIM-50 with {f['fast']['name']}", flush=True)

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
