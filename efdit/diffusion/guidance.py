"""Guidance: how the conditional, null and superclass branches combine, and the guided forward pass.

One batched forward per step: every branch is concatenated into one batch of k·N rows (k = 1, 2 or 3) and the
ε channels of the chunks are combined; learned-Σ channels come from the conditional branch. `channels="all"`
guides all C ε channels, `"first3"` only the first three (DiT's `forward_with_cfg`, for bit-exact reproduction).

Guidance in a limited interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves
sample and distribution quality"): with `interval = (t_lo, t_hi)` the branches are combined only while the
original timestep t (of the 1000-step training chain) lies in [t_lo, t_hi]; outside it the step is one
conditional forward of N rows, exactly the unguided conditional output.
"""
from __future__ import annotations

import dataclasses
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
    interval: (t_lo, t_hi), original timesteps, both included: guide only there, a single conditional forward at
    every other t; None guides every step.
    """
    mode: str = "none"
    scale: float = 1.0
    scale_super: float = 1.0
    channels: str = "all"  # all | first3
    interval: tuple[int, int] | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"guidance mode must be {' | '.join(MODES)}, not {self.mode!r}")
        if self.channels not in ("all", "first3"):
            raise ValueError(f"cfg channels must be all | first3, not {self.channels!r}")
        for name in ("scale", "scale_super"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                raise ValueError(f"guidance {name} must be a finite number, got {value!r}")
        if self.interval is not None:
            iv = self.interval
            ok = (isinstance(iv, (tuple, list)) and len(iv) == 2
                  and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in iv)
                  and 0 <= iv[0] <= iv[1])
            if not ok:
                raise ValueError(f"guidance interval must be two integer timesteps (t_lo, t_hi) with "
                                 f"0 <= t_lo <= t_hi, got {iv!r}")
            self.interval = (int(iv[0]), int(iv[1]))

    @property
    def branches(self) -> int:
        """k, the number of branches of a guided step (rows per sample of its forward)."""
        return {"none": 1, "cfg": 2, "super": 2, "two_term": 3}[self.mode]

    def applies(self, t: int) -> bool:
        """Whether the branches are combined at original timestep t (always for mode "none": it has one)."""
        return self.interval is None or self.interval[0] <= int(t) <= self.interval[1]

    def at(self, t: int) -> "Guidance":
        """The guidance of a step at original timestep t, without interval: this one inside it, "none" outside."""
        if not self.applies(t) or self.mode == "none":
            return Guidance()
        return self if self.interval is None else dataclasses.replace(self, interval=None)

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
    for every branch; `block_cache` is passed to the model as it is. With `guidance.interval`, rows whose t is
    outside it get the conditional output: a batch wholly outside runs one N-row forward.
    """
    guidance = guidance or Guidance()
    kw = dict(model_kwargs or {})
    if guidance.mode != "none" and guidance.interval is not None:
        lo, hi = guidance.interval
        inside = (t >= lo) & (t <= hi)  # (N,)
        if not bool(inside.any()):
            guidance = Guidance()
        elif bool(inside.all()):
            guidance = dataclasses.replace(guidance, interval=None)
        else:  # rows on both sides: guide all of them, then keep the conditional branch outside
            out, cond = _branches_forward(model, x, t, labels, guidance, kw, block_cache, channels)
            return torch.where(inside.view(-1, *([1] * (out.ndim - 1))), out, cond)
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
