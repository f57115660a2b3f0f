"""Embedders of the diffusion timestep and of class labels.

Label embedders own their label-id space: besides the ordinary class ids they define the ids of the
unconditional ("null") branch and, for hierarchical embedders, the superclass branch. Samplers ask the
embedder for them (`null_labels`, `super_labels`) and never hard-code an id.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [cos | sin] as in DiT. t: (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t -> sinusoidal features (256) -> MLP -> (N, D)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Flat class labels -> (N, D), with DiT's classifier-free-guidance dropout.

    Label ids: 0..num_classes-1 are classes; `num_classes` is the null (unconditional) id, a table row that
    exists when `dropout_prob > 0` (as in the official checkpoints: 1001 rows for ImageNet).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.has_null = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null), hidden_size)

    @property
    def null_id(self) -> int:
        return self.num_classes

    def null_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if not self.has_null:
            raise ValueError("this model has no null class (trained with class_dropout_prob=0): "
                             "classifier-free guidance is unavailable")
        return torch.full_like(labels, self.null_id)

    def super_labels(self, labels: torch.Tensor) -> torch.Tensor:
        raise ValueError("a flat LabelEmbedder has no superclass branch; use the tiered embedder")

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape, device=labels.device, generator=generator) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.null_id), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)
