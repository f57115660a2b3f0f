"""Sampling a trained model, and the pictures people look at: a labelled grid per superclass, PNGs, an .npz."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .config import Config
from .data.hierarchy import Hierarchy
from .diffusion import Guidance, sample
from .errors import EfditError
from .runs import build_diffusion


def guidance_of(cfg: Config) -> Guidance:
    s = cfg.sample
    mode = s.guidance
    if mode == "auto":
        mode = "super" if cfg.model.embedder == "tiered" else "cfg"
    if s.cfg_scale == 1.0 and mode != "two_term":
        mode = "none"
    return Guidance(mode, s.cfg_scale, s.cfg_scale_super, s.cfg_channels)


@torch.inference_mode()
def generate(model, cfg: Config, labels: torch.Tensor, device="cpu", progress: bool = True,
             batch_size: int = 256, hooks=(), seed: int | None = None) -> torch.Tensor:
    """Samples for `labels` (ids in the model's label space) -> uint8 (N, C, H, W)."""
    s = cfg.sample
    check_sampler(cfg)
    diffusion = build_diffusion(cfg, s.steps)
    hooks = list(hooks) + hrig_hooks(cfg) + accel_hooks(cfg)
    gen = torch.Generator(device=device).manual_seed(s.seed if seed is None else seed)
    from .models.compiled import maybe_compile
    model = maybe_compile(model, s.compile)  # the model itself unless sample.compile
    from .latent.autoencoder import latent_decoder
    decode = latent_decoder(cfg, device)  # None in pixel space; latents are decoded by the run's VAE
    out = []
    for i in range(0, len(labels), batch_size):
        y = labels[i:i + batch_size].to(device)
        x = sample(model, y, diffusion, method=s.sampler, eta=s.eta, guidance=guidance_of(cfg), hooks=hooks,
                   generator=gen, clip_x0=s.clip_x0 and decode is None, progress=progress)
        if decode is not None:
            x = decode(x)
        out.append(to_uint8(x).cpu())
    return torch.cat(out)


def hrig_hooks(cfg: Config) -> list:
    spec = cfg.sample.hrig.strip()
    if spec.lower() in ("", "off", "none"):
        return []
    from .diffusion.hooks.hrig import HRIG
    try:
        return [HRIG.from_spec(spec)]
    except ValueError as e:
        raise EfditError(f"--hrig {spec!r}: {e}") from None


def check_sampler(cfg: Config) -> None:
    from .diffusion.samplers import SAMPLERS
    s = cfg.sample
    if s.sampler not in SAMPLERS:
        raise EfditError(f"--sampler must be {' | '.join(SAMPLERS)}, not {s.sampler!r}")
    if s.sampler == "dpmpp2m" and s.eta != 0:
        raise EfditError(f"--sampler dpmpp2m is deterministic: --eta must be 0, not {s.eta}")


def accel_hooks(cfg: Config) -> list:
    """The training-free block cache of `sample.accel` (FORA, Δ-DiT, TaylorSeer), as a sampler hook; [] for none."""
    from .config import parse_kv
    from .diffusion.hooks.cache import build_accel
    s = cfg.sample
    try:
        cache = build_accel(s.accel, parse_kv(s.accel_kwargs))
    except ValueError as e:
        raise EfditError(f"--accel {s.accel} --accel-kw {s.accel_kwargs!r}: {e}") from None
    return [] if cache is None else [cache]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def class_labels(cfg: Config, hierarchy: Hierarchy, classes: list[int] | None, per_class: int) -> torch.Tensor:
    """per_class labels for each class (all classes of the model's label space when `classes` is None)."""
    n = hierarchy.num_sub if cfg.model.condition_on == "sub" else hierarchy.num_super
    ids = list(range(n)) if classes is None else classes
    return torch.tensor(ids, dtype=torch.long).repeat_interleave(per_class)


def generate_per_class(model, cfg: Config, hierarchy: Hierarchy, per_class: int, classes: list[int] | None = None,
                       device="cpu", progress: bool = True):
    labels = class_labels(cfg, hierarchy, classes, per_class)
    return generate(model, cfg, labels, device=device, progress=progress), labels


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow
        return ImageFont.load_default()


def save_grid(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy,
              condition_on: str = "sub", scale: int | None = None) -> Path:
    """A PNG with one block per superclass: a header naming it, then a row per subclass (labelled at the left).

    images: uint8 (N, C, H, W); labels: (N,) in the model's label space (subclass or superclass ids).
    """
    path = Path(path)
    H, W = images.shape[-2:]
    scale = scale or max(1, 56 // max(H, W))
    cell_h, cell_w = H * scale, W * scale
    rows: list[tuple[str, str, list[torch.Tensor]]] = []  # (superclass, row label, images)
    for sup in range(hierarchy.num_super):
        members = hierarchy.children(sup) if condition_on == "sub" else [sup]
        for cls in members:
            imgs = [images[i] for i in range(len(labels)) if int(labels[i]) == cls]
            if imgs:
                name = hierarchy.sub_names[cls] if condition_on == "sub" else hierarchy.super_names[cls]
                rows.append((hierarchy.super_names[sup], name, imgs))
    ncol = max(len(r[2]) for r in rows)
    label_w, header_h, pad = 110, 18, 2
    n_headers = len({r[0] for r in rows})
    height = len(rows) * (cell_h + pad) + n_headers * header_h + pad
    canvas = Image.new("RGB", (label_w + ncol * (cell_w + pad) + pad, height), "white")
    draw = ImageDraw.Draw(canvas)
    font, bold = _font(11), _font(13)
    y, current = pad, None
    for sup_name, name, imgs in rows:
        if sup_name != current:
            draw.text((4, y + 2), sup_name, fill=(20, 60, 160), font=bold)
            draw.line([(0, y), (canvas.width, y)], fill=(180, 180, 200))
            y += header_h
            current = sup_name
        draw.text((10, y + cell_h // 2 - 6), name[:17], fill="black", font=font)
        for j, im in enumerate(imgs):
            arr = im.permute(1, 2, 0).numpy()
            pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).convert("RGB")
            canvas.paste(pil.resize((cell_w, cell_h), Image.NEAREST), (label_w + pad + j * (cell_w + pad), y))
        y += cell_h + pad
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    canvas.save(tmp)
    os.replace(tmp, path)
    return path


def save_samples(out_dir: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy,
                 condition_on: str = "sub") -> Path:
    """Individual PNGs (`<class>/<i>.png`) and `samples.npz` (arr_0: uint8 NHWC, labels, names) for metrics."""
    out_dir = Path(out_dir)
    names = hierarchy.sub_names if condition_on == "sub" else hierarchy.super_names
    for i, (im, y) in enumerate(zip(images, labels)):
        d = out_dir / "png" / _safe(names[int(y)])
        d.mkdir(parents=True, exist_ok=True)
        arr = im.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(d / f"{i:05d}.png")
    npz = out_dir / "samples.npz"
    tmp = out_dir / ".samples.tmp.npz"
    np.savez(tmp, arr_0=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy(),
             label_space=np.array(condition_on), names=np.array(names))
    os.replace(tmp, npz)
    return npz


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
