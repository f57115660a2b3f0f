"""Multi-grained diffusion: the forward noise, the multi-grained ("dynamic grain") loss and sampling of the DCT.

Noise: ε = where(M_up == fine, ε_f, nearest_up2(ε_c)), ε_f ~ N(0, I) on the fine grid, ε_c ~ N(0, I) per region:
a coarse code gets ONE unit-variance draw copied to its 4 cells (same SNR(t) as a fine cell), so x_t of a
multi-grained x0 stays constant over every coarse region at every t.

Loss: each code counted once at its own granularity. S = summed squared errors (a coarse region read from one
copy), N_c = coarse regions, N_f = fine cells in the batch, C channels:
    per_grain: L = w_c · S_c / (C · max(1, N_c)) + w_f · S_f / (C · max(1, N_f))
    per_code:  L = (S_c + S_f) / (C · (N_c + N_f))
A grain absent from the batch contributes 0. With learned Σ, L_vlb is reduced the same way.
"""
from __future__ import annotations

import math

import torch

from ..diffusion import Guidance, sample
from ..diffusion.gaussian import discretized_gaussian_log_likelihood, normal_kl
from .grains import upsample_map


def multigrain_noise(shape, grain: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """shape (N, C, 2h, 2w), grain (N, h, w) -> multi-grained N(0, 1) noise."""
    N, C, H, W = shape
    dev = grain.device
    eps_f = torch.randn((N, C, H, W), generator=generator, device=dev)
    eps_c = torch.randn((N, C, H // 2, W // 2), generator=generator, device=dev)
    return torch.where(upsample_map(grain, 2).bool(), eps_f, eps_c.repeat_interleave(2, 2).repeat_interleave(2, 3))


def multigrain_reduce(values: torch.Tensor, grain: torch.Tensor, w_coarse: float = 1.0, w_fine: float = 1.0,
                      weighting: str = "per_grain") -> torch.Tensor:
    """values (N, C, 2h, 2w) of per-element losses (coarse regions: equal over their 4 cells) -> scalar."""
    C = values.shape[1]
    fine_cells = upsample_map(grain, 2).bool()                     # (N, 1, 2h, 2w)
    coarse_regions = ~grain[:, None].bool()                        # (N, 1, h, w)
    S_f = torch.where(fine_cells, values, torch.zeros_like(values)).sum()
    one = values[:, :, ::2, ::2]                                   # one copy per region
    S_c = torch.where(coarse_regions, one, torch.zeros_like(one)).sum()
    N_f = fine_cells.sum()
    N_c = coarse_regions.sum()
    if weighting == "per_grain":
        return w_coarse * S_c / (C * N_c.clamp(min=1)) + w_fine * S_f / (C * N_f.clamp(min=1))
    if weighting == "per_code":
        return (S_c + S_f) / (C * (N_c + N_f).clamp(min=1))
    raise ValueError(f"weighting must be per_grain | per_code, not {weighting!r}")


def training_losses(model, diffusion, x0, grain, y, t, generator=None, w_coarse=1.0, w_fine=1.0,
                    weighting="per_grain") -> dict:
    """Multi-grained noise -> x_t -> DCT -> multi-grained MSE (+ L_vlb on learned Σ, reduced the same way)."""
    noise = multigrain_noise(x0.shape, grain, generator)
    x_t = diffusion.q_sample(x0, t, noise)
    out = model(x_t, diffusion.timestep_map.to(t.device)[t], y, grain=grain)
    eps, var_values = diffusion.split_output(out, x0.shape[1])
    mse = multigrain_reduce((noise - eps) ** 2, grain, w_coarse, w_fine, weighting)
    terms = {"mse": mse}
    if var_values is not None:
        frozen = torch.cat([eps.detach(), var_values], dim=1)
        true_mean, _, true_logvar = diffusion.q_posterior(x0, x_t, t)
        pred = diffusion.p_mean_variance(frozen, x_t, t)
        kl = normal_kl(true_mean, true_logvar, pred.mean, pred.log_variance) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, pred.mean, 0.5 * pred.log_variance) / math.log(2.0)
        vb = torch.where((t == 0).view(-1, 1, 1, 1), nll, kl)
        terms["vb"] = multigrain_reduce(vb, grain, w_coarse, w_fine, weighting)
        terms["loss"] = mse + terms["vb"]
    else:
        terms["loss"] = mse
    return terms


@torch.no_grad()
def sample_dct(model, labels, grain, diffusion, method="ddpm", cfg_scale=1.0, generator=None, hooks=(),
               progress=True, project=None):
    """Sample multi-grained latents (N, C, 2h, 2w) for labels (N,) and grain maps (N, h, w). Every injected
    noise (x_T and the ancestral σ·z) is multi-grained under the same map; CFG uses the same map in both branches."""
    guidance = Guidance("cfg", cfg_scale) if cfg_scale != 1.0 else Guidance()
    return sample(model, labels, diffusion, method=method, guidance=guidance, hooks=hooks, generator=generator,
                  noise_fn=lambda s, g: multigrain_noise(s, grain, g), model_kwargs={"grain": grain},
                  progress=progress, project=project)
