"""HRIG: super-resolution in the perceptual denoising stage, as a sampler hook (efdit.md §2.3).

At every sampling step whose SNR lies in the perceptual band (P2's content stage, 1e-2 ≤ SNR < 1, which is
t ∈ [259, 673] of DiT's 1000-step linear schedule; stored as SNR so other schedules and respacings work):

    y = D(E(x̂0))   E: bicubic ×r (optionally + a `LatentRefiner`); D: Gaussian blur (σ ≈ 0.5·r high-res px),
                    then area / bicubic ↓r back to H×W
    y = E(x̂0, SNR) with a `DetailRefiner`: the learned E trained on the model's own predictions (below)
    x̂0_new = x̂0 + λ · Re IFFT2( M_hp ⊙ (FFT2(y) − FFT2(x̂0)) )          (FFT fusion, gain λ)

Low frequencies (M_hp(0) = 0) always come from the model, the high band is moved towards y by λ. The sampler
then recomputes ε from x̂0_new and continues (DDPM posterior mean with the model's variance, or DDIM).
λ = 0 returns the state untouched (bit-identical samples). Works on any (N, C, H, W) x̂0: pixels or latents,
non-square and odd H, W. With a bicubic-only E, D∘E is a linear low-pass filter, so λ > 0 *softens* the high
band and λ < 0 sharpens (unsharp masking with D∘E as the blur).

The learned E. What the fusion adds is HP(y − x̂0), so E is useful exactly where y has detail x̂0 lacks. A refiner
trained to invert bicubic∘D on clean images (`train_refiner`) does not do that: applied as D(E(x̂0)) with the same
D, it reproduces x̂0 (D∘E ≈ identity on its own outputs), so the better it is trained the smaller the
correction. `train_detail_refiner` instead trains E on pairs (x̂0(x_t), x0) drawn at SNRs inside the band, the
DiT frozen: x_t = sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·ε, x̂0 the model's prediction there, x0 the real image; the fusion
target is then y = E(x̂0), the composite D∘E learned as one map onto x̂0's grid. Its loss pairs a pixel MSE with
a radially averaged amplitude term on the fusion's high band (`fit_detail_refiner`): MSE alone would learn
E[x0 | x̂0] ≈ x̂0, the posterior mean, which lacks the detail by construction.

Guidance: the hook sees the guided x̂0. With a linear E (bicubic) the fusion is linear and guidance is an
affine combination with weights summing to 1, so fusing the guided x̂0 equals fusing both CFG halves.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..schedule import get_betas
from . import SamplerHook, SamplerState

MASKS = ("hard", "gaussian", "butterworth", "allpass", "allstop")
DOWNSAMPLERS = ("area", "bicubic")
DEFAULT_SNR_BAND = (1e-2, 1.0)  # P2 content stage: 1e-2 ≤ SNR < 1  <=>  t ∈ [259, 673] (linear, T = 1000)


# ---------------------------------------------------------------------------------------------------
# FFT fusion
# ---------------------------------------------------------------------------------------------------
def radial_mask(H: int, W: int, kind: str = "gaussian", cutoff: float = 0.25, order: int = 2,
                device=None) -> torch.Tensor:
    """High-pass mask M_hp (H, W) in the unshifted `fft2` layout, float32.

    ρ = 2·sqrt(fy² + fx²) with fy = fftfreq(H), fx = fftfreq(W): the radial frequency normalised to Nyquist
    (1 at either axis's Nyquist, √2 in the corners). hard: 1[ρ > ρc]; gaussian: 1 − exp(−ρ²/(2ρc²));
    butterworth: 1/(1 + (ρc/ρ)^{2n}) (0 at ρ = 0); allpass: 1; allstop: 0 (test / ablation masks).
    """
    if kind not in MASKS:
        raise ValueError(f"mask must be one of {', '.join(MASKS)}, not {kind!r}")
    if kind in ("gaussian", "butterworth") and cutoff <= 0:
        raise ValueError(f"the {kind} mask needs cutoff > 0, got {cutoff}")
    fy = torch.fft.fftfreq(H, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(W, dtype=torch.float64)[None, :]
    rho = 2.0 * torch.sqrt(fy ** 2 + fx ** 2)  # (H, W)
    return mask_of_rho(rho, kind, cutoff, order).to(device=device, dtype=torch.float32)


def mask_of_rho(rho: torch.Tensor, kind: str = "gaussian", cutoff: float = 0.25, order: int = 2) -> torch.Tensor:
    """The mask's value at radial frequencies ρ (any shape, float64); `radial_mask` evaluates it on the grid.
    The butterworth form is ρ^{2n}/(ρ^{2n} + ρc^{2n}), so ρ = 0 gives 0 without dividing by 0."""
    if kind == "allpass":
        return torch.ones_like(rho)
    if kind == "allstop":
        return torch.zeros_like(rho)
    if kind == "hard":
        return (rho > cutoff).to(rho.dtype)
    if kind == "gaussian":
        return 1.0 - torch.exp(-rho ** 2 / (2.0 * cutoff ** 2))
    return rho ** (2 * order) / (rho ** (2 * order) + cutoff ** (2 * order))


def fft_fuse(x0: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, gain: float) -> torch.Tensor:
    """x̂0 + λ·Re IFFT2(M ⊙ (FFT2(y) − FFT2(x̂0))) over the last two dims, per batch element and channel.

    x0, y: (..., H, W); mask: (H, W) in the unshifted layout, symmetric (M(−f) = M(f), as every radial mask
    is), so the real-input transform `rfft2` with the mask's first W//2+1 columns gives the same result at
    half the cost. Computed in float32 and cast back to x0's dtype. An all-zero mask returns x0 exactly.
    """
    if y.shape != x0.shape:
        raise ValueError(f"fft_fuse: y {tuple(y.shape)} and x0 {tuple(x0.shape)} differ in shape")
    H, W = x0.shape[-2:]
    if tuple(mask.shape) != (H, W):
        raise ValueError(f"fft_fuse: mask {tuple(mask.shape)} does not match the {H}x{W} grid")
    x = x0.float()
    diff = torch.fft.rfft2(y.float() - x)  # FFT2(y) − FFT2(x̂0), by linearity: (..., H, W//2+1)
    delta = torch.fft.irfft2(diff * mask[:, : W // 2 + 1].to(x.device, torch.float32), s=(H, W))
    return (x + gain * delta).to(x0.dtype)


# ---------------------------------------------------------------------------------------------------
# Enhancement E and degradation D
# ---------------------------------------------------------------------------------------------------
def enhance_bicubic(x: torch.Tensor, r: float = 2.0, size: tuple[int, int] | None = None) -> torch.Tensor:
    """E without learning: bicubic ×r, (N, C, H, W) -> (N, C, round(r·H), round(r·W)) (or `size`), float32."""
    H, W = x.shape[-2:]
    size = size or (round(r * H), round(r * W))
    return F.interpolate(x.float(), size=tuple(size), mode="bicubic", align_corners=False)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (radius ⌈3σ⌉, reflect padding; replicate where the grid is too small)."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3.0 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-taps ** 2 / (2.0 * sigma ** 2))
    k = (k / k.sum()).to(x.device, x.dtype)
    C, (H, W) = x.shape[1], x.shape[-2:]
    mode = "reflect" if radius < min(H, W) else "replicate"
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode), k.view(1, 1, -1, 1).repeat(C, 1, 1, 1), groups=C)
    return F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode), k.view(1, 1, 1, -1).repeat(C, 1, 1, 1), groups=C)


def degrade(y: torch.Tensor, size: tuple[int, int], sigma: float = 1.0, down: str = "area", noise: float = 0.0,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """D: anti-aliased downsampling of a high-res (N, C, rH, rW) tensor back to `size` = (H, W).

    Gaussian blur σ (in high-res pixels), then area (adaptive average) or bicubic resampling; optionally
    + noise·N(0, 1) (a Real-ESRGAN-style degradation term).
    """
    if down not in DOWNSAMPLERS:
        raise ValueError(f"down must be one of {', '.join(DOWNSAMPLERS)}, not {down!r}")
    y = gaussian_blur(y.float(), sigma)
    size = (int(size[0]), int(size[1]))
    y = F.adaptive_avg_pool2d(y, size) if down == "area" else \
        F.interpolate(y, size=size, mode="bicubic", align_corners=False)
    if noise > 0:
        y = y + noise * torch.randn(y.shape, generator=generator, device=y.device)
    return y


def _conv_stack(c_in: int, c_out: int, hidden: int, depth: int) -> list[nn.Module]:
    """3×3 convs (replicate padding) c_in -> hidden -> … -> c_out with SiLU between; the last conv zero-initialised."""
    if depth < 2:
        raise ValueError(f"a refiner needs depth ≥ 2, got {depth}")
    conv = lambda i, o: nn.Conv2d(i, o, 3, padding=1, padding_mode="replicate")  # noqa: E731
    layers: list[nn.Module] = [conv(c_in, hidden), nn.SiLU()]
    for _ in range(depth - 2):
        layers += [conv(hidden, hidden), nn.SiLU()]
    last = conv(hidden, c_out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return layers + [last]


class Refiner(nn.Module):
    """Base of the learned parts of E: a safetensors file format shared by every kind (`kind` in its metadata)."""

    kind = ""
    config: dict

    def save(self, path) -> None:
        """Safetensors file with the kind and the constructor arguments in its metadata (atomic write)."""
        import json
        import os

        from safetensors.torch import save_file
        tmp = f"{path}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, tmp,
                  metadata={"format": "efdit-hrig-refiner", "kind": self.kind, "config": json.dumps(self.config)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, map_location="cpu") -> "Refiner":
        """The refiner a file holds, of whatever kind it is (files without a kind hold a `LatentRefiner`)."""
        import json

        from safetensors import safe_open
        from safetensors.torch import load_file
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") != "efdit-hrig-refiner":
                raise ValueError("not an efdit HRIG refiner file")
            kinds = {k.kind: k for k in (LatentRefiner, DetailRefiner)}
            kind = meta.get("kind") or LatentRefiner.kind
            if kind not in kinds:
                raise ValueError(f"unknown refiner kind {kind!r}")
            model = kinds[kind](**json.loads(meta["config"]))
            model.load_state_dict(load_file(str(path), device=str(map_location)))
        except FileNotFoundError:
            raise ValueError(f"HRIG refiner file not found: {path}") from None
        except Exception as e:  # corrupt file, wrong format, wrong shapes
            raise ValueError(f"cannot load HRIG refiner {path}: {e}") from None
        return model.eval()


def load_refiner(path, map_location="cpu") -> Refiner:
    """A saved refiner of any kind (`LatentRefiner` or `DetailRefiner`), in eval mode."""
    return Refiner.load(path, map_location)


class LatentRefiner(Refiner):
    """Learned ×r part of E trained self-supervised on clean data (`train_refiner`): E(x) = up + f(up), up =
    bicubic ×r of x; f a small conv net, last conv zero-initialised (an untrained refiner is exactly the bicubic
    E). Works on pixels or latents with `channels` channels; the fusion target is y = D(E(x̂0))."""

    kind = "sr"

    def __init__(self, channels: int, hidden: int = 32, depth: int = 3):
        super().__init__()
        self.config = dict(channels=channels, hidden=hidden, depth=depth)
        self.net = nn.Sequential(*_conv_stack(channels, channels, hidden, depth))

    def forward(self, up: torch.Tensor) -> torch.Tensor:
        return up + self.net(up)


def snr_code(snr, n: int, device=None) -> torch.Tensor:
    """c = ln(SNR)/4 as an (n, 1) float32 column (0 at SNR 1, −1.15 at SNR 1e-2); `snr` a float or (n,)."""
    s = torch.as_tensor(snr, dtype=torch.float32, device=device).flatten()
    if s.numel() == 1:
        s = s.expand(n)
    if s.numel() != n:
        raise ValueError(f"got {s.numel()} SNR values for {n} images")
    return (torch.log(s.clamp_min(1e-20)) / 4.0)[:, None]


class DetailRefiner(Refiner):
    """Learned E trained on the model's own predictions (`train_detail_refiner`), on x̂0's own grid:

        E(x̂0, SNR) = x̂0 + f(x̂0; SNR),    h₁ = SiLU(conv(x̂0)·(1 + s(c)) + b(c)),  c = ln(SNR)/4

    f: a conv net whose first hidden layer is scaled and shifted per channel by an MLP of the SNR code c (the
    missing detail grows as SNR falls through the band); last conv zero-initialised, so an untrained refiner is
    the identity and the fusion adds nothing. Trained so that E(x̂0) has the high band of the real x0, it plays
    the part of the composite D∘E (enhance, then degrade back to x̂0's grid): the fusion target is y = E(x̂0).
    """

    kind = "detail"

    def __init__(self, channels: int, hidden: int = 32, depth: int = 3):
        super().__init__()
        self.config = dict(channels=channels, hidden=hidden, depth=depth)
        layers = _conv_stack(channels, channels, hidden, depth)
        self.first, self.rest = layers[0], nn.Sequential(*layers[1:])
        self.snr_mlp = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x0: torch.Tensor, snr) -> torch.Tensor:
        """x0 (N, C, H, W), snr float or (N,) -> E(x̂0) (N, C, H, W)."""
        s, b = self.snr_mlp(snr_code(snr, x0.shape[0], x0.device).to(x0.dtype)).chunk(2, dim=1)  # (N, hidden) each
        h = self.first(x0) * (1 + s[:, :, None, None]) + b[:, :, None, None]
        return x0 + self.rest(h)


def train_refiner(images: torch.Tensor, *, r: float = 2.0, sigma: float | None = None, down: str = "area",
                  hidden: int = 32, depth: int = 3, steps: int = 300, batch_size: int = 16, lr: float = 1e-3,
                  flips: bool = True, seed: int = 0) -> tuple[LatentRefiner, list[float]]:
    """Self-supervised ×r refiner on clean data (the DiT is not involved): the baseline that D∘E ≈ identity makes
    cancel itself in the fusion (module docstring); `train_detail_refiner` is the learned E that adds detail.

    images: (N, C, H, W) training images or latents in the model's space. Each step: z_lo = D(z) at
    (H/r, W/r) with the same degradation the hook uses, then minimise ||refiner(bicubic(z_lo) to H×W) − z||².
    Returns the refiner (eval mode) and the per-step losses (losses[0] is the bicubic baseline of that batch).
    """
    if images.dim() != 4:
        raise ValueError(f"train_refiner expects (N, C, H, W) images, got shape {tuple(images.shape)}")
    sigma = 0.5 * r if sigma is None else sigma
    N, C, H, W = images.shape
    lo_size = (max(1, round(H / r)), max(1, round(W / r)))
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        refiner = LatentRefiner(C, hidden, depth).to(images.device)
    opt = torch.optim.Adam(refiner.parameters(), lr=lr)
    losses = []
    refiner.train()
    for _ in range(steps):
        idx = torch.randint(0, N, (min(batch_size, N),), generator=gen)
        z = images[idx.to(images.device)].float()
        if flips:
            flip = (torch.rand(z.shape[0], generator=gen) < 0.5).to(z.device)
            z = torch.where(flip[:, None, None, None], z.flip(-1), z)
        with torch.no_grad():
            up = enhance_bicubic(degrade(z, lo_size, sigma, down), size=(H, W))
        loss = F.mse_loss(refiner(up), z)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return refiner.eval(), losses


# ---------------------------------------------------------------------------------------------------
# The learned E on the model's own predictions
# ---------------------------------------------------------------------------------------------------
@dataclass
class PredictionPairs:
    """Training pairs of the learned E: the model's prediction x̂0(x_t) and the real x0 it came from.

    x0_hat, x0: (P, C, H, W) float32; snr: (P,) float64, SNR of the chain step each x_t was drawn at; t: (P,)
    the original timesteps the model saw.
    """
    x0_hat: torch.Tensor
    x0: torch.Tensor
    snr: torch.Tensor
    t: torch.Tensor

    def __len__(self) -> int:
        return self.x0.shape[0]


def band_steps(diffusion, snr_band: tuple[float, float] = DEFAULT_SNR_BAND) -> torch.Tensor:
    """Chain indices i of `diffusion` (respaced or not) with lo ≤ SNR_i = ᾱ_i/(1 − ᾱ_i) < hi, ascending."""
    ab = diffusion.alphas_cumprod.double()
    snr = ab / (1.0 - ab)
    idx = torch.nonzero((snr >= snr_band[0]) & (snr < snr_band[1])).flatten()
    if idx.numel() == 0:
        raise ValueError(f"no step of the diffusion has an SNR in [{snr_band[0]:g}, {snr_band[1]:g})")
    return idx


def predict_x0(model, diffusion, x_t: torch.Tensor, t_idx: torch.Tensor, labels: torch.Tensor,
               guidance=None) -> torch.Tensor:
    """The model's x̂0 at chain indices t_idx (N,): one forward (all guidance branches in one batch), guidance on
    the ε channels (the learned-Σ channels from the conditional branch; a guidance interval, if any, applies per
    sample), then x̂0 from the model's parameterisation (ε: x̂0 = (x_t − sqrt(1−ᾱ)·ε̂)/sqrt(ᾱ))."""
    base = getattr(model, "module", model)
    t = diffusion.timestep_map.to(x_t.device)[t_idx]
    if guidance is None or guidance.mode == "none":
        out = model(x_t, t, labels)
    else:
        branches = guidance.branch_labels(labels, base.y_embedder)
        k, C = len(branches), x_t.shape[1]
        chunks = model(torch.cat([x_t] * k), torch.cat([t] * k), torch.cat(branches)).chunk(k)
        n = C if guidance.channels == "all" else min(3, C)
        out = torch.cat([guidance.combine([c[:, :n] for c in chunks]), chunks[0][:, n:]], dim=1)
        interval = getattr(guidance, "interval", None)
        if interval is not None:  # guided only at original timesteps inside it, conditional elsewhere
            inside = ((t >= interval[0]) & (t <= interval[1])).view(-1, *[1] * (out.dim() - 1))
            out = torch.where(inside, out, chunks[0])
    return diffusion.p_mean_variance(out.float(), x_t, t_idx).x0


@torch.no_grad()
def prediction_pairs(model, diffusion, images: torch.Tensor, labels: torch.Tensor, *, num_pairs: int | None = None,
                     snr_band: tuple[float, float] = DEFAULT_SNR_BAND, guidance=None, batch_size: int = 64,
                     seed: int = 0, progress: bool = False) -> PredictionPairs:
    """(x̂0(x_t), x0) pairs at SNRs inside HRIG's band, the model frozen (eval mode, restored afterwards).

    images: (N, C, H, W) real samples in the model's space (pixels in [−1, 1] or latents); labels: (N,) the labels
    the model is conditioned on. Pair p takes image p mod N (every image once before any repeats), a chain index
    i uniform over `band_steps`, ε ~ N(0, I), x_t = sqrt(ᾱ_i)·x0 + sqrt(1 − ᾱ_i)·ε, and the model's x̂0 at
    (x_t, i) (guided if `guidance` is given). num_pairs: None = N. Deterministic given `seed`.
    """
    if images.dim() != 4 or labels.shape != (images.shape[0],):
        raise ValueError(f"prediction_pairs: images (N, C, H, W) and labels (N,), got {tuple(images.shape)} "
                         f"and {tuple(labels.shape)}")
    N = images.shape[0]
    P = N if num_pairs is None else int(num_pairs)
    steps = band_steps(diffusion, snr_band)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(N, generator=gen)
    order = perm.repeat((P + N - 1) // N)[:P]
    chosen = steps[torch.randint(0, len(steps), (P,), generator=gen)]
    ab = diffusion.alphas_cumprod.double()
    was_training = model.training
    model.eval()
    out_hat, out_x0 = [], []
    try:
        for s in _progress(range(0, P, batch_size), progress, "HRIG pairs"):
            idx, t_idx = order[s:s + batch_size], chosen[s:s + batch_size]
            x0 = images[idx.to(images.device)].to(device, torch.float32)
            eps = torch.randn(x0.shape, generator=gen).to(device)
            x_t = diffusion.q_sample(x0, t_idx.to(device), eps)
            out_hat.append(predict_x0(model, diffusion, x_t, t_idx.to(device), labels[idx.to(labels.device)].to(device),
                                      guidance).float())
            out_x0.append(x0)
    finally:
        model.train(was_training)
    snr = (ab / (1.0 - ab))[chosen]
    return PredictionPairs(torch.cat(out_hat), torch.cat(out_x0), snr, diffusion.timestep_map[chosen])


def _progress(it, on: bool, desc: str):
    if not on:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, leave=False)


def ring_matrix(H: int, W: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (A (H·W, B), ρ_b (B,)), float32: A averages a flattened power map over each radial bin b of
    `efdit.metrics.spectrum` (b = round(ρ·min(H, W)/2) ≤ min(H, W)//2; the corners beyond belong to no bin)."""
    from ...metrics.spectrum import radial_bins
    b, radii = radial_bins(H, W)
    b = b.flatten()
    keep = torch.nonzero(b >= 0).flatten()
    A = torch.zeros(H * W, len(radii), dtype=torch.float64)
    A[keep, b[keep]] = 1.0
    A /= A.sum(0, keepdim=True)
    return A.to(device, torch.float32), torch.as_tensor(radii, dtype=torch.float32, device=device)


def ring_power(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """P̄(n, c, b) = mean_{f ∈ bin b} |F x_{n,c}(f)|², orthonormal FFT2 F: (N, C, H, W) -> (N, C, B), differentiable."""
    return (torch.fft.fft2(x.float(), norm="ortho").abs() ** 2).flatten(-2) @ A


def ring_loss(a: torch.Tensor, b: torch.Tensor, A: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """mean_{n,c} Σ_b w_b·(sqrt P̄_a(n,c,b) − sqrt P̄_b(n,c,b))² / Σ_b w_b: per image and channel, the radially
    averaged amplitude of a against that of b; w (B,) weights the bins."""
    d = (torch.sqrt(ring_power(a, A) + 1e-12) - torch.sqrt(ring_power(b, A) + 1e-12)) ** 2
    return (d * w).sum(-1).mean() / w.sum()


def fit_detail_refiner(pairs: PredictionPairs, *, hidden: int = 32, depth: int = 3, steps: int = 600,
                       batch_size: int = 32, lr: float = 3e-3, spectral_weight: float = 16.0, mask: str = "gaussian",
                       cutoff: float = 0.25, order: int = 2, flips: bool = True,
                       seed: int = 0) -> tuple[DetailRefiner, list[float]]:
    """Train E on (x̂0, x0) pairs; per batch, with y = E(x̂0, SNR),

        L = mean |y − x0|² + spectral_weight · mean_{n,c} Σ_b w_b·(sqrt P̄_y(n,c,b) − sqrt P̄_x0(n,c,b))² / Σ_b w_b

    P̄: the radially averaged power of each image (`ring_power`); w_b = M_hp(ρ_b): the fusion's high-pass mask
    (mask, cutoff, order) at the bin radii, so the spectral term acts on the band the fusion takes from E.
    Why both terms: x̂0 is (close to) the posterior mean E[x0 | x_t], so the pixel term alone drives E to the
    identity (E[x0 | x̂0] = x̂0) and adds no detail; where the phase of the missing detail is uncertain it even
    favours less high band. The spectral term is phase- and orientation-free: it asks each image's high band to
    be as strong as its real counterpart's (an amplitude per radial bin, so no (E|F|)² < E|F|² shortfall at
    single frequencies), and the pixel term keeps that detail where x̂0's structure says it belongs.
    flips: a random horizontal flip of each pair (both images). Returns E (eval mode) and the per-step losses
    (losses[0]: the loss of the untrained E, i.e. of x̂0 itself, on the first batch).
    """
    P, C, H, W = pairs.x0.shape
    gen = torch.Generator().manual_seed(seed)
    device = pairs.x0.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        refiner = DetailRefiner(C, hidden, depth).to(device)
    A, radii = ring_matrix(H, W, device)
    w = mask_of_rho(radii.double(), mask, cutoff, order).float()  # (B,)
    if not w.sum() > 0:
        raise ValueError(f"fit_detail_refiner: the {mask} mask passes no radial bin of a {H}x{W} grid")
    snr_all = pairs.snr.to(device)
    opt = torch.optim.Adam(refiner.parameters(), lr=lr)
    losses = []
    refiner.train()
    for _ in range(steps):
        idx = torch.randint(0, P, (min(batch_size, P),), generator=gen).to(device)
        xh, x0, snr = pairs.x0_hat[idx].float(), pairs.x0[idx].float(), snr_all[idx]
        if flips:
            flip = (torch.rand(len(idx), generator=gen) < 0.5).to(device)[:, None, None, None]
            xh, x0 = torch.where(flip, xh.flip(-1), xh), torch.where(flip, x0.flip(-1), x0)
        y = refiner(xh, snr)
        loss = F.mse_loss(y, x0) + spectral_weight * ring_loss(y, x0, A, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return refiner.eval(), losses


def train_detail_refiner(model, diffusion, images: torch.Tensor, labels: torch.Tensor, *,
                         num_pairs: int | None = None, snr_band: tuple[float, float] = DEFAULT_SNR_BAND,
                         guidance=None, pair_batch_size: int = 64, hidden: int = 32, depth: int = 3,
                         steps: int = 600, batch_size: int = 32, lr: float = 3e-3, spectral_weight: float = 16.0,
                         mask: str = "gaussian", cutoff: float = 0.25, order: int = 2, flips: bool = True,
                         seed: int = 0, progress: bool = False) -> tuple[DetailRefiner, list[float]]:
    """HRIG's learned E for a trained model: `prediction_pairs` (the model's own x̂0 at SNRs inside the band
    against the real x0), then `fit_detail_refiner` on them. The model is frozen (only E trains).

    Use the refiner with the same band and mask: HRIG(refiner=E, snr_band=snr_band, mask=mask, cutoff=cutoff)
    fuses x̂0 + λ·HP(E(x̂0) − x̂0). Returns E (eval mode, on the model's device) and the per-step losses.
    """
    pairs = prediction_pairs(model, diffusion, images, labels, num_pairs=num_pairs, snr_band=snr_band,
                             guidance=guidance, batch_size=pair_batch_size, seed=seed, progress=progress)
    return fit_detail_refiner(pairs, hidden=hidden, depth=depth, steps=steps, batch_size=batch_size, lr=lr,
                              spectral_weight=spectral_weight, mask=mask, cutoff=cutoff, order=order, flips=flips,
                              seed=seed)


# ---------------------------------------------------------------------------------------------------
# The perceptual band, in SNR
# ---------------------------------------------------------------------------------------------------
def reference_snr(schedule: str = "linear", num_timesteps: int = 1000) -> np.ndarray:
    """SNR(t) = ᾱ_t/(1 − ᾱ_t), t = 0..T−1, of the reference schedule that `band=t_lo:t_hi` refers to."""
    ab = np.cumprod(1.0 - get_betas(schedule, num_timesteps))
    return ab / (1.0 - ab)


def band_to_snr(t_lo: int, t_hi: int, schedule: str = "linear", num_timesteps: int = 1000) -> tuple[float, float]:
    """Timesteps [t_lo, t_hi] (inclusive) of the reference schedule -> an SNR range [lo, hi).

    The bounds sit at the geometric mean of neighbouring SNR values, so exactly t_lo..t_hi of the reference
    schedule fall inside; any other schedule or respacing then uses the same SNR range.
    """
    if not 0 <= t_lo <= t_hi < num_timesteps:
        raise ValueError(f"band {t_lo}:{t_hi} must satisfy 0 ≤ t_lo ≤ t_hi < {num_timesteps}")
    s = reference_snr(schedule, num_timesteps)  # decreasing in t
    hi = math.inf if t_lo == 0 else math.sqrt(s[t_lo - 1] * s[t_lo])
    lo = 0.0 if t_hi == num_timesteps - 1 else math.sqrt(s[t_hi] * s[t_hi + 1])
    return lo, hi


# ---------------------------------------------------------------------------------------------------
# The hook
# ---------------------------------------------------------------------------------------------------
class HRIG(SamplerHook):
    """HRIG as a sampler hook; see the module docstring. `modified_steps` / `modified_t` list the step indices
    and original timesteps it changed during the last sampling run.

    gain λ: None -> −0.3 with the bicubic E, 1.0 with a refiner (`LatentRefiner` or `DetailRefiner`; train a detail
    refiner with the same snr_band and mask it will be used with). band=(t_lo, t_hi) (reference linear schedule,
    T = 1000) or snr_band=(lo, hi) (lo ≤ SNR < hi; default (1e-2, 1)). r: enhancement factor; sigma: blur of D
    in high-res px (None -> 0.5·r); clip: clamp x̂0_new to [−clip, clip] (pixel space), None = off.
    """

    def __init__(self, *, gain: float | None = None, band: tuple[int, int] | None = None,
                 snr_band: tuple[float, float] | None = None, r: float = 2.0, cutoff: float = 0.25,
                 mask: str = "gaussian", order: int = 2, sigma: float | None = None, down: str = "area",
                 noise: float = 0.0, seed: int = 0, clip: float | None = None, refiner: nn.Module | None = None):
        if band is not None and snr_band is not None:
            raise ValueError("give HRIG a timestep band or an SNR band, not both")
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {', '.join(MASKS)}, not {mask!r}")
        if down not in DOWNSAMPLERS:
            raise ValueError(f"down must be one of {', '.join(DOWNSAMPLERS)}, not {down!r}")
        if r < 1:
            raise ValueError(f"HRIG enhances by r ≥ 1, got r={r}")
        self.band = tuple(band) if band is not None else None
        self.snr_band = band_to_snr(*band) if band is not None else tuple(snr_band or DEFAULT_SNR_BAND)
        if not self.snr_band[0] < self.snr_band[1]:
            raise ValueError(f"empty SNR band {self.snr_band}")
        self.refiner = refiner
        self.gain = float(gain) if gain is not None else (1.0 if refiner is not None else -0.3)
        self.r, self.cutoff, self.mask, self.order = float(r), float(cutoff), mask, int(order)
        self.sigma = 0.5 * self.r if sigma is None else float(sigma)
        self.down, self.noise, self.seed, self.clip = down, float(noise), int(seed), clip
        radial_mask(2, 2, mask, cutoff, order)  # validate the mask parameters now, not at the first step
        self._masks: dict = {}
        self.reset()

    @classmethod
    def from_spec(cls, spec: str, refiner: nn.Module | None = None) -> "HRIG":
        """Build from a spec string such as "band=259:673,r=2,cutoff=0.25,gain=-0.3,mask=gaussian"."""
        kw = parse_hrig_spec(spec)
        enhancer = kw.pop("enhancer", None)
        path = kw.pop("refiner_path", None)
        if path is not None:
            refiner = load_refiner(path)
        if enhancer == "bicubic":
            refiner = None
        elif enhancer == "refiner" and refiner is None:
            raise ValueError("HRIG spec says enhancer=refiner but gives no refiner=PATH")
        return cls(refiner=refiner, **kw)

    def reset(self) -> None:
        self.modified_steps: list[int] = []
        self.modified_t: list[int] = []
        self._generator = None

    def active(self, snr: float) -> bool:
        lo, hi = self.snr_band
        return lo <= snr < hi

    # E, D and the fusion, usable on their own (tests, plots)
    @property
    def detail(self) -> bool:
        """True when E is a `DetailRefiner` (trained on the model's predictions; the fusion target is E(x̂0))."""
        return getattr(self.refiner, "kind", None) == DetailRefiner.kind

    def enhance(self, x0: torch.Tensor, snr=None) -> torch.Tensor:
        """E(x̂0): bicubic ×r (+ a `LatentRefiner`), (N, C, rH, rW); a `DetailRefiner`'s E(x̂0, SNR), (N, C, H, W)."""
        if self.detail:
            if snr is None:
                raise ValueError("HRIG with a detail refiner needs the step's SNR")
            p = next(self.refiner.parameters())
            return self.refiner(x0.to(p.device, p.dtype), snr).float().to(x0.device)
        up = enhance_bicubic(x0, self.r)
        if self.refiner is not None:
            p = next(self.refiner.parameters(), None)
            up = self.refiner(up if p is None else up.to(p.device, p.dtype)).float().to(x0.device)
        return up

    def degrade(self, y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.noise > 0 and self._generator is None:
            self._generator = torch.Generator(device=y.device).manual_seed(self.seed)
        return degrade(y, size, self.sigma, self.down, self.noise, self._generator)

    def target(self, x0: torch.Tensor, snr=None) -> torch.Tensor:
        """y, whose high band the fusion moves x̂0 towards: D(E(x̂0)), or E(x̂0) for a detail refiner."""
        with torch.no_grad():
            return self.enhance(x0, snr) if self.detail else self.degrade(self.enhance(x0), tuple(x0.shape[-2:]))

    def hp_mask(self, x: torch.Tensor) -> torch.Tensor:
        """M_hp (H, W) for x's grid and device (cached)."""
        H, W = x.shape[-2:]
        key = (H, W, x.device)
        if key not in self._masks:
            self._masks[key] = radial_mask(H, W, self.mask, self.cutoff, self.order, device=x.device)
        return self._masks[key]

    def highpass(self, x: torch.Tensor) -> torch.Tensor:
        """HP(x) = Re IFFT2(M_hp ⊙ FFT2(x)) with this hook's mask (float32)."""
        return fft_fuse(torch.zeros_like(x, dtype=torch.float32), x.float(), self.hp_mask(x), 1.0)

    def fuse(self, x0: torch.Tensor, snr=None) -> torch.Tensor:
        """x̂0 -> x̂0_new = x̂0 + λ·HP(y − x̂0) (always computed, whatever the band); snr: the step's SNR (a float
        or (N,)), needed by a detail refiner."""
        out = fft_fuse(x0, self.target(x0, snr), self.hp_mask(x0), self.gain)
        return out.clamp(-self.clip, self.clip) if self.clip else out

    def correction_fraction(self, x0: torch.Tensor, snr=None) -> float:
        """‖HP(y − x̂0)‖ / ‖HP(x̂0)‖ over the batch: the size of the high-band correction at λ = 1, as a fraction
        of x̂0's own high band (0 when y has x̂0's high band)."""
        x = x0.float()
        return float(self.highpass(self.target(x0, snr) - x).norm() / self.highpass(x).norm().clamp_min(1e-30))

    def on_step(self, state: SamplerState) -> SamplerState:
        if self.gain == 0.0 or not self.active(state.snr):
            return state  # untouched: bit-identical sampling
        self.modified_steps.append(state.step_index)
        self.modified_t.append(int(state.t.flatten()[0]))
        return state.replace(x0=self.fuse(state.x0, state.snr))

    def to_spec(self) -> str:
        """The canonical spec string of this hook (for logs and reports)."""
        band = f"band={self.band[0]}:{self.band[1]}" if self.band else f"snr={self.snr_band[0]:g}:{self.snr_band[1]:g}"
        parts = [band, f"r={self.r:g}", f"cutoff={self.cutoff:g}", f"gain={self.gain:g}", f"mask={self.mask}",
                 f"order={self.order}", f"sigma={self.sigma:g}", f"down={self.down}",
                 f"enhancer={'refiner' if self.refiner is not None else 'bicubic'}"]
        if self.noise:
            parts += [f"noise={self.noise:g}", f"seed={self.seed}"]
        if self.clip:
            parts.append(f"clip={self.clip:g}")
        return ",".join(parts)

    def __repr__(self) -> str:
        return f"HRIG({self.to_spec()})"


# ---------------------------------------------------------------------------------------------------
# Spec strings
# ---------------------------------------------------------------------------------------------------
SPEC_KEYS = ("band", "snr", "r", "cutoff", "gain", "mask", "order", "sigma", "down", "noise", "seed", "clip",
             "enhancer", "refiner")


def _pair_of(key: str, val: str, cast):
    parts = val.split(":")
    if len(parts) != 2:
        raise ValueError(f"HRIG spec: {key} takes LO:HI, got {val!r}")
    try:
        return cast(parts[0]), cast(parts[1])
    except ValueError:
        raise ValueError(f"HRIG spec: bad {key} {val!r}") from None


def parse_hrig_spec(spec: str) -> dict:
    """"key=value,key=value" -> keyword arguments of `HRIG` (plus "enhancer" and "refiner_path").

    Keys: band=T_LO:T_HI (original timesteps of the 1000-step linear schedule, inclusive) | snr=LO:HI,
    r, cutoff, gain, mask (hard|gaussian|butterworth|allpass|allstop), order, sigma, down (area|bicubic),
    noise, seed, clip (0 / none = off), enhancer (bicubic|refiner), refiner=PATH (a saved refiner of either kind).
    An empty string gives the defaults.
    """
    out: dict = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"HRIG spec: expected key=value, got {item!r}")
        key, val = (s.strip() for s in item.split("=", 1))
        key = key.lower()
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(key, SPEC_KEYS, n=1)
            raise ValueError(f"HRIG spec: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else
                                                                 f"; known: {', '.join(SPEC_KEYS)}"))
        try:
            if key == "band":
                out["band"] = _pair_of(key, val, int)
            elif key == "snr":
                out["snr_band"] = _pair_of(key, val, float)
            elif key in ("r", "cutoff", "gain", "sigma", "noise"):
                out[key] = float(val)
            elif key in ("order", "seed"):
                out[key] = int(val)
            elif key == "clip":
                out["clip"] = None if val.lower() in ("0", "none", "off", "") else float(val)
            elif key == "mask":
                if val not in MASKS:
                    raise ValueError(f"HRIG spec: mask must be one of {', '.join(MASKS)}, not {val!r}")
                out["mask"] = val
            elif key == "down":
                if val not in DOWNSAMPLERS:
                    raise ValueError(f"HRIG spec: down must be one of {', '.join(DOWNSAMPLERS)}, not {val!r}")
                out["down"] = val
            elif key == "enhancer":
                if val not in ("bicubic", "refiner"):
                    raise ValueError(f"HRIG spec: enhancer must be bicubic or refiner, not {val!r}")
                out["enhancer"] = val
            else:  # refiner
                out["refiner_path"] = val
        except ValueError as e:
            if str(e).startswith("HRIG spec"):
                raise
            raise ValueError(f"HRIG spec: bad value for {key}: {val!r}") from None
    if "band" in out and "snr_band" in out:
        raise ValueError("HRIG spec: give band or snr, not both")
    return out
