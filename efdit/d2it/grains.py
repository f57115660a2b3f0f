"""Entropy grain maps: D²iT's Dynamic Grained Coding (paper Eq. 2-3), thresholds from dataset percentiles.

Per region k (S x S pixels, S = the coarse downsampling factor f2), on grayscale intensities in [0, 1]:

    p̂_k(b_j) = Σ_i exp(−(x_{k,i} − b_j)² / (2σ²)),   b_j = linspace(lo, hi, P)     (Gaussian KDE, Eq. 2)
    p_k = p̂_k / Σ_j p̂_k(b_j)                                                       (a pmf over the P bins)
    E_k = −Σ_j p_k(b_j) · ln p_k(b_j)     (natural log, 0·ln 0 = 0)                (Shannon entropy, Eq. 3)

A region is fine iff E_k > τ(r_fine), τ(r) = the 100·(1 − r)-th percentile of all region entropies of the
dataset's train split, computed ONCE (`compute_thresholds`) and stored as JSON; ties at τ go to coarse.

Implementation: for 8-bit gray images p̂ is exact and cheap: a sum of rows of a fixed (256, P) kernel table
(small regions) or a per-region level histogram times that table (large regions), no exponential per pixel.
Other inputs (RGB luma, float images) take the direct formula (`entropy_of_pixels`), in chunks. Entropies are computed in float64 and
rounded to 1e-9 so identical regions give bit-identical entropies (ties are real ties).
Grain maps are int64 (N, H/S, W/S) with 0 = coarse, 1 = fine (the paper draws 1 = coarse, 2 = fine).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EfditError, atomic_write

LEVELS = 256             # 8-bit intensity levels (the kernel-table path)
LUMA = (0.2989, 0.5870, 0.1140)   # DQ-VAE's grayscale weights
COARSE, FINE = 0, 1


@dataclass(frozen=True)
class EntropySpec:
    """Everything entropy values depend on; thresholds are valid only for the spec they were computed with."""
    region: int = 4          # S: region side in pixels (= f2)
    bins: int = 64           # P
    sigma: float = 0.01      # KDE bandwidth
    lo: float = 0.0          # pixel range of the bins
    hi: float = 1.0

    def key(self) -> str:
        return f"S{self.region}-P{self.bins}-sigma{self.sigma:g}-range{self.lo:g}_{self.hi:g}"


def grayscale01(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) or float in [-1, 1] -> float64 gray (N, H, W) in [0, 1] (C = 1 or 3)."""
    x = images.to(torch.float64) / 255.0 if images.dtype == torch.uint8 else (images.to(torch.float64) + 1) / 2
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise EfditError(f"expected images (N, C, H, W) with C in {{1, 3}}, got {tuple(x.shape)}")
    if x.shape[1] == 3:
        w = torch.tensor(LUMA, dtype=torch.float64).view(1, 3, 1, 1)
        x = (x * w).sum(1, keepdim=True)
    return x[:, 0].clamp(0, 1)


def kernel_table(spec: EntropySpec) -> torch.Tensor:
    """(256, P) float64: exp(−(k/255 − b_j)² / 2σ²) for every 8-bit intensity k."""
    levels = torch.linspace(0, 1, LEVELS, dtype=torch.float64)
    bins = torch.linspace(spec.lo, spec.hi, spec.bins, dtype=torch.float64)
    return torch.exp(-(levels[:, None] - bins[None, :]) ** 2 / (2 * spec.sigma ** 2))


def entropy_of_pixels(pixels: torch.Tensor, spec: EntropySpec) -> torch.Tensor:
    """Direct Eq. 2-3 on float pixels (..., S²) in [0, 1] -> entropies (...), float64 (reference, no quantising)."""
    bins = torch.linspace(spec.lo, spec.hi, spec.bins, dtype=torch.float64)
    p = torch.exp(-(pixels.to(torch.float64)[..., None] - bins) ** 2 / (2 * spec.sigma ** 2)).sum(-2)  # (..., P)
    p = p / p.sum(-1, keepdim=True)
    return -torch.special.xlogy(p, p).sum(-1)


def region_entropy(images: torch.Tensor, spec: EntropySpec, chunk_regions: int = 8192) -> torch.Tensor:
    """Entropy of every S x S region: images (N, C, H, W) uint8 or [-1, 1] float -> (N, H/S, W/S) float64."""
    gray = grayscale01(images)
    N, H, W = gray.shape
    S = spec.region
    if H % S or W % S:
        raise EfditError(f"image size {H}x{W} is not divisible by the region size {S}")
    h, w = H // S, W // S
    px = gray.view(N, h, S, w, S).permute(0, 1, 3, 2, 4).reshape(N * h * w, S * S)   # (R, S²)
    eight_bit = images.dtype == torch.uint8 and images.shape[1] == 1
    table = kernel_table(spec) if eight_bit else None                                  # (256, P)
    q = (px * 255).round().long() if eight_bit else None
    out = torch.empty(N * h * w, dtype=torch.float64)
    for i in range(0, px.shape[0], chunk_regions):
        if eight_bit and S * S * 4 <= LEVELS:
            p = table[q[i:i + chunk_regions]].sum(1)                   # (r, P): Σ_i exp(...) by table rows
        elif eight_bit:
            qi = q[i:i + chunk_regions]
            counts = torch.zeros(qi.shape[0], LEVELS, dtype=torch.float64)
            counts.scatter_add_(1, qi, torch.ones_like(qi, dtype=torch.float64))   # (r, 256) level histogram
            p = counts @ table
        else:
            out[i:i + chunk_regions] = entropy_of_pixels(px[i:i + chunk_regions], spec)
            continue
        p = p / p.sum(-1, keepdim=True)
        out[i:i + chunk_regions] = -torch.special.xlogy(p, p).sum(-1)
    return torch.round(out, decimals=9).view(N, h, w)


