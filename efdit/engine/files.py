"""Checkpoint and model-file I/O, in one place.

An efdit **model file** is one safetensors file: weights (EMA, possibly fp16) + the JSON config, the hierarchy,
the input size and channels in its metadata — everything needed to rebuild and sample the model.
A **delta** model file (a PEFT run from a base) stores only the tensors that can differ from the base (trainable
parameters, what PEFT added, buffers) plus a record of the base (path + SHA-256); loading it rebuilds the model from
the base first and refuses a base that is missing or changed, naming the file it expects. `export_model` merges
a delta into a standalone file.
A **training state** (`checkpoints/latest.safetensors`) holds model, EMA, optimizer, progress and every rank's RNG
states: rerunning the same command resumes bit-identically.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from ..config import Config, apply_overrides
from ..data.hierarchy import Hierarchy
from ..errors import EfditError
from ..models.checkpoint import file_sha256, load_safetensors, load_state_dict_checked, save_safetensors
from ..models.dit import DiT
from . import distributed
from .build import build_model
from .finetune import init_from_base, resolve_base
from .paths import ASSETS, model_file


# ---- model files ------------------------------------------------------------------------------------------
def save_model(path: str | os.PathLike, model: DiT, cfg: Config, hierarchy: Hierarchy, input_size, channels,
               dtype: torch.dtype | None = None, extra: dict | None = None, base: dict | None = None,
               frozen: list[str] | None = None) -> Path:
    """An efdit model file: weights (optionally cast, e.g. to fp16 for shipping) + everything to rebuild it.
    With `base` (base_record) only the tensors not in `frozen` are stored: a delta over that base."""
    sd = delta_state(model, frozen or []) if base else model.state_dict()
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in sd.items()}
    meta = {"config": cfg.to_dict(), "hierarchy": hierarchy.to_dict(), "input_size": list(input_size),
            "channels": channels, **(extra or {})}
    if base:
        meta["base"] = base
    return save_safetensors(path, sd, meta)


def _fill(model: DiT, cfg: Config, hierarchy: Hierarchy, tensors: dict, meta: dict, source: str) -> None:
    """Load a model file's tensors into a freshly built model: from the base first if the file is a delta."""
    tensors = {k: v.float() for k, v in tensors.items()}
    if meta.get("base"):
        load_delta(model, cfg, hierarchy, tensors, meta["base"], source)
    else:
        load_state_dict_checked(model, tensors, source=source, verbose=False)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """-> (model in eval mode, Config, Hierarchy, metadata dict) from an efdit model file or its run folder."""
    path = model_file(path)
    tensors, meta, _ = load_safetensors(path)
    if "config" not in meta or "hierarchy" not in meta:
        raise EfditError(f"{path} is an efdit checkpoint without a model config (a training-state file?)")
    cfg = Config.from_dict(meta["config"])
    hierarchy = Hierarchy.from_dict(meta["hierarchy"])
    model = build_model(cfg, hierarchy, tuple(meta["input_size"]), meta["channels"])
    _fill(model, cfg, hierarchy, tensors, meta, Path(path).name)
    meta["sha256"] = file_sha256(path)
    return model.to(device).eval(), cfg, hierarchy, meta


def export_model(run: Path, out: Path, dtype: str = "fp16") -> Path:
    """A run's EMA weights as a standalone model file (a PEFT delta is merged with its base). `run`: a run
    directory, a model file or a training-state file (then the hierarchy and input size are rebuilt from the
    config's dataset)."""
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    run = model_file(run, allow_training_state=True)
    tensors, meta, _ = load_safetensors(run)
    if "config" not in meta:
        raise EfditError(f"{run} is not an efdit model file or training state (no config in its metadata)")
    cfg = Config.from_dict(meta["config"])
    if meta.get("kind") == "training-state":
        from .datasets import load_data
        ds = load_data(cfg)
        hierarchy, input_size, channels = ds.hierarchy, ds.image_size, ds.num_channels
        weights = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    else:
        hierarchy = Hierarchy.from_dict(meta["hierarchy"])
        input_size, channels, weights = tuple(meta["input_size"]), meta["channels"], tensors
    model = build_model(cfg, hierarchy, input_size, channels)
    _fill(model, cfg, hierarchy, weights, meta, run.name)
    return save_model(out, model, cfg, hierarchy, input_size, channels, dtype=dt,
                      extra={"progress": meta.get("progress", {}), "exported_from": str(run)})


# ---- PEFT deltas over a base ----------------------------------------------------------------------------
def saves_delta(cfg: Config) -> bool:
    """Whether a run's files store only what differs from its base (PEFT from a base, unless train.save_frozen)."""
    return cfg.model.peft != "full" and bool(cfg.train.init_from) and not cfg.train.save_frozen


def frozen_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of the parameters that do not train: equal to the base's after `init_from_base`."""
    return sorted(name for name, p in model.named_parameters() if not p.requires_grad)


def delta_state(model: torch.nn.Module, frozen: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The state dict without the frozen parameters."""
    drop = set(frozen_keys(model) if frozen is None else frozen)
    return {k: v for k, v in model.state_dict().items() if k not in drop}


def base_record(cfg: Config) -> dict:
    """What a delta file says of its base: the path as resolved now and the file's SHA-256 (first 16 hex)."""
    path = resolve_base(cfg.train.init_from)
    if not path.is_file():
        raise EfditError(f"base checkpoint not found: {path}")
    shipped = path.resolve().parent == ASSETS.resolve()
    return {"init_from": cfg.train.init_from, "path": path.name if shipped else str(path.resolve()),
            "shipped": shipped, "sha256": file_sha256(path)}


def check_base(record: dict, source: str) -> Path:
    """The base file a delta file was trained from, after checking it is there and unchanged."""
    path = ASSETS / record["path"] if record.get("shipped") else Path(record["path"])
    if not path.is_file():
        raise EfditError(f"{source} stores only the tensors a PEFT run trained; it needs its base model "
                         f"{path} (sha256 {record['sha256']}), which is not there: put the base back at that "
                         f"path (or export a standalone file where it is: efdit export RUN)")
    same_base(record, {"path": str(path), "sha256": file_sha256(path)}, source)
    return path


def same_base(record: dict, now: dict | None, source: str) -> None:
    """Refuse a delta whose base (`record`, from its file) is not the base at hand (`now`: path and sha256)."""
    if now is None or now["sha256"] != record["sha256"]:
        where = f"{now['path']} now has sha256 {now['sha256']}" if now else "this run has no base (train.init_from)"
        raise EfditError(f"{source} was fine-tuned from a base with sha256 {record['sha256']}, but {where}: "
                         f"the frozen weights would not be the ones it was trained with")


def load_delta(model: torch.nn.Module, cfg: Config, hierarchy: Hierarchy, tensors: dict[str, torch.Tensor],
               record: dict, source: str) -> None:
    """Fill `model` (built from `cfg`) from its base and then from a delta state dict."""
    base = check_base(record, source)
    init_from_base(model, apply_overrides(copy.deepcopy(cfg), {"train.init_from": str(base)}), hierarchy,
                   verbose=False)
    load_state_dict_checked(model, tensors, allow_missing=tuple(frozen_keys(model)), source=source, verbose=False)


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


# ---- metadata without the tensors -------------------------------------------------------------------------
def read_metadata(path: Path) -> dict:
    """The JSON metadata of an efdit model file, without reading its tensors."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), "pt") as f:
            raw = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise EfditError(f"cannot read {path} as safetensors: {e}") from None
    meta = json.loads(raw["config"]) if "config" in raw else {}
    return {**{k: v for k, v in raw.items() if k != "config"}, **meta}


def is_d2it(meta: dict) -> bool:
    """D²iT model files say so in their metadata (`kind`/`model` "d2it", or a `d2it` section)."""
    tags = {str(meta.get(k, "")).lower().replace("²", "2") for k in ("kind", "model", "model_type", "family")}
    return "d2it" in meta or any(t.startswith("d2it") for t in tags)


def is_d2it_run(run: Path) -> bool:
    """A D²iT run folder: stage files (dvae / dgt / dct .safetensors) or a config with those sections."""
    if any((run / f"{stage}.safetensors").is_file() for stage in ("dvae", "dgt", "dct")):
        return True
    try:
        return {"dvae", "dgt", "dct"} <= set(json.loads((run / "config.json").read_text()))
    except (OSError, ValueError, TypeError):
        return False
