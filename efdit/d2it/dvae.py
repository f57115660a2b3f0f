"""DVAE: D²iT's Dynamic VAE with two grains (fine factor f1, coarse f2 = 2·f1) and a KL bottleneck.

    image x (N, C, H, W)
      └─ E1 (conv stem + log2(f1) downsamplings)  -> h1 (N, c1, H/f1, W/f1) ─ fine head   -> (μ1, logσ²1) (N, 2z, H/f1, W/f1)
           └─ E2 (one more downsampling)           -> h2 (N, c2, H/f2, W/f2) ─ coarse head -> (μ2, logσ²2) (N, 2z, H/f2, W/f2)
    Dynamic Grained Coding with the entropy grain map M (N, H/f2, W/f2), 1 = fine:
      z1 ~ N(μ1, σ1²), z2 ~ N(μ2, σ2²)   (each branch is sampled BEFORE copying: the 4 copies of a coarse code agree)
      Z_d = where(M_up == fine, z1, nearest_up2(z2))                      (neighbour copying, dense (N, z, H/f1, W/f1))
    (`full_res_blocks` res blocks at the image resolution in E1 and the decoder's last stage: 0 on CPU.)
    Decoder: conv_in(Z_d) + learned 2-D position embedding + grain-type embedding of M_up
             -> res blocks -> log2(f1) upsamplings -> image.

Loss: L1(x̂, x) + β·KL, the KL summed over the codes actually used (a coarse code once, a fine cell once) and
divided by the number of pixels (`DVAE.loss`). The perceptual and adversarial terms of the VQGAN / LDM
objective live in `losses.py` (`DVAELoss`; λ is taken at `last_layer()`, the decoder's output conv). The branch
not selected by M gets no gradient at all (torch.where), so with r_fine = 0 only E1 + E2 + the coarse head
train, with r_fine = 1 only E1 + the fine head.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .grains import upsample_map


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, ch), ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Head(nn.Module):
    """A branch's bottleneck: res block -> norm -> SiLU -> 3x3 conv to (μ, log σ²)."""

    def __init__(self, c_in: int, z_channels: int, groups: int):
        super().__init__()
        self.res = ResBlock(c_in, c_in, groups)
        self.norm = _norm(c_in, groups)
        self.out = nn.Conv2d(c_in, 2 * z_channels, 3, padding=1)

    def forward(self, h):
        return self.out(F.silu(self.norm(self.res(h))))


def _stage(c_in: int, c_out: int, n_res: int, groups: int, down: bool) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_in, 3, stride=2, padding=1)] if down else []
    layers += [ResBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n_res)]
    if n_res == 0 and c_in != c_out:
        layers.append(nn.Conv2d(c_in, c_out, 1))
    return nn.Sequential(*layers)


class HierarchicalEncoder(nn.Module):
    """E1 (to the fine grid) then E2 (one more stride-2 stage, to the coarse grid); both heads."""

    def __init__(self, in_channels: int, f1: int, z_channels: int, ch: int, ch_mult: tuple[int, ...],
                 num_res_blocks: int, groups: int, full_res_blocks: int = 0):
        super().__init__()
        n_down = int(math.log2(f1))
        if len(ch_mult) != n_down + 1:
            raise ValueError(f"ch_mult needs log2(f1) + 1 = {n_down + 1} entries, got {ch_mult}")
        chans = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        e1, c = [], ch
        for i, co in enumerate(chans):
            e1.append(_stage(c, co, num_res_blocks if i else full_res_blocks, groups, down=i > 0))
            c = co
        self.E1 = nn.Sequential(*e1)
        self.E2 = _stage(c, 2 * c, num_res_blocks, groups, down=True)
        self.fine_head = Head(c, z_channels, groups)
        self.coarse_head = Head(2 * c, z_channels, groups)

    def forward(self, x):
        h1 = self.E1(self.conv_in(x))      # (N, c, H/f1, W/f1)
        h2 = self.E2(h1)                   # (N, 2c, H/f2, W/f2)
        return self.fine_head(h1), self.coarse_head(h2)


