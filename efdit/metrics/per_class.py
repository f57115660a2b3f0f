"""Scores per level of the hierarchy: per-superclass FD, mean intra-class FD, fine accuracy given the superclass.

    FD_super(s)  = FD(generated samples requested under superclass s, real samples of s)
    intra-FD     = (1 / C) Σ_c FD(generated samples requested as subclass c, real samples of c)
    fine | super = #{fine right and superclass right} / #{superclass right}

Bias at small N: FD is biased upward, by an amount falling roughly as 1 / n (Chong & Forsyth 2020); the mean term
alone gains tr Σ_g / n_g + tr Σ_r / n_r in expectation, and the covariance of n points in d dimensions has rank
≤ n - 1. With 100 samples per subclass and d = 1280 an intra-class FD is dominated by that bias: compare intra-class FDs only at equal
n per class, next to the real-vs-real intra-class floor at the same n, and read the N reported with each value.
All FDs here are exact and computed in the low-rank space (`FrechetReference`), so thousands of classes are cheap.
"""
from __future__ import annotations

import numpy as np
import torch

from efdit.data.hierarchy import Hierarchy
from efdit.errors import EfditError
from efdit.metrics.bootstrap import FrechetReference, _as_features, _as_labels


def _group_fd(gen, gen_groups, ref, ref_groups, num_groups: int, names: list[str], min_samples: int) -> dict:
    """FD per group id with its sample counts; groups with fewer than `min_samples` on either side get fd None."""
    per = {}
    for c in range(num_groups):
        gi, ri = np.flatnonzero(gen_groups == c), np.flatnonzero(ref_groups == c)
        if len(gi) == 0 and len(ri) == 0:
            continue
        fd = None
        if len(gi) >= min_samples and len(ri) >= min_samples:
            fd = FrechetReference(ref[ri]).fd(gen[gi])
        per[names[c]] = {"fd": fd, "n_gen": int(len(gi)), "n_ref": int(len(ri))}
    scored = [v for v in per.values() if v["fd"] is not None]
    return {"per_class": per,
            "mean": float(np.mean([v["fd"] for v in scored])) if scored else None,
            "classes": len(scored),
            "n_gen_min": min((v["n_gen"] for v in scored), default=0),
            "n_ref_min": min((v["n_ref"] for v in scored), default=0),
            "skipped": [k for k, v in per.items() if v["fd"] is None]}


def _prepare(gen_features, gen_sub_labels, ref_features, ref_sub_labels, hierarchy: Hierarchy):
    g = _as_features(gen_features, "generated features")
    r = _as_features(ref_features, "reference features")
    if g.shape[1] != r.shape[1]:
        raise EfditError(f"feature dimensions differ: {g.shape[1]} generated vs {r.shape[1]} reference")
    yg, yr = _as_labels(gen_sub_labels, len(g)), _as_labels(ref_sub_labels, len(r))
    for y in (yg, yr):
        if len(y) and (y.min() < 0 or y.max() >= hierarchy.num_sub):
            raise EfditError(f"subclass labels must lie in [0, {hierarchy.num_sub})")
    return g, yg, r, yr


def per_superclass_fd(gen_features, gen_sub_labels, ref_features, ref_sub_labels, hierarchy: Hierarchy,
                      min_samples: int = 2) -> dict:
    """FD of each superclass: generated samples whose requested subclass lies under it vs the real ones under it.

    Returns {"per_class": {superclass name: {"fd", "n_gen", "n_ref"}}, "mean", "classes", "n_gen_min",
    "n_ref_min", "skipped"}; a superclass with fewer than `min_samples` on either side has fd None (skipped).
    """
    g, yg, r, yr = _prepare(gen_features, gen_sub_labels, ref_features, ref_sub_labels, hierarchy)
    parent = hierarchy.parent.numpy()
    return _group_fd(g, parent[yg], r, parent[yr], hierarchy.num_super, hierarchy.super_names, min_samples)


def intra_class_fd(gen_features, gen_sub_labels, ref_features, ref_sub_labels, hierarchy: Hierarchy,
                   min_samples: int = 2) -> dict:
    """Mean intra-class FD: the FD of each subclass (requested label vs real label), averaged over subclasses.

    Same return layout as `per_superclass_fd` (per_class keyed by subclass name). Biased upward at small n per
    class (see the module docstring): report it with n_gen_min / n_ref_min and the real-vs-real value at the same n.
    """
    g, yg, r, yr = _prepare(gen_features, gen_sub_labels, ref_features, ref_sub_labels, hierarchy)
    return _group_fd(g, yg, r, yr, hierarchy.num_sub, hierarchy.sub_names, min_samples)


def fine_acc_given_super(fine_pred, coarse_pred, sub_labels, hierarchy: Hierarchy, super_from: str = "coarse") -> dict:
    """Fine accuracy among the samples whose superclass is right.

    super_from="coarse": the superclass is right when the judge's coarse head says so (coarse_pred == requested
    superclass); "fine": when the fine prediction lies under the requested superclass (then the value is
    fine_acc / super_consistency, and its chance level is 1 / (number of sibling subclasses)).
    Returns {"value" (0 when no superclass is right), "n_super_right", "n"}.
    """
    y = (sub_labels.detach().cpu().numpy() if torch.is_tensor(sub_labels) else np.asarray(sub_labels))
    y = y.reshape(-1).astype(np.int64)
    n = len(y)
    if n == 0:
        raise EfditError("no samples to score")
    if len(y) and (y.min() < 0 or y.max() >= hierarchy.num_sub):
        raise EfditError(f"subclass labels must lie in [0, {hierarchy.num_sub})")
    parent = hierarchy.parent.numpy()
    fine = _as_labels(fine_pred, n)
    if super_from == "coarse":
        if coarse_pred is None:
            raise EfditError("super_from='coarse' needs the coarse predictions")
        right = _as_labels(coarse_pred, n) == parent[y]
    elif super_from == "fine":
        right = parent[fine] == parent[y]
    else:
        raise EfditError(f"super_from must be 'coarse' or 'fine', got {super_from!r}")
    den = int(right.sum())
    value = float(((fine == y) & right).sum() / den) if den else 0.0
    return {"value": value, "n_super_right": den, "n": n}
