"""One step of every sampler on the (respaced) chain of a `GaussianDiffusion`, for `sample()` and hand-written loops.

A step goes from chain index i (ᾱ_s = ᾱ[i]; the model saw the original timestep `timestep_map[i]`) to i − 1
(ᾱ_t = ᾱ_prev[i]; ᾱ_t = 1, the clean end, after index 0), from x_s and the (guided, clipped, hook-modified)
predictions x̂0 and ε at s, all (N, C, H, W). With α = sqrt(ᾱ), σ = sqrt(1 − ᾱ), λ = log(α/σ), h = λ_t − λ_s:

  DDPM (ancestral):   x_t = μ̃(x̂0, x_s) + exp(½·log σ̂²)·z,   z ~ N(0, I), none into the clean end;
                      μ̃ = β_s·α_t/(1 − ᾱ_s)·x̂0 + (1 − ᾱ_t)·sqrt(1 − β_s)/(1 − ᾱ_s)·x_s, σ̂² the model's variance.
  DDIM (η):           x_t = α_t·x̂0 + sqrt(σ_t² − ς²)·ε + ς·z,   ς = η·sqrt((1 − ᾱ_t)/(1 − ᾱ_s))·sqrt(1 − ᾱ_s/ᾱ_t).
  DPM-Solver++(2M) (Lu et al. 2022; data prediction, multistep, second order):
      first order (= DDIM, η = 0):  x_t = (σ_t/σ_s)·x_s + α_t·(1 − e^{−h})·x̂0_s
      second order:                 x_t = (σ_t/σ_s)·x_s + α_t·(1 − e^{−h})·D,
                                    D = (1 + 1/(2r))·x̂0_s − 1/(2r)·x̂0_prev,  r = h_prev/h

DPM-Solver++(2M) starts at first order (no history yet) and takes the last two steps at first order: the step into
t = 0 (on the uniform-in-t grid it is the longest in λ, so r ≪ 1 and the 2M coefficient 1/(2r)
would amplify x̂0's changes; "lower order final", which measured 6.0 -> 4.3 (10 steps) and 3.2 -> 2.0 (20 steps)
mean |Δ| /255 to DDIM-250 on fmnist-base for 2M) and the step t = 0 -> σ = 0 (λ = ∞: it returns x̂0, as DDIM does).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
DETERMINISTIC = ("dpmpp2m",)  # ODE solvers: η must be 0

Noise = torch.Tensor | Callable[[], torch.Tensor] | None


def log_snr_half(ab: float) -> float:
    """λ = log(α/σ) = ½·log(ᾱ/(1 − ᾱ))."""
    return 0.5 * math.log(ab / (1 - ab))


def chain_alpha_bars(diffusion, i: int) -> tuple[float, float]:
    """(ᾱ_s, ᾱ_t) of the step from chain index i to i − 1 (ᾱ_t = 1 after index 0)."""
    i = _chain_index(diffusion, i)
    return float(diffusion.alphas_cumprod[i]), float(diffusion.alphas_cumprod_prev[i])


def _chain_index(diffusion, i) -> int:
    i = int(i)
    if not 0 <= i < diffusion.num_timesteps:
        raise ValueError(f"chain index must be in [0, {diffusion.num_timesteps - 1}], got {i}")
    return i


def _draw(noise: Noise, like: torch.Tensor) -> torch.Tensor:
    """The injected noise: a tensor, a zero-argument callable drawn only now, or N(0, I) like `like`."""
    if noise is None:
        return torch.randn_like(like)
    return noise() if callable(noise) else noise


# ---------------------------------------------------------------------------------------------------
# DDPM and DDIM
# ---------------------------------------------------------------------------------------------------
def ddpm_step(diffusion, x_t: torch.Tensor, i: int, x0: torch.Tensor, log_variance: torch.Tensor,
              noise: Noise = None) -> torch.Tensor:
    """Ancestral step x_i -> x_{i−1}: the posterior mean of q(x_{i−1} | x_i, x̂0) plus exp(½·log σ̂²)·z.

    log_variance: the model's (learned or fixed) log σ̂², e.g. `p_mean_variance(...).log_variance`;
    noise: z, or a callable giving it (only drawn when i > 0); None draws torch.randn_like(x_t).
    """
    i = _chain_index(diffusion, i)
    t_idx = torch.full((x_t.shape[0],), i, device=x_t.device, dtype=torch.long)
    mean = diffusion.q_posterior(x0, x_t, t_idx)[0]
    if i == 0:
        return mean
    return mean + torch.exp(0.5 * log_variance) * _draw(noise, x_t)


def ddim_step(diffusion, x_t: torch.Tensor, i: int, x0: torch.Tensor, eps: torch.Tensor, eta: float = 0.0,
              noise: Noise = None) -> torch.Tensor:
    """DDIM step x_i -> x_{i−1} with stochasticity η (0: deterministic); noise as in `ddpm_step`, drawn only
    when ς > 0 and i > 0."""
    ab, ab_prev = chain_alpha_bars(diffusion, i)
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
    x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps
    if sigma > 0 and int(i) > 0:
        x = x + sigma * _draw(noise, x_t)
    return x


# ---------------------------------------------------------------------------------------------------
# DPM-Solver++(2M)
# ---------------------------------------------------------------------------------------------------
def dpmpp2m_update(x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, ab: float, ab_prev: float, history,
                   first_order: bool = False):
    """One DPM-Solver++(2M) step from ᾱ_s = `ab` to ᾱ_t = `ab_prev` (formulas in the module docstring).

    x0, eps: the (consistent) data and noise predictions at s; history: (x̂0, λ) of the previous step or None.
    Returns (x_t, history for the next step). First order when asked, when there is no history, or when t is the
    clean end (ᾱ = 1); that branch is DDIM's update written the same way, so such steps equal DDIM's bit for bit.
    """
    lam_s = log_snr_half(ab)
    if first_order or history is None or ab_prev >= 1.0:
        x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
        return x, (x0, lam_s)
    x0_prev, lam_prev = history
    lam_t = log_snr_half(ab_prev)
    h, h_prev = lam_t - lam_s, lam_s - lam_prev
    r = h_prev / h
    d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
    x = math.sqrt((1 - ab_prev) / (1 - ab)) * x - math.sqrt(ab_prev) * math.expm1(-h) * d
    return x, (x0, lam_s)


def dpmpp2m_step(diffusion, x_t: torch.Tensor, i: int, x0: torch.Tensor, eps: torch.Tensor, history=None):
    """DPM-Solver++(2M) step x_i -> x_{i−1} -> (x_{i−1}, history); start with history None, pass back what it
    returns. First order into t = 0 and the clean end (lower-order final)."""
    ab, ab_prev = chain_alpha_bars(diffusion, i)
    return dpmpp2m_update(x_t, x0, eps, ab, ab_prev, history, first_order=int(i) <= 1)


# ---------------------------------------------------------------------------------------------------
# any of them
# ---------------------------------------------------------------------------------------------------
def sampler_step(method: str, diffusion, x_t: torch.Tensor, i: int, x0: torch.Tensor, eps: torch.Tensor, *,
                 log_variance: torch.Tensor | None = None, history=None, eta: float = 0.0, noise: Noise = None):
    """One step of `method` (one of SAMPLERS) from chain index i -> (x_{i−1}, history).

    history: None at the first step, then what the previous call returned (None throughout for ddpm / ddim);
    log_variance: needed by ddpm; eta: DDIM's η (must be 0 for the ODE solvers); noise: see `ddpm_step`.
    """
    if method == "ddpm":
        if log_variance is None:
            raise ValueError("a ddpm step needs the model's log_variance (p_mean_variance(...).log_variance)")
        return ddpm_step(diffusion, x_t, i, x0, log_variance, noise), None
    if method == "ddim":
        return ddim_step(diffusion, x_t, i, x0, eps, eta, noise), None
    if method in DETERMINISTIC and eta != 0:
        raise ValueError(f"{method} is a deterministic ODE solver: eta must be 0, got {eta}")
    if method == "dpmpp2m":
        return dpmpp2m_step(diffusion, x_t, i, x0, eps, history)
    raise ValueError(f"sampler must be {' | '.join(SAMPLERS)}, not {method!r}")
