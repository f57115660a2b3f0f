"""Fréchet distance between Gaussian fits of two feature sets (FD-EffNetLite0 on EfficientNet-Lite0 features).

    FD = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

The statistics and the distance are torch-fidelity's own (`fid_features_to_statistics`,
`fid_statistics_to_metric`): they take plain mean / covariance arrays, so they work unchanged with our
features. Tr((S_1 S_2)^{1/2}) is computed there as the sum of square roots of the eigenvalues of S_1 S_2
(real parts), which equals the trace of scipy's `sqrtm(S_1 @ S_2).real`. These wrappers only convert
inputs (numpy or torch, any float dtype) to float64 and check shapes.
"""
from __future__ import annotations

import importlib

import numpy as np
import torch

from efdit.errors import EfditError


def torch_fidelity_module(name: str):
    """Import torch_fidelity.<name> on first use (it pulls in torchvision); EfditError if not installed."""
    try:
        return importlib.import_module(f"torch_fidelity.{name}")
    except ImportError:
        raise EfditError("these metrics use torch-fidelity's estimators: "
                         "`pip install torch-fidelity==0.4.0` (or the project's `fid` extra)") from None


def _as_float64_numpy(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), both float64."""
    fid_features_to_statistics = torch_fidelity_module("metric_fid").fid_features_to_statistics
    f = _as_float64_numpy(features)
    if f.ndim != 2 or len(f) < 2:
        raise EfditError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    stats = fid_features_to_statistics(torch.from_numpy(f))
    return np.asarray(stats["mu"], dtype=np.float64), np.atleast_2d(np.asarray(stats["sigma"], dtype=np.float64))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (symmetric, >= 0 up to round-off)."""
    metric_fid = torch_fidelity_module("metric_fid")
    mu1, mu2 = _as_float64_numpy(mu1), _as_float64_numpy(mu2)
    sigma1, sigma2 = _as_float64_numpy(sigma1), _as_float64_numpy(sigma2)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.ndim != 1 or mu2.shape != mu1.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise EfditError(f"statistics do not match: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {sigma1.shape} / {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise EfditError("feature statistics contain NaN or inf")
    out = metric_fid.fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, verbose=False)
    return float(out[metric_fid.KEY_METRIC_FID])


def frechet_distance_from_features(features1, features2) -> float:
    """FD between two feature sets (N1, D) and (N2, D); fix N and the image resolution when comparing."""
    return frechet_distance(*feature_stats(features1), *feature_stats(features2))
