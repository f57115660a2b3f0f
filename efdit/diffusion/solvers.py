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
  UniPC (Zhao et al. 2023; unified predictor-corrector, data prediction, B(h) = e^{−h} − 1, the "bh2" variant):
      with the last p evaluation points s = s_0, s_1, …, s_{p−1} (newest first), r_k = (λ_{s_k} − λ_s)/h,
      D_k = (x̂0_{s_k} − x̂0_s)/r_k and the DDIM part x̃_t = (σ_t/σ_s)·x_s + α_t·(1 − e^{−h})·x̂0_s,
      predictor UniP-p:  x_t   = x̃_t − α_t·B(h)·Σ_{k=1}^{p−1} ρ_k·D_k
      corrector UniC-p:  x_t^c = x̃_t − α_t·B(h)·(Σ_{k=1}^{p−1} ρ^c_k·D_k + ρ^c_p·(x̂0_t − x̂0_s))
      where x̂0_t is the prediction at the predicted x_t: the evaluation the next step makes anyway, so the
      corrector costs no forward; x_t^c replaces x_t as the start of the next predictor (x̂0_t is not evaluated
      again). The coefficients solve Σ_k ρ_k·r_k^{j−1} = b_j = j!·φ_j(−h)/B(h) for j = 1, 2, … (one equation per
      coefficient; r_p = 1 for the corrector), φ_j(x) = (e^x − Σ_{n=0}^{j} x^n/n!)/x^j. As in the reference,
      ρ = ½ is taken for the single coefficient of UniP-2 (which makes UniP-2 exactly DPM-Solver++(2M)) and of
      UniC-1. UniC-p raises the order of accuracy to p + 1; efdit's "unipc" is p = 2 (third order).

