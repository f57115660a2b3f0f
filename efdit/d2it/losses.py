"""The DVAE's perceptual and adversarial training terms (the VQGAN / LDM autoencoder objective), and the
reconstruction measures PSNR and SSIM.

Perceptual distance (LPIPS-style, on the frozen EfficientNet-Lite0 that efdit ships for FD-EffNetLite0):
    f_l(x)   activations (N, C_l, H_l, W_l) after MBConv block b_l, l = 1..L (default blocks 0, 2, 4, 10, 15:
             the last block at each resolution, 1/2 ... 1/32 of the input)
    f̂_l      = f_l / ‖f_l‖₂ over the channels, at every position (unit-normalised activations)
    d(x, y)  = Σ_l 1/(H_l W_l) Σ_{h,w} Σ_c w_{l,c} (f̂_l(x) − f̂_l(y))²_{c,h,w}
The channel weights are uniform, w_{l,c} = 1 (LPIPS's "lin"-free baseline): learned weights need human
similarity judgements (LPIPS fits them on BAPPS), which do not exist here, and fitting them to the DVAE's own
objective would only shrink them. Each depth contributes at most 4 (two unit vectors), so d ∈ [0, 4L].
d is invariant to a positive rescaling of the feature vector at any position (of either input), not to the
scale of one channel relative to the others. The network is frozen (eval, no parameter gradients);
gradients flow to the inputs.

Patch discriminator (PatchGAN, pix2pix / taming-transformers' NLayerDiscriminator): 4x4 convolutions, n
stride-2 layers with LeakyReLU(0.2) (BatchNorm after all but the first), one stride-1 layer, then a 1-channel
stride-1 conv: a map of real/fake logits, one per receptive field.
    L_D = ½·(mean relu(1 − D(x)) + mean relu(1 + D(x̂)))            (hinge)
    L_G = −mean D(x̂)
    λ   = clamp(‖∇_w L_rec‖ / (‖∇_w L_G‖ + 1e-4), 0, λ_max) · disc_weight      (w: the decoder's last layer)
    L   = L_rec + β·KL + f(step)·λ·L_G,   L_rec = L1 + perceptual_weight·d,   f = 1[step ≥ disc_start]
Before `disc_start` neither the adversarial term nor the discriminator is computed.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..metrics.features import fuse_batchnorm, load_effnet_lite0, resize

PERCEPTUAL_BLOCKS = (0, 2, 4, 10, 15)   # EfficientNet-Lite0 MBConv blocks ending each resolution (1/2 .. 1/32)


# ---- perceptual distance ------------------------------------------------------------------------------------
def unit_normalize(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """f (N, C, H, W) -> f / ‖f‖₂ over C at every (n, h, w). eps under the root keeps the gradient finite at 0."""
    return f * torch.rsqrt(f.pow(2).sum(1, keepdim=True) + eps)


def feature_distance(feats_a: list[torch.Tensor], feats_b: list[torch.Tensor],
                     weights: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Σ_l mean_{h,w} Σ_c w_{l,c} (f̂_l(a) − f̂_l(b))² over matching lists of (N, C_l, H_l, W_l) -> (N,).
    weights: per-channel weights (C_l,) per depth; None = uniform (1)."""
    total = 0.0
    for i, (fa, fb) in enumerate(zip(feats_a, feats_b, strict=True)):
        sq = (unit_normalize(fa) - unit_normalize(fb)).pow(2)            # (N, C, H, W)
        if weights is not None:
            sq = sq * weights[i].view(1, -1, 1, 1)
        total = total + sq.sum(1).mean((1, 2))                            # (N,)
    return total