class Decoder(nn.Module):
    """Dense latent (N, z, H/f1, W/f1) + grain map -> image; position embeddings let the 4 copies of a coarse
    code decode to different pixels."""

    def __init__(self, out_channels: int, f1: int, z_channels: int, ch: int, ch_mult: tuple[int, ...],
                 num_res_blocks: int, groups: int, latent_size: tuple[int, int], full_res_blocks: int = 0):
        super().__init__()
        chans = [ch * m for m in ch_mult][::-1]           # deepest first
        c = chans[0]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.pos_embed = nn.Parameter(torch.zeros(1, c, *latent_size))
        self.grain_embed = nn.Parameter(torch.zeros(2, c))
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.grain_embed, std=0.02)
        self.mid = nn.Sequential(*[ResBlock(c, c, groups) for _ in range(num_res_blocks + 1)])
        ups = []
        for j, co in enumerate(chans[1:]):
            n = full_res_blocks if j == len(chans) - 2 else num_res_blocks
            ups.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, co, 3, padding=1),
                                     *[ResBlock(co, co, groups) for _ in range(n)]))
            c = co
        self.ups = nn.Sequential(*ups)
        self.norm_out = _norm(c, groups)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z, grain):
        # z: (N, z, h1, w1); grain: (N, h2, w2) int (1 = fine)
        m = upsample_map(grain, z.shape[-1] // grain.shape[-1])[:, 0]        # (N, h1, w1)
        g = self.grain_embed[m].permute(0, 3, 1, 2)                            # (N, c, h1, w1)
        h = self.conv_in(z) + self.pos_embed + g
        h = self.ups(self.mid(h))
        return self.conv_out(F.silu(self.norm_out(h)))


class DVAE(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int = 32, f1: int = 2, z_channels: int = 4, ch: int = 64,
                 ch_mult: tuple[int, ...] = (1, 2), num_res_blocks: int = 1, groups: int = 8,
                 full_res_blocks: int = 0):
        super().__init__()
        self.in_channels, self.image_size, self.f1, self.f2 = in_channels, image_size, f1, 2 * f1
        self.z_channels = z_channels
        self.encoder = HierarchicalEncoder(in_channels, f1, z_channels, ch, ch_mult, num_res_blocks, groups,
                                          full_res_blocks)
        self.decoder = Decoder(in_channels, f1, z_channels, ch, ch_mult, num_res_blocks, groups,
                               (image_size // f1, image_size // f1), full_res_blocks)
        self.register_buffer("scale_factor", torch.ones(()))   # set from data after training (1 / std of Z_d)

    @staticmethod
    def _sample(moments, generator=None, sample=True):
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        if not sample:
            return mean, mean, logvar
        eps = torch.randn(mean.shape, generator=generator, device=mean.device)
        return mean + torch.exp(0.5 * logvar) * eps, mean, logvar

    def encode(self, x, grain, sample: bool = True, generator=None):
        """x (N, C, H, W) in [-1, 1], grain (N, H/f2, W/f2) -> dense Z_d (N, z, H/f1, W/f1), KL per image (N,)."""
        fine, coarse = self.encoder(x)
        z1, m1, lv1 = self._sample(fine, generator, sample)      # (N, z, H/f1, W/f1)
        z2, m2, lv2 = self._sample(coarse, generator, sample)    # (N, z, H/f2, W/f2)
        up = upsample_map(grain, 2).bool()                       # (N, 1, H/f1, W/f1)
        z = torch.where(up, z1, z2.repeat_interleave(2, 2).repeat_interleave(2, 3))   # neighbour copying
        kl1 = 0.5 * (m1 ** 2 + lv1.exp() - 1 - lv1)             # per fine cell
        kl2 = 0.5 * (m2 ** 2 + lv2.exp() - 1 - lv2)             # per coarse code
        fine_m = grain[:, None].bool()
        kl = (torch.where(up, kl1, torch.zeros_like(kl1)).sum((1, 2, 3))
              + torch.where(fine_m, torch.zeros_like(kl2), kl2).sum((1, 2, 3)))
        return z, kl

    def decode(self, z, grain):
        return self.decoder(z, grain)

    def forward(self, x, grain, generator=None):
        z, kl = self.encode(x, grain, sample=True, generator=generator)
        return self.decode(z, grain), kl

    def last_layer(self) -> nn.Parameter:
        """The decoder's last weight (conv_out), where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def loss(self, x, grain, kl_weight: float = 1e-6, generator=None) -> dict:
        rec, kl = self(x, grain, generator)
        l1 = (rec - x).abs().mean()
        kl = kl.mean() / x[0].numel()
        return {"loss": l1 + kl_weight * kl, "l1": l1, "kl": kl}


def build_dvae(cfg, in_channels: int) -> DVAE:
    d = cfg.dvae
    return DVAE(in_channels=in_channels, image_size=cfg.data.image_size, f1=d.f1, z_channels=d.z_channels,
                ch=d.ch, ch_mult=tuple(int(v) for v in d.ch_mult.split(",")), num_res_blocks=d.num_res_blocks,
                groups=d.groups, full_res_blocks=d.full_res_blocks)


def project_multigrain(x: torch.Tensor, grain: torch.Tensor) -> torch.Tensor:
    """P_M: make every coarse region constant over its 2x2 cells (their mean); fine cells unchanged."""
    coarse = F.avg_pool2d(x, 2).repeat_interleave(2, 2).repeat_interleave(2, 3)
    return torch.where(upsample_map(grain, 2).bool(), x, coarse)