The multistep solvers (2M, UniPC) start at first order (no history yet) and take the last two steps at first order:
the step into t = 0 (on the uniform-in-t grid it is the longest in λ, so r ≪ 1 and the 2M coefficient 1/(2r)
would amplify x̂0's changes; "lower order final", which measured 6.0 -> 4.3 (10 steps) and 3.2 -> 2.0 (20 steps)
mean |Δ| /255 to DDIM-250 on fmnist-base for 2M) and the step t = 0 -> σ = 0 (λ = ∞: it returns x̂0, as DDIM does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

SAMPLERS = ("ddpm", "ddim", "dpmpp2m", "unipc")
DETERMINISTIC = ("dpmpp2m", "unipc")  # ODE solvers: η must be 0

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
# UniPC
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UniPCHistory:
    """What a UniPC step leaves for the next one.

    base: the DDIM part x̃_t of its prediction (where the corrector starts); x0, lam: x̂0 and λ of its last
    evaluation points, newest first; order: p of its predictor; alpha_bar_next: ᾱ_t, where the next step starts.
    """
    base: torch.Tensor
    x0: tuple[torch.Tensor, ...]
    lam: tuple[float, ...]
    order: int
    alpha_bar_next: float


def _phi(x: float, j: int) -> float:
    """φ_j(x) = (e^x − Σ_{n=0}^{j} x^n/n!)/x^j, by its series Σ_{n≥1} x^n/(n + j)! near 0 (no cancellation)."""
    if abs(x) < 0.5:
        return sum(x ** n / math.factorial(n + j) for n in range(1, 24))
    return (math.exp(x) - sum(x ** n / math.factorial(n) for n in range(j + 1))) / x ** j


def unipc_coefficients(rks: list[float], h: float, corrector: bool) -> list[float]:
    """ρ of UniP (rks = r_1…r_{p−1}) or UniC (rks = r_1…r_{p−1}, 1): Σ_k ρ_k·r_k^{j−1} = b_j, j = 1…len(rks),
    b_j = j!·φ_j(−h)/B(h), B(h) = e^{−h} − 1; ρ = ½ for a single coefficient (UniP-2, UniC-1)."""
    n = len(rks)
    if n == 1:
        return [0.5]
    B = math.expm1(-h)
    b = [math.factorial(j) * _phi(-h, j) / B for j in range(1, n + 1)]
    R = np.array([[r ** (j - 1) for r in rks] for j in range(1, n + 1)], dtype=np.float64)
    return [float(v) for v in np.linalg.solve(R, np.array(b, dtype=np.float64))]


def _weighted_differences(x0s, lams, lam_s: float, h: float, rho) -> torch.Tensor:
    """Σ_k ρ_k·D_k, D_k = (x̂0_{s_k} − x̂0_s)/r_k over the older points k = 1…len(rho)."""
    out = 0.0
    for k, rho_k in enumerate(rho, start=1):
        r_k = (lams[k] - lam_s) / h
        out = out + (rho_k / r_k) * (x0s[k] - x0s[0])
    return out


def unipc_update(x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, ab: float, ab_prev: float,
                 history: UniPCHistory | None = None, order: int = 2, corrector: bool = True):
    """One UniPC (bh2, data prediction) step from ᾱ_s = `ab` to ᾱ_t = `ab_prev` (module docstring).

    x: the point the model was evaluated at (the previous predictor's x_s); x0, eps: the predictions there;
    history: what the previous step returned, or None. First UniC corrects x with the new x̂0 (when there is a
    history and `corrector`), then UniP of order min(order, points known) predicts x_t.
    Returns (x_t, history for the next step); at the clean end (ᾱ_t = 1) x_t is x̂0 and the history None.
    Without a history the step is DDIM's update, bit for bit; with corrector=False and order 2 it is 2M.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    if ab_prev >= 1.0:
        return x0, None  # σ_t = 0: the corrected x would be discarded
    lam_s = log_snr_half(ab)
    corrected = False
    if history is not None:
        if not math.isclose(history.alpha_bar_next, ab, rel_tol=1e-9, abs_tol=0.0):
            raise ValueError(f"the UniPC history leads to ᾱ = {history.alpha_bar_next:.6g}, not to this step's "
                             f"ᾱ = {ab:.6g}: pass the history returned by the previous step of the same chain")
        if corrector:
            h = lam_s - history.lam[0]
            p = history.order
            rks = [(history.lam[k] - history.lam[0]) / h for k in range(1, p)] + [1.0]
            rho = unipc_coefficients(rks, h, corrector=True)
            corr = (_weighted_differences(history.x0, history.lam, history.lam[0], h, rho[:-1])
                    + rho[-1] * (x0 - history.x0[0]))
            x = history.base - math.sqrt(ab) * math.expm1(-h) * corr
            corrected = True
    x0s = ((x0,) + history.x0) if history is not None else (x0,)
    lams = ((lam_s,) + history.lam) if history is not None else (lam_s,)
    p = min(order, len(x0s))
    h = log_snr_half(ab_prev) - lam_s
    if corrected:
        base = math.sqrt((1 - ab_prev) / (1 - ab)) * x - math.sqrt(ab_prev) * math.expm1(-h) * x0
    else:  # the same x̃_t written as DDIM's α_t·x̂0 + σ_t·ε (x0 and eps belong to x)
        base = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
    x_t = base
    if p > 1:
        rks = [(lams[k] - lam_s) / h for k in range(1, p)]
        rho = unipc_coefficients(rks, h, corrector=False)
        x_t = base - math.sqrt(ab_prev) * math.expm1(-h) * _weighted_differences(x0s, lams, lam_s, h, rho)
    return x_t, UniPCHistory(base, x0s[:order], lams[:order], p, ab_prev)


def unipc_step(diffusion, x_t: torch.Tensor, i: int, x0: torch.Tensor, eps: torch.Tensor,
               history: UniPCHistory | None = None, order: int = 2, corrector: bool = True):
    """UniPC step x_i -> x_{i−1} -> (x_{i−1}, history); start with history None, pass back what it returns.
    The order falls to min(order, i) at the end of the chain (first order into t = 0: lower-order final)."""
    ab, ab_prev = chain_alpha_bars(diffusion, i)
    return unipc_update(x_t, x0, eps, ab, ab_prev, history, order=min(order, max(int(i), 1)), corrector=corrector)


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
    if method == "unipc":
        return unipc_step(diffusion, x_t, i, x0, eps, history)
    raise ValueError(f"sampler must be {' | '.join(SAMPLERS)}, not {method!r}")
