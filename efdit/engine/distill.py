"""Guidance distillation, the first stage of Meng et al., "On Distillation of Guided Diffusion Models" (CVPR 2023):
a student that takes the guidance scale w as an input learns its guided teacher's output, so that sampling costs
one forward per step instead of one per guidance branch.

The teacher is a trained efdit model file. The student is the same DiT with a guidance embedding
(`model.guidance_embed`: w embedded like t and added to c, its output layer zero), initialised from the teacher, so
it starts as the teacher's conditional branch. Each step draws real images x0 with their labels y (the teacher's
training data), t ~ U{0, …, T−1}, w ~ U[w_min, w_max] per sample, ε ~ N(0, I), x_t = q_sample(x0, t, ε), and
minimises the mean squared difference, over every output channel, between

    student(x_t, t, y, w)    and    the teacher's guided output at w,

which is what the sampler's `guided_forward` computes for the teacher: ε̃ = ε_∅ + w·(ε_c − ε_∅) for "cfg",
ε_sup + w·(ε_c − ε_sup) for "super", ε_∅ + s_sup·(ε_sup − ε_∅) + w·(ε_c − ε_sup) for "two_term" (s_sup fixed at
`sample.cfg_scale_super`), the learned-Σ channels from the conditional branch. The student runs without label
dropout (its target is the guided output for that very label).

A run lives in one folder, like training: `config.json` (the student's config), `distill.json` (the teacher and
its SHA-256, the guidance mode, the w range), `log.jsonl`, `checkpoints/latest.safetensors` (student, EMA,
optimizer, progress, RNG states), and at the end `model.safetensors` (the EMA student, its `distill` record in the
metadata) and `samples/final.png`. Rerunning the same command resumes bit-identically; the budgets
(`train.total_images`, `train.minutes`) and intervals may change. One process.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import MAX_SCALE, Config, apply_overrides, field_paths, validate_config
from ..data.hierarchy import Hierarchy
from ..diffusion.guidance import Guidance, label_embedder
from ..errors import EfditError, atomic_write
from ..models.checkpoint import file_sha256, load_state_dict_checked
from ..models.dit import DiT, resolve_device
from .build import build_diffusion, build_model, labels_for
from .datasets import load_data
from .ema import EMA
from .files import load_model, load_training_state, save_model
from .finetune import resolve_base
from .lr import learning_rate
from .paths import model_file, shipped
from .train import check_finite, check_same_run, draw_batch, optimizer_step, sample_grid, save_checkpoint
from .trainlog import TrainLog, truncate_log

W_RANGE = (1.0, 5.0)   # w ~ U[w_min, w_max] unless given
# the student's training settings, over the teacher's (its own training run's); the command line overrides them
DEFAULTS = {"train.batch_size": 32, "train.lr": 1e-4, "train.warmup_images": 0, "train.weight_decay": 0.0,
            "train.ema_decay": 0.999, "train.ema_warmup": True, "train.grad_clip": 1.0, "train.grad_accum": 1,
            "train.precision": "fp32", "train.grad_checkpointing": False, "train.compile": False,
            "train.total_images": 64_000, "train.minutes": 0.0, "train.log_every": 1_024,
            "train.ckpt_every": 8_192, "train.sample_every": 0, "train.init_labels": "parent",
            "train.save_frozen": False, "train.seed": 0, "train.threads": 0}
# the config fields a distillation run may set (sample.* too: the student's sampling defaults)
OPTIONS = ("train.batch_size", "train.lr", "train.warmup_images", "train.weight_decay", "train.ema_decay",
           "train.ema_warmup", "train.grad_clip", "train.precision", "train.total_images", "train.minutes",
           "train.log_every", "train.ckpt_every", "train.seed", "train.threads", "device", "data.root")


@dataclass
class Plan:
    """A checked distillation, before anything is written: the student's config, the `distill.json` record, the
    teacher (eval mode, frozen) and what its model file says of the data."""
    cfg: Config
    record: dict
    teacher: DiT
    hierarchy: Hierarchy
    input_size: tuple[int, int]
    channels: int

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)


# ---- the plan: every option checked, nothing written ------------------------------------------------------
def plan_distillation(run_dir, teacher: str | None = None, w_min: float | None = None, w_max: float | None = None,
                      guidance: str | None = None, overrides: dict | None = None) -> Plan:
    """Check a distillation into `run_dir` (new, or the run there resumed) and load its teacher.

    teacher: a model file, its run folder or a shipped name (fmnist-base); when resuming it may be left out
    (the run's), and must otherwise be the same file (SHA-256). w_min, w_max: the range of w (default 1, 5);
    guidance: cfg | super | two_term | auto (the teacher's `sample.guidance`; auto: super for a tiered embedder,
    else cfg); overrides: `--key value` options (training settings `OPTIONS`, `sample.*`). One EfditError naming
    the first problem."""
    run_dir = Path(run_dir)
    saved = read_record(run_dir)
    teacher = teacher or (saved or {}).get("teacher")
    if not teacher:
        raise EfditError("--teacher is required: the guided model to distil (a model file, its run folder, or a "
                         "shipped name such as fmnist-base)")
    path = model_file(resolve_base(str(teacher)))
    model, tcfg, hierarchy, meta = load_model(path)
    if tcfg.model.guidance_embed:
        raise EfditError(f"{path} is already guidance-distilled (it takes w as an input): give its guided teacher")
    model.requires_grad_(False)

    w_min = float(_given(w_min, saved, "w_min", W_RANGE[0]))
    w_max = float(_given(w_max, saved, "w_max", W_RANGE[1]))
    for name, value in (("w-min", w_min), ("w-max", w_max)):
        if not (math.isfinite(value) and 0 <= value <= MAX_SCALE):
            raise EfditError(f"--{name} must be a guidance scale from 0 to {MAX_SCALE:g}, got {value!r}")
    if w_max < w_min:
        raise EfditError(f"--w-max {w_max:g} must be ≥ --w-min {w_min:g}")
    mode = _given(guidance, saved, "guidance", tcfg.sample.guidance)
    if mode == "auto":
        mode = "super" if tcfg.model.embedder == "tiered" else "cfg"
    if mode not in ("cfg", "super", "two_term"):
        raise EfditError(f"--guidance must be one of auto | cfg | super | two_term (the teacher samples with "
                         f"{mode!r}: nothing to distil), got {mode!r}")

    name = saved["teacher"] if saved else (str(teacher) if shipped(str(teacher)) else str(path.resolve()))
    cfg = student_config(tcfg, run_dir, name, mode, overrides or {})
    check = Guidance(mode, 1.0, cfg.sample.cfg_scale_super, cfg.sample.cfg_channels)
    try:  # the branches exist (a null label, a superclass branch), said before any work
        check.branch_labels(torch.zeros(1, dtype=torch.long), label_embedder(model, check))
    except (EfditError, ValueError) as e:
        raise EfditError(f"--guidance {mode}: {e}") from None
    record = {"teacher": cfg.train.init_from, "teacher_sha256": file_sha256(path), "guidance": mode,
              "w_min": w_min, "w_max": w_max, "scale_super": cfg.sample.cfg_scale_super,
              "channels": cfg.sample.cfg_channels}
    if saved is not None:
        same_distillation(run_dir, saved, record)
    return Plan(cfg, record, model, hierarchy, tuple(meta["input_size"]), meta["channels"])


def student_config(teacher_cfg: Config, run_dir: Path, teacher: str, mode: str, overrides: dict) -> Config:
    """The teacher's config with the guidance embedding on, the distillation's training settings (DEFAULTS, then
    `overrides`, each checked) and its sampling: one branch at w = sample.cfg_scale."""
    cfg = copy.deepcopy(teacher_cfg)
    cfg.model.guidance_embed = True
    cfg.run_dir = str(run_dir)
    apply_overrides(cfg, {**DEFAULTS, "train.init_from": teacher})
    cfg.sample.guidance, cfg.sample.guidance_interval = mode, ""
    paths = field_paths(cfg)
    for key in overrides:
        path = _field_path(key, paths)
        if path is None:                                   # unknown or ambiguous: apply_overrides says which
            apply_overrides(cfg, {key: overrides[key]})
            continue
        if path.startswith("sample.") or path in OPTIONS:
            continue
        part = path.split(".")[0]
        kept = {"model": "model (the student is the teacher's DiT plus the w embedding)", "data": "data",
                "diffusion": "diffusion"}.get(part)
        if kept:
            raise EfditError(f"--{key}: a distillation keeps the teacher's {kept}")
        raise EfditError(f"--{key} is not an option of distill-guidance (its training options: "
                         f"{', '.join('--' + p.split('.')[-1].replace('_', '-') for p in OPTIONS)}, and --sample.*)")
    apply_overrides(cfg, overrides)
    return validate_config(cfg)


def _field_path(key: str, paths: dict) -> str | None:
    k = key.replace("-", "_")
    if k in paths:
        return k
    matches = [p for p in paths if p.split(".")[-1] == k]
    return matches[0] if len(matches) == 1 else None


def _given(value, saved: dict | None, key: str, default):
    """An option as given, else the resumed run's, else its default."""
    if value is not None:
        return value
    return saved[key] if saved is not None else default


def read_record(run_dir: Path) -> dict | None:
    """The `distill.json` of a run folder that has a checkpoint to resume from; None for a new run."""
    if not (run_dir / "checkpoints" / "latest.safetensors").is_file():
        return None
    try:
        return json.loads((run_dir / "distill.json").read_text())
    except (OSError, ValueError):
        raise EfditError(f"{run_dir} holds a checkpoint but no readable distill.json: it is not a distillation "
                         f"run (use another folder)") from None


def same_distillation(run_dir: Path, saved: dict, now: dict) -> None:
    """Refuse to resume a run with another teacher, guidance mode or w range."""
    if saved["teacher_sha256"] != now["teacher_sha256"]:
        raise EfditError(f"{run_dir} distils the teacher with sha256 {saved['teacher_sha256']} ({saved['teacher']}), "
                         f"not this one ({now['teacher_sha256']}): use another folder, or the run's teacher")
    diff = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in ("guidance", "w_min", "w_max", "scale_super", "channels")
            if saved.get(k) != now[k]]
    if diff:
        raise EfditError(f"{run_dir} holds a distillation with other settings ({'; '.join(diff)}): use another "
                         f"folder, or the same options to resume")


