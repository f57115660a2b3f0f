"""Gaussian diffusion, schedules, guidance, single-step solvers and the sampling loop."""
from .gaussian import GaussianDiffusion, create_diffusion
from .guidance import Guidance, guided_forward
from .hooks import SamplerHook, SamplerState
from .samplers import sample
from .schedule import get_betas, respace_betas, space_timesteps
from .solvers import SAMPLERS, UniPCHistory, ddim_step, ddpm_step, dpmpp2m_step, sampler_step, unipc_step, unipc_update

__all__ = ["GaussianDiffusion", "create_diffusion", "SamplerHook", "SamplerState", "Guidance", "guided_forward",
           "sample", "SAMPLERS", "sampler_step", "ddpm_step", "ddim_step", "dpmpp2m_step", "unipc_step",
           "unipc_update", "UniPCHistory", "get_betas", "respace_betas", "space_timesteps"]
