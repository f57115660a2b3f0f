"""Improved precision and recall (Kynkäänniemi et al. 2019) by k-nearest-neighbour manifolds.

Each feature set defines a manifold: the union of balls around its samples, each ball's radius being
the distance to the sample's k-th nearest neighbour in the same set (k = 3, the ADM evaluator's value).

- precision = share of generated samples that lie inside the real manifold (fidelity),
- recall    = share of real samples that lie inside the generated manifold (diversity).

The computation is torch-fidelity's `calculate_precision_recall_part` (its convention: features_1 =
generated, features_2 = real), which works on row blocks of the distance matrices, so 10k x 10k sets
need only `batch_size` x N distances at a time (batch 2048, N = 10k: 80 MB in float32).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from efdit.errors import EfditError
from efdit.metrics.fd import torch_fidelity_module


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _as_float32_tensor(x) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.detach().cpu().float().contiguous()
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def precision_recall(real, generated, k: int = 3, batch_size: int = 2048) -> PrecisionRecall:
    """k-NN precision and recall of `generated` features (M, D) against `real` features (N, D).

    Distances are computed in float32 in blocks of `batch_size` rows.
    """
    calculate_precision_recall_part = torch_fidelity_module("metric_prc").calculate_precision_recall_part
    x_real, x_gen = _as_float32_tensor(real), _as_float32_tensor(generated)
    if x_real.dim() != 2 or x_gen.dim() != 2 or x_real.shape[1] != x_gen.shape[1]:
        raise EfditError(f"features must be (N, D) with the same D, got {tuple(x_real.shape)} and {tuple(x_gen.shape)}")
    if k < 1 or min(len(x_real), len(x_gen)) <= k:
        raise EfditError(f"precision/recall with k = {k} needs more than k samples per set "
                         f"(got {len(x_real)} real, {len(x_gen)} generated)")
    precision, recall = calculate_precision_recall_part(x_gen, x_real, neighborhood=k, batch_size=batch_size)
    return PrecisionRecall(float(precision), float(recall))
