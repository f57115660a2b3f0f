"""A judge for any dataset: a linear probe on EfficientNet-Lite0 features, and a test of whether a judge says anything.

FeatureProbe
  Multinomial logistic regression on standardised features z = (f - mean) / std of the 1280-d pooled
  EfficientNet-Lite0 features (the same features FD-EffNetLite0 uses, at the same resolution), with two heads:
  subclass (fine) and superclass (coarse), as the CNN judge has. Each head minimises

      (1 / N) Σ_i CE(W z_i + b, y_i) + (λ / 2) ‖W‖²

  by full-batch L-BFGS (convex: the optimum does not depend on the seed). λ is chosen on a class-stratified
  held-out 10 % of the real train split from a small grid (largest λ among the best on fine accuracy), then the
  probe is refitted on the whole train split. `hidden > 0` puts one ReLU layer of that width in front of both heads
  (a small MLP, trained by AdamW mini-batches; not convex, seeded).

judge_reliability
  A judge's real test accuracy a over C balanced classes, turned into κ = (a - 1/C) / (1 - 1/C). Under the symmetric
  confusion model (the judge is right with probability a and otherwise picks one of the other C - 1 classes
  uniformly) a sample set of true accuracy t is measured at m = t a + (1 - t)(1 - a)/(C - 1), so dm/dt = κ: a judge
  attenuates every difference in sample accuracy by the factor κ. The judge is "near chance" when the lower 95 %
  Wilson bound of κ is below 1/4 — differences in sample accuracy shrink more than fourfold and mostly drown in the
  judge's own errors. (For C = 10 that is a real accuracy below 32.5 %; for C = 8, 34.4 %; for C = 2, 62.5 %.)
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from efdit.data.hierarchy import Hierarchy
from efdit.errors import EfditError

FORMAT = "efdit-probe"
FORMAT_VERSION = 1
L2_GRID = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1)
NEAR_CHANCE_KAPPA = 0.25


class FeatureProbe(nn.Module):
    """Standardise -> [Linear(d, hidden) -> ReLU] -> fine head (num_sub) and coarse head (num_super).

    forward(features (N, d)) -> (fine_logits (N, num_sub), coarse_logits (N, num_super)).
    """

    def __init__(self, dim: int, num_sub: int, num_super: int, hidden: int = 0):
        super().__init__()
        self.config = dict(dim=dim, num_sub=num_sub, num_super=num_super, hidden=hidden)
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(dim, dtype=torch.float64))
        width = hidden or dim
        self.trunk = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU()) if hidden else nn.Identity()
        self.fine_head = nn.Linear(width, num_sub)
        self.coarse_head = nn.Linear(width, num_super)
        self.hierarchy: Hierarchy | None = None
        self.train_info: dict = {}

    def standardise(self, features) -> torch.Tensor:
        f = features if torch.is_tensor(features) else torch.from_numpy(np.asarray(features, dtype=np.float64))
        if f.dim() != 2 or f.shape[1] != self.config["dim"]:
            raise EfditError(f"the probe takes ({self.config['dim']},)-d features, got shape {tuple(f.shape)}")
        return ((f.double() - self.mean) / self.scale).float()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(z)
        return self.fine_head(h), self.coarse_head(h)

    @torch.no_grad()
    def predict(self, features, batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        """Predicted (fine subclass ids, coarse superclass ids), int64 numpy (N,) each."""
        self.eval()
        z = self.standardise(features)
        fine, coarse = [], []
        for i in range(0, len(z), batch_size):
            f, c = self(z[i:i + batch_size])
            fine.append(f.argmax(1))
            coarse.append(c.argmax(1))
        if not fine:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return torch.cat(fine).numpy(), torch.cat(coarse).numpy()


def _labels(sub_labels, n: int, hierarchy: Hierarchy) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(sub_labels.cpu() if torch.is_tensor(sub_labels) else sub_labels,
                                   dtype=np.int64)).reshape(-1)
    if len(y) != n:
        raise EfditError(f"{n} feature rows but {len(y)} labels")
    if n and (y.min() < 0 or y.max() >= hierarchy.num_sub):
        raise EfditError(f"subclass labels must lie in [0, {hierarchy.num_sub}), got [{int(y.min())}, {int(y.max())}]")
    return y


def _stratified_split(y: torch.Tensor, fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(train positions, held-out positions): about `fraction` of every class held out (at least one of each class
    with >= 2 samples)."""
    held = []
    for c in torch.unique(y).tolist():
        members = torch.nonzero(y == c).flatten()
        k = int(round(fraction * len(members)))
        k = min(max(k, 1), len(members) - 1) if len(members) >= 2 else 0
        held.append(members[torch.randperm(len(members), generator=gen)[:k]])
    held = torch.cat(held) if held else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[held] = False
    return torch.nonzero(keep).flatten(), held.sort().values


