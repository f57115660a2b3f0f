"""Gaussian diffusion: forward process, posterior, model mean/variance and training losses.

Follows DDPM (Ho et al. 2020) and improved DDPM (Nichol & Dhariwal 2021) as used by DiT: ε-prediction with a
learned-range Σ and the hybrid loss L_simple + L_vlb. v- and x0-prediction and fixed variances are options.

A `GaussianDiffusion` may be respaced (`timestep_map[i]` is the original timestep of chain index i): the
model always receives original timesteps, the maths uses the respaced chain.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .schedule import get_betas, respace_betas, space_timesteps
from .timesteps import snr_weight


def _extract(arr: torch.Tensor, idx: torch.Tensor, ndim: int) -> torch.Tensor:
    """arr[idx] (float64 table -> float32) shaped (N, 1, 1, ...) to broadcast against an ndim tensor."""
    out = arr.to(idx.device)[idx].float()
    return out.reshape(-1, *([1] * (ndim - 1)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of data in [-1, 1] quantised to 256 bins under N(means, e^{2 log_scales}) (DDPM's decoder)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def mean_flat(x):
    return x.mean(dim=list(range(1, x.ndim)))


@dataclass
class ModelPrediction:
    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    x0: torch.Tensor
    eps: torch.Tensor


class GaussianDiffusion:
    def __init__(self, betas: np.ndarray, prediction: str = "eps", learn_sigma: bool = True,
                 fixed_variance: str = "small", loss: str = "hybrid", timestep_map: list[int] | None = None,
                 num_train_timesteps: int | None = None, weighting: str = "none", min_snr_gamma: float = 5.0):
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"prediction must be eps | v | x0, not {prediction!r}")
        if loss not in ("hybrid", "mse"):
            raise ValueError(f"loss must be hybrid | mse, not {loss!r}")
        self.prediction = prediction
        self.learn_sigma = learn_sigma
        self.fixed_variance = fixed_variance
        self.loss = loss
        snr_weight(torch.ones(1), prediction, weighting, min_snr_gamma)  # refuses an unknown weighting / bad γ
        self.weighting, self.min_snr_gamma = weighting, min_snr_gamma
        betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.timestep_map = torch.tensor(timestep_map if timestep_map is not None else range(len(betas)),
                                         dtype=torch.long)
        self.num_train_timesteps = num_train_timesteps or len(betas)

        f64 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
        alphas = 1.0 - betas
        ab = np.cumprod(alphas)
        ab_prev = np.append(1.0, ab[:-1])
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        self.betas = f64(betas)
        self.alphas_cumprod = f64(ab)
        self.alphas_cumprod_prev = f64(ab_prev)
        self.sqrt_alphas_cumprod = f64(np.sqrt(ab))
        self.sqrt_one_minus_alphas_cumprod = f64(np.sqrt(1.0 - ab))
        self.sqrt_recip_alphas_cumprod = f64(np.sqrt(1.0 / ab))
        self.sqrt_recipm1_alphas_cumprod = f64(np.sqrt(1.0 / ab - 1))
        self.posterior_variance = f64(post_var)
        # log β̃ with the t=0 entry (β̃_0 = 0) replaced by β̃_1, as in IDDPM
        self.posterior_log_variance_clipped = f64(np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1
                                                  else np.log(betas))
        self.posterior_mean_coef1 = f64(betas * np.sqrt(ab_prev) / (1.0 - ab))
        self.posterior_mean_coef2 = f64((1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab))
        self.log_betas = f64(np.log(betas))

    # ---- forward process ---------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε; t are chain indices."""
        noise = torch.randn_like(x0) if noise is None else noise
        return (_extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x0)."""
        mean = (_extract(self.posterior_mean_coef1, t, x_t.ndim) * x0
                + _extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t)
        return (mean, _extract(self.posterior_variance, t, x_t.ndim),
                _extract(self.posterior_log_variance_clipped, t, x_t.ndim))

    # ---- conversions between parameterisations -----------------------------------------------------
    def x0_from_eps(self, x_t, t, eps):
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

    def eps_from_x0(self, x_t, t, x0):
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))

    def v_target(self, x0, t, eps):
        return (_extract(self.sqrt_alphas_cumprod, t, x0.ndim) * eps
                - _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)

    def split_output(self, model_output: torch.Tensor, channels: int):
        """(N, C or 2C, ...) -> (mean-part (N, C, ...), variance-part or None)."""
        if self.learn_sigma:
            if model_output.shape[1] != 2 * channels:
                raise ValueError(f"learn_sigma expects {2 * channels} output channels, got {model_output.shape[1]}")
            return model_output[:, :channels], model_output[:, channels:]
        return model_output, None

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        clip_x0: bool = False) -> ModelPrediction:
        """Turn a model output at chain index t into x0, ε and the mean / variance of p(x_{t−1} | x_t)."""
        out, var_values = self.split_output(model_output, x_t.shape[1])
        log_variance, variance = self.model_log_variance(var_values, t, x_t)
        if self.prediction == "eps":
            eps = out
            x0 = self.x0_from_eps(x_t, t, eps)
        elif self.prediction == "x0":
            x0 = out
            eps = self.eps_from_x0(x_t, t, x0)
        else:  # v
            sa = _extract(self.sqrt_alphas_cumprod, t, x_t.ndim)
            s1a = _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
            x0 = sa * x_t - s1a * out
            eps = sa * out + s1a * x_t
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = self.eps_from_x0(x_t, t, x0)
        mean, _, _ = self.q_posterior(x0, x_t, t)
        return ModelPrediction(mean, variance, log_variance, x0, eps)

    def model_log_variance(self, var_values: torch.Tensor | None, t: torch.Tensor, x_t: torch.Tensor):
        """Log-variance of p(x_{t−1}|x_t): learned range log σ² = v·log β + (1−v)·log β̃, or fixed."""
        if var_values is not None:
            min_log = _extract(self.posterior_log_variance_clipped, t, x_t.ndim)
            max_log = _extract(self.log_betas, t, x_t.ndim)
            frac = (var_values + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        elif self.fixed_variance == "large":
            # β_t, with β̃_1 at t = 0 (IDDPM's "fixed large")
            table = torch.cat([self.posterior_variance[1:2], self.betas[1:]]).log()
            log_var = _extract(table, t, x_t.ndim).expand_as(x_t)
        else:
            log_var = _extract(self.posterior_log_variance_clipped, t, x_t.ndim).expand_as(x_t)
        return log_var, torch.exp(log_var)

    # ---- training -----------------------------------------------------------------------------------
    def sample_t(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)

    def training_losses(self, model, x0: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None,
                        noise: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> dict:
        """Per-sample losses at chain indices t. Returns dict(loss, mse[, vb]) of shape (N,).

        `weight` (broadcastable to x0, e.g. (N, 1, H, W)): if given, mse = Σ W·(target − pred)² / C per sample
        (the caller normalises W); otherwise the plain mean over elements. `mse` is reported unweighted; the
        loss is w_t·mse (+ vb) with w_t the diffusion's SNR weighting (timesteps.snr_weight; 1 for "none").
        """
        model_kwargs = model_kwargs or {}
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        model_output = model(x_t, self.timestep_map.to(t.device)[t], **model_kwargs)
        out, var_values = self.split_output(model_output, x0.shape[1])
        target = {"eps": noise, "x0": x0, "v": None}[self.prediction]
        if target is None:
            target = self.v_target(x0, t, noise)
        sq = (target - out.float()) ** 2
        if weight is None:
            mse = mean_flat(sq)
        else:
            mse = (sq * weight).sum(dim=list(range(1, sq.ndim))) / x0.shape[1]
        terms = {"mse": mse}
        if self.weighting != "none":
            mse = mse * snr_weight(_extract(self.alphas_cumprod / (1 - self.alphas_cumprod), t, 1), self.prediction,
                                   self.weighting, self.min_snr_gamma)
        if var_values is not None and self.loss == "hybrid":
            # L_vlb trains only Σ: the mean comes from a detached copy of the prediction
            frozen = torch.cat([out.detach(), var_values], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x0, x_t, t)
            terms["loss"] = mse + terms["vb"]
        else:
            terms["loss"] = mse
        return terms

    def vb_terms_bpd(self, model_output, x0, x_t, t) -> torch.Tensor:
        """One term of the variational bound, in bits per dimension: KL at t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        pred = self.p_mean_variance(model_output.float(), x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, pred.mean, pred.log_variance)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, pred.mean, 0.5 * pred.log_variance)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def create_diffusion(timestep_respacing: str | int | None = None, noise_schedule: str = "linear",
                     diffusion_steps: int = 1000, prediction: str = "eps", learn_sigma: bool = True,
                     loss: str = "hybrid", fixed_variance: str = "small", weighting: str = "none",
                     min_snr_gamma: float = 5.0) -> GaussianDiffusion:
    """A diffusion with DiT's defaults; `timestep_respacing` "250" / "ddim50" / None (all steps)."""
    betas = get_betas(noise_schedule, diffusion_steps)
    if timestep_respacing in (None, "", diffusion_steps, str(diffusion_steps)):
        use = list(range(diffusion_steps))
    else:
        use = space_timesteps(diffusion_steps, timestep_respacing)
    if len(use) < diffusion_steps:
        betas = respace_betas(betas, use)
    return GaussianDiffusion(betas, prediction=prediction, learn_sigma=learn_sigma,
                             fixed_variance=fixed_variance, loss=loss, timestep_map=use,
                             num_train_timesteps=diffusion_steps, weighting=weighting, min_snr_gamma=min_snr_gamma)
