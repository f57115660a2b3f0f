"""`HierarchicalDataset`: a labelled image set held fully in memory, with its superclass -> subclass map.

Every loader in `efdit.data` (fmnist, digits, emoji, folder) returns one. Images are kept as uint8
(N, C, H, W) and turned into float32 in [-1, 1] only when read, so a 60k-image set costs N*C*H*W bytes.
The whole set fits in memory by design: `sample_batch` draws random batches with plain tensor indexing,
which is what a fast CPU training loop wants (no DataLoader, no worker processes).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from efdit.data.hierarchy import Hierarchy
from efdit.errors import EfditError


HOLDOUT_SEED = 2_718  # the held-out part of a train split is the same whatever else is seeded


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (any shape)."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (any shape); values outside [-1, 1] are clipped."""
    return ((x.detach().to(torch.float32) + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def as_size(image_size: int | Sequence[int] | None, default: tuple[int, int]) -> tuple[int, int]:
    """An int (square) or an (H, W) pair -> (H, W); None -> default."""
    if image_size is None:
        return default
    if isinstance(image_size, int):
        h = w = image_size
    else:
        h, w = (int(v) for v in image_size)
    if h < 1 or w < 1:
        raise EfditError(f"image size must be positive, got {image_size!r}")
    return h, w


def resize_uint8(images: torch.Tensor, size: tuple[int, int], chunk: int = 4096) -> torch.Tensor:
    """Resize (N, C, h, w) uint8 -> (N, C, H, W) uint8: bilinear, antialiased when shrinking."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    try:  # torch resizes uint8 directly on CPU (about 2x faster than through float)
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    except (RuntimeError, NotImplementedError):
        pass
    out = torch.empty((*images.shape[:2], *size), dtype=torch.uint8)
    for i in range(0, len(images), chunk):  # chunks keep the float copy small
        x = images[i:i + chunk].to(torch.float32)
        y = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
        out[i:i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def convert_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    """(N, C, H, W) uint8 with C in {1, 3} -> `channels` channels (gray is repeated; RGB -> luma, ITU-R 601)."""
    c = images.shape[1]
    if channels is None or channels == c:
        return images
    if channels not in (1, 3):
        raise EfditError(f"channels must be 1 (gray) or 3 (RGB), got {channels}")
    if c == 1:
        return images.repeat(1, 3, 1, 1)
    if c == 3:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.to(torch.float32) * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise EfditError(f"cannot convert {c}-channel images to {channels} channels")


class LabelSummary:
    """Label summaries and batch drawing shared by every dataset kind (in memory, file-backed, latent cache).

    Needs `hierarchy` (Hierarchy), `sub_labels` (N,) long and `_super_labels` (N,) long on the instance,
    `batch(idx, generator, hflip)` for `sample_batch`, and `subset(indices)`, `name`, `split` for
    `subset_per_class`."""

    @property
    def super_labels(self) -> torch.Tensor:
        """long (N,): superclass id of each item."""
        return self._super_labels

    @property
    def num_sub(self) -> int:
        return self.hierarchy.num_sub

    @property
    def num_super(self) -> int:
        return self.hierarchy.num_super

    def class_counts(self) -> torch.Tensor:
        """long (num_sub,): items per subclass."""
        return torch.bincount(self.sub_labels, minlength=self.hierarchy.num_sub)

    def super_counts(self) -> torch.Tensor:
        """long (num_super,): items per superclass."""
        return torch.bincount(self._super_labels, minlength=self.hierarchy.num_super)

    def subset_per_class(self, n: int, seed: int = 0, allow_fewer: bool = False):
        """A class-balanced subset (the dataset's own kind, through `subset`): `n` random items of every subclass.

        A subclass with fewer than `n` images is an EfditError naming it, unless `allow_fewer=True`
        (then all its images are taken). Deterministic for a given seed; grouped by subclass id.
        """
        return self.subset(self.per_class_indices(n, seed, allow_fewer))

    def holdout(self, n_per_class: int, seed: int = HOLDOUT_SEED):
        """-> (the rest, a held-out class-balanced part of `n_per_class` items per subclass): the rest is what a
        run trains on, the held-out part is where its settings (e.g. the guidance scale) are chosen."""
        held = self.per_class_indices(n_per_class, seed, allow_fewer=True)
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[held] = False
        return self.subset(keep.nonzero().flatten()), self.subset(held, split=f"{self.split}-holdout")

    def per_class_indices(self, n: int, seed: int = 0, allow_fewer: bool = False) -> torch.Tensor:
        """long: the indices of `subset_per_class` (grouped by subclass id, ascending within a class)."""
        if n < 1:
            raise EfditError(f"subset_per_class needs n >= 1, got {n}")
        counts = self.class_counts()
        short = [i for i in range(self.num_sub) if int(counts[i]) < n]
        if short and not allow_fewer:
            shown = ", ".join(f"{self.hierarchy.sub_names[i]!r} ({int(counts[i])})" for i in short[:5])
            more = f" and {len(short) - 5} more" if len(short) > 5 else ""
            raise EfditError(f"dataset {self.name!r} ({self.split}) has fewer than {n} images of subclass "
                             f"{shown}{more}; lower n or pass allow_fewer=True")
        g = torch.Generator().manual_seed(seed)
        order = torch.argsort(self.sub_labels, stable=True)  # indices grouped by subclass, original order
        picks, start = [], 0
        for c in counts.tolist():
            members = order[start:start + c]
            start += c
            if c:
                chosen = members[torch.randperm(c, generator=g)[:n]]
                picks.append(chosen.sort().values)
        return torch.cat(picks)

    def sample_batch(self, batch_size: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None, hflip: bool = False):
        """A random batch (indices drawn with replacement): x float32 (B, C, H, W), sub (B,), super (B,), through
        the dataset's own `batch(idx, generator, hflip)`. `hflip=True` mirrors a random half of the images (fine
        for emoji / clothes, wrong for digits)."""
        idx = torch.randint(len(self), (batch_size,), generator=generator)
        x, sub, sup = self.batch(idx, generator, hflip)
        if device is not None:
            x, sub, sup = x.to(device), sub.to(device), sup.to(device)
        return x, sub, sup


class HierarchicalDataset(LabelSummary, Dataset):
    """Images with a subclass label each; the superclass follows from `hierarchy.parent`.

    Attributes:
        images:     uint8 (N, C, H, W)
        sub_labels: long (N,), subclass ids in [0, hierarchy.num_sub)
        hierarchy:  the `Hierarchy` (all subclasses, also those absent from a subset)
        name, split: e.g. "fmnist", "train"
        info:       free-form metadata (source, licence, ...), copied into subsets

    Loaders may attach more per-image fields with `set_per_image` (e.g. the emoji style of each image);
    `subset` slices those along with the images.

    `dataset[i]` -> (image float32 (C, H, W) in [-1, 1], subclass id, superclass id).
    """

    def __init__(self, images: torch.Tensor, sub_labels: torch.Tensor, hierarchy: Hierarchy, name: str,
                 split: str = "train", *, allow_empty_classes: bool = False, info: dict | None = None):
        images = torch.as_tensor(images)
        sub_labels = torch.as_tensor(sub_labels).to(torch.long)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if sub_labels.shape != (images.shape[0],):
            raise ValueError(f"sub_labels has shape {tuple(sub_labels.shape)}, expected ({images.shape[0]},)")
        self.images = images.contiguous()
        self.sub_labels = sub_labels
        self.hierarchy = hierarchy
        self.name = name
        self.split = split
        self.info = dict(info or {})
        self._per_image: list[str] = []
        if len(images) == 0:
            raise EfditError(f"dataset {name!r} ({split}) has no images; check the data folder or the filters")
        if int(sub_labels.min()) < 0 or int(sub_labels.max()) >= hierarchy.num_sub:
            raise ValueError(f"sub_labels hold ids outside [0, {hierarchy.num_sub})")
        self._super_labels = hierarchy.parent[sub_labels]  # (N,) long
        if not allow_empty_classes:
            empty = [hierarchy.sub_names[i] for i in torch.nonzero(self.class_counts() == 0).flatten().tolist()]
            if empty:
                more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
                shown = ", ".join(repr(e) for e in empty[:5]) + more
                raise EfditError(f"dataset {name!r} ({split}) has no images of subclass {shown}; "
                                 f"add images or pass allow_empty_classes=True")

    # ---- shape and label summaries -----------------------------------------------------------
    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)"""
        return tuple(self.images.shape[-2:])

    # ---- reading -----------------------------------------------------------------------------
    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return to_signed(self.images[i]), int(self.sub_labels[i]), int(self._super_labels[i])

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None, hflip: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Items idx (B,): x float32 (B, C, H, W) in [-1, 1], sub (B,), super (B,) (what the training loop reads;
        the index draw is the loop's, e.g. per rank)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        x = to_signed(self.images[idx])
        if hflip:
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, self.sub_labels[idx], self._super_labels[idx]

    # ---- subsets -----------------------------------------------------------------------------
    def set_per_image(self, field: str, values) -> None:
        """Attach a per-image field (tensor or list of length N) as attribute `field`; subsets slice it."""
        if len(values) != len(self):
            raise ValueError(f"{field} has {len(values)} entries, expected {len(self)}")
        setattr(self, field, values)
        if field not in self._per_image:
            self._per_image.append(field)

    def subset(self, indices: torch.Tensor | Sequence[int], split: str | None = None) -> "HierarchicalDataset":
        """A new dataset with the given images (same hierarchy; subclasses may end up empty)."""
        idx = torch.as_tensor(indices, dtype=torch.long).flatten()
        if len(idx) == 0:
            raise EfditError(f"subset of dataset {self.name!r} ({self.split}) would have no images")
        new = copy.copy(self)
        new.images = self.images[idx]
        new.sub_labels = self.sub_labels[idx]
        new._super_labels = self._super_labels[idx]
        new.info = dict(self.info)
        new._per_image = list(self._per_image)
        if split is not None:
            new.split = split
        for field in self._per_image:
            values = getattr(self, field)
            if isinstance(values, torch.Tensor):
                setattr(new, field, values[idx])
            else:
                setattr(new, field, [values[i] for i in idx.tolist()])
        return new

    def __repr__(self) -> str:
        c, (h, w) = self.num_channels, self.image_size
        return (f"HierarchicalDataset({self.name!r}, split={self.split!r}, {len(self)} images {c}x{h}x{w}, "
                f"{self.num_sub} subclasses under {self.num_super} superclasses)")
