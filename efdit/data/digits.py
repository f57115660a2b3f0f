"""scikit-learn `load_digits`: 1,797 handwritten digits, 8x8 grayscale with 16 gray levels (0..16).

Source: UCI "Optical Recognition of Handwritten Digits" (Alpaydin & Kaynak), CC BY 4.0, shipped inside
scikit-learn (`sklearn/datasets/data/digits.csv.gz`): offline wherever scikit-learn is installed (efdit[data]). Tiny:
meant for unit tests and the CPU smoke demo, far too small and low-resolution for meaningful FD numbers.

Hierarchy: digits have none. The 3 superclasses below are MADE UP (roughly by the shape of the glyph)
only to exercise the superclass -> subclass code paths; they carry no real meaning:
    0 loops    : 0, 6, 8, 9
    1 straight : 1, 4, 7
    2 curves   : 2, 3, 5
Subclass id = digit value.

Splits (deterministic, stratified, no random generator involved): within each digit, in data order,
every 5th image (positions 4, 9, 14, ...) is "test" (355 images, ~20 %), the rest "train" (1,442);
"all" is all 1,797.
"""
from __future__ import annotations

import numpy as np
import torch

from efdit.data.base import HierarchicalDataset, as_size, convert_channels, resize_uint8
from efdit.data.hierarchy import Hierarchy
from efdit.errors import EfditError

SUB_NAMES = [str(d) for d in range(10)]
SUPER_NAMES = ["loops", "straight", "curves"]  # made up, see the module docstring
PARENT = [0, 1, 2, 2, 1, 2, 0, 1, 0, 0]  # superclass id of digit 0..9
SPLITS = ("train", "test", "all")


def digits_hierarchy() -> Hierarchy:
    return Hierarchy(list(SUB_NAMES), list(SUPER_NAMES), torch.tensor(PARENT))


def _test_mask(labels: np.ndarray) -> np.ndarray:
    """True for every 5th image of each digit (in data order)."""
    mask = np.zeros(len(labels), dtype=bool)
    for d in range(10):
        members = np.flatnonzero(labels == d)
        mask[members[4::5]] = True
    return mask


def load_digits(split: str = "train", image_size: int | tuple[int, int] | None = None,
                channels: int | None = None, allow_empty_classes: bool = False) -> HierarchicalDataset:
    """The digits as a `HierarchicalDataset`: uint8 (N, 1, 8, 8), values 0..16 scaled to 0..255."""
    if split not in SPLITS:
        raise EfditError(f"unknown digits split {split!r}; known: {', '.join(SPLITS)}")
    try:
        from sklearn.datasets import load_digits as sk_load_digits  # heavy import, kept out of `import efdit.data`
    except ImportError:
        raise EfditError("the digits dataset ships inside scikit-learn, which is not installed: "
                         "pip install 'efdit[data]'") from None

    d = sk_load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (1797, 8, 8)
    labels = d.target.astype(np.int64)  # (1797,)
    if split != "all":
        keep = _test_mask(labels) == (split == "test")
        images, labels = images[keep], labels[keep]
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)  # (N, 1, 8, 8)
    x = convert_channels(resize_uint8(x, as_size(image_size, (8, 8))), channels)
    return HierarchicalDataset(x, torch.from_numpy(labels), digits_hierarchy(), "digits", split,
                               allow_empty_classes=allow_empty_classes,
                               info={"source": "sklearn.datasets.load_digits", "licence": "CC BY 4.0 (UCI)",
                                     "hierarchy": "made up: loops / straight / curves"})
