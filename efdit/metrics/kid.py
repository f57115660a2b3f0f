"""Kernel distance (KID-style, Bińkowski et al. 2018) on EfficientNet-Lite0 features.

Unbiased MMD² with the cubic polynomial kernel k(x, y) = (x·y / d + 1)³, averaged over random
subsets of equal size drawn without replacement from each set; reports mean and standard deviation.
The estimator is torch-fidelity's `kid_features_to_metric` (kernel "poly", degree 3, gamma 1/d,
coef0 1, unbiased `mmd2`), which takes feature tensors directly; we only convert inputs, pick the
subset size and silence its progress bar.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from efdit.errors import EfditError
from efdit.metrics.fd import torch_fidelity_module


class KID(NamedTuple):
    mean: float
    std: float


def _as_float64_tensor(x) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.detach().cpu().double()
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


def kernel_distance(real, generated, subset_size: int | None = 1000, subsets: int = 100, seed: int = 0) -> KID:
    """KID mean and std over `subsets` random subsets of `subset_size` from each feature set (N, D).

    subset_size: None -> min(1000, N_real, N_generated); larger than either set is an EfditError.
    seed: seeds the subset draws (numpy RandomState), so the result is reproducible.
    """
    metric_kid = torch_fidelity_module("metric_kid")
    x, y = _as_float64_tensor(real), _as_float64_tensor(generated)
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise EfditError(f"features must be (N, D) with the same D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if subset_size is None:
        subset_size = min(1000, len(x), len(y))
    if not 2 <= subset_size <= min(len(x), len(y)):
        raise EfditError(f"KID subset size {subset_size} must lie in [2, {min(len(x), len(y))}] "
                         f"(sets of {len(x)} and {len(y)} features)")
    if subsets < 1:
        raise EfditError("KID needs at least one subset")
    out = metric_kid.kid_features_to_metric(x, y, kid_subsets=subsets, kid_subset_size=subset_size, rng_seed=seed,
                                 kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                 kid_kernel_poly_coef0=1, verbose=False)
    return KID(float(out[metric_kid.KEY_METRIC_KID_MEAN]), float(out[metric_kid.KEY_METRIC_KID_STD]))
