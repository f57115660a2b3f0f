"""Spectral measures of image sets: radially averaged power spectrum, spectral distance, high-band energy ratio.

Conventions (the same as HRIG's masks): for an H×W grid, fy = fftfreq(H)[:, None], fx = fftfreq(W)[None, :]
(cycles/sample) and the radial frequency normalised to Nyquist is

    ρ = 2·sqrt(fy² + fx²)         (ρ = 1 at either axis's Nyquist, up to √2 in the corners).

Power of one image x (H, W) at frequency f, with the orthonormal DFT (Parseval: Σ_f P(f) = Σ_pixels x²):

    P(f) = |FFT2(x)(f)|² / (H·W)

so white noise of variance σ² has E P(f) = σ² at every f, and cos(2π·k·col/W) puts H·W/4 at f = (0, ±k/W).

Radial bins: n = min(H, W); bin b = round(ρ·n/2) for b = 0 … ⌊n/2⌋ (on a square grid, b is the integer
radius |k| in cycles per image); the corners beyond the Nyquist circle (b > ⌊n/2⌋) are left out of the profile.
The radially averaged power of bin b is the mean of P(f) over the frequencies in it, and over images and
channels:  P̄(b) = mean_{n, c, f ∈ bin b} P_{n,c}(f).  Bin b sits at ρ_b = 2b/n.

Inputs: (N, C, H, W) or (N, H, W) arrays, numpy or torch, any float dtype; computed in float64. Outputs: numpy
float64 arrays and Python floats. Every function is pure (no state, no randomness).
"""
from __future__ import annotations

import math

import numpy as np
import torch

EPS = 1e-12  # floor under a power before its logarithm (an all-zero bin is log(EPS), not −∞)


def _as_images(x) -> torch.Tensor:
    """(N, C, H, W) or (N, H, W), numpy or torch -> float64 torch (N, C, H, W) on the CPU."""
    t = torch.as_tensor(x.detach().cpu() if torch.is_tensor(x) else np.asarray(x)).to(torch.float64)
    if t.dim() == 3:
        t = t[:, None]
    if t.dim() != 4 or t.shape[0] == 0:
        raise ValueError(f"expected images (N, C, H, W) or (N, H, W) with N ≥ 1, got shape {tuple(t.shape)}")
    return t


def radial_frequency(H: int, W: int) -> torch.Tensor:
    """ρ (H, W), float64, in the unshifted `fft2` layout: 2·sqrt(fy² + fx²)."""
    fy = torch.fft.fftfreq(H, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(W, dtype=torch.float64)[None, :]
    return 2.0 * torch.sqrt(fy ** 2 + fx ** 2)


def power(x) -> torch.Tensor:
    """P = |FFT2(x)|²/(H·W) per image and channel: (N, C, H, W) float64 torch, unshifted layout."""
    t = _as_images(x)
    H, W = t.shape[-2:]
    return torch.fft.fft2(t).abs() ** 2 / (H * W)


def radial_bins(H: int, W: int) -> tuple[torch.Tensor, np.ndarray]:
    """Bin index of every frequency (H, W) long (−1 beyond the Nyquist circle) and the bin radii ρ_b (B,)."""
    n = min(H, W)
    nb = n // 2 + 1
    b = torch.round(radial_frequency(H, W) * n / 2).long()
    b[b >= nb] = -1
    return b, 2.0 * np.arange(nb) / n


def radial_power_spectrum(x, per_image: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """-> (ρ_b (B,), P̄(b)): the radially averaged power spectrum, B = min(H, W)//2 + 1 bins.

    P̄ is (B,) averaged over images and channels, or (N, B) averaged over channels only (`per_image`, e.g. for
    bootstrap intervals over images).
    """
    p = power(x).mean(1)  # (N, H, W): mean over channels
    H, W = p.shape[-2:]
    b, radii = radial_bins(H, W)
    keep = b >= 0
    idx, flat = b[keep], p[:, keep]  # (F,), (N, F)
    nb = len(radii)
    sums = torch.zeros(p.shape[0], nb, dtype=torch.float64).index_add_(1, idx, flat)
    counts = torch.bincount(idx, minlength=nb).to(torch.float64)  # every bin holds ≥ 1 frequency
    prof = (sums / counts).numpy()
    return radii, (prof if per_image else prof.mean(0))


def spectral_distance(a, b, skip_dc: bool = True, min_radius: float = 0.0) -> float:
    """Mean over radial bins of |log P̄_a(b) − log P̄_b(b)| (natural log) between two image sets on one grid.

    0 for identical spectra; a set whose power is k× the other's in every bin is at |log k|. skip_dc leaves out
    bin 0 (the mean brightness); min_radius keeps only bins with ρ_b ≥ min_radius (e.g. the high band).
    """
    ta, tb = _as_images(a), _as_images(b)
    if ta.shape[1:] != tb.shape[1:]:
        raise ValueError(f"spectral_distance: sets of shape {tuple(ta.shape[1:])} and {tuple(tb.shape[1:])} differ")
    radii, pa = radial_power_spectrum(ta)
    _, pb = radial_power_spectrum(tb)
    keep = radii >= min_radius
    if skip_dc:
        keep[0] = False
    if not keep.any():
        raise ValueError(f"spectral_distance: no radial bin with ρ ≥ {min_radius} on a {tuple(ta.shape[-2:])} grid")
    return float(np.mean(np.abs(np.log(pa[keep] + EPS) - np.log(pb[keep] + EPS))))


def high_band_energy(x, cutoff: float = 0.5) -> np.ndarray:
    """Per-image energy above the cutoff, (N,): Σ_{f: ρ(f) > cutoff} P(f), mean over channels (corners included)."""
    p = power(x).mean(1)
    mask = radial_frequency(*p.shape[-2:]) > cutoff
    return p[:, mask].sum(-1).numpy()


def high_band_energy_ratio(x, real, cutoff: float = 0.5) -> float:
    """mean_n E_high(x_n) / mean_n E_high(real_n): 1 when the set has the real images' high-band energy,
    < 1 when it lacks detail, > 1 when it has too much (noise, over-sharpening)."""
    ex, er = high_band_energy(x, cutoff).mean(), high_band_energy(real, cutoff).mean()
    if not er > 0:
        raise ValueError(f"high_band_energy_ratio: the reference set has no energy above ρ = {cutoff}")
    return float(ex / er)


def log_high_band_gap(x, real, cutoff: float = 0.5) -> float:
    """|log(high_band_energy_ratio(x, real))|: how far, in log power, a set's high band is from the real one's."""
    return abs(math.log(max(high_band_energy_ratio(x, real, cutoff), EPS)))
