"""Gaussian diffusion, schedules and samplers."""
from .gaussian import GaussianDiffusion, create_diffusion
from .hooks import SamplerHook, SamplerState
from .samplers import Guidance, sample
from .schedule import get_betas, respace_betas, space_timesteps

__all__ = ["GaussianDiffusion", "create_diffusion", "SamplerHook", "SamplerState", "Guidance", "sample",
           "get_betas", "respace_betas", "space_timesteps"]
