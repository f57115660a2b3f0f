"""Multi-head self-attention with swappable backends.

`Attention` owns one fused `qkv` Linear and `proj` (the official DiT key names); the attention core is a
backend function `(q, k, v, *, grid=None, attn_mask=None) -> out`, all of shape (N, heads, L, head_dim),
chosen by name. Switching backends never changes the state dict, so checkpoints move freely between them.
Backends other than SDPA (ProAttention's robust and proxy variants) register themselves with
`register_backend` from their own modules.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKENDS: dict[str, Callable] = {}


def register_backend(name: str):
    """Decorator: make `fn(q, k, v, *, grid=None, attn_mask=None, **kwargs)` available as backend `name`."""
    def deco(fn):
        BACKENDS[name] = fn
        return fn
    return deco


@register_backend("sdpa")
def sdpa_attention(q, k, v, *, grid=None, attn_mask=None):
    # q, k, v: (N, heads, L, head_dim); torch picks the fused kernel (flash / memory-efficient / math).
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


@register_backend("math")
def math_attention(q, k, v, *, grid=None, attn_mask=None):
    """The explicit softmax(QKᵀ/√d)·V in float32: a readable reference for tests and other backends."""
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (N, heads, L, L_k)
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    return (logits.softmax(-1) @ v).to(dtype)


def get_backend(name: str, **kwargs) -> Callable:
    if name not in BACKENDS:
        # backends living in optional modules register on import
        import importlib
        for mod in ("efdit.models.proattention",):
            try:
                importlib.import_module(mod)
            except ImportError:
                pass
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
    fn = BACKENDS[name]
    return functools.partial(fn, **kwargs) if kwargs else fn


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa", **backend_kwargs):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.set_backend(backend, **backend_kwargs)

    def set_backend(self, name: str, **kwargs) -> None:
        self.backend_name = name
        self.backend = get_backend(name, **kwargs)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None, attn_mask=None) -> torch.Tensor:
        N, L, D = x.shape
        qkv = self.qkv(x).reshape(N, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, N, H, L, hd)
        q, k, v = qkv.unbind(0)
        out = self.backend(q, k, v, grid=grid, attn_mask=attn_mask)  # (N, H, L, hd)
        return self.proj(out.transpose(1, 2).reshape(N, L, D))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, with the official key names."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
