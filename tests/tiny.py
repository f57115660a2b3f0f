"""Tiny DiTs with random (non-zero) weights, shared by the tests: adaLN-Zero would make every output zero."""
import torch

from efdit.models.dit import DiT

TINY = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=4)


def randomize(model, seed: int = 1, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def tiny_model(seed: int = 1, **kw) -> DiT:
    return randomize(DiT(**{**TINY, **kw}), seed)


def trained_digits_base(run_dir, total_images: int):
    """A superclass-conditioned digits-tiny base trained for `total_images` images (seconds): its model file."""
    from efdit.config import build_config
    from efdit.engine.train import train
    train(build_config("digits-tiny", {"run_dir": str(run_dir), "total_images": total_images, "condition_on": "super",
                                       "threads": 1}), progress=False)
    return run_dir / "model.safetensors"
