"""Building models from configs, and efdit model files (weights + config + hierarchy in one safetensors)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import Config
from .data.hierarchy import Hierarchy
from .diffusion import create_diffusion
from .errors import EfditError
from .finetune import delta_state, load_delta
from .models.checkpoint import file_sha256, load_safetensors, load_state_dict_checked, save_safetensors
from .models.dit import DiT, DiT_models


def num_labels(cfg: Config, hierarchy: Hierarchy) -> int:
    if cfg.model.condition_on not in ("sub", "super"):
        raise EfditError(f"model.condition_on must be sub | super, not {cfg.model.condition_on!r}")
    return hierarchy.num_sub if cfg.model.condition_on == "sub" else hierarchy.num_super


def model_kwargs(cfg: Config, hierarchy: Hierarchy, input_size: tuple[int, int], channels: int) -> dict:
    m = cfg.model
    sizes = dict(patch_size=m.patch_size, hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads)
    if m.arch:
        if m.arch not in DiT_models:
            raise EfditError(f"unknown model.arch {m.arch!r} (known: {', '.join(DiT_models)})")
        sizes = dict(DiT_models[m.arch])
    return dict(input_size=tuple(input_size), in_channels=channels, mlp_ratio=m.mlp_ratio,
                class_dropout_prob=m.class_dropout_prob, num_classes=num_labels(cfg, hierarchy),
                learn_sigma=m.learn_sigma, pos_embed=m.pos_embed, attn_backend=m.attn_backend, **sizes)


def build_model(cfg: Config, hierarchy: Hierarchy, input_size: tuple[int, int], channels: int) -> DiT:
    """The DiT a config describes: label embedder (flat or tiered) and PEFT modules included.

    `model.peft_added` lists the tensors PEFT added (absent from a base checkpoint; identity-initialised)."""
    from .models.embedders import TieredEmbedder
    from .models.peft import apply_peft
    kw = model_kwargs(cfg, hierarchy, input_size, channels)
    m = cfg.model
    if m.embedder == "tiered":
        if m.condition_on != "sub":
            raise EfditError("the tiered embedder conditions on subclasses: use --condition-on sub")
        kw["y_embedder"] = TieredEmbedder(hierarchy.num_sub, hierarchy.num_super, hierarchy.parent, kw["hidden_size"],
                                          m.class_dropout_prob,
                                          mode=m.tiered_mode, null_prob=m.null_prob)
    elif m.embedder != "flat":
        raise EfditError(f"model.embedder must be flat | tiered, not {m.embedder!r}")
    model = DiT(**kw)
    apply_attention(model, cfg)
    model.peft_added = apply_peft(model, m.peft, lora_rank=m.lora_rank, difffit_blocks=m.difffit_blocks)
    return model


def apply_attention(model: DiT, cfg: Config) -> DiT:
    """Switch every block to the config's attention backend (the state dict is unchanged)."""
    from .config import parse_kv
    try:
        model.set_attention_backend(cfg.model.attn_backend, **parse_kv(cfg.model.attn_kwargs))
    except (ValueError, TypeError) as e:
        raise EfditError(f"attention backend {cfg.model.attn_backend!r}: {e}") from None
    return model


def build_diffusion(cfg: Config, respacing: str | None = None):
    d = cfg.diffusion
    return create_diffusion(respacing, noise_schedule=d.schedule, diffusion_steps=d.steps, prediction=d.prediction,
                            learn_sigma=cfg.model.learn_sigma, loss=d.loss, weighting=d.weighting,
                            min_snr_gamma=d.min_snr_gamma)


def labels_for(cfg: Config, sub: torch.Tensor, sup: torch.Tensor) -> torch.Tensor:
    return sub if cfg.model.condition_on == "sub" else sup


def save_model(path: str | os.PathLike, model: DiT, cfg: Config, hierarchy: Hierarchy, input_size, channels,
               dtype: torch.dtype | None = None, extra: dict | None = None, base: dict | None = None,
               frozen: list[str] | None = None) -> Path:
    """An efdit model file: weights (optionally cast, e.g. to fp16 for shipping) + everything to rebuild it.
    With `base` (finetune.base_record) only the tensors not in `frozen` are stored: a delta over that base."""
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
    """-> (model in eval mode, Config, Hierarchy, metadata dict) from an efdit model file."""
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
    run = Path(run)
    if run.is_dir():
        run = run / "model.safetensors" if (run / "model.safetensors").is_file() else \
            run / "checkpoints" / "latest.safetensors"
    tensors, meta, _ = load_safetensors(run)
    cfg = Config.from_dict(meta["config"])
    if meta.get("kind") == "training-state":
        from .train import load_data
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
