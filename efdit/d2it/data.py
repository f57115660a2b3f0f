"""D²iT data: an efdit dataset (via `efdit.data.build_dataset`) brought to the size the DVAE needs.

Fashion-MNIST (28x28) is zero-padded to 32x32 (its background is black, so padding adds flat regions and no
resampling blur); any other dataset is loaded at `image_size` by the efdit loaders (resized) when given.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import build_dataset
from ..errors import EfditError


def load_d2it_dataset(dataset: str, split: str = "train", image_size: int = 32, pad: bool = True,
                      channels: int = 0, root: str = "", **levels):
    """-> HierarchicalDataset whose images are uint8 (N, C, image_size, image_size).

    pad: if the dataset's own size is smaller than image_size, pad with zeros (centred) instead of resizing.
    levels: emoji's super_level / sub_level / categories (empty values are left out).
    """
    levels = {k: v for k, v in levels.items() if v}
    ds = build_dataset(dataset, split=split, channels=channels or None, root=root or None, **levels)
    H, W = ds.image_size
    if (H, W) != (image_size, image_size):
        if pad and H <= image_size and W <= image_size:
            top, left = (image_size - H) // 2, (image_size - W) // 2
            ds.images = F.pad(ds.images, (left, image_size - W - left, top, image_size - H - top), value=0)
        else:
            ds = build_dataset(dataset, split=split, image_size=image_size, channels=channels or None,
                               root=root or None, **levels)
    if tuple(ds.images.shape[-2:]) != (image_size, image_size):
        raise EfditError(f"could not bring {dataset} to {image_size}x{image_size}")
    return ds


def split_by_share(ds, share: float, seed: int = 0):
    """-> (train, test) of a dataset without a test split: floor(share · n_c) random images of every class c held
    out (a class of fewer than 1 / share images stays whole in train), deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    held = []
    for c in range(ds.hierarchy.num_sub):
        idx = (ds.sub_labels == c).nonzero().flatten()
        held.append(idx[torch.randperm(len(idx), generator=gen)[:int(share * len(idx))]])
    held = torch.cat(held).sort().values
    keep = torch.ones(len(ds), dtype=torch.bool)
    keep[held] = False
    return ds.subset(keep.nonzero().flatten()), ds.subset(held, split="test")


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)
