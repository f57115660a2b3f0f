"""Generation from a config's sampling settings: sampler, steps, guidance, HRIG and block-cache hooks, the
latent decoder; class-balanced labels. Images come back as uint8 (N, C, H, W)."""
from __future__ import annotations

import torch

from ..config import Config, parse_kv
from ..data.base import to_uint8
from ..data.hierarchy import Hierarchy
from ..diffusion import Guidance, sample
from ..errors import EfditError
from ..latent.autoencoder import latent_decoder
from ..models.compiled import maybe_compile
from .build import build_diffusion


def guidance_of(cfg: Config) -> Guidance:
    """The sampler's guidance. A guidance-distilled model (`model.guidance_embed`) runs one branch: mode "none",
    its scale w = `sample.cfg_scale` going to the model as an input (`sampling_kwargs`)."""
    s = cfg.sample
    if cfg.model.guidance_embed:
        return Guidance("none", s.cfg_scale, s.cfg_scale_super, s.cfg_channels)
    mode = s.guidance
    if mode == "auto":
        mode = "super" if cfg.model.embedder == "tiered" else "cfg"
    if s.cfg_scale == 1.0 and mode != "two_term":
        mode = "none"
    return Guidance(mode, s.cfg_scale, s.cfg_scale_super, s.cfg_channels, interval=guidance_interval(cfg))


def sampling_kwargs(cfg: Config) -> dict:
    """The model's extra inputs when sampling: {"w": sample.cfg_scale} for a guidance-distilled model, else {}."""
    return {"w": float(cfg.sample.cfg_scale)} if cfg.model.guidance_embed else {}


def guidance_interval(cfg: Config) -> tuple[int, int] | None:
    """`sample.guidance_interval` "T_LO,T_HI" -> (t_lo, t_hi) in original timesteps; "" -> None (every step)."""
    spec = str(cfg.sample.guidance_interval).strip()
    if not spec:
        return None
    lo, hi = (int(v) for v in spec.split(","))
    return lo, hi


@torch.inference_mode()
def generate(model, cfg: Config, labels: torch.Tensor, device="cpu", progress: bool = True,
             batch_size: int = 256, hooks=(), seed: int | None = None) -> torch.Tensor:
    """Samples for `labels` (ids in the model's label space) -> uint8 (N, C, H, W)."""
    s = cfg.sample
    check_sampler(cfg)
    diffusion = build_diffusion(cfg, s.steps)
    hooks = list(hooks) + hrig_hooks(cfg) + accel_hooks(cfg)
    gen = torch.Generator(device=device).manual_seed(s.seed if seed is None else seed)
    model = maybe_compile(model, s.compile)  # the model itself unless sample.compile
    decode = latent_decoder(cfg, device)  # None in pixel space; latents are decoded by the run's VAE
    out = []
    for i in range(0, len(labels), batch_size):
        y = labels[i:i + batch_size].to(device)
        x = sample(model, y, diffusion, method=s.sampler, eta=s.eta, guidance=guidance_of(cfg), hooks=hooks,
                   generator=gen, clip_x0=s.clip_x0 and decode is None, progress=progress,
                   model_kwargs=sampling_kwargs(cfg))
        if decode is not None:
            x = decode(x)
        out.append(to_uint8(x).cpu())
    return torch.cat(out)


def hrig_hooks(cfg: Config) -> list:
    spec = cfg.sample.hrig.strip()
    if spec.lower() in ("", "off", "none"):
        return []
    from ..diffusion.hooks.hrig import HRIG
    try:
        return [HRIG.from_spec(spec)]
    except ValueError as e:
        raise EfditError(f"--hrig {spec!r}: {e}") from None


def check_sampling(cfg: Config) -> None:
    """Everything about a config's sampling that can be wrong, checked before any work: the sampler and η, the
    respacing within the chain, the HRIG and block-cache specs. One EfditError naming the option."""
    check_sampler(cfg)
    try:
        build_diffusion(cfg, cfg.sample.steps)
    except ValueError as e:
        raise EfditError(f"--steps {cfg.sample.steps!r}: {e}") from None
    hrig_hooks(cfg)
    accel_hooks(cfg)


def check_sampler(cfg: Config) -> None:
    from ..diffusion.solvers import DETERMINISTIC, SAMPLERS
    s = cfg.sample
    if s.sampler not in SAMPLERS:
        raise EfditError(f"--sampler must be {' | '.join(SAMPLERS)}, not {s.sampler!r}")
    if s.sampler in DETERMINISTIC and s.eta != 0:
        raise EfditError(f"--sampler {s.sampler} is deterministic: --eta must be 0, not {s.eta}")
    if cfg.model.guidance_embed and str(cfg.sample.guidance_interval).strip():
        raise EfditError("--guidance-interval: a guidance-distilled model runs one forward at its scale w at every "
                         "step, it has no conditional-only steps (sample it without --guidance-interval)")


def accel_hooks(cfg: Config) -> list:
    """The training-free block cache of `sample.accel` (FORA, Δ-DiT, TaylorSeer), as a sampler hook; [] for none."""
    from ..diffusion.hooks.cache import build_accel
    s = cfg.sample
    try:
        cache = build_accel(s.accel, parse_kv(s.accel_kwargs))
    except ValueError as e:
        raise EfditError(f"--accel {s.accel} --accel-kw {s.accel_kwargs!r}: {e}") from None
    return [] if cache is None else [cache]


def class_labels(cfg: Config, hierarchy: Hierarchy, classes: list[int] | None, per_class: int) -> torch.Tensor:
    """per_class labels for each class (all classes of the model's label space when `classes` is None)."""
    n = hierarchy.num_sub if cfg.model.condition_on == "sub" else hierarchy.num_super
    ids = list(range(n)) if classes is None else classes
    return torch.tensor(ids, dtype=torch.long).repeat_interleave(per_class)


def generate_per_class(model, cfg: Config, hierarchy: Hierarchy, per_class: int, classes: list[int] | None = None,
                       device="cpu", progress: bool = True):
    labels = class_labels(cfg, hierarchy, classes, per_class)
    return generate(model, cfg, labels, device=device, progress=progress), labels


class StepProgress:
    """A sampler hook that reports each step to a callback(done, total)."""
    granularity = None

    def __init__(self, total: int, callback):
        self.total, self.callback = total, callback

    def reset(self):
        pass

    def on_step_begin(self, step_index: int, t):
        self.callback(step_index, self.total)

    def on_step(self, state):
        return state
