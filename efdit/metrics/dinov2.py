"""FD-DINOv2 (Stein et al. 2023): the Fréchet distance on DINOv2 features, from a local weights folder.

The model code is `transformers.Dinov2Model` (installable from PyPI; torch-fidelity 0.4's DINOv2 extractor only
loads through torch.hub, i.e. from the network). The weights are a Hugging Face folder (config.json +
model.safetensors, e.g. facebook/dinov2-large = ViT-L/14, the variant of Stein et al.), read with
`use_safetensors=True` and `local_files_only=True`: nothing is unpickled and nothing is downloaded.

Features, as dgm-eval's DINOv2 encoder: images resized to 224 × 224 bicubic, ImageNet mean / std normalisation, and
the CLS token after the final layer norm (`pooler_output`; 1024-d for ViT-L/14). The resize is torch's antialiased
bicubic on float images, which equals PIL's bicubic resize of float images (dgm-eval's "clean" resize) to ~1e-6;
dgm-eval's default resizes the uint8 PIL image and rounds to uint8 again, a difference of up to half a grey level.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from efdit.errors import EfditError

INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_FILE = "model.safetensors"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise EfditError("FD-DINOv2 uses the DINOv2 model code of `transformers`: `pip install transformers`") from None
    return transformers


def load_dinov2(folder: str | os.PathLike, device: str | torch.device = "cpu"):
    """A transformers Dinov2Model from a local folder (config.json + model.safetensors), eval mode, on `device`."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise EfditError(f"DINOv2 weights not found: {folder} must hold config.json and {WEIGHTS_FILE} "
                         "(a Hugging Face folder such as facebook/dinov2-large; efdit never downloads it)")
    transformers = _transformers()
    try:
        model = transformers.Dinov2Model.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise EfditError(f"{folder} is not a DINOv2 model folder: {str(e).splitlines()[0][:200]}") from None
    return model.eval().requires_grad_(False).to(device)


def dinov2_weights_sha256(folder: str | os.PathLike, length: int = 16) -> str:
    """The first `length` hex digits of the SHA-256 of the folder's model.safetensors."""
    from efdit.metrics.features import weights_sha256

    return weights_sha256(Path(folder) / WEIGHTS_FILE, length)


def preprocess(images) -> torch.Tensor:
    """uint8 / [0, 1] images (N, C, H, W), C in {1, 3} -> normalised float32 (N, 3, 224, 224)."""
    from efdit.metrics.features import to_float_images

    x = to_float_images(images, channels=3)
    if tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class DinoV2Extractor:
    """Images -> DINOv2 CLS features (N, hidden) float64, for FD-DINOv2 (and KID / precision-recall on them)."""

    def __init__(self, folder: str | os.PathLike | None = None, model=None, device: str | torch.device = "cpu"):
        if (folder is None) == (model is None):
            raise EfditError("give either a DINOv2 weights folder or a model")
        self.device = torch.device(device)
        self.model = (model if model is not None else load_dinov2(folder, self.device)).eval().to(self.device)
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def extract(self, images, batch_size: int = 32) -> np.ndarray:
        n = len(images)
        out = np.empty((n, self.dim), dtype=np.float64)
        for i in range(0, n, batch_size):
            x = preprocess(images[i:i + batch_size]).to(self.device)
            out[i:i + len(x)] = self.model(pixel_values=x).pooler_output.double().cpu().numpy()
        return out

    __call__ = extract


def write_random_dinov2(folder: str | os.PathLike, seed: int = 0, hidden_size: int = 32, layers: int = 2,
                        heads: int = 2, patch_size: int = 14) -> Path:
    """A tiny DINOv2 folder with random weights in the Hugging Face layout (for tests only)."""
    transformers = _transformers()
    config = transformers.Dinov2Config(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                                       intermediate_size=2 * hidden_size, patch_size=patch_size,
                                       image_size=INPUT_SIZE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Dinov2Model(config)
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder
