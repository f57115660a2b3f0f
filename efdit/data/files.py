"""`FileDataset`: a hierarchical image set read lazily from disk (iNat 2021, VegFru, big folder trees).

Only the file list and the labels live in memory; an image is decoded when it is read. This is the input of
`efdit cache-latents` (encode once, then train from the cache); it can also feed training directly
(`batch` decodes in a thread pool), which is fine for small sets and slow for large ones.

Preprocessing is ADM's center crop (DiT / FineDiffusion): halve with a box filter while the image is at least
twice the target, resize bicubically so the shorter side fits, crop the center. RGB (or L) uint8.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import EfditError
from .base import HierarchicalDataset, LabelSummary, as_size, to_signed
from .hierarchy import Hierarchy


def adm_center_crop(im, size: tuple[int, int]):
    """PIL image -> PIL image of size (H, W) = `size`, ADM style (box halvings, bicubic, center crop)."""
    from PIL import Image
    h, w = size
    while im.width >= 2 * w and im.height >= 2 * h:
        im = im.resize((im.width // 2, im.height // 2), Image.BOX)
    scale = max(w / im.width, h / im.height)
    im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.BICUBIC)
    left, top = (im.width - w) // 2, (im.height - h) // 2
    return im.crop((left, top, left + w, top + h))


def read_image(path: str | os.PathLike, size: tuple[int, int], channels: int = 3) -> np.ndarray:
    """One file -> uint8 (H, W, C), EXIF-rotated, transparency on white, ADM center crop."""
    from PIL import Image, ImageOps

    from .folder import _flatten
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        im = _flatten(im, "L" if channels == 1 else "RGB")
    a = np.asarray(adm_center_crop(im, size))
    return a[:, :, None] if a.ndim == 2 else a


class FileDataset(LabelSummary, torch.utils.data.Dataset):
    """Images given by path, with a subclass label each; decoded on access.

    `dataset[i]` -> (float32 (C, H, W) in [-1, 1], subclass id, superclass id); `load(i)` -> uint8 (C, H, W).
    Attributes like HierarchicalDataset: hierarchy, sub_labels, super_labels, image_size, num_channels,
    name, split, root, files, class_counts().
    """

    def __init__(self, files: Sequence[str | os.PathLike], sub_labels, hierarchy: Hierarchy, name: str,
                 split: str = "train", image_size: int | tuple[int, int] | None = None, channels: int | None = None,
                 root: str | os.PathLike | None = None, on_bad_image: str = "fail",
                 allow_empty_classes: bool = False, info: dict | None = None, num_workers: int = 8,
                 missing_hint: str = ""):
        """missing_hint: when given, the first file must exist (a cheap check that an archive was extracted
        where its list says); the error names that file and adds the hint."""
        self.files = [str(f) for f in files]
        self.sub_labels = torch.as_tensor(sub_labels, dtype=torch.long)
        if self.sub_labels.shape != (len(self.files),):
            raise ValueError(f"{len(self.files)} files but {tuple(self.sub_labels.shape)} labels")
        if not self.files:
            raise EfditError(f"dataset {name!r} ({split}) has no images")
        if int(self.sub_labels.min()) < 0 or int(self.sub_labels.max()) >= hierarchy.num_sub:
            raise ValueError(f"sub_labels hold ids outside [0, {hierarchy.num_sub})")
        if on_bad_image not in ("skip", "fail"):
            raise EfditError(f"on_bad_image must be skip | fail, got {on_bad_image!r}")
        self.hierarchy, self.name, self.split = hierarchy, name, split
        self.root = Path(root) if root is not None else None
        first = self.root / self.files[0] if self.root is not None else Path(self.files[0])
        if missing_hint and not first.is_file():
            raise EfditError(f"{name}: image {first} is missing ({missing_hint})")
        self.image_size = as_size(image_size, (256, 256))
        self.num_channels = 3 if channels is None else channels
        if self.num_channels not in (1, 3):
            raise EfditError(f"channels must be 1 (gray) or 3 (RGB), got {channels}")
        self.on_bad_image = on_bad_image
        self.info = dict(info or {})
        self.num_workers = num_workers
        self._super_labels = hierarchy.parent[self.sub_labels]
        if not allow_empty_classes:
            empty = torch.nonzero(self.class_counts() == 0).flatten().tolist()
            if empty:
                shown = ", ".join(repr(hierarchy.sub_names[i]) for i in empty[:5])
                raise EfditError(f"dataset {name!r} ({split}) has no images of {len(empty)} subclass(es): {shown}"
                                 f"{' …' if len(empty) > 5 else ''}; pass allow_empty_classes=True to accept that")

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        p = Path(self.files[i])
        return p if p.is_absolute() or self.root is None else self.root / p

    def load(self, i: int) -> torch.Tensor:
        """uint8 (C, H, W); an unreadable file is an EfditError naming it."""
        try:
            a = read_image(self.path(i), self.image_size, self.num_channels)
        except (OSError, SyntaxError, ValueError) as e:
            raise EfditError(f"cannot read image {self.path(i)} ({type(e).__name__}: {e})") from None
        return torch.from_numpy(np.array(a)).permute(2, 0, 1)  # a writable copy

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return to_signed(self.load(i)), int(self.sub_labels[i]), int(self._super_labels[i])

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None, hflip: bool = False):
        """Decode items idx (thread pool): x float32 (B, C, H, W) in [-1, 1], sub (B,), super (B,)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        ids = idx.tolist()
        if self.num_workers > 1 and len(ids) > 1:
            with ThreadPoolExecutor(min(self.num_workers, len(ids))) as pool:  # PIL decodes without the GIL
                images = list(pool.map(self.load, ids))
        else:
            images = [self.load(i) for i in ids]
        x = to_signed(torch.stack(images))
        if hflip:
            flip = torch.rand(len(ids), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, self.sub_labels[idx], self._super_labels[idx]

    def to_memory(self, progress: bool = True):
        """Decode every file into an in-memory HierarchicalDataset (for evaluation subsets: mind the size).
        With on_bad_image="skip" unreadable files are left out; otherwise the first one is an EfditError."""
        from tqdm.auto import tqdm

        def load(i):
            try:
                return self.load(i)
            except EfditError:
                if self.on_bad_image == "skip":
                    return None
                raise
        with ThreadPoolExecutor(max(1, self.num_workers)) as pool:
            images = list(tqdm(pool.map(load, range(len(self))), total=len(self), disable=not progress,
                               desc=f"reading {self.name} ({self.split})", unit="img", leave=False))
        keep = [i for i, im in enumerate(images) if im is not None]
        if not keep:
            raise EfditError(f"dataset {self.name!r} ({self.split}): no readable images")
        return HierarchicalDataset(torch.stack([images[i] for i in keep]), self.sub_labels[keep], self.hierarchy,
                                   self.name, self.split, allow_empty_classes=True,
                                   info={**self.info, "files": len(self), "read": len(keep)})

    def subset(self, indices, split: str | None = None) -> "FileDataset":
        idx = torch.as_tensor(indices, dtype=torch.long).flatten()
        return FileDataset([self.files[i] for i in idx.tolist()], self.sub_labels[idx], self.hierarchy, self.name,
                           split or self.split, self.image_size, self.num_channels, self.root, self.on_bad_image,
                           allow_empty_classes=True, info=self.info, num_workers=self.num_workers)

    def __repr__(self) -> str:
        c, (h, w) = self.num_channels, self.image_size
        return (f"FileDataset({self.name!r}, split={self.split!r}, {len(self)} files -> {c}x{h}x{w}, "
                f"{self.num_sub} subclasses under {self.num_super} superclasses)")


def folder_files(root: str | os.PathLike, split: str = "train", image_size=None, channels=None,
                 on_bad_image: str = "fail", allow_empty_classes: bool = False) -> FileDataset:
    """The folder format (root/<superclass>/<subclass>/*.jpg, see efdit.data.folder) read lazily."""
    from .folder import LAYOUT, scan_folder, split_root
    root = Path(root).expanduser()
    if not root.is_dir():
        raise EfditError(f"image folder {root} does not exist (expected {LAYOUT})")
    root = split_root(root, split)
    classes, _ = scan_folder(root)
    files = [f for _, _, fs in classes for f in fs]
    if not files:
        raise EfditError(f"no images found under {root} (expected {LAYOUT})")
    hierarchy = Hierarchy.from_paths([(sup, sub) for sup, sub, _ in classes])
    labels = [k for k, (_, _, fs) in enumerate(classes) for _ in fs]
    return FileDataset([f.relative_to(root) for f in files], labels, hierarchy, "folder", split, image_size, channels,
                       root=root, on_bad_image=on_bad_image, allow_empty_classes=allow_empty_classes,
                       info={"source": str(root)})
