"""The training loop (nanoGPT / EDM2 style): `train(cfg)` reads top to bottom; its pieces sit beside it —
the EMA (ema.py), the learning-rate schedule (lr.py), the log (trainlog.py), checkpoints (files.py).

A run lives in one directory: `config.json` (resolved config), `log.jsonl` (loss, img/s, lr), `samples/`
(EMA grids), `checkpoints/latest.safetensors` (model, EMA, optimizer, step, RNG states) and, at the end,
`model.safetensors` (EMA weights + config + hierarchy, for sampling). Rerunning the same command resumes from
the last checkpoint, bit-identically. Budget: images seen (`train.total_images`) and/or wall-clock minutes
(`train.minutes`). One code path serves 1 and N processes (torchrun): `train.batch_size` is the global batch.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config, validate_config
from ..data.hierarchy import Hierarchy
from ..diffusion.timesteps import sample_timesteps
from ..errors import EfditError, atomic_write
from ..models.compiled import maybe_compile
from ..models.peft import parameter_report
from . import distributed
from .build import build_diffusion, build_model, labels_for
from .datasets import load_data
from .dry_run import dry_run_report
from .ema import EMA
from .files import base_record, frozen_keys, load_training_state, save_model, save_training_state, saves_delta
from .finetune import init_from_base
from .lr import learning_rate, warmup_warning
from .paths import run_dir_of
from .trainlog import TrainLog, truncate_log

# Fields that may change between a run and its resumption (budgets, intervals, the device; sample.* too).
RESUMABLE_CHANGES = ("train.total_images", "train.minutes", "train.log_every", "train.ckpt_every",
                     "train.sample_every", "train.threads", "train.compile",
                     "train.grad_checkpointing", "device", "run_dir")
WARMUP_CHECK_STEP = 10  # a time budget's warm-up is judged from the throughput of the first steps


def param_groups(model: torch.nn.Module, label_lr_scale: float = 1.0) -> list[dict]:
    """The optimizer's groups: the label tables (`y_embedder.*`) at lr × label_lr_scale, the rest at lr; each
    group's `lr_scale` multiplies the schedule's lr at every step. With the scale 1, one group of every trainable
    parameter in the model's order, as before the option existed (so older training states resume)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if label_lr_scale == 1.0:
        return [{"params": [p for _, p in named], "lr_scale": 1.0}]
    groups = ({"params": [p for n, p in named if not n.startswith("y_embedder.")], "lr_scale": 1.0},
              {"params": [p for n, p in named if n.startswith("y_embedder.")], "lr_scale": label_lr_scale})
    return [g for g in groups if g["params"]]


