"""The training loop: one readable file (nanoGPT / EDM2 style).

A run lives in one directory: `config.json` (resolved config), `log.jsonl` (loss, img/s, lr), `samples/`
(EMA grids), `checkpoints/latest.safetensors` (model, EMA, optimizer, step, RNG states) and, at the end,
`model.safetensors` (EMA weights + config + hierarchy, for sampling). Rerunning the same command resumes from
the last checkpoint. Budget: images seen (`train.total_images`) and/or wall-clock minutes (`train.minutes`).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .config import Config
from .data import build_dataset
from .data.hierarchy import Hierarchy
from .diffusion.timesteps import sample_timesteps
from .errors import EfditError
from .models.checkpoint import load_safetensors, load_state_dict_checked, save_safetensors
from .models.dit import count_params
from .models.peft import parameter_report
from .finetune import base_record, delta_state, frozen_keys, init_from_base, same_base, saves_delta
from .runs import build_diffusion, build_model, labels_for, save_model

# Fields that may change between a run and its resumption (budgets, intervals, the device; sample.* too).
RESUMABLE_CHANGES = ("train.total_images", "train.minutes", "train.log_every", "train.ckpt_every",
                     "train.sample_every", "train.threads", "train.compile",
                     "train.grad_checkpointing", "device", "run_dir")


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.run_dir or os.path.join("runs", cfg.preset or "run"))


def load_data(cfg: Config, split: str = "train", lazy: bool = False):
    """The config's training data (`data.latent_cache` if set: a LatentDataset), or another split.
    lazy: the folder format as a FileDataset (read on access), e.g. to encode a big tree."""
    d = cfg.data
    if split == "train" and d.latent_cache:
        from .latent.cache import LatentDataset
        return LatentDataset(d.latent_cache)
    if split == "train":
        split = d.split or default_split(d.dataset)
    kw = {"lazy": True} if lazy and d.dataset == "folder" else {}
    if d.super_level:
        kw["super_level"] = d.super_level
    if d.sub_level:
        kw["sub_level"] = d.sub_level
    return build_dataset(d.dataset, split=split, image_size=d.image_size or None, channels=d.channels or None,
                         root=d.root or None, on_bad_image=d.on_bad_image, **kw)


def default_split(dataset: str) -> str:
    from .data import ALIASES
    return "train_mini" if ALIASES.get(dataset.lower(), dataset.lower()) == "inat21" else "train"


def reference_shape(cfg: Config):
    """(hierarchy, input size, channels) of iNat 2021 / VegFru from their published description, without the data
    (dry runs): SD-VAE latents (4 channels, /8, or the config of a local VAE folder) when `data.vae` is set."""
    from .data import ALIASES
    key = ALIASES.get(cfg.data.dataset.lower(), cfg.data.dataset.lower())
    if key == "inat21":
        from .data.inat import reference_hierarchy
    elif key == "vegfru":
        from .data.vegfru import reference_hierarchy
    else:
        return None
    size, channels = cfg.data.image_size or 256, 3
    if cfg.data.vae or cfg.data.latent_cache:
        latent_channels, factor = 4, 8
        conf = Path(cfg.data.vae).expanduser() / "config.json"
        if conf.is_file():
            vc = json.loads(conf.read_text())
            latent_channels, factor = vc.get("latent_channels", 4), 2 ** (len(vc.get("block_out_channels", [0] * 4)) - 1)
        size, channels = size // factor, latent_channels
    return reference_hierarchy(), (size, size), channels


def sample_indices(n: int, batch_size: int, gen: torch.Generator, rank: int = 0, world: int = 1) -> torch.Tensor:
    """A with-replacement draw from this rank's shard of the dataset (items rank, rank + world, …; the
    DistributedSampler partition). One process: torch.randint(n), as the loop always drew."""
    if world == 1:
        return torch.randint(n, (batch_size,), generator=gen)
    if n < world:
        raise EfditError(f"{n} training items cannot be sharded over {world} processes")
    return rank + world * torch.randint((n - rank + world - 1) // world, (batch_size,), generator=gen)


# ---- optimizer state <-> flat tensors (safetensors holds tensors only) -------------------------------------
def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_training_state(path: Path, model, ema, opt, gen: torch.Generator, progress: dict, cfg: Config,
                        rank_rngs: list | None = None, base: dict | None = None) -> None:
    """rank_rngs: every rank's (torch RNG state, data-generator state) under torchrun; rank 0's go to the plain
    `rng.torch` / `rng.data` keys, rank r's to `rng.torch.r` / `rng.data.r`. With `base` (a PEFT delta run) the
    frozen parameters are left out of model and EMA: they are the base's."""
    model = distributed.unwrap(model)
    frozen = frozen_keys(model) if base else []
    tensors = {f"model.{k}": v for k, v in delta_state(model, frozen).items()}
    tensors.update({f"ema.{k}": v for k, v in delta_state(ema, frozen).items()})
    opt_tensors, opt_meta = optimizer_to_tensors(opt)
    tensors.update(opt_tensors)
    rank_rngs = rank_rngs or [(torch.get_rng_state(), gen.get_state())]
    for r, (torch_state, data_state) in enumerate(rank_rngs):
        sfx = f".{r}" if r else ""
        tensors["rng.torch" + sfx], tensors["rng.data" + sfx] = torch_state, data_state
    meta = {"kind": "training-state", "config": cfg.to_dict(), "progress": progress, "optimizer": opt_meta}
    if base:
        meta["base"] = base
    save_safetensors(path, tensors, meta)


