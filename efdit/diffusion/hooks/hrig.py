"""HRIG: super-resolution in the perceptual denoising stage, as a sampler hook (efdit.md §2.3).

At every sampling step whose SNR lies in the perceptual band (P2's content stage, 1e-2 ≤ SNR < 1, which is
t ∈ [259, 673] of DiT's 1000-step linear schedule; stored as SNR so other schedules and respacings work):

    x̂0 ──E──▶ ×r enhanced (bicubic, optionally + a learned `LatentRefiner`)
        ──D──▶ y = D(E(x̂0)): Gaussian blur (σ ≈ 0.5·r high-res px), then area / bicubic ↓r back to H×W
    x̂0_new = x̂0 + λ · Re IFFT2( M_hp ⊙ (FFT2(y) − FFT2(x̂0)) )          (FFT fusion, gain λ)

Low frequencies (M_hp(0) = 0) always come from the model, the high band is moved towards y by λ. The sampler
then recomputes ε from x̂0_new and continues (DDPM posterior mean with the model's variance, or DDIM).
λ = 0 returns the state untouched (bit-identical samples). Works on any (N, C, H, W) x̂0: pixels or latents,
non-square and odd H, W. With a bicubic-only E, D∘E is a linear low-pass filter, so λ > 0 *softens* the high
band and λ < 0 sharpens (unsharp masking with D∘E as the blur); added detail needs a learned E.

Guidance: the hook sees the guided x̂0. With a linear E (bicubic) the fusion is linear and guidance is an
affine combination with weights summing to 1, so fusing the guided x̂0 equals fusing both CFG halves.
"""
from __future__ import annotations

import difflib
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import SamplerHook, SamplerState
from ..schedule import get_betas

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
    fy = torch.fft.fftfreq(H, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(W, dtype=torch.float64)[None, :]
    rho = 2.0 * torch.sqrt(fy ** 2 + fx ** 2)  # (H, W)
    if kind == "allpass":
        m = torch.ones_like(rho)
    elif kind == "allstop":
        m = torch.zeros_like(rho)
    elif kind == "hard":
        m = (rho > cutoff).double()
    else:
        if cutoff <= 0:
            raise ValueError(f"the {kind} mask needs cutoff > 0, got {cutoff}")
        if kind == "gaussian":
            m = 1.0 - torch.exp(-rho ** 2 / (2.0 * cutoff ** 2))
        else:  # butterworth, written as ρ^{2n}/(ρ^{2n} + ρc^{2n}) so ρ = 0 gives 0 without dividing by 0
            m = rho ** (2 * order) / (rho ** (2 * order) + cutoff ** (2 * order))
    return m.to(device=device, dtype=torch.float32)


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


class LatentRefiner(nn.Module):
    """Learned part of E: E(x) = up + f(up), up = bicubic ×r of x; f a small conv net, last conv zero-initialised
    (so an untrained refiner is exactly the bicubic E). Works on pixels or latents with `channels` channels."""

    def __init__(self, channels: int, hidden: int = 32, depth: int = 3):
        super().__init__()
        if depth < 2:
            raise ValueError(f"LatentRefiner needs depth ≥ 2, got {depth}")
        self.config = dict(channels=channels, hidden=hidden, depth=depth)
        conv = lambda i, o: nn.Conv2d(i, o, 3, padding=1, padding_mode="replicate")  # noqa: E731
        layers: list[nn.Module] = [conv(channels, hidden), nn.SiLU()]
        for _ in range(depth - 2):
            layers += [conv(hidden, hidden), nn.SiLU()]
        last = conv(hidden, channels)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def forward(self, up: torch.Tensor) -> torch.Tensor:
        return up + self.net(up)

    def save(self, path) -> None:
        """Safetensors file with the constructor arguments in its metadata (atomic write)."""
        import json
        import os
        from safetensors.torch import save_file
        tmp = f"{path}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, tmp,
                  metadata={"format": "efdit-hrig-refiner", "config": json.dumps(self.config)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, map_location="cpu") -> "LatentRefiner":
        import json
        from safetensors import safe_open
        from safetensors.torch import load_file
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") != "efdit-hrig-refiner":
                raise ValueError("not an efdit HRIG refiner file")
            model = cls(**json.loads(meta["config"]))
            model.load_state_dict(load_file(str(path), device=str(map_location)))
        except FileNotFoundError:
            raise ValueError(f"HRIG refiner file not found: {path}") from None
        except Exception as e:  # corrupt file, wrong format, wrong shapes
            raise ValueError(f"cannot load HRIG refiner {path}: {e}") from None
        return model.eval()


def train_refiner(images: torch.Tensor, *, r: float = 2.0, sigma: float | None = None, down: str = "area",
                  hidden: int = 32, depth: int = 3, steps: int = 300, batch_size: int = 16, lr: float = 1e-3,
                  flips: bool = True, seed: int = 0) -> tuple[LatentRefiner, list[float]]:
    """Self-supervised training of the learned enhancer (the DiT is not involved, so it stays frozen).

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

    gain λ: None -> −0.3 with the bicubic E, 1.0 with a refiner. band=(t_lo, t_hi) (reference linear schedule,
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
            refiner = LatentRefiner.load(path)
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
    def enhance(self, x0: torch.Tensor) -> torch.Tensor:
        up = enhance_bicubic(x0, self.r)
        if self.refiner is not None:
            p = next(self.refiner.parameters(), None)
            up = self.refiner(up if p is None else up.to(p.device, p.dtype)).float().to(x0.device)
        return up

    def degrade(self, y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.noise > 0 and self._generator is None:
            self._generator = torch.Generator(device=y.device).manual_seed(self.seed)
        return degrade(y, size, self.sigma, self.down, self.noise, self._generator)

    def fuse(self, x0: torch.Tensor) -> torch.Tensor:
        """x̂0 -> x̂0_new (always computed, whatever the band)."""
        H, W = x0.shape[-2:]
        key = (H, W, x0.device)
        if key not in self._masks:
            self._masks[key] = radial_mask(H, W, self.mask, self.cutoff, self.order, device=x0.device)
        y = self.degrade(self.enhance(x0), (H, W))
        out = fft_fuse(x0, y, self._masks[key], self.gain)
        return out.clamp(-self.clip, self.clip) if self.clip else out

    def on_step(self, state: SamplerState) -> SamplerState:
        if self.gain == 0.0 or not self.active(state.snr):
            return state  # untouched: bit-identical sampling
        self.modified_steps.append(state.step_index)
        self.modified_t.append(int(state.t.flatten()[0]))
        return state.replace(x0=self.fuse(state.x0))

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
    noise, seed, clip (0 / none = off), enhancer (bicubic|refiner), refiner=PATH (a saved LatentRefiner).
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