# ---- thresholds -------------------------------------------------------------------------------------------
def percentile_thresholds(entropies: torch.Tensor | np.ndarray) -> dict[str, float]:
    """{"0": min, "1": ..., "100": max}: the p-th percentile (numpy 'inverted_cdf': the smallest value with
    CDF ≥ p/100), so with τ = percentile p and fine ⇔ E > τ the fine share is ⌊n(1 − p/100)⌋/n when no ties."""
    e = np.asarray(entropies, dtype=np.float64).ravel()
    if e.size == 0:
        raise EfditError("no region entropies to take percentiles of")
    qs = np.percentile(e, np.arange(0, 101), method="inverted_cdf")
    return {str(p): float(v) for p, v in enumerate(qs)}


def threshold_for(thresholds: dict, r_fine: float) -> float:
    """τ(r_fine) from a thresholds dict (its "percentiles"); r_fine in [0, 1], whole percent."""
    if not 0.0 <= r_fine <= 1.0:
        raise EfditError(f"fine ratio must lie in [0, 1], got {r_fine}")
    if r_fine >= 1.0:
        return float("-inf")   # every region fine
    if r_fine <= 0.0:
        return float("inf")    # every region coarse
    p = 100.0 * (1.0 - r_fine)
    if abs(p - round(p)) > 1e-6:
        raise EfditError(f"fine ratio {r_fine} is not a whole percent (thresholds are stored per percent)")
    return float(thresholds["percentiles"][str(int(round(p)))])


def grain_map(entropy: torch.Tensor, tau: float) -> torch.Tensor:
    """(N, h, w) entropies -> int64 grain map, 1 = fine iff E > τ (ties at τ are coarse)."""
    return (entropy > tau).long()


def upsample_map(m: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """(N, h, w) grain map -> (N, 1, h·f, w·f) (nearest), for masking a dense fine-grid tensor."""
    return m[:, None].repeat_interleave(factor, 2).repeat_interleave(factor, 3)


def thresholds_path(cache_dir: str | os.PathLike, dataset: str, image_size: int, spec: EntropySpec) -> Path:
    return Path(cache_dir) / "grains" / f"{dataset}-{image_size}px-train-{spec.key()}.json"


def compute_thresholds(images: torch.Tensor, spec: EntropySpec, meta: dict | None = None,
                       progress: bool = True, batch: int = 4096) -> tuple[dict, torch.Tensor]:
    """Percentile thresholds of all region entropies of `images` -> (thresholds dict, entropies (N, h, w))."""
    from tqdm.auto import tqdm
    parts = []
    for i in tqdm(range(0, len(images), batch), desc="region entropies", disable=not progress, leave=False):
        parts.append(region_entropy(images[i:i + batch], spec))
    ent = torch.cat(parts)
    th = {"spec": asdict(spec), "log": "natural", "levels": LEVELS, "n_images": int(len(images)),
          "n_regions": int(ent.numel()), "percentiles": percentile_thresholds(ent), **(meta or {})}
    return th, ent


def save_json(path: str | os.PathLike, obj: dict) -> Path:
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))
    return path


def load_thresholds(path: str | os.PathLike, spec: EntropySpec | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EfditError(f"thresholds file not found: {path} (run `efdit grains compute-thresholds`)")
    th = json.loads(path.read_text())
    if spec is not None and EntropySpec(**th["spec"]) != spec:
        raise EfditError(f"{path} was computed with {th['spec']}, not {asdict(spec)}: recompute the thresholds")
    return th


def overlay(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.35) -> torch.Tensor:
    """uint8 (N, C, H, W) images with their grain maps tinted (red = fine, blue = coarse) -> uint8 RGB."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    factor = x.shape[-1] // maps.shape[-1]
    m = upsample_map(maps, factor).float()                                    # (N, 1, H, W)
    tint = m * torch.tensor([255.0, 40, 40]).view(1, 3, 1, 1) + (1 - m) * torch.tensor([40.0, 80, 255]).view(1, 3, 1, 1)
    out = (1 - alpha) * x + alpha * tint
    # region borders: darken the first row / column of every region
    border = torch.zeros_like(m, dtype=torch.bool)
    border[..., ::factor, :] = True
    border[..., :, ::factor] = True
    out = torch.where(border, out * 0.6, out)
    return out.round().clamp(0, 255).to(torch.uint8)


def map_image(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Grain maps (N, h, w) drawn alone as uint8 RGB (N, 3, size, size): red fine, blue coarse."""
    m = F.interpolate(maps[:, None].float(), size=(size, size), mode="nearest")
    red = torch.tensor([230.0, 50, 50]).view(1, 3, 1, 1)
    blue = torch.tensor([50.0, 90, 230]).view(1, 3, 1, 1)
    return (m * red + (1 - m) * blue).round().to(torch.uint8)
