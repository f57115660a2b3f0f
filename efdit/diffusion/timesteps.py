"""Two training-time choices of the diffusion loss: which timesteps a batch draws, and how each is weighted.

Timestep sampling (`sample_timesteps`), over the chain indices 0..T−1:
  uniform     t ~ U{0, …, T−1}                                   (DDPM, DiT)
  lognormal   log σ ~ N(P_mean, P_std²), t = the index whose σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) is nearest in log σ
              (EDM's training distribution, Karras et al. 2022, on a discrete schedule; EDM: P_mean −1.2, P_std 1.2)

Loss weighting of the mean-squared term (`snr_weight`), SNR_t = ᾱ_t / (1 − ᾱ_t):
  none        w = 1
  min_snr     Min-SNR-γ (Hang et al. 2023): the x0-space weight min(SNR, γ) written for the model's target,
              ε: min(SNR, γ) / SNR,   v: min(SNR, γ) / (SNR + 1),   x0: min(SNR, γ)
The variational-bound term of the hybrid loss is never reweighted.
"""
from __future__ import annotations

import torch

TIMESTEP_SAMPLING = ("uniform", "lognormal")
LOSS_WEIGHTING = ("none", "min_snr")


def sample_timesteps(n: int, alphas_cumprod: torch.Tensor, kind: str = "uniform", mean: float = -1.2,
                     std: float = 1.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) long chain indices drawn per `kind` (see the module docstring); alphas_cumprod: (T,) float64.

    `uniform` is exactly `torch.randint(0, T, (n,), generator=generator)`."""
    T = len(alphas_cumprod)
    if kind == "uniform":
        return torch.randint(0, T, (n,), generator=generator)
    if kind != "lognormal":
        raise ValueError(f"timestep sampling must be {' | '.join(TIMESTEP_SAMPLING)}, not {kind!r}")
    if not std > 0:
        raise ValueError(f"the log-normal timestep std must be positive, not {std}")
    log_sigma = 0.5 * torch.log((1 - alphas_cumprod) / alphas_cumprod)          # (T,) increasing in t
    z = (mean + std * torch.randn(n, generator=generator)).double()
    hi = torch.searchsorted(log_sigma, z).clamp(1, T - 1)                       # log_sigma[hi-1] < z <= log_sigma[hi]
    lo = hi - 1
    nearer_lo = (z - log_sigma[lo]).abs() <= (log_sigma[hi] - z).abs()
    return torch.where(nearer_lo, lo, hi)


def snr_weight(snr: torch.Tensor, prediction: str, kind: str = "none", gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weight of the mean-squared term for the SNR of each sample's timestep (see the docstring)."""
    if kind == "none":
        return torch.ones_like(snr)
    if kind != "min_snr":
        raise ValueError(f"loss weighting must be {' | '.join(LOSS_WEIGHTING)}, not {kind!r}")
    if not gamma > 0:
        raise ValueError(f"min-SNR γ must be positive, not {gamma}")
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    if prediction == "x0":
        return clipped
    raise ValueError(f"prediction must be eps | v | x0, not {prediction!r}")
