"""Guidance: how the conditional, null and superclass branches combine, and the guided forward pass.

One batched forward per step: every branch is concatenated into one batch of k·N rows (k = 1, 2 or 3) and the
ε channels of the chunks are combined; learned-Σ channels come from the conditional branch. `channels="all"`
guides all C ε channels, `"first3"` only the first three (DiT's `forward_with_cfg`, for bit-exact reproduction).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

MODES = ("none", "cfg", "super", "two_term")


@dataclass
class Guidance:
    """How the branches combine.

    mode: "none" (conditional only) | "cfg" (null branch: ε_∅ + s·(ε_c − ε_∅)) | "super" (superclass branch:
    ε_sup + s·(ε_c − ε_sup)) | "two_term" (ε_∅ + s_sup·(ε_sup − ε_∅) + s·(ε_c − ε_sup)).
    """
    mode: str = "none"
    scale: float = 1.0
    scale_super: float = 1.0
    channels: str = "all"  # all | first3

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"guidance mode must be {' | '.join(MODES)}, not {self.mode!r}")
        if self.channels not in ("all", "first3"):
            raise ValueError(f"cfg channels must be all | first3, not {self.channels!r}")
        for name in ("scale", "scale_super"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                raise ValueError(f"guidance {name} must be a finite number, got {value!r}")

    @property
    def branches(self) -> int:
        """k, the number of branches of a guided step (rows per sample of its forward)."""
        return {"none": 1, "cfg": 2, "super": 2, "two_term": 3}[self.mode]

    def branch_labels(self, labels: torch.Tensor, embedder) -> list[torch.Tensor]:
        if self.mode == "none":
            return [labels]
        if self.mode == "cfg":
            return [labels, embedder.null_labels(labels)]
        if self.mode == "super":
            return [labels, embedder.super_labels(labels)]
        return [labels, embedder.super_labels(labels), embedder.null_labels(labels)]

    def combine(self, eps: list[torch.Tensor]) -> torch.Tensor:
        if self.mode == "none":
            return eps[0]
        if self.mode in ("cfg", "super"):
            cond, other = eps
            return other + self.scale * (cond - other)
        cond, sup, null = eps
        return null + self.scale_super * (sup - null) + self.scale * (cond - sup)


def label_embedder(model, guidance: Guidance):
    """The model's label embedder (`y_embedder`), which gives the null / superclass labels of the branches."""
    base = getattr(model, "module", model)
    embedder = getattr(base, "y_embedder", None)
    if embedder is None:
        need = {"cfg": "null", "super": "superclass", "two_term": "null and superclass"}[guidance.mode]
        raise ValueError(f"guidance mode {guidance.mode!r} needs the model's label embedder (y_embedder) for its "
                         f"{need} labels, and this model has none: use guidance mode 'none'")
    return embedder


def guided_forward(model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: Guidance | None = None,
                   *, model_kwargs: dict | None = None, block_cache=None, channels: int | None = None) -> torch.Tensor:
    """One forward for all branches -> the guided model output (efdit's `forward_with_cfg`).

    x: (N, C, H, W) x_t; t: (N,) original timesteps; labels: (N,) label ids; model(x, t, y, **kw) -> (N, C_out, H, W).
    Returns (N, C_out, H, W): the first `channels` (default C) channels combined by `guidance` (three with
    "first3"), any further (learned-Σ) channels from the conditional branch. Tensors in `model_kwargs` are repeated
    for every branch; `block_cache` is passed to the model as it is.
    """
    guidance = guidance or Guidance()
    kw = dict(model_kwargs or {})
    if guidance.mode == "none":
        if block_cache is not None:
            kw["block_cache"] = block_cache
        return model(x, t, labels, **kw)
    return _branches_forward(model, x, t, labels, guidance, kw, block_cache, channels)[0]


def _branches_forward(model, x, t, labels, guidance: Guidance, kw: dict, block_cache, channels):
    """(guided output, conditional output) of one k·N-row forward."""
    branches = guidance.branch_labels(labels, label_embedder(model, guidance))
    k = len(branches)
    x_in, t_in, y_in = torch.cat([x] * k), torch.cat([t] * k), torch.cat(branches)  # (k·N, …)
    kw = {key: (torch.cat([v] * k) if torch.is_tensor(v) else v) for key, v in kw.items()}
    if block_cache is not None:
        kw["block_cache"] = block_cache
    chunks = model(x_in, t_in, y_in, **kw).chunk(k)  # k × (N, C_out, H, W)
    channels = x.shape[1] if channels is None else channels
    n_guided = channels if guidance.channels == "all" else min(3, channels)
    guided = guidance.combine([c[:, :n_guided] for c in chunks])
    return torch.cat([guided, chunks[0][:, n_guided:]], dim=1), chunks[0]
