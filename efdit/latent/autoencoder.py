"""Autoencoders between images and the space the DiT models: identity (pixel space) or a diffusers AutoencoderKL.

Interface (both classes):
    encode_moments(x) -> (mean, std)   x: float (N, C, H, W) in [-1, 1] -> the posterior's mean and std, both
                                       (N, c, H/f, W/f), already in model units: (mean − shift)·scale, std·scale
    decode(z) -> x                     model-unit latents (N, c, h, w) -> images (N, C, H, W), about [-1, 1]
    latent_channels, downsample (f), describe() (a JSON-able dict recorded in caches and runs)

The VAE is loaded from a LOCAL folder only (`local_files_only=True`; efdit never downloads weights): a diffusers
`AutoencoderKL` folder such as a copy of stabilityai/sd-vae-ft-mse (`config.json` +
`diffusion_pytorch_model.safetensors`), or a full pipeline folder with a `vae/` subfolder. The scale factor
(0.18215 for SD-1.x VAEs) and the optional shift come from its config.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import EfditError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.fp16.safetensors")


class Autoencoder:
    latent_channels: int
    downsample: int

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C, H, W) image -> (c, h, w) latent."""
        _, h, w = image_shape
        f = self.downsample
        if h % f or w % f:
            raise EfditError(f"image size {h}x{w} is not divisible by the autoencoder's factor {f}")
        return self.latent_channels, h // f, w // f


class IdentityAutoencoder(Autoencoder):
    """Pixel space: the 'latent' is the image itself, with std 0 (every training step sees the same x)."""

    downsample = 1

    def __init__(self, channels: int = 3):
        self.latent_channels = channels

    def encode_moments(self, x):
        return x.float(), torch.zeros_like(x, dtype=torch.float32)

    def decode(self, z):
        return z

    def describe(self) -> dict:
        return {"kind": "identity", "scale": 1.0, "shift": 0.0, "latent_channels": self.latent_channels,
                "downsample": 1}


class DiffusersVAE(Autoencoder):
    """A diffusers AutoencoderKL (frozen, eval mode). Build with `load_autoencoder(folder)` or `from_model`."""

    def __init__(self, vae, path: str = "", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.vae = vae.eval().requires_grad_(False).to(device)
        if dtype != torch.float32:
            self.vae = self.vae.to(dtype=dtype)
        self.path = str(path)
        self.device, self.dtype = torch.device(device), dtype
        cfg = vae.config
        self.scale = float(getattr(cfg, "scaling_factor", None) or 0.18215)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.in_channels = int(cfg.in_channels)

    @classmethod
    def from_model(cls, vae, **kw) -> "DiffusersVAE":
        return cls(vae, **kw)

    @torch.no_grad()
    def encode_moments(self, x):
        # x: (N, C, H, W) in [-1, 1] -> mean, std: (N, c, H/f, W/f) float32, in model units
        post = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
        mean = (post.mean.float() - self.shift) * self.scale
        std = post.std.float() * self.scale
        return mean, std

    @torch.no_grad()
    def decode(self, z):
        z = z.to(self.device, self.dtype) / self.scale + self.shift
        return self.vae.decode(z).sample.float()

    def describe(self) -> dict:
        return {"kind": "diffusers-autoencoderkl", "path": self.path, "scale": self.scale, "shift": self.shift,
                "latent_channels": self.latent_channels, "downsample": self.downsample}


def vae_folder(path: str | os.PathLike) -> Path:
    """The folder holding the AutoencoderKL's config.json (the folder itself, or its `vae/`), or an EfditError."""
    p = Path(path).expanduser()
    hint = ("a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors), e.g. your local "
            "copy of stabilityai/sd-vae-ft-mse; efdit never downloads weights")
    if not p.is_dir():
        raise EfditError(f"VAE folder not found: {p} (expected {hint})")
    for cand in (p, p / "vae"):
        if (cand / "config.json").is_file():
            if not any((cand / w).is_file() for w in WEIGHT_FILES):
                raise EfditError(f"VAE folder {cand} has config.json but no weights "
                                 f"(expected {' or '.join(WEIGHT_FILES[:2])})")
            return cand
    raise EfditError(f"VAE folder {p} has no config.json (expected {hint})")


def load_autoencoder(spec: str | os.PathLike | None, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, channels: int = 3) -> Autoencoder:
    """"" / "identity" / "pixel" -> IdentityAutoencoder; anything else is a local VAE folder."""
    if spec is None or str(spec).strip().lower() in ("", "identity", "pixel", "none"):
        return IdentityAutoencoder(channels)
    folder = vae_folder(spec)
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise EfditError("a VAE needs the diffusers library: pip install 'efdit[latent]'") from None
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise EfditError(f"cannot load an AutoencoderKL from {folder}: {str(e).splitlines()[0]}") from None
    return DiffusersVAE(vae, path=str(Path(spec)), device=device, dtype=dtype)


def latent_decoder(cfg, device: str | torch.device = "cpu"):
    """The decoder of a latent-space config (`data.vae`, else the VAE recorded in `data.latent_cache`), or None in
    pixel space. A latent model without its VAE folder is an EfditError naming the folder."""
    path = cfg.data.vae
    if not path and cfg.data.latent_cache:
        meta = Path(cfg.data.latent_cache) / "meta.json"
        if meta.is_file():
            import json
            ae = json.loads(meta.read_text()).get("autoencoder", {})
            if ae.get("kind") == "identity":
                return None
            path = ae.get("path", "")
        if not path:
            raise EfditError("this model was trained on latents: decoding its samples needs --vae (the VAE folder)")
    if not path:
        return None
    return load_autoencoder(path, device=device).decode
