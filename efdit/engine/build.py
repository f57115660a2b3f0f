"""From a config to the objects it describes: the DiT (label embedder, attention backend and PEFT modules
included), its diffusion, and the labels a batch is conditioned on."""
from __future__ import annotations

import torch

from ..config import Config, parse_kv
from ..data.hierarchy import Hierarchy
from ..diffusion import create_diffusion
from ..errors import EfditError
from ..models.dit import DiT, DiT_models


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
    p = sizes["patch_size"]
    if input_size[0] % p or input_size[1] % p:
        raise EfditError(f"--model.patch_size {p} must divide the input size {input_size[0]}x{input_size[1]} "
                         f"(efdit does not pad silently: resize the data with --image-size, or pick another patch)")
    return dict(input_size=tuple(input_size), in_channels=channels, mlp_ratio=m.mlp_ratio,
                class_dropout_prob=m.class_dropout_prob, num_classes=num_labels(cfg, hierarchy),
                learn_sigma=m.learn_sigma, pos_embed=m.pos_embed, attn_backend=m.attn_backend,
                guidance_embed=m.guidance_embed, **sizes)


def build_model(cfg: Config, hierarchy: Hierarchy, input_size: tuple[int, int], channels: int) -> DiT:
    """The DiT a config describes: label embedder (flat or tiered), attention backend and PEFT modules included.

    The attention backend is set before the PEFT rule, so that `model.attn_adapt` (auto) can see it: a non-SDPA
    backend under a rule that freezes qkv / proj gets LoRA on them (models/peft.py). `model.peft_added` lists the
    tensors PEFT added (absent from a base checkpoint; identity-initialised); `model.attn_adapt` the resolved mode."""
    from ..models.embedders import TieredEmbedder
    from ..models.peft import apply_peft
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
    model.peft_added = apply_peft(model, m.peft, lora_rank=m.lora_rank, difffit_blocks=m.difffit_blocks,
                                  attn_adapt=m.attn_adapt)
    return model


def apply_attention(model: DiT, cfg: Config) -> DiT:
    """Switch every block to the config's attention backend (the state dict is unchanged)."""
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