def train(cfg: Config, progress: bool = True, dry_run: bool = False, dataset=None, on_finish=None) -> Path:
    """Train per `cfg` (or resume its run directory). `dataset` replaces the config's data (a
    HierarchicalDataset), e.g. for tests and notebooks. Under torchrun every process runs this same function
    (DDP); `on_finish(model, ema_model)` is called on every rank at the end."""
    validate_config(cfg)
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if dry_run:
        dry_run_report(cfg, dataset)
        return run_dir_of(cfg)
    info = distributed.setup(cfg.device)
    device, rank, world, main = info.device, info.rank, info.world_size, info.is_main
    run_dir = run_dir_of(cfg)
    ckpt_path = run_dir / "checkpoints" / "latest.safetensors"

    # ---- data, model, EMA, optimizer --------------------------------------------------------------------
    ds = dataset if dataset is not None else load_data(cfg, "train")
    local_batch = local_batch_size(tc.batch_size, world)
    torch.manual_seed(tc.seed)                       # the same initial model on every rank
    model = build_model(cfg, ds.hierarchy, ds.image_size, ds.num_channels)
    model.grad_checkpointing = tc.grad_checkpointing
    diffusion = build_diffusion(cfg)
    gen = torch.Generator().manual_seed(distributed.rank_seed(tc.seed, rank, world))
    resumed = distributed.broadcast_object(ckpt_path.is_file())
    delta = saves_delta(cfg)                         # PEFT from a base: files store only what trains
    if tc.init_from and (not resumed or delta):
        init_from_base(model, cfg, ds.hierarchy, verbose=main and not resumed)
    elif main and not resumed:
        suggest_a_base(cfg, ds)
    base = distributed.broadcast_object(base_record(cfg) if delta and main else None)
    if main and (cfg.model.peft != "full" or tc.init_from):
        print(f"{cfg.model.peft}: {parameter_report(model)}")
    if world > 1:
        torch.manual_seed(distributed.rank_seed(tc.seed, rank, world))  # label dropout differs per rank
    model.to(device)
    ema = EMA(model, tc.ema_decay, tc.ema_warmup)
    groups = param_groups(model, tc.label_lr_scale)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.999))

    # ---- a new run, or the same run resumed ----------------------------------------------------------------
    prog = {"step": 0, "images": 0, "seconds": 0.0}
    if resumed:
        check_same_run(run_dir, cfg)
        prog = load_training_state(ckpt_path, model, ema.model, opt, gen, rank, world, tc.seed, base)
        if main:
            was = prog.get("world_size", 1)
            print(f"resuming {run_dir} from step {prog['step']} ({prog['images']:,} images)"
                  + (f" on {world} processes (saved by {was}: data streams re-seeded)" if was != world else ""))
            truncate_log(run_dir / "log.jsonl", prog["step"])  # drop what was logged after the checkpoint
    prog["world_size"] = world
    if main:
        with atomic_write(run_dir / "config.json", "the run's config") as tmp:
            tmp.write_text(cfg.to_json())
        if skipped := getattr(ds, "info", {}).get("skipped_files"):
            with atomic_write(run_dir / "skipped-images.txt", "the list of skipped images") as tmp:
                tmp.write_text("".join(f"{f}\n" for f in skipped))
        if not resumed and not tc.minutes and (note := warmup_warning(tc)):
            print(note)   # (with a time budget: judged after the first steps, from their throughput)
    ddp_model = distributed.wrap_ddp(model, info)    # the model itself on one process
    forward = maybe_compile(ddp_model, tc.compile)   # the (DDP) model itself unless train.compile

    # ---- the loop ------------------------------------------------------------------------------------------
    budget_s = tc.minutes * 60 if tc.minutes else math.inf
    per_step = tc.batch_size * tc.grad_accum
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")
    log = TrainLog(run_dir / "log.jsonl", tc.log_every, prog["images"], enabled=main)
    last = {"ckpt": prog["images"], "sample": prog["images"]}
    bar = tqdm(total=tc.total_images, initial=min(prog["images"], tc.total_images), unit="img",
               disable=not (progress and main), desc=f"train {cfg.preset or ''}".strip(), smoothing=0.1)
    start = time.time() - prog["seconds"]
    out_of_time = prog["seconds"] >= budget_s
    warn_at = prog["step"] + WARMUP_CHECK_STEP if tc.minutes and prog["images"] < tc.warmup_images else None
    model.train()
    try:
        while prog["images"] < tc.total_images and not out_of_time:
            lr = learning_rate(tc, prog["images"] + per_step)
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)   # a state saved before lr_scale existed: 1
            terms = train_step(cfg, forward, ddp_model, diffusion, ds, gen, info, local_batch, autocast)
            # the mean over ranks (logging, the NaN stop) and the time budget, one collective: every rank decides alike
            reduced = distributed.all_reduce_mean(list(terms.values()) + [time.time() - start], device)
            terms, out_of_time = dict(zip(terms, reduced[:-1])), reduced[-1] >= budget_s
            check_finite(terms["loss"], prog["step"] + 1, ckpt_path)
            optimizer_step(opt, params, tc.grad_clip, ema, prog, per_step)
            prog["seconds"] = time.time() - start
            bar.update(per_step)
            log.add(terms, per_step)

            if prog["step"] == warn_at and main and (note := warmup_warning(tc, prog["images"] / prog["seconds"])):
                bar.write(note)
            if log.due(prog["images"]):
                rec = log.write(prog["step"], prog["images"], lr, prog["seconds"])
                bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.1f}")
            if prog["images"] - last["ckpt"] >= tc.ckpt_every:
                save_checkpoint(ckpt_path, model, ema, opt, gen, prog, cfg, base, main)
                last["ckpt"] = prog["images"]
            if main and tc.sample_every and prog["images"] - last["sample"] >= tc.sample_every:
                sample_grid(ema.model, cfg, ds.hierarchy, run_dir / "samples" / f"{prog['images'] // 1000:06d}k.png",
                            device)
                last["sample"] = prog["images"]
    finally:
        bar.close()
        log.close()

    # ---- the end: checkpoint, model file, a grid -----------------------------------------------------------
    distributed.check_in_sync(model)
    save_checkpoint(ckpt_path, model, ema, opt, gen, prog, cfg, base, main)
    if main:
        save_model(run_dir / "model.safetensors", ema.model, cfg, ds.hierarchy, ds.image_size, ds.num_channels,
                   extra={"progress": prog}, base=base, frozen=frozen_keys(model))
        sample_grid(ema.model, cfg, ds.hierarchy, run_dir / "samples" / "final.png", device)
        print(f"done: {prog['images']:,} images in {prog['seconds'] / 60:.1f} min -> {run_dir / 'model.safetensors'}")
    if on_finish is not None:
        on_finish(model, ema.model)
    distributed.barrier()
    return run_dir


