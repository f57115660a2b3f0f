"""Optional `torch.compile` with a clean fallback to eager.

`maybe_compile(model, enabled)` returns the model itself when disabled, else a `CompiledModel`: calling it runs
the compiled model; if compiling fails (no C++ compiler, an unsupported op, an old torch — at `torch.compile`
or, since compilation is lazy, at the first call) it warns once, in one line, and runs the eager model from then
on. An error the eager model raises too (bad input) is re-raised as it is, with no warning and compile kept.
Attributes resolve to the model and `.module` is the model, so samplers and losses take the wrapper wherever
they take a DiT. Calls with a `block_cache` (FORA, Δ-DiT, TaylorSeer) run eager: a cache's Python-side
decisions would make the compiled graph recompile at every step.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ..errors import EfditWarning


class CompiledModel:
    def __init__(self, model: nn.Module, **compile_kwargs):
        self.module = model
        self.compiled = None
        try:
            self.compiled = torch.compile(model, **compile_kwargs)
        except Exception as e:  # torch.compile itself refused (e.g. unsupported Python / platform)
            self._fall_back(e)

    def _fall_back(self, e: BaseException) -> None:
        self.compiled = None
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        warnings.warn(f"torch.compile failed ({type(e).__name__}: {reason}); running the eager model",
                      EfditWarning, stacklevel=3)

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    def __call__(self, *args, **kwargs):
        if self.compiled is None or kwargs.get("block_cache") is not None:
            return self.module(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as e:
            error = e
        out = self.module(*args, **kwargs)  # if eager raises too, the input was at fault, not compile
        self._fall_back(error)
        return out

    def __getattr__(self, name):
        # only called for names not found on the wrapper: the model's attributes (y_embedder, in_channels, …)
        if name in ("module", "compiled"):
            raise AttributeError(name)
        return getattr(self.module, name)


def maybe_compile(model: nn.Module, enabled: bool, **compile_kwargs):
    """The model, or a CompiledModel of it when `enabled` (see the module docstring)."""
    return CompiledModel(model, **compile_kwargs) if enabled else model