def load_training_state(path: Path, model, ema, opt, gen: torch.Generator, rank: int = 0, world: int = 1,
                        seed: int = 0, base: dict | None = None) -> dict:
    """Restore model, EMA, optimizer and this rank's RNG states. A run resumed on another number of processes
    cannot continue the old random streams: each rank is re-seeded from (seed, step, rank) instead.
    base: `finetune.base_record` of the base the model was just filled from (a PEFT delta run)."""
    tensors, meta, _ = load_safetensors(path)
    model = distributed.unwrap(model)
    frozen = ()
    if meta.get("base"):  # a PEFT delta: the frozen weights came from the base (init_from_base), check it is the same
        same_base(meta["base"], base, str(path))
        frozen = tuple(frozen_keys(model))
    load_state_dict_checked(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
                            allow_missing=frozen, source=str(path), verbose=False)
    load_state_dict_checked(ema, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")},
                            allow_missing=frozen, source=str(path), verbose=False)
    optimizer_from_tensors(opt, tensors, meta["optimizer"])
    prog = meta["progress"]
    sfx = f".{rank}" if rank else ""
    if prog.get("world_size", 1) == world and f"rng.data{sfx}" in tensors:
        torch.set_rng_state(tensors["rng.torch" + sfx])
        gen.set_state(tensors["rng.data" + sfx])
    else:
        s = distributed.rank_seed(seed + 1_000_003 * prog["step"], rank, world)
        torch.manual_seed(s)
        gen.manual_seed(s)
    return prog