# ---- one optimizer step ---------------------------------------------------------------------------------------
def train_step(cfg: Config, forward, ddp_model, diffusion, ds, gen: torch.Generator, info, local_batch: int,
               autocast) -> dict[str, float]:
    """Forward and backward of `grad_accum` micro-batches (gradients summed into .grad; DDP all-reduces once, at
    the last). Returns the mean loss terms of this process."""
    tc, d = cfg.train, cfg.diffusion
    terms_sum: dict[str, float] = {}
    for micro in range(tc.grad_accum):
        x, sub, sup = draw_batch(ds, cfg, gen, info.rank, info.world_size, local_batch)
        t = sample_timesteps(x.shape[0], diffusion.alphas_cumprod, d.timesteps, d.lognormal_mean, d.lognormal_std,
                             gen)
        noise = torch.randn(x.shape, generator=gen)
        dev = info.device
        x, t, noise, y = x.to(dev), t.to(dev), noise.to(dev), labels_for(cfg, sub, sup).to(dev)
        with distributed.no_sync(ddp_model, skip=micro < tc.grad_accum - 1):
            with autocast:
                terms = diffusion.training_losses(forward, x, t, dict(y=y), noise=noise)
            (terms["loss"].mean() / tc.grad_accum).backward()
        for k, v in terms.items():
            terms_sum[k] = terms_sum.get(k, 0.0) + v.mean().item() / tc.grad_accum
    return terms_sum


def optimizer_step(opt, params, grad_clip: float, ema: EMA, prog: dict, images: int) -> None:
    """Clip the gradients (grad_clip > 0), step, clear them, update the EMA, count the step and its images."""
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema.update(prog["step"])
    prog["step"] += 1
    prog["images"] += images


def check_finite(loss: float, step: int, ckpt_path: Path) -> None:
    """A NaN or infinite loss stops the run with one line naming the last good checkpoint."""
    if not math.isfinite(loss):
        raise EfditError(f"loss became {loss} at step {step}: stopping; the last good checkpoint is "
                         f"{ckpt_path if ckpt_path.exists() else 'none (no checkpoint yet)'} (try a lower --lr or "
                         f"--grad-clip)")


def draw_batch(ds, cfg: Config, gen: torch.Generator, rank: int, world: int, batch_size: int):
    """-> (x in [-1, 1] or latents, subclass ids, superclass ids): a with-replacement draw from this rank's
    shard, randomly mirrored when `data.hflip` (a latent cache mirrors with its stored mirrored moments)."""
    latent = getattr(ds, "latent", False)
    if hasattr(ds, "batch"):
        idx = sample_indices(len(ds), batch_size, gen, rank, world)
        x, sub, sup = ds.batch(idx, gen, hflip=True) if latent and cfg.data.hflip else ds.batch(idx)
    elif world == 1:
        x, sub, sup = ds.sample_batch(batch_size, gen)
    else:
        raise EfditError(f"distributed training needs a dataset with batch(idx), not {type(ds).__name__}")
    if cfg.data.hflip and not latent:
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x, sub, sup


