"""End-to-end D²iT sampling: class -> DGT grain map -> DCT multi-grained latent -> DVAE decode -> image.

    pipe = D2iTPipeline("runs/d2it-fmnist32")
    images, grains = pipe(labels)                       # uint8 (N, C, H, W), grain maps (N, h, w)
    images, grains = pipe(labels, grain_source="random")   # or "gt" with grains=..., as in Table 5
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..d2it.config import D2itConfig
from ..data.base import to_uint8
from ..diffusion import create_diffusion
from ..errors import EfditError
from . import d2it_train as T


class D2iTPipeline:
    def __init__(self, run_dir: str | Path, need=("dvae", "dgt", "dct")):
        self.run_dir = Path(run_dir)
        if not (self.run_dir / "config.json").is_file():
            raise EfditError(f"{self.run_dir} is not a D²iT run directory (no config.json)")
        self.cfg = D2itConfig.from_dict(json.loads((self.run_dir / "config.json").read_text()))
        self.dvae = T.load_dvae(self.cfg, self.run_dir) if "dvae" in need else None
        self.dgt = T.load_dgt(self.cfg, self.run_dir) if "dgt" in need else None
        self.dct = T.load_dct(self.cfg, self.run_dir) if "dct" in need else None
        self.dit = T.load_dit(self.cfg, self.run_dir) if "dit" in need else None
        lat = self.run_dir / "latents.safetensors"
        self.fine_share = float(T.load_latents(self.run_dir)["grain"].float().mean()) if lat.is_file() else 0.5

    @torch.no_grad()
    def grains(self, labels, source: str = "dgt", generator=None, cfg_scale: float | None = None, progress=False):
        """Grain maps (N, h, w) for labels: "dgt" (generated) or "random" (i.i.d., the train fine share)."""
        g = self.cfg.data.image_size // self.cfg.f2
        if source == "random":
            return (torch.rand((len(labels), g, g), generator=generator) < self.fine_share).long()
        if source == "dgt":
            from ..d2it.dgt import sample_grains
            s = self.cfg.sample.grain_cfg_scale if cfg_scale is None else cfg_scale
            return sample_grains(self.dgt, labels, steps=self.cfg.dgt.sample_steps, cfg_scale=s,
                                 schedule=self.cfg.dgt.schedule, generator=generator, progress=progress)
        raise EfditError(f"grain source must be dgt | random (or pass grains), not {source!r}")

    @torch.no_grad()
    def decode(self, z, grain):
        return to_uint8(self.dvae.decode(z / self.dvae.scale_factor, grain))

    @torch.no_grad()
    def __call__(self, labels, grains=None, grain_source: str = "dgt", steps: str | None = None,
                 sampler: str | None = None, cfg_scale: float | None = None, seed: int | None = None,
                 progress: bool = True, batch_size: int = 250, hooks=(), grain_cfg_scale: float | None = None):
        """-> (uint8 images (N, C, H, W), grain maps (N, h, w)). grain_cfg_scale: the DGT's guidance (default
        sample.grain_cfg_scale); hooks: efdit sampler hooks on the DCT chain."""
        from ..d2it.multigrain import sample_dct
        s = self.cfg.sample
        gen = torch.Generator().manual_seed(s.seed if seed is None else seed)
        if grains is None:
            grains = self.grains(labels, grain_source, gen, cfg_scale=grain_cfg_scale, progress=progress)
        d = self.cfg.dct
        diffusion = create_diffusion(steps or s.steps, noise_schedule=d.schedule, learn_sigma=d.learn_sigma,
                                     loss="hybrid" if d.learn_sigma else "mse")
        images = []
        for i in range(0, len(labels), batch_size):
            z = sample_dct(self.dct, labels[i:i + batch_size], grains[i:i + batch_size], diffusion,
                           method=sampler or s.sampler, cfg_scale=s.cfg_scale if cfg_scale is None else cfg_scale,
                           generator=gen, progress=progress, hooks=hooks)
            images.append(self.decode(z, grains[i:i + batch_size]))
        return torch.cat(images), grains

    @torch.no_grad()
    def sample_baseline(self, labels, steps: str | None = None, sampler: str | None = None,
                        cfg_scale: float | None = None, seed: int | None = None, progress: bool = True,
                        batch_size: int = 250):
        """The plain DiT on the all-fine latent, decoded with the same DVAE (all-fine grain map)."""
        from ..diffusion import Guidance, sample
        s, d = self.cfg.sample, self.cfg.dct
        gen = torch.Generator().manual_seed(s.seed if seed is None else seed)
        diffusion = create_diffusion(steps or s.steps, noise_schedule=d.schedule, learn_sigma=d.learn_sigma,
                                     loss="hybrid" if d.learn_sigma else "mse")
        scale = s.cfg_scale if cfg_scale is None else cfg_scale
        g = self.cfg.data.image_size // self.cfg.f2
        out = []
        for i in range(0, len(labels), batch_size):
            y = labels[i:i + batch_size]
            z = sample(self.dit, y, diffusion, method=sampler or s.sampler, generator=gen, progress=progress,
                       guidance=Guidance("cfg", scale) if scale != 1.0 else Guidance())
            out.append(self.decode(z, torch.ones((len(y), g, g), dtype=torch.long)))
        return torch.cat(out)
