"""Embedders of the diffusion timestep and of class labels.

Label embedders own their label-id space: besides the ordinary class ids they define the ids of the
unconditional ("null") branch and, for hierarchical embedders, the superclass branch. Samplers ask the
embedder for them (`null_labels`, `super_labels`) and never hard-code an id.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import EfditError


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
            raise EfditError("this model has no null class (trained with class_dropout_prob=0): "
                             "classifier-free guidance is unavailable")
        return torch.full_like(labels, self.null_id)

    def super_labels(self, labels: torch.Tensor) -> torch.Tensor:
        raise EfditError("a flat LabelEmbedder has no superclass branch; use the tiered embedder")

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


class TieredEmbedder(nn.Module):
    """EFDiT's Tiered Embedder: subclass and superclass labels fused into one conditioning vector.

    Label ids: 0..S-1 subclasses, S + s superclass s, S + P the null label (when it exists), with S subclasses,
    P superclasses and the sub -> super map `parent`. Modes:

    * ``finediffusion`` (FineDiffusion's TieredEmbedder): one table of S + P rows (`embedding_table`); a subclass
      label embeds as its own row only; label dropout (p) replaces a subclass by its superclass. No null row.
    * ``sum`` (efdit's default reading of EFDiT): tables `sub_table` (S rows) and `super_table` (P rows);
      a subclass embeds as E_sub[y] + E_sup[π(y)], a superclass label as E_sup[s] (+ a learned null-subclass
      vector with `learned_null_sub`); dropout keeps only the superclass term. With `null_prob` > 0 a second,
      rarer drop goes to a learned fully-null vector (`null_embedding`), enabling null CFG and two-term guidance.
    """

    def __init__(self, num_sub: int, num_super: int, parent: torch.Tensor, hidden_size: int,
                 dropout_prob: float = 0.1, mode: str = "sum", null_prob: float = 0.0, learned_null_sub: bool = False):
        super().__init__()
        if mode not in ("sum", "finediffusion"):
            raise ValueError(f"tiered embedder mode must be sum | finediffusion, not {mode!r}")
        if mode == "finediffusion" and (null_prob > 0 or learned_null_sub):
            raise ValueError("mode finediffusion has no null row: null_prob and learned_null_sub need mode sum")
        parent = torch.as_tensor(parent, dtype=torch.long, device="cpu")
        if parent.shape != (num_sub,) or (num_sub and (parent.min() < 0 or parent.max() >= num_super)):
            raise ValueError("parent must map each of the num_sub subclasses to a superclass id < num_super")
        self.num_sub, self.num_super, self.mode = num_sub, num_super, mode
        self.dropout_prob, self.null_prob = dropout_prob, null_prob
        self.has_null = null_prob > 0
        self.register_buffer("parent", parent.clone(), persistent=False)
        if mode == "finediffusion":
            self.embedding_table = nn.Embedding(num_sub + num_super, hidden_size)
        else:
            self.sub_table = nn.Embedding(num_sub, hidden_size)
            self.super_table = nn.Embedding(num_super, hidden_size)
            self.null_sub = nn.Parameter(torch.zeros(hidden_size)) if learned_null_sub else None
            self.null_embedding = nn.Parameter(torch.zeros(hidden_size)) if self.has_null else None
            if self.null_embedding is not None:
                nn.init.normal_(self.null_embedding, std=0.02)

    @property
    def num_classes(self) -> int:  # the conditional label space: subclasses
        return self.num_sub

    @property
    def null_id(self) -> int:
        return self.num_sub + self.num_super

    def super_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The superclass label of each subclass label (superclass labels map to themselves)."""
        return self.num_sub + self._super_id(labels)

    def null_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if not self.has_null:
            raise EfditError("this tiered embedder has no null label (mode finediffusion, or null_prob=0): use "
                             "superclass guidance, or train with a null drop")
        return torch.full_like(labels, self.null_id)

    def _super_id(self, labels: torch.Tensor) -> torch.Tensor:
        is_sub = labels < self.num_sub
        par = self.parent[labels.clamp(0, max(self.num_sub - 1, 0))]
        return torch.where(is_sub, par, (labels - self.num_sub).clamp(0, self.num_super - 1))

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Training dropout: subclass -> its superclass (p = dropout_prob), then -> null (p = null_prob)."""
        if force_drop_ids is not None:
            drop = force_drop_ids == 1
        else:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
        out = torch.where(drop & (labels < self.num_sub), self.super_labels(labels), labels)
        if self.has_null and force_drop_ids is None:
            to_null = torch.rand(labels.shape, device=labels.device) < self.null_prob
            out = torch.where(to_null, torch.full_like(out, self.null_id), out)
        return out

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and (self.dropout_prob > 0 or self.has_null)) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        if self.mode == "finediffusion":
            return self.embedding_table(labels)
        is_sub = (labels < self.num_sub).unsqueeze(-1)
        is_null = (labels == self.null_id).unsqueeze(-1)
        emb = self.super_table(self._super_id(labels))                                   # (N, D)
        emb = emb + self.sub_table(labels.clamp(0, self.num_sub - 1)) * is_sub          # + E_sub[y] for subclasses
        if self.null_sub is not None:
            emb = emb + self.null_sub * (~is_sub & ~is_null)
        if self.null_embedding is not None:
            emb = torch.where(is_null, self.null_embedding.expand_as(emb), emb)
        return emb
