"""The sampling loop: ancestral DDPM (learned or fixed variance), DDIM(η), DPM-Solver++(2M) and UniPC, with guidance
and hooks.

Each step is the public single-step API, so a hand-written loop reproduces `sample()` exactly:

    x, history = x_T, None
    for i in reversed(range(diffusion.num_timesteps)):                  # chain index, counts down to 0
        t = diffusion.timestep_map[i].repeat(N)                          # (N,) original timesteps
        out = guided_forward(model, x, t, labels, guidance.at(int(t[0])))  # guidance.py: one batched forward
        pred = diffusion.p_mean_variance(out.float(), x, torch.full((N,), i))   # x̂0, ε, log σ̂²
        x, history = sampler_step(method, diffusion, x, i, pred.x0, pred.eps,  # solvers.py
                                  log_variance=pred.log_variance, history=history, eta=eta)

`sample()` adds, per step: hooks (see hooks/__init__.py; `on_step_begin` before the forward, `on_step` after guidance
and clipping, which may replace x̂0 or ε: the other is recomputed from what they return), the block cache among the
hooks (passed to the model), `noise_fn` for x_T and every injected noise, and `project(x)` after every update.
Hooks see the x_t the model was evaluated at; UniPC's corrector then moves it (solvers.py) without a new forward.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .gaussian import GaussianDiffusion
from .guidance import Guidance, guided_forward, label_embedder
from .hooks import SamplerHook, SamplerState
from .solvers import DETERMINISTIC, SAMPLERS, dpmpp2m_update, sampler_step  # noqa: F401  (SAMPLERS, 2M: API)


def gaussian_noise(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=device)


def _model_forward(model, x, t, labels, guidance: Guidance, model_kwargs: dict, block_cache, channels: int):
    """`guided_forward` with positional arguments (the older private name)."""
    return guided_forward(model, x, t, labels, guidance, model_kwargs=model_kwargs, block_cache=block_cache,
                          channels=channels)


def _sample_shape(base, labels: torch.Tensor, shape, x_T) -> tuple[int, ...]:
    """(N, C, H, W): `shape`, else x_T's, else from the model's in_channels and input_size."""
    if shape is None and x_T is not None:
        shape = tuple(x_T.shape)
    if shape is None:
        if not (hasattr(base, "in_channels") and hasattr(base, "input_size")):
            raise ValueError("sample() needs shape=(N, C, H, W) or x_T for a model without in_channels and "
                             "input_size")
        shape = (labels.shape[0], base.in_channels, *base.input_size)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or shape[0] != labels.shape[0]:
        raise ValueError(f"sample() shape {shape} must be (N, C, ...) with N = {labels.shape[0]}, the number of "
                         f"labels")
    return shape


@torch.inference_mode()
def sample(model, labels: torch.Tensor, diffusion: GaussianDiffusion, *, method: str = "ddpm", eta: float = 0.0,
           guidance: Guidance | None = None, hooks: Sequence[SamplerHook] = (),
           generator: torch.Generator | None = None,
           noise_fn: Callable | None = None, project: Callable | None = None, clip_x0: bool = False,
           model_kwargs: dict | None = None, x_T: torch.Tensor | None = None, progress: bool = True,
           shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Generate samples for `labels` (N,) by running the (respaced) chain of `diffusion` backwards.

    model: a DiT, or any callable model(x, t, y, **model_kwargs) -> (N, C_out, H, W) (then give `shape` or `x_T`,
    and guidance other than "none" needs a `y_embedder` for its null / superclass labels).
    method: "ddpm" (ancestral, model's variance), "ddim" (η = `eta`), "dpmpp2m" (DPM-Solver++(2M)) or "unipc"
    (UniPC-2, bh2); the last two are deterministic ODE solvers, η must be 0. Deterministic given `generator`.
    guidance.interval limits guidance to a range of timesteps (one N-row forward outside it).
    noise_fn(shape, generator) supplies x_T and every injected noise; project(x) runs after each update.
    """
    if method not in SAMPLERS:
        raise ValueError(f"sampler must be {' | '.join(SAMPLERS)}, not {method!r}")
    if method in DETERMINISTIC and eta != 0:
        raise ValueError(f"{method} is a deterministic ODE solver: eta must be 0, got {eta}")
    if not eta >= 0:
        raise ValueError(f"eta must be a number ≥ 0, got {eta}")
    if not callable(model):
        raise ValueError(f"model must be callable as model(x, t, y, **kwargs), got {type(model).__name__}")
    guidance = guidance or Guidance()
    model_kwargs = model_kwargs or {}
    base = getattr(model, "module", model)
    device = labels.device
    shape = _sample_shape(base, labels, shape, x_T)
    if guidance.mode != "none" and any(guidance.applies(t) for t in diffusion.timestep_map.tolist()):
        label_embedder(base, guidance)  # guided steps need the label table: say so before any work
    noise_fn = noise_fn or (lambda s, g: gaussian_noise(s, g, device))
    x = noise_fn(shape, generator) if x_T is None else x_T.to(device)
    caches = [h for h in hooks if getattr(h, "granularity", None) is not None]
    if len(caches) > 1:
        raise ValueError("at most one block cache can run at a time")
    block_cache = caches[0] if caches else None
    if block_cache is not None and hasattr(block_cache, "bind"):
        if not hasattr(base, "blocks"):
            raise ValueError(f"block cache {type(block_cache).__name__} runs inside a DiT's blocks, and this model "
                             f"has no blocks")
        block_cache.bind(base)  # a cache may need the model's structure (Δ-DiT: its depth)
    for h in hooks:
        h.reset()

    N = shape[0]
    history = None  # multistep solvers: what the previous step left
    draw = lambda: noise_fn(shape, generator)  # noqa: E731  (drawn only by the steps that inject noise)
    steps = list(range(diffusion.num_timesteps))[::-1]
    timesteps = diffusion.timestep_map.tolist()
    for step, i in enumerate(tqdm(steps, desc=f"sampling ({method})", disable=not progress, leave=False)):
        t_idx = torch.full((N,), i, device=device, dtype=torch.long)
        t = diffusion.timestep_map.to(device)[t_idx]
        for h in hooks:
            h.on_step_begin(step, t)
        out = guided_forward(model, x, t, labels, guidance.at(timesteps[i]), model_kwargs=model_kwargs,
                             block_cache=block_cache, channels=shape[1])
        pred = diffusion.p_mean_variance(out.float(), x, t_idx, clip_x0=clip_x0)
        ab = float(diffusion.alphas_cumprod[i])
        ab_prev = float(diffusion.alphas_cumprod_prev[i])
        state = SamplerState(step, i, t, x, pred.eps, pred.x0, out, ab, ab_prev, ab / (1 - ab), model_kwargs)
        for h in hooks:
            new = h.on_step(state)
            x0_new, eps_new = new.x0 is not state.x0, new.eps is not state.eps
            if x0_new and eps_new:
                raise RuntimeError(f"hook {type(h).__name__} replaced both x0 and eps; replace one of them")
            if x0_new:
                new = new.replace(eps=diffusion.eps_from_x0(x, t_idx, new.x0))
            elif eps_new:
                new = new.replace(x0=diffusion.x0_from_eps(x, t_idx, new.eps))
            state = new
        x, history = sampler_step(method, diffusion, x, i, state.x0, state.eps, log_variance=pred.log_variance,
                                  history=history, eta=eta, noise=draw)
        if project is not None:
            x = project(x)
    return x
