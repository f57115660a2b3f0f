"""Fashion-MNIST: 70,000 28x28 grayscale photos of clothes (60,000 train + 10,000 test), 10 classes.

Source: Zalando Research (Xiao, Rasul & Vollgraf 2017), MIT licence, read from the Debian package
`dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`;
another folder with the same four files can be given as `root` or with the env var EFDIT_FMNIST_ROOT).

Hierarchy: the 10 standard classes (ids 0..9 kept exactly) under 4 superclasses that we chose because
they are natural:
    0 tops            : T-shirt/top (0), Pullover (2), Coat (4), Shirt (6)   <- the classic confusable set
    1 bottoms+dresses : Trouser (1), Dress (3)
    2 footwear        : Sandal (5), Sneaker (7), Ankle boot (9)
    3 bag             : Bag (8)
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from efdit.data.base import HierarchicalDataset, as_size, convert_channels, resize_uint8
from efdit.data.hierarchy import Hierarchy
from efdit.errors import EfditError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
ROOT_ENV = "EFDIT_FMNIST_ROOT"
SUB_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SUPER_NAMES = ["tops", "bottoms+dresses", "footwear", "bag"]
PARENT = [0, 1, 0, 1, 0, 2, 0, 2, 3, 2]  # superclass id of standard label 0..9
SPLIT_FILES = {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}
INSTALL_HINT = ("install it with `apt-get install dataset-fashion-mnist` (or scripts/install_data.sh), "
                f"or set {ROOT_ENV} to a folder holding {{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz")


def fmnist_hierarchy() -> Hierarchy:
    return Hierarchy(list(SUB_NAMES), list(SUPER_NAMES), torch.tensor(PARENT))


def fmnist_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: `root` if given, else $EFDIT_FMNIST_ROOT, else the Debian package's folder."""
    return Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an IDX file (gzip or plain): big-endian int32 magic, dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise EfditError(f"Fashion-MNIST file {path} is unreadable ({e}); reinstall: {INSTALL_HINT}") from None
    ndim = magic & 0xFF
    header = np.frombuffer(raw, dtype=">i4", count=1 + ndim) if len(raw) >= 4 * (1 + ndim) else None
    if header is None or header[0] != magic:
        raise EfditError(f"Fashion-MNIST file {path} is not an IDX file with magic {magic}")
    dims = [int(d) for d in header[1:]]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + ndim))
    if data.size != int(np.prod(dims)):
        raise EfditError(f"Fashion-MNIST file {path} is truncated "
                         f"({data.size} bytes of data, expected {int(np.prod(dims))})")
    return data.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise EfditError(f"Fashion-MNIST not found: {root / (stem + '.gz')} is missing; {INSTALL_HINT}")


def load_fmnist(split: str = "train", image_size: int | tuple[int, int] | None = None, channels: int | None = None,
                root: str | os.PathLike | None = None, allow_empty_classes: bool = False) -> HierarchicalDataset:
    """Fashion-MNIST as a `HierarchicalDataset`; split "train" (60k), "test" (10k) or "all" (70k).

    image_size: None keeps 28x28, else bilinear (antialiased) resize; channels: None/1 gray, 3 repeats gray.
    """
    if split not in SPLIT_FILES:
        raise EfditError(f"unknown Fashion-MNIST split {split!r}; known: {', '.join(SPLIT_FILES)}")
    folder = fmnist_root(root)
    xs, ys = [], []
    for kind in SPLIT_FILES[split]:
        x = _read_idx(_find(folder, f"{kind}-images-idx3-ubyte"), 2051)  # (n, 28, 28) uint8
        y = _read_idx(_find(folder, f"{kind}-labels-idx1-ubyte"), 2049)  # (n,) uint8
        if len(x) != len(y):
            raise EfditError(f"Fashion-MNIST {kind}: {len(x)} images but {len(y)} labels in {folder}")
        xs.append(x)
        ys.append(y)
    images = torch.from_numpy(np.concatenate(xs) if len(xs) > 1 else xs[0].copy()).unsqueeze(1)  # (N, 1, 28, 28)
    labels = torch.from_numpy(np.concatenate(ys).astype(np.int64))  # (N,)
    if int(labels.max()) > 9:
        raise EfditError(f"Fashion-MNIST labels in {folder} go up to {int(labels.max())}, expected 0..9")
    images = convert_channels(resize_uint8(images, as_size(image_size, (28, 28))), channels)
    return HierarchicalDataset(images, labels, fmnist_hierarchy(), "fmnist", split,
                               allow_empty_classes=allow_empty_classes,
                               info={"source": str(folder), "licence": "MIT (Zalando SE)"})
