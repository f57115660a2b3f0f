"""The exponential moving average of the trainable weights: the model that is sampled and shipped."""
from __future__ import annotations

import copy

import torch


class EMA:
    """ema ← decay·ema + (1 − decay)·model over the trainable parameters (frozen ones are equal anyway).

    With `warmup`, decay_t = min(decay, (1 + t) / (10 + t)) at optimizer step t, so that the early EMA follows the
    fast-moving model instead of its random initialisation."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        self._pairs = [(pe, pm) for pe, pm in zip(self.model.parameters(), model.parameters()) if pm.requires_grad]

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = self.decay_at(step)
        for pe, pm in self._pairs:
            pe.lerp_(pm, 1 - decay)
