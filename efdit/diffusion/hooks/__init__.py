"""Sampler hooks: mechanisms that change sampling (HRIG, caches) without editing the model.

A hook is any object with
  reset()                                  called at the start of every sampling run,
  on_step_begin(step_index, t)             before the model forward of a step (caches need the step first),
  on_step(state) -> state                  after guidance; may return a state with `x0` or `eps` replaced.
Block caches (hooks/cache.py) also have a `granularity` ("block" | "branch") and are the `block_cache(i, branch,
fn, x, c)` callable the model calls per block; the sampler passes the (single) cache among its hooks to the model
and, if it has one, calls its `bind(model)` before `reset()`.
Hooks never modify tensors in place: the sampler detects a replacement by object identity and recomputes
the other quantity (`eps` from a new `x0`, or `x0` from a new `eps`); replacing both is an error.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class SamplerState:
    step_index: int           # position in the sampling loop, 0 = first (noisiest) step
    chain_index: int          # index in the (respaced) chain, counts down to 0
    t: torch.Tensor           # (N,) original timesteps (what the model sees)
    x_t: torch.Tensor         # (N, C, H, W)
    eps: torch.Tensor         # guided ε
    x0: torch.Tensor          # predicted clean sample
    model_output: torch.Tensor  # guided output, ε channels and (learned Σ) the conditional variance channels
    alpha_bar: float
    alpha_bar_prev: float
    snr: float
    model_kwargs: dict = field(default_factory=dict)

    def replace(self, **changes) -> "SamplerState":
        return dataclasses.replace(self, **changes)


class SamplerHook:
    """Base class with no-op methods; subclasses override what they need."""

    def reset(self) -> None:
        pass

    def on_step_begin(self, step_index: int, t: torch.Tensor) -> None:
        pass

    def on_step(self, state: SamplerState) -> SamplerState:
        return state