class PerceptualLoss(nn.Module):
    """d(x, y) of the module docstring on frozen EfficientNet-Lite0 features, uniform channel weights.

    Inputs in the DVAE's range [-1, 1], (N, 1 or 3, H, W): mapped to [0, 1], grey repeated to RGB, resized
    bilinearly to `resolution` (the network's features at 32 px are 1x1 by the last tap; 64 px gives 2x2).
    """

    def __init__(self, blocks: tuple[int, ...] = PERCEPTUAL_BLOCKS, resolution: int = 64, net=None,
                 weights_path: str | None = None):
        super().__init__()
        net = net if net is not None else load_effnet_lite0(weights_path)
        if not blocks or list(blocks) != sorted(set(blocks)) or blocks[0] < 0 or blocks[-1] >= len(net._blocks):
            raise ValueError(f"perceptual blocks must be increasing indices in [0, {len(net._blocks)}), got {blocks}")
        self.blocks, self.resolution = tuple(blocks), resolution
        self.net = fuse_batchnorm(net).requires_grad_(False).eval()     # BN folded: same features, no statistics

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()                                                  # frozen: always inference mode
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (N, C, H, W) in [-1, 1] -> activations after each tapped block, [(N, C_l, H_l, W_l)]."""
        x = (x + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = resize(x, self.resolution)
        net = self.net
        h = (x * 255.0 - 127.0) / 128.0                                  # the Lite models' input normalisation
        h = F.relu6(net._bn0(net._conv_stem(h)))
        out = []
        for i, block in enumerate(net._blocks[:self.blocks[-1] + 1]):
            h = block(h)
            if i in self.blocks:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample distance (N,) between x and y (N, C, H, W) in [-1, 1]."""
        return feature_distance(self.features(x), self.features(y))


