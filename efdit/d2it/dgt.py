"""Dynamic Grain Transformer (DGT): a class-conditional DiT that generates grain maps.

Diffusion on the grain map with an x0-classification head (spec §2.2): x0 = 2M − 1 ∈ {−1, 1}^(h x w),
x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε; an efdit DiT (patch 1 on the region grid, learned position embedding,
adaLN-Zero on t + class) outputs logits (ℓ_coarse, ℓ_fine) per region, trained with cross-entropy against M.
Sampling: DDIM (η = 0) with x̂0 = p_fine − p_coarse = tanh((ℓ_fine − ℓ_coarse)/2), ε̂ from x̂0, CFG on the logits
(ℓ = ℓ_∅ + s·(ℓ_c − ℓ_∅)), M̂ = argmax of the last step's logits. Diversity comes from x_T.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..diffusion import create_diffusion
from ..models.dit import DiT, FinalLayer


class DynamicGrainTransformer(nn.Module):
    def __init__(self, grid_size: int = 8, hidden_size: int = 128, depth: int = 4, num_heads: int = 4,
                 num_classes: int = 10, class_dropout_prob: float = 0.1):
        super().__init__()
        self.dit = DiT(input_size=grid_size, patch_size=1, in_channels=1, hidden_size=hidden_size, depth=depth,
                       num_heads=num_heads, num_classes=num_classes, class_dropout_prob=class_dropout_prob,
                       learn_sigma=False, pos_embed="learned")
        self.dit.out_channels = 2                              # 2 logits per region instead of ε
        self.dit.final_layer = FinalLayer(hidden_size, 1, 2)
        for layer in (self.dit.final_layer.adaLN_modulation[-1], self.dit.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.grid_size = grid_size

    @property
    def y_embedder(self):
        return self.dit.y_embedder

    def forward(self, x_t, t, y):
        """x_t (N, 1, h, w), t (N,), y (N,) -> logits (N, 2, h, w) (channel 0 coarse, 1 fine)."""
        return self.dit(x_t, t, y)


def grain_loss(model, diffusion, grain, y, t, generator=None) -> torch.Tensor:
    """Cross-entropy of the predicted grain map at a random noise level. grain (N, h, w) in {0, 1}."""
    x0 = (2 * grain - 1).float()[:, None]                                # (N, 1, h, w)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    x_t = diffusion.q_sample(x0, t, noise)
    logits = model(x_t, t, y)
    return F.cross_entropy(logits, grain)


@torch.no_grad()
def sample_grains(model, labels, steps: int = 50, cfg_scale: float = 1.0, schedule: str = "cosine",
                  generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Grain maps (N, h, w) in {0, 1} for labels (N,), by DDIM on the ±1 map with the x0 head."""
    diffusion = create_diffusion(f"ddim{steps}", noise_schedule=schedule, learn_sigma=False, loss="mse")
    N, g = labels.shape[0], model.grid_size
    dev = labels.device
    x = torch.randn((N, 1, g, g), generator=generator, device=dev)
    logits = None
    for i in tqdm(range(diffusion.num_timesteps)[::-1], desc="grain maps", disable=not progress, leave=False):
        t_idx = torch.full((N,), i, device=dev, dtype=torch.long)
        t = diffusion.timestep_map.to(dev)[t_idx]
        if cfg_scale != 1.0:
            out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, model.y_embedder.null_labels(labels)]))
            cond, null = out.chunk(2)
            logits = null + cfg_scale * (cond - null)
        else:
            logits = model(x, t, labels)
        x0 = torch.tanh((logits[:, 1:2] - logits[:, 0:1]) / 2)             # p_fine − p_coarse
        eps = diffusion.eps_from_x0(x, t_idx, x0)
        ab_prev = float(diffusion.alphas_cumprod_prev[i])
        x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
    return logits.argmax(1)


def build_dgt(cfg, num_classes: int) -> DynamicGrainTransformer:
    d = cfg.dgt
    return DynamicGrainTransformer(grid_size=cfg.data.image_size // cfg.f2, hidden_size=d.hidden_size,
                                   depth=d.depth, num_heads=d.num_heads, num_classes=num_classes,
                                   class_dropout_prob=d.class_dropout_prob)