def _truncate_log(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        p = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _config_diff(a[k], b[k], p + ".")
        elif k in a and a.get(k) != b.get(k) and p not in RESUMABLE_CHANGES and not p.startswith("sample."):  # (fields newer than the run: kept)
            out.append(f"{p}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


# ---- the loop ---------------------------------------------------------------------------------------------
class _SkipMetaInit(torch.overrides.TorchFunctionMode):
    """Initialisers on meta tensors do nothing: skip them (torch's meta `normal_` imports its decompositions,
    seconds of start-up for a dry run)."""
    INIT = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "xavier_uniform_", "zeros_", "ones_",
            "constant_", "zero_", "fill_")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = args[0] if args else kwargs.get("tensor")
        if getattr(func, "__name__", "") in self.INIT and isinstance(t, torch.Tensor) and t.device.type == "meta":
            return t
        return func(*args, **kwargs)


def dry_run_report(cfg: Config, dataset=None) -> None:
    """The resolved config and the parameter counts, with the model built on the meta device (no memory, no
    weights, no data needed: iNat / VegFru shapes come from their published description when absent)."""
    note = ""
    try:
        ds = dataset if dataset is not None else load_data(cfg, "train")
        name, n, hierarchy, input_size, channels = ds.name, f"{len(ds):,}", ds.hierarchy, ds.image_size, ds.num_channels
    except EfditError as e:
        ref = reference_shape(cfg)
        if ref is None:
            raise
        (hierarchy, input_size, channels), name, n = ref, cfg.data.dataset, "?"
        note = f"  (data not loaded: {e}; shapes from the dataset's published description)"
    with torch.device("meta"), _SkipMetaInit():
        model = build_model(cfg, hierarchy, input_size, channels)
    n_params = count_params(model)
    n_train = count_params(model, trainable_only=True)
    print(cfg.to_json())
    print(f"dataset: {name} ({n} images, {hierarchy}), input {channels}x{input_size[0]}x{input_size[1]}{note}")
    print(f"model: {n_params:,} parameters ({n_train:,} trainable, {100 * n_train / n_params:.4f}%, "
          f"peft={cfg.model.peft}, embedder={cfg.model.embedder}), {len(model.blocks)} blocks, "
          f"{model.x_embedder.num_patches} tokens")
    frozen = set(frozen_keys(model)) if saves_delta(cfg) else set()
    stored = sum(v.numel() for k, v in model.state_dict().items() if k not in frozen)
    print(f"model file: {stored * 4 / 2**20:,.1f} MiB fp32" +
          (f", a PEFT delta over {cfg.train.init_from} (--save-frozen true: the whole model)" if saves_delta(cfg)
           else ""))
    print(f"run directory: {run_dir_of(cfg)}")


def train(cfg: Config, progress: bool = True, dry_run: bool = False, dataset=None, on_finish=None) -> Path:
    """Train per `cfg` (or resume its run directory). `dataset` replaces the config's data (a
    HierarchicalDataset), e.g. for tests and notebooks. Under torchrun every process runs this same function
    (DDP; `train.batch_size` is the global batch); `on_finish(model, ema)` is called on every rank at the end."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if dry_run:
        dry_run_report(cfg, dataset)
        return run_dir_of(cfg)
    info = distributed.setup(cfg.device)
    device, rank, world, main = info.device, info.rank, info.world_size, info.is_main
    progress = progress and main
    run_dir = run_dir_of(cfg)
    ds = dataset if dataset is not None else load_data(cfg, "train")
    hierarchy = ds.hierarchy
    input_size, channels = ds.image_size, ds.num_channels
    if cfg.train.batch_size % world:
        raise EfditError(f"train.batch_size {cfg.train.batch_size} (the global batch) is not divisible by the "
                         f"{world} processes")
    local_batch = cfg.train.batch_size // world
    torch.manual_seed(cfg.train.seed)  # the same initial model on every rank
    model = build_model(cfg, hierarchy, input_size, channels)
    model.grad_checkpointing = cfg.train.grad_checkpointing

    diffusion = build_diffusion(cfg)
    ckpt_path = run_dir / "checkpoints" / "latest.safetensors"
    gen = torch.Generator().manual_seed(distributed.rank_seed(cfg.train.seed, rank, world))
    resumed = distributed.broadcast_object(ckpt_path.is_file())
    delta = saves_delta(cfg)  # PEFT from a base: checkpoints and the model file store only what trains
    if cfg.train.init_from and (not resumed or delta):
        init_from_base(model, cfg, hierarchy, verbose=main and not resumed)
    base = distributed.broadcast_object(base_record(cfg) if delta and main else None)
    if main and (cfg.model.peft != "full" or cfg.train.init_from):
        print(f"{cfg.model.peft}: {parameter_report(model)}")
    if world > 1:
        torch.manual_seed(distributed.rank_seed(cfg.train.seed, rank, world))  # label dropout differs per rank
    model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, betas=(0.9, 0.999))
    prog = {"step": 0, "images": 0, "seconds": 0.0}
    if resumed:
        saved_cfg = json.loads((run_dir / "config.json").read_text())
        diff = _config_diff(saved_cfg, cfg.to_dict())
        if diff:
            raise EfditError(f"{run_dir} holds a run with another config ({'; '.join(diff[:4])}): "
                             f"use another --run-dir, or the same options to resume")
        prog = load_training_state(ckpt_path, model, ema, opt, gen, rank, world, cfg.train.seed, base)
        if main:
            was = prog.get("world_size", 1)
            print(f"resuming {run_dir} from step {prog['step']} ({prog['images']:,} images)"
                  + (f" on {world} processes (saved by {was}: data streams re-seeded)" if was != world else ""))
            _truncate_log(run_dir / "log.jsonl", prog["step"])  # drop what was logged after the checkpoint
    prog["world_size"] = world
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.to_json())
    ddp_model = distributed.wrap_ddp(model, info)  # the model itself on one process
    latent = getattr(ds, "latent", False)          # a latent cache flips with its stored mirrored moments

    tc = cfg.train
    budget_s = tc.minutes * 60 if tc.minutes else math.inf
    per_step = tc.batch_size * tc.grad_accum
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")
    from .models.compiled import maybe_compile
    forward = maybe_compile(ddp_model, tc.compile)  # the (DDP) model itself unless train.compile
    ema_params = [p for p in ema.parameters()]
    model_params = list(model.parameters())
    trainable = [p.requires_grad for p in model_params]
    last = {"log": prog["images"], "ckpt": prog["images"], "sample": prog["images"]}
    window = {"loss": 0.0, "mse": 0.0, "vb": 0.0, "n": 0, "t0": time.time(), "img": 0}
    log = open(run_dir / "log.jsonl", "a") if main else None
    bar = tqdm(total=tc.total_images, initial=min(prog["images"], tc.total_images), unit="img", disable=not progress,
               desc=f"train {cfg.preset or ''}".strip(), smoothing=0.1)
    start = time.time() - prog["seconds"]
    out_of_time = prog["seconds"] >= budget_s
    model.train()
    try:
        while prog["images"] < tc.total_images and not out_of_time:
            lr = tc.lr * min(1.0, (prog["images"] + per_step) / tc.warmup_images) if tc.warmup_images else tc.lr
            for g in opt.param_groups:
                g["lr"] = lr
            terms_sum = {}
            for micro in range(tc.grad_accum):
                if hasattr(ds, "batch"):
                    idx = sample_indices(len(ds), local_batch, gen, rank, world)   # this rank's shard
                    x, sub, sup = ds.batch(idx, gen, hflip=True) if latent and cfg.data.hflip else ds.batch(idx)
                elif world == 1:
                    x, sub, sup = ds.sample_batch(local_batch, gen)
                else:
                    raise EfditError(f"distributed training needs a dataset with batch(idx), not {type(ds).__name__}")
                if cfg.data.hflip and not latent:
                    flip = torch.rand(x.shape[0], generator=gen) < 0.5
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                t = sample_timesteps(x.shape[0], diffusion.alphas_cumprod, cfg.diffusion.timesteps,
                                     cfg.diffusion.lognormal_mean, cfg.diffusion.lognormal_std, gen)
                noise = torch.randn(x.shape, generator=gen)
                x, t, noise, y = x.to(device), t.to(device), noise.to(device), labels_for(cfg, sub, sup).to(device)
                with distributed.no_sync(ddp_model, skip=micro < tc.grad_accum - 1):  # all-reduce grads once
                    with autocast:
                        terms = diffusion.training_losses(forward, x, t, dict(y=y), noise=noise)
                    loss = terms["loss"].mean() / tc.grad_accum
                    loss.backward()
                for k, v in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + v.mean().item() / tc.grad_accum
            # the mean over ranks (logging, the NaN stop) and the time budget, one collective: every rank decides alike
            reduced = distributed.all_reduce_mean(list(terms_sum.values()) + [time.time() - start], device)
            terms_sum = dict(zip(terms_sum, reduced[:-1]))
            out_of_time = reduced[-1] >= budget_s
            if not math.isfinite(terms_sum["loss"]):
                raise EfditError(f"loss became {terms_sum['loss']} at step {prog['step'] + 1}: stopping; the last "
                                 f"good checkpoint is {ckpt_path if ckpt_path.exists() else 'none (no checkpoint yet)'}"
                                 f" (try a lower --lr or --grad-clip)")
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            decay = min(tc.ema_decay, (1 + prog["step"]) / (10 + prog["step"])) if tc.ema_warmup else tc.ema_decay
            with torch.no_grad():
                for pe, pm, tr in zip(ema_params, model_params, trainable):
                    if tr:
                        pe.lerp_(pm, 1 - decay)
            prog["step"] += 1
            prog["images"] += per_step
            prog["seconds"] = time.time() - start
            bar.update(per_step)
            for k, v in terms_sum.items():
                window[k] = window.get(k, 0.0) + v
            window["n"] += 1
            window["img"] += per_step

            if prog["images"] - last["log"] >= tc.log_every:
                dt = time.time() - window["t0"]
                rec = {"step": prog["step"], "images": prog["images"], "lr": lr, "seconds": round(prog["seconds"], 1),
                       "img_per_s": round(window["img"] / dt, 2)}
                rec.update({k: window[k] / window["n"] for k in terms_sum})
                if log is not None:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.1f}")
                window = {"n": 0, "t0": time.time(), "img": 0}
                last["log"] = prog["images"]
            if prog["images"] - last["ckpt"] >= tc.ckpt_every:
                rngs = distributed.gather_objects(_rng_states(gen))  # a collective: every rank takes part
                if main:
                    save_training_state(ckpt_path, model, ema, opt, gen, prog, cfg, rngs, base)
                last["ckpt"] = prog["images"]
            if main and tc.sample_every and prog["images"] - last["sample"] >= tc.sample_every:
                _sample_grid(ema, cfg, hierarchy, run_dir / "samples" / f"{prog['images'] // 1000:06d}k.png", device)
                last["sample"] = prog["images"]
    finally:
        bar.close()
        if log is not None:
            log.close()
    distributed.check_in_sync(model)
    rngs = distributed.gather_objects(_rng_states(gen))
    if main:
        save_training_state(ckpt_path, model, ema, opt, gen, prog, cfg, rngs, base)
        save_model(run_dir / "model.safetensors", ema, cfg, hierarchy, input_size, channels,
                   extra={"progress": prog}, base=base, frozen=frozen_keys(model))
        _sample_grid(ema, cfg, hierarchy, run_dir / "samples" / "final.png", device)
        print(f"done: {prog['images']:,} images in {prog['seconds'] / 60:.1f} min -> {run_dir / 'model.safetensors'}")
    if on_finish is not None:
        on_finish(model, ema)
    distributed.barrier()
    return run_dir


def _rng_states(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.get_rng_state(), gen.get_state()


def _grid_classes(cfg: Config, hierarchy: Hierarchy, most: int = 64) -> list[int] | None:
    """All classes when there are at most `most`; else the first two subclasses of each superclass (iNat: 22)."""
    n = hierarchy.num_sub if cfg.model.condition_on == "sub" else hierarchy.num_super
    if n <= most:
        return None
    if cfg.model.condition_on != "sub":
        return list(range(most))
    return [c for s in range(hierarchy.num_super) for c in hierarchy.children(s)[:2]]


def _sample_grid(ema, cfg: Config, hierarchy: Hierarchy, path: Path, device) -> None:
    from .sample import generate_per_class, save_grid
    try:
        images, labels = generate_per_class(ema, cfg, hierarchy, per_class=min(cfg.sample.per_class, 8),
                                            classes=_grid_classes(cfg, hierarchy), device=device, progress=False)
    except EfditError as e:  # a latent model whose VAE is not at hand: the grid is optional
        print(f"no sample grid ({e})")
        ema.train(False)
        return
    save_grid(path, images, labels, hierarchy, condition_on=cfg.model.condition_on)
    ema.train(False)