def sample_indices(n: int, batch_size: int, gen: torch.Generator, rank: int = 0, world: int = 1) -> torch.Tensor:
    """A with-replacement draw from this rank's shard of the dataset (items rank, rank + world, …; the
    DistributedSampler partition). One process: torch.randint(n), as the loop always drew."""
    if world == 1:
        return torch.randint(n, (batch_size,), generator=gen)
    if n < world:
        raise EfditError(f"{n} training items cannot be sharded over {world} processes")
    return rank + world * torch.randint((n - rank + world - 1) // world, (batch_size,), generator=gen)


def local_batch_size(batch_size: int, world: int) -> int:
    if batch_size % world:
        raise EfditError(f"train.batch_size {batch_size} (the global batch) is not divisible by the {world} "
                         f"processes")
    return batch_size // world


# ---- resuming and checkpoints ---------------------------------------------------------------------------------
def check_same_run(run_dir: Path, cfg: Config) -> None:
    """Refuse to resume a run folder that holds a run with another config (budgets and sampling may change)."""
    saved = json.loads((run_dir / "config.json").read_text())
    diff = config_diff(saved, cfg.to_dict())
    if diff:
        raise EfditError(f"{run_dir} holds a run with another config ({'; '.join(diff[:4])}): "
                         f"use another --run-dir, or the same options to resume")


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """"key: old -> new" for the fields that differ and may not change on resume (fields newer than the run are
    kept: a run saved before they existed resumes with their defaults)."""
    out = []
    for k in sorted(set(a) | set(b)):
        p = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += config_diff(a[k], b[k], p + ".")
        elif k in a and a.get(k) != b.get(k) and p not in RESUMABLE_CHANGES and not p.startswith("sample."):
            out.append(f"{p}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def save_checkpoint(path: Path, model, ema: EMA, opt, gen: torch.Generator, prog: dict, cfg: Config, base, main: bool):
    """Every rank's RNG states (a collective: all ranks take part), then the training state on the main rank."""
    rngs = distributed.gather_objects((torch.get_rng_state(), gen.get_state()))
    if main:
        save_training_state(path, model, ema.model, opt, gen, prog, cfg, rngs, base)


# ---- notes and pictures ---------------------------------------------------------------------------------------
SMALL_FOLDER = 5_000  # images: training from scratch on fewer suggests fine-tuning a shipped base instead


def suggest_a_base(cfg: Config, ds) -> None:
    """A from-scratch run on a small folder of one's own images is told, once, that fine-tuning is faster."""
    if cfg.data.dataset == "folder" and len(ds) < SMALL_FOLDER:
        from .paths import shipped_names
        bases = [n for n in shipped_names() if n.startswith("emoji")] or shipped_names()
        print(f"note: training from scratch on {len(ds):,} images; fine-tuning a shipped base is the faster path: "
              f"--init-from {bases[0] if bases else 'BASE'} --init-labels random (see the README)")


def grid_classes(cfg: Config, hierarchy: Hierarchy, most: int = 64) -> list[int] | None:
    """All classes when there are at most `most`; else the first two subclasses of each superclass (iNat: 22)."""
    n = hierarchy.num_sub if cfg.model.condition_on == "sub" else hierarchy.num_super
    if n <= most:
        return None
    if cfg.model.condition_on != "sub":
        return list(range(most))
    return [c for s in range(hierarchy.num_super) for c in hierarchy.children(s)[:2]]


def sample_grid(ema_model, cfg: Config, hierarchy: Hierarchy, path: Path, device) -> None:
    """A grid of EMA samples (at most 8 per class) written to `path`; skipped with a line when it cannot be made."""
    from .generate import generate_per_class
    from .pictures import save_grid
    try:
        images, labels = generate_per_class(ema_model, cfg, hierarchy, per_class=min(cfg.sample.per_class, 8),
                                            classes=grid_classes(cfg, hierarchy), device=device, progress=False)
    except EfditError as e:  # a latent model whose VAE is not at hand: the grid is optional
        print(f"no sample grid ({e})")
        ema_model.train(False)
        return
    save_grid(path, images, labels, hierarchy, condition_on=cfg.model.condition_on)
    ema_model.train(False)