def _fit_linear(head: nn.Linear, z: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int) -> int:
    """Full-batch L-BFGS on mean CE + (l2 / 2) ‖W‖² (bias unpenalised); returns the iteration count."""
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-10)
    calls = [0]

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(z), y) + 0.5 * l2 * (head.weight ** 2).sum()
        loss.backward()
        calls[0] += 1
        return loss

    opt.step(closure)
    return calls[0]


def _fit(probe: FeatureProbe, z, y_sub, y_super, l2: float, max_iter: int, epochs: int, seed: int) -> None:
    if not probe.config["hidden"]:
        for head, y in ((probe.fine_head, y_sub), (probe.coarse_head, y_super)):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            _fit_linear(head, z, y, l2, max_iter)
        return
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=l2)  # decoupled weight decay l2
    batch = min(256, len(z))
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(len(z), generator=gen)
        for i in range(0, len(z) - batch + 1, batch):
            idx = order[i:i + batch]
            f, c = probe(z[idx])
            loss = F.cross_entropy(f, y_sub[idx]) + F.cross_entropy(c, y_super[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    probe.eval()


def train_probe(features, sub_labels, hierarchy: Hierarchy, *, l2: float | None = None,
                l2_grid: tuple[float, ...] = L2_GRID, val_fraction: float = 0.1, hidden: int = 0, seed: int = 0,
                max_iter: int = 500, epochs: int = 30) -> FeatureProbe:
    """Fit a FeatureProbe on real train features (N, d) and subclass ids (N,).

    l2: the ridge strength λ; None chooses it from `l2_grid` on a stratified held-out `val_fraction` of the data
    (then refits on everything). Deterministic for a given seed; the global RNG is untouched.
    """
    f = features if torch.is_tensor(features) else torch.from_numpy(np.asarray(features, dtype=np.float64))
    f = f.double()
    if f.dim() != 2 or len(f) < 2:
        raise EfditError(f"probe features must be (N, D) with N >= 2, got shape {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise EfditError("probe features contain NaN or inf")
    y_sub = _labels(sub_labels, len(f), hierarchy)
    y_super = hierarchy.super_of(y_sub)
    start = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)

        def fitted(rows: torch.Tensor, lam: float) -> FeatureProbe:
            p = FeatureProbe(f.shape[1], hierarchy.num_sub, hierarchy.num_super, hidden)
            mean = f[rows].mean(0)
            p.mean.copy_(mean)
            p.scale.copy_(f[rows].std(0, unbiased=False).clamp_min(1e-6 * (f[rows].std() + 1e-12)))
            _fit(p, p.standardise(f[rows]), y_sub[rows], y_super[rows], lam, max_iter, epochs, seed)
            return p

        scores = {}
        if l2 is None:
            train_rows, val_rows = _stratified_split(y_sub, val_fraction, gen)
            if len(val_rows) == 0 or len(train_rows) == 0:
                raise EfditError("too few samples per class to hold some out for choosing the probe's λ; pass l2")
            for lam in l2_grid:
                fine, _ = fitted(train_rows, lam).predict(f[val_rows])
                scores[lam] = float((torch.from_numpy(fine) == y_sub[val_rows]).double().mean())
            best = max(scores.values())
            l2 = max(lam for lam, s in scores.items() if s == best)
        probe = fitted(torch.arange(len(f)), float(l2))
    probe.hierarchy = hierarchy
    probe.train_info = dict(l2=float(l2), val_fine_acc={str(k): v for k, v in scores.items()}, n_train=len(f),
                            hidden=hidden, seed=seed, val_fraction=val_fraction,
                            train_seconds=round(time.time() - start, 1))
    return probe


# ---- is a judge informative? -----------------------------------------------------------------------------------------

def wilson_interval(correct: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion correct / n."""
    if n < 1 or not 0 <= correct <= n:
        raise EfditError(f"need 0 <= correct <= n and n >= 1, got {correct} / {n}")
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + level / 2))
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if correct == 0 else max(0.0, centre - half)), (1.0 if correct == n else min(1.0, centre + half))


def judge_reliability(accuracy: float, n: int, num_classes: int, level: float = 0.95,
                      kappa_min: float = NEAR_CHANCE_KAPPA) -> dict:
    """How much a judge with real test accuracy `accuracy` on `n` class-balanced images of `num_classes` says.

    Returns {"accuracy", "low", "high" (Wilson bounds), "chance", "kappa", "kappa_low", "near_chance", "n", "rule"}:
    κ = (a - 1/C) / (1 - 1/C) is the factor by which the judge shrinks differences in sample accuracy (module
    docstring); near_chance when the lower bound of κ is below kappa_min (1/4).
    """
    if num_classes < 2:
        raise EfditError(f"a judge needs at least 2 classes, got {num_classes}")
    correct = int(round(accuracy * n))
    low, high = wilson_interval(correct, n, level)
    chance = 1.0 / num_classes
    kappa = lambda a: (a - chance) / (1.0 - chance)  # noqa: E731
    k_low = kappa(low)
    return {"accuracy": float(accuracy), "low": low, "high": high, "chance": chance, "kappa": kappa(accuracy),
            "kappa_low": k_low, "near_chance": bool(k_low < kappa_min), "n": int(n), "num_classes": int(num_classes),
            "rule": f"near chance when the lower {level:.0%} bound of (acc - 1/C) / (1 - 1/C) is below {kappa_min:g}"}


def probe_report(probe: FeatureProbe, features, sub_labels) -> dict:
    """The probe's real accuracies on labelled features: fine_acc, coarse_acc, super_consistency, n, and a
    judge_reliability entry for each head ("fine_judge", "coarse_judge")."""
    from efdit.metrics.classifier import hierarchy_scores

    if probe.hierarchy is None:
        raise EfditError("the probe has no hierarchy attached")
    fine, coarse = probe.predict(features)
    out = hierarchy_scores(fine, coarse, sub_labels, probe.hierarchy)
    out["fine_judge"] = judge_reliability(out["fine_acc"], out["n"], probe.hierarchy.num_sub)
    if probe.hierarchy.num_super >= 2:
        out["coarse_judge"] = judge_reliability(out["coarse_acc"], out["n"], probe.hierarchy.num_super)
    return out


# ---- persistence -------------------------------------------------------------------------------------------------------

def _sidecar(path) -> Path:
    return Path(path).with_suffix(".json")


def save_probe(path: str | os.PathLike, probe: FeatureProbe, meta: dict | None = None) -> Path:
    """Weights to `path` (safetensors) and config / hierarchy / train info / meta to `path` with suffix .json.

    Put the feature extractor's weight hash and the feature resolution in `meta`: a probe only fits its features.
    """
    from safetensors.torch import save_file

    from efdit.errors import atomic_write

    if probe.hierarchy is None:
        raise EfditError("the probe has no hierarchy attached; set probe.hierarchy before saving")
    path = Path(path)
    with atomic_write(path, "probe") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()}, str(tmp),
                  metadata={"format": FORMAT})
    side = dict(format=FORMAT, version=FORMAT_VERSION, config=probe.config, hierarchy=probe.hierarchy.to_dict(),
                train=probe.train_info, **(meta or {}))
    with atomic_write(_sidecar(path), "probe sidecar") as tmp:
        tmp.write_text(json.dumps(side, indent=2) + "\n")
    return path


def load_probe(path: str | os.PathLike) -> tuple[FeatureProbe, dict]:
    """(probe in eval mode with .hierarchy set, sidecar meta) from save_probe's files."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file() or not _sidecar(path).is_file():
        raise EfditError(f"probe files not found: {path} and {_sidecar(path)}")
    meta = json.loads(_sidecar(path).read_text())
    if meta.get("format") != FORMAT:
        raise EfditError(f"{_sidecar(path)} is not an {FORMAT} sidecar")
    probe = FeatureProbe(**meta["config"])
    try:
        probe.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise EfditError(f"{path} does not match its sidecar config: {str(e).splitlines()[0]}") from None
    probe.hierarchy = Hierarchy.from_dict(meta["hierarchy"])
    probe.train_info = meta.get("train") or {}
    return probe.eval(), meta
