"""Your own images, laid out as a two-level folder tree:

    root/<superclass>/<subclass>/*.png|jpg|jpeg|webp|bmp      e.g. root/birds/eagle/0001.jpg

A root that holds split folders — `root/train/…` beside `root/test/…` (or `val/`) — gives each split its own
tree; otherwise every split reads the one tree.
Superclass and subclass names are the folder names (subclass names must be unique across superclasses).
Folders, subfolders and files are read in sorted order, so ids are deterministic: superclass ids follow
the sorted superclass folders, subclass ids the sorted (superclass, subclass) pairs. Hidden entries
(".name") are ignored; deeper nesting is not read.

Every image is decoded, EXIF-rotated, composited on white if it has transparency, converted to 1 (L)
or 3 (RGB) channels, resized so its shorter side fits, and center-cropped to the size (default 64x64).
Everything is held in memory as uint8, so this is for sets of up to some 10^5 small images.
Licence: whatever your images carry.

Unreadable images: on_bad_image="skip" (default) leaves them out and emits one warning with the count
and the first few paths (also in `dataset.info["skipped_files"]`); "fail" raises an EfditError naming
the file. A subclass folder left with no images, or a root with none at all, is an EfditError.
The `split` argument is only recorded; point `root` at another tree for another split.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from efdit.data.base import HierarchicalDataset, as_size
from efdit.data.hierarchy import Hierarchy
from efdit.errors import EfditError, EfditWarning

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BAD_IMAGE_MODES = ("skip", "fail")
LAYOUT = "root/<superclass>/<subclass>/*.png|jpg|jpeg|webp|bmp"


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in EXTENSIONS and _visible(p)


SPLIT_FOLDERS = ("train", "test", "val")


def split_root(root: Path, split: str) -> Path:
    """root/<split> when root holds split folders (train/ beside test/ or val/), else root itself."""
    if (root / "train").is_dir() and any((root / s).is_dir() for s in SPLIT_FOLDERS[1:]):
        if not (root / split).is_dir():
            have = ", ".join(s for s in SPLIT_FOLDERS if (root / s).is_dir())
            raise EfditError(f"{root} holds split folders ({have}) but no {split}/")
        return root / split
    return root


def scan_folder(root: Path) -> tuple[list[tuple[str, str, list[Path]]], int]:
    """Sorted (superclass, subclass, image files) per subclass folder, and the count of images at the wrong depth."""
    classes, stray = [], 0
    for sup in sorted(p for p in root.iterdir() if p.is_dir() and _visible(p)):
        subs = sorted(p for p in sup.iterdir() if p.is_dir() and _visible(p))
        stray += sum(_is_image(p) for p in sup.iterdir())
        for sub in subs:
            classes.append((sup.name, sub.name, sorted(p for p in sub.iterdir() if _is_image(p))))
    stray += sum(_is_image(p) for p in root.iterdir())
    return classes, stray


def _flatten(im: Image.Image, mode: str) -> Image.Image:
    """Any PIL mode -> `mode` ("L" or "RGB"); transparency is composited on white."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit / float gray
        a = np.asarray(im, dtype=np.float64)
        a = a / 257.0 if a.max() > 255 else a
        im = Image.fromarray(np.rint(a).clip(0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        bg.alpha_composite(rgba)
        im = bg
    return im.convert(mode)


def _cover_crop(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize so the image covers (H, W) (shorter side fits), then crop the center."""
    h, w = size
    scale = max(w / im.width, h / im.height)
    nw, nh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
    if (nw, nh) != im.size:
        im = im.resize((nw, nh), Image.LANCZOS, reducing_gap=3.0)
    left, top = (nw - w) // 2, (nh - h) // 2
    return im.crop((left, top, left + w, top + h))


def load_image(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """One file -> uint8 (H, W, C). Raises whatever PIL raises for a bad file."""
    mode = "L" if channels == 1 else "RGB"
    with Image.open(path) as im:
        scale = max(size) / min(im.size)  # orientation-proof upper bound on the needed scale
        if im.format == "JPEG" and scale < 0.5:
            im.draft(mode, (math.ceil(im.width * scale), math.ceil(im.height * scale)))  # decode at 1/2..1/8
        im = ImageOps.exif_transpose(im)
        im = _flatten(im, mode)
    a = np.asarray(_cover_crop(im, size))
    return a[:, :, None] if a.ndim == 2 else a


def _caller_stacklevel() -> int:
    """The warnings stacklevel of the first frame outside efdit.data (so a warning points at the user's call)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("efdit.data"):
        frame, level = frame.f_back, level + 1
    return level


def _try_load(args):
    path, size, channels = args
    try:
        return load_image(path, size, channels), None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files (OSError, SyntaxError, ValueError, ...)
        return None, f"{type(e).__name__}: {e}"


def load_folder(root: str | os.PathLike, split: str = "train", image_size: int | tuple[int, int] | None = None,
                channels: int | None = None, on_bad_image: str = "skip", num_workers: int | None = None,
                allow_empty_classes: bool = False) -> HierarchicalDataset:
    """Load `root/<superclass>/<subclass>/*` (see the module docstring) as a `HierarchicalDataset`."""
    if on_bad_image not in BAD_IMAGE_MODES:
        raise EfditError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_MODES)}, got {on_bad_image!r}")
    channels = 3 if channels is None else channels
    if channels not in (1, 3):
        raise EfditError(f"channels must be 1 (gray) or 3 (RGB), got {channels}")
    size = as_size(image_size, (64, 64))
    root = Path(root).expanduser()
    if not root.is_dir():
        raise EfditError(f"image folder {root} does not exist (expected {LAYOUT})")
    root = split_root(root, split)
    classes, stray = scan_folder(root)
    files = [f for _, _, fs in classes for f in fs]
    if not files:
        extra = f"; {stray} image(s) lie at the wrong depth" if stray else ""
        raise EfditError(f"no images found under {root} (expected {LAYOUT}{extra})")
    names = {}
    for sup, sub, _ in classes:
        if sub in names and names[sub] != sup:
            raise EfditError(f"subclass folder name {sub!r} appears under both {names[sub]!r} and {sup!r} in {root}; "
                             "subclass names must be unique, rename one")
        names[sub] = sup

    workers = num_workers or min(8, os.cpu_count() or 1)
    jobs = [(f, size, channels) for f in files]
    with warnings.catch_warnings():  # set once here: the filter list is process-wide, not per thread
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # big but legal images
        if workers > 1 and len(jobs) > 16:
            with ThreadPoolExecutor(workers) as pool:  # PIL decodes and resizes without the GIL
                results = list(pool.map(_try_load, jobs, chunksize=8))
        else:
            results = [_try_load(j) for j in jobs]

    pixels, labels, kept, bad = [], [], [], []
    sub_ids = {sub: i for i, (_, sub, _) in enumerate(classes)}
    class_of_file = [sub for _, sub, fs in classes for _ in fs]
    for f, sub, (arr, err) in zip(files, class_of_file, results):
        if arr is None:
            if on_bad_image == "fail":
                raise EfditError(f"cannot read image {f} ({err})")
            bad.append(str(f))
            continue
        pixels.append(arr)
        labels.append(sub_ids[sub])
        kept.append(str(f.relative_to(root)))
    if bad:
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        warnings.warn(f"skipped {len(bad)} unreadable image(s) under {root}: {shown} (all of them: the dataset's "
                      f"info['skipped_files']; a training run lists them in its skipped-images.txt)", EfditWarning,
                      stacklevel=_caller_stacklevel())

    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    empty = [f"{sup}/{sub}" for (sup, sub, _), c in zip(classes, counts) if c == 0]
    if empty and not allow_empty_classes:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise EfditError(f"subclass folder(s) with no readable images under {root}: {shown}")
    if not pixels:
        raise EfditError(f"no readable images under {root} ({len(bad)} unreadable)")
    if stray:
        warnings.warn(f"ignored {stray} image(s) under {root} that are not in a subclass folder ({LAYOUT})",
                      stacklevel=_caller_stacklevel())

    hierarchy = Hierarchy.from_paths([(sup, sub) for sup, sub, _ in classes])
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
    ds = HierarchicalDataset(images, torch.tensor(labels), hierarchy, "folder", split,
                             allow_empty_classes=allow_empty_classes,
                             info={"source": str(root), "skipped_files": bad})
    ds.root = root
    ds.set_per_image("files", kept)
    return ds
