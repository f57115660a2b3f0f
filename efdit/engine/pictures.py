"""The pictures people look at, and the files metrics read: a labelled grid per superclass (PNG), one PNG per
sample, `samples.npz`; D²iT's images beside their grain maps."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..d2it.grains import map_image, overlay
from ..data.hierarchy import Hierarchy
from ..errors import atomic_write


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
    with atomic_write(path, "the sample grid") as tmp:
        canvas.save(tmp, format="PNG")
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
    with atomic_write(npz, "the samples") as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy(),
                 label_space=np.array(condition_on), names=np.array(names))
    return npz


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def save_pairs_grid(path: str | Path, images: torch.Tensor, grains: torch.Tensor, labels: torch.Tensor,
                    names: list[str] | None = None, per_row: int = 8, scale: int = 2) -> Path:
    """A PNG: per sample the image with its grain map tinted over it and the map alone beside it
    (red = fine, blue = coarse); one row block per class, labelled at the left."""
    path = Path(path)
    H = images.shape[-1]
    ov = overlay(images, grains)                                          # (N, 3, H, W)
    mp = map_image(grains, H)
    rgb = images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images
    tiles = torch.cat([rgb, ov, mp], dim=3)                               # (N, 3, H, 3W)
    pad = 2
    tw, th = 3 * H + pad, H + pad
    label_w = 90 if names else 0
    classes = list(dict.fromkeys(labels.tolist()))
    rows = []
    for c in classes:
        idx = (labels == c).nonzero().flatten().tolist()
        rows += [(c, idx[j:j + per_row]) for j in range(0, len(idx), per_row)]
    canvas = Image.new("RGB", (label_w + per_row * tw * scale, len(rows) * th * scale), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (c, idx) in enumerate(rows):
        if names:
            draw.text((4, r * th * scale + 4), names[c][:14], fill=(0, 0, 0))
        for k, i in enumerate(idx):
            t = Image.fromarray(tiles[i].permute(1, 2, 0).numpy()).resize((3 * H * scale, H * scale), Image.NEAREST)
            canvas.paste(t, (label_w + k * tw * scale, r * th * scale))
    with atomic_write(path, "the sample grid") as tmp:
        canvas.save(tmp, format="PNG")
    return path
