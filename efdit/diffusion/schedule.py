"""Noise schedules and timestep respacing.

Schedules are numpy float64 arrays (exactness matters for ᾱ over 1000 steps); `diffusion.gaussian` turns
them into tensors. Respacing keeps a subset of the original timesteps and recomputes the betas so that
ᾱ at every kept step equals the original ᾱ (IDDPM / DiT `SpacedDiffusion`).
"""
from __future__ import annotations

import math
import re

import numpy as np


def get_betas(schedule: str = "linear", num_timesteps: int = 1000, beta_start: float = 1e-4,
              beta_end: float = 0.02) -> np.ndarray:
    """β_t for t = 0..T-1.

    linear: DiT's default, β from 1e-4 to 0.02 over 1000 steps (scaled by 1000/T for other T, as in IDDPM).
    cosine: Nichol & Dhariwal (2021), ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008, β clipped at 0.999.
    """
    if schedule == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)
    if schedule == "cosine":
        def f(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), 0.999)
                         for i in range(num_timesteps)], dtype=np.float64)
    raise ValueError(f"unknown noise schedule {schedule!r} (linear | cosine)")


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """Which original timesteps to keep.

    "250": 250 steps spread evenly (per section, as IDDPM); "10,15,20": three equal sections with that many
    steps each; "ddim50": DDIM striding, t = 0, s, 2s, ... with the integer stride s = T // 50.
    """
    bad = ValueError(f'timestep respacing must be a positive integer or a respacing such as "ddim50", '
                     f'got {section_counts!r}')
    if isinstance(section_counts, str) and not re.fullmatch(r"(ddim)?[1-9][0-9]*|[1-9][0-9]*(,[1-9][0-9]*)+",
                                                            section_counts.strip()):
        raise bad
    if isinstance(section_counts, int) and section_counts < 1:
        raise bad
    if isinstance(section_counts, str):
        section_counts = section_counts.strip()
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {want} steps from {num_timesteps} with an integer stride")
        section_counts = [int(s) for s in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += frac_stride
        start += size
    return sorted(set(kept))


def respace_betas(betas: np.ndarray, use_timesteps: list[int]) -> np.ndarray:
    """Betas of the respaced chain: β'_i = 1 − ᾱ_{τ_i}/ᾱ_{τ_{i−1}} (ᾱ_{τ_{−1}} = 1)."""
    alphas_cumprod = np.cumprod(1.0 - betas)
    last, new = 1.0, []
    for t in sorted(use_timesteps):
        new.append(1 - alphas_cumprod[t] / last)
        last = alphas_cumprod[t]
    return np.array(new, dtype=np.float64)


def snr(betas: np.ndarray) -> np.ndarray:
    ab = np.cumprod(1.0 - betas)
    return ab / (1 - ab)