# ---- the student and the teacher's target ---------------------------------------------------------------
def init_student(teacher: DiT, cfg: Config, hierarchy: Hierarchy, input_size, channels: int) -> DiT:
    """The DiT of `cfg` (guidance_embed on) with the teacher's weights: its output equals the teacher's conditional
    output at every w until it trains. Every parameter trains (the fixed sin-cos position embedding excepted)."""
    student = build_model(cfg, hierarchy, input_size, channels)
    load_state_dict_checked(student, teacher.state_dict(), allow_missing=("w_embedder.",), source="the teacher",
                            verbose=False)
    for name, p in student.named_parameters():
        p.requires_grad_(not (name == "pos_embed" and cfg.model.pos_embed == "sincos"))
    return student


@torch.no_grad()
def guided_target(teacher, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, guidance: Guidance,
                  w: torch.Tensor) -> torch.Tensor:
    """The teacher's guided output at a scale per sample: x_t (N, C, H, W), t (N,) original timesteps, y (N,),
    w (N,) -> (N, C_out, H, W), from one forward of k·N rows (k branches of `guidance.mode`).

    A guided combination is affine in its scale, G(w) = G(0) + w·(G(1) − G(0)), G(s) being `guidance.combine` at
    scale s; with one w for every row it is `guided_forward(teacher, x_t, t, y, Guidance(mode, w))` to rounding.
    The first C channels (three with channels "first3") are combined, the rest (learned Σ) are conditional."""
    branches = guidance.branch_labels(y, label_embedder(teacher, guidance))
    k = len(branches)
    chunks = teacher(torch.cat([x_t] * k), torch.cat([t] * k), torch.cat(branches)).chunk(k)  # k × (N, C_out, H, W)
    n = x_t.shape[1] if guidance.channels == "all" else min(3, x_t.shape[1])
    eps = [c[:, :n] for c in chunks]
    g0 = dataclasses.replace(guidance, scale=0.0).combine(eps)
    g1 = dataclasses.replace(guidance, scale=1.0).combine(eps)
    guided = g0 + w.to(g0.dtype).view(-1, 1, 1, 1) * (g1 - g0)
    return torch.cat([guided, chunks[0][:, n:]], dim=1)