# ---- patch discriminator and its losses -----------------------------------------------------------------------
class PatchDiscriminator(nn.Module):
    """PatchGAN: (N, C, H, W) -> logits (N, 1, h, w).

    Channels ndf·min(2^i, 8). Receptive field at the output: 16, 34, 70 px for n_layers = 1, 2, 3.
    Output size for H = 32: n_layers 1 -> 14, 2 -> 6, 3 -> 2.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"the discriminator needs at least one stride-2 layer, got n_layers={n_layers}")
        mult = [min(2 ** i, 8) for i in range(n_layers + 1)]
        layers = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, n_layers + 1):
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(channels * mult[i - 1], channels * mult[i], 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(channels * mult[i]), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(channels * mult[n_layers], 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():                                         # the pix2pix / taming initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """L_D = ½·(mean relu(1 − D(x)) + mean relu(1 + D(x̂)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """L_G = −mean D(x̂)."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """λ = clamp(‖∇_w L_rec‖ / (‖∇_w L_G‖ + eps), 0, max_weight), w = last_layer; detached (a constant).
    Both graphs are kept for the backward pass that follows."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + eps)).clamp(0.0, max_weight).detach()


def adversarial_factor(step: int, disc_start: int) -> float:
    """f(step) = 1 from `disc_start` on (steps counted from 0), 0 during the warm-up."""
    return 1.0 if step >= disc_start else 0.0


class DVAELoss(nn.Module):
    """The DVAE objective with optional perceptual and adversarial terms (module docstring); owns the
    perceptual network and the discriminator. The caller steps the DVAE on `generator_terms(...)["loss"]` and
    then the discriminator on `discriminator_terms(...)["loss"]` (its own optimizer), alternating."""

    def __init__(self, in_channels: int, kl_weight: float = 1e-6, perceptual_weight: float = 0.0,
                 disc_weight: float = 0.0, disc_start: int = 0, disc_channels: int = 64, disc_layers: int = 3,
                 disc_weight_max: float = 1e4, perceptual: PerceptualLoss | None = None):
        super().__init__()
        self.kl_weight, self.perceptual_weight = kl_weight, perceptual_weight
        self.disc_weight, self.disc_start, self.disc_weight_max = disc_weight, disc_start, disc_weight_max
        self.perceptual = (perceptual if perceptual is not None else PerceptualLoss()) if perceptual_weight else None
        self.discriminator = PatchDiscriminator(in_channels, disc_channels, disc_layers) if disc_weight else None

    def adversarial(self, step: int) -> bool:
        return self.discriminator is not None and adversarial_factor(step, self.disc_start) > 0

    def generator_terms(self, x: torch.Tensor, rec: torch.Tensor, kl: torch.Tensor, step: int,
                        last_layer: torch.Tensor | None = None) -> dict:
        """x, rec (N, C, H, W) in [-1, 1]; kl (N,) summed per image; step counted from 0 -> terms, "loss" scalar.
        last_layer: the decoder's last weight (for λ), needed from `disc_start` on."""
        l1 = (rec - x).abs().mean()
        kl = kl.mean() / x[0].numel()
        terms = {"l1": l1, "kl": kl}
        rec_loss = l1
        if self.perceptual is not None:
            p = self.perceptual(rec, x).mean()
            rec_loss = rec_loss + self.perceptual_weight * p
            terms["perceptual"] = p
        loss = rec_loss + self.kl_weight * kl
        if self.adversarial(step):
            g = generator_loss(self.discriminator(rec))
            # L_rec and L_G reach the DVAE only through x̂: their gradients at x̂ are taken once (one backward
            # through the perceptual network and the discriminator), give ∇_w at the last layer by the chain
            # rule, and the DVAE's backward runs on the surrogate Σ x̂·(∂L_rec/∂x̂ + f·λ·∂L_G/∂x̂) + β·KL, whose
            # gradient is that of L_rec + f·λ·L_G + β·KL (its value is set to the loss itself). The
            # discriminator is not in the surrogate's graph: the DVAE step gives it no gradient.
            grad_rec, = torch.autograd.grad(rec_loss, rec)
            grad_adv, = torch.autograd.grad(g, rec)
            w_rec, = torch.autograd.grad(rec, last_layer, grad_rec, retain_graph=True)
            w_adv, = torch.autograd.grad(rec, last_layer, grad_adv, retain_graph=True)
            lam = (w_rec.norm() / (w_adv.norm() + 1e-4)).clamp(0.0, self.disc_weight_max) * self.disc_weight
            f = adversarial_factor(step, self.disc_start)
            surrogate = (rec * (grad_rec + f * lam * grad_adv)).sum() + self.kl_weight * kl
            loss = surrogate + (loss + f * lam * g - surrogate).detach()
            terms.update(g_loss=g.detach(), disc_lambda=lam)
        terms["loss"] = loss
        return terms

    def discriminator_terms(self, x: torch.Tensor, rec: torch.Tensor, step: int) -> dict | None:
        """Hinge loss of the discriminator on real x and detached rec; None during the warm-up."""
        if not self.adversarial(step):
            return None
        real, fake = self.discriminator(x.detach()), self.discriminator(rec.detach())
        return {"loss": hinge_d_loss(real, fake), "logits_real": real.detach().mean(),
                "logits_fake": fake.detach().mean()}


# ---- reconstruction measures ----------------------------------------------------------------------------------
def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, 10·log10(range² / mean (x − y)²), of (N, C, H, W) -> (N,)."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-20))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian (size,), float64."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) with a Gaussian window, 'valid' filtering, averaged over positions and
    channels, (N, C, H, W) -> (N,):
        SSIM = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)),  C_i = (k_i · range)²
    with μ, σ², σxy the window-weighted local means, variances and covariance."""
    x, y = x.double(), y.double()
    C = x.shape[1]
    g = gaussian_window(size, sigma)
    wx = g.view(1, 1, 1, size).repeat(C, 1, 1, 1)
    wy = g.view(1, 1, size, 1).repeat(C, 1, 1, 1)

    def blur(t):                                                         # separable, per channel, valid
        return F.conv2d(F.conv2d(t, wx, groups=C), wy, groups=C)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def receptive_field(n_layers: int) -> int:
    """The PatchDiscriminator's receptive field in pixels: 4x4 kernels, n stride-2 layers then 2 stride-1."""
    rf = 1
    for stride in [1, 1] + [2] * n_layers:                               # from the output back to the input
        rf = (rf - 1) * stride + 4
    return rf