def distill_step(student, teacher, diffusion, ds, cfg: Config, guidance: Guidance, w_range: tuple[float, float],
                 gen: torch.Generator, device, autocast) -> dict[str, float]:
    """One batch's loss and gradients (into .grad): real x0 and labels, t, w, ε all drawn from `gen`."""
    tc = cfg.train
    x0, sub, sup = draw_batch(ds, cfg, gen, 0, 1, tc.batch_size)
    N = x0.shape[0]
    t = torch.randint(0, diffusion.num_timesteps, (N,), generator=gen)
    w = w_range[0] + (w_range[1] - w_range[0]) * torch.rand(N, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    x0, t, w, noise, y = (v.to(device) for v in (x0, t, w, noise, labels_for(cfg, sub, sup)))
    x_t = diffusion.q_sample(x0, t, noise)
    with autocast:
        target = guided_target(teacher, x_t, t, y, guidance, w)
        out = student(x_t, t, y, w=w)
    loss = (out.float() - target.float()).square().mean()
    loss.backward()
    return {"loss": loss.item()}


# ---- the loop -----------------------------------------------------------------------------------------------
def distill(plan: Plan, progress: bool = True, dataset=None) -> Path:
    """Run (or resume) the distillation `plan_distillation` checked. `dataset` replaces the teacher's training
    data (a HierarchicalDataset of the same hierarchy and image size), e.g. for tests. -> the run folder."""
    cfg, record, tc = plan.cfg, plan.record, plan.cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(cfg.device)
    run_dir = plan.run_dir
    ckpt_path = run_dir / "checkpoints" / "latest.safetensors"

    # ---- data, teacher, student, EMA, optimizer ---------------------------------------------------------
    ds = dataset if dataset is not None else load_data(cfg, "train")
    if ds.hierarchy != plan.hierarchy or tuple(ds.image_size) != plan.input_size or \
            ds.num_channels != plan.channels:
        raise EfditError(f"the data ({tuple(ds.image_size)}, {ds.num_channels} channels) is not the teacher's "
                         f"({plan.input_size}, {plan.channels} channels, its hierarchy): distil on its own data")
    teacher = plan.teacher.to(device).eval()
    torch.manual_seed(tc.seed)
    student = init_student(teacher, cfg, plan.hierarchy, plan.input_size, plan.channels).to(device).eval()
    ema = EMA(student, tc.ema_decay, tc.ema_warmup)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(tc.seed)
    diffusion = build_diffusion(cfg)
    guidance = Guidance(record["guidance"], 1.0, record["scale_super"], record["channels"])
    w_range = (record["w_min"], record["w_max"])

    # ---- a new run, or the same run resumed ----------------------------------------------------------------
    prog = {"step": 0, "images": 0, "seconds": 0.0}
    resumed = ckpt_path.is_file()
    if resumed:
        check_same_run(run_dir, cfg)
        prog = load_training_state(ckpt_path, student, ema.model, opt, gen, seed=tc.seed)
        print(f"resuming {run_dir} from step {prog['step']} ({prog['images']:,} images)")
        truncate_log(run_dir / "log.jsonl", prog["step"])
    else:
        print(f"distilling {record['guidance']} guidance of {record['teacher']} for w in "
              f"[{record['w_min']:g}, {record['w_max']:g}] -> {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("config.json", cfg.to_json()), ("distill.json", json.dumps(record, indent=2))):
        with atomic_write(run_dir / name, f"the run's {name}") as tmp:
            tmp.write_text(text)

    budget_s = tc.minutes * 60 if tc.minutes else math.inf
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")
    log = TrainLog(run_dir / "log.jsonl", tc.log_every, prog["images"])
    last_ckpt = prog["images"]
    bar = tqdm(total=tc.total_images, initial=min(prog["images"], tc.total_images), unit="img",
               disable=not progress, desc="distill-guidance", smoothing=0.1)
    start = time.time() - prog["seconds"]
    try:
        while prog["images"] < tc.total_images and time.time() - start < budget_s:
            lr = learning_rate(tc, prog["images"] + tc.batch_size)
            for g in opt.param_groups:
                g["lr"] = lr
            terms = distill_step(student, teacher, diffusion, ds, cfg, guidance, w_range, gen, device, autocast)
            check_finite(terms["loss"], prog["step"] + 1, ckpt_path)
            optimizer_step(opt, params, tc.grad_clip, ema, prog, tc.batch_size)
            prog["seconds"] = time.time() - start
            bar.update(tc.batch_size)
            log.add(terms, tc.batch_size)
            if log.due(prog["images"]):
                rec = log.write(prog["step"], prog["images"], lr, prog["seconds"])
                bar.set_postfix(loss=f"{rec['loss']:.5f}", img_s=f"{rec['img_per_s']:.1f}")
            if prog["images"] - last_ckpt >= tc.ckpt_every:
                save_checkpoint(ckpt_path, student, ema, opt, gen, prog, cfg, None, True)
                last_ckpt = prog["images"]
    finally:
        bar.close()
        log.close()

    # ---- the end: checkpoint, the student's model file, a grid -----------------------------------------------
    save_checkpoint(ckpt_path, student, ema, opt, gen, prog, cfg, None, True)
    out = save_model(run_dir / "model.safetensors", ema.model, cfg, plan.hierarchy, plan.input_size, plan.channels,
                     extra={"progress": prog, "distill": record})
    sample_grid(ema.model, cfg, plan.hierarchy, run_dir / "samples" / "final.png", device)
    print(f"done: {prog['images']:,} images in {prog['seconds'] / 60:.1f} min -> {out} "
          f"(one forward per step at w = --cfg-scale, trained for w in [{record['w_min']:g}, {record['w_max']:g}])")
    return run_dir


def distill_guidance(run_dir, teacher: str | None = None, w_min: float | None = None, w_max: float | None = None,
                     guidance: str | None = None, overrides: dict | None = None, progress: bool = True,
                     dataset=None) -> Path:
    """`plan_distillation` then `distill`: the whole run (or its resumption) in one call."""
    return distill(plan_distillation(run_dir, teacher, w_min, w_max, guidance, overrides), progress, dataset)
