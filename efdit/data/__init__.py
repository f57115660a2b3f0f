"""Hierarchical image datasets (superclass -> subclass), held in memory.

    from efdit.data import build_dataset
    ds = build_dataset("fmnist", split="train")          # 60000 x 1 x 28 x 28, 10 subclasses / 4 superclasses
    x, sub, sup = ds.sample_batch(128)                   # x float32 (128, 1, 28, 28) in [-1, 1]

Loaders are imported only when used, so `import efdit.data` stays light (no scikit-learn, no PIL).
"""
from __future__ import annotations

import inspect
import os

from efdit.data.base import HierarchicalDataset
from efdit.data.hierarchy import Hierarchy
from efdit.errors import EfditError, did_you_mean

# name -> one-line description (for CLI help); the loaders are in the modules of the same name
DATASETS: dict[str, str] = {
    "digits": "scikit-learn digits, 1,797 x 8x8 gray, 10 digits under 3 made-up superclasses (needs efdit[data])",
    "fmnist": "Fashion-MNIST, 60k+10k x 28x28 gray, 10 classes under 4 superclasses (Debian dataset-fashion-mnist)",
    "emoji": "emoji drawings (Google + Twitter), 32x32 RGB, Unicode group -> subgroup -> emoji (npm, --emoji)",
    "folder": "your images: root/<superclass>/<subclass>/*.png|jpg|... (needs root; lazy=True reads on access)",
    "inat21": "iNaturalist 2021 (root: train_mini.json + train_mini/ …), 10,000 species / 11 supercategories, lazy",
    "vegfru": "VegFru (root: vegfru_list/ + veg200_images/ + fru92_images/), 292 / 25, lazy",
}
ALIASES = {"inat": "inat21", "inat2021": "inat21", "inaturalist": "inat21", "inat-2021": "inat21",
           "fashion-mnist": "fmnist", "fashion_mnist": "fmnist", "fashionmnist": "fmnist", "sklearn-digits": "digits"}

# datasets that are one set, with no test split: a reference for evaluation is a class-balanced draw of it
ONE_SET = frozenset({"emoji"})

__all__ = ["Hierarchy", "HierarchicalDataset", "build_dataset", "DATASETS", "ONE_SET"]


def _reject(name: str, **given) -> None:
    """An EfditError for options a dataset does not take."""
    bad = [k for k, v in given.items() if v is not None]
    if bad:
        raise EfditError(f"dataset {name!r} does not take {', '.join(bad)}")


def _call(name: str, loader, *args, **kwargs) -> HierarchicalDataset:
    """Call a loader, turning unknown keyword arguments into an EfditError that lists the known ones."""
    params = inspect.signature(loader).parameters
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise EfditError(f"dataset {name!r} does not take {', '.join(unknown)} "
                         f"(its options: {', '.join(p for p in params if p != 'split')})")
    return loader(*args, **kwargs)


def build_dataset(name: str, split: str = "train", image_size: int | tuple[int, int] | None = None,
                  channels: int | None = None, root: str | os.PathLike | None = None, on_bad_image: str = "skip",
                  super_level: str | None = None, sub_level: str | None = None, **kw) -> HierarchicalDataset:
    """Load dataset `name` ("digits", "fmnist", "emoji", "folder"); see `DATASETS`.

    image_size: int or (H, W); None = the dataset's own size (digits 8, fmnist 28, emoji 32, folder 64).
    channels: 1 or 3; None = the dataset's own (gray for digits/fmnist, RGB for emoji/folder).
    root: data folder (fmnist: the idx files; emoji: the npm node_modules; folder: required).
    on_bad_image: "skip" | "fail", folder only. super_level / sub_level: emoji only.
    Extra keyword arguments go to the loader (e.g. emoji `categories`, `styles`; any `allow_empty_classes`).
    """
    key = ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if key == "digits":
        from efdit.data.digits import load_digits
        _reject(key, root=root, super_level=super_level, sub_level=sub_level)
        return _call(key, load_digits, split, image_size=image_size, channels=channels, **kw)
    if key == "fmnist":
        from efdit.data.fmnist import load_fmnist
        _reject(key, super_level=super_level, sub_level=sub_level)
        return _call(key, load_fmnist, split, image_size=image_size, channels=channels, root=root, **kw)
    if key == "emoji":
        from efdit.data.emoji import load_emoji
        return _call(key, load_emoji, split, image_size=image_size, channels=channels, root=root,
                          super_level=super_level, sub_level=sub_level, **kw)
    if key in ("inat21", "vegfru"):
        if root is None:
            raise EfditError(f"dataset {key!r} needs root (its folder; see `efdit.data.{key[:4]}` for the layout)")
        _reject(key, super_level=super_level, sub_level=sub_level)
        if key == "inat21":
            from efdit.data.inat import load_inat21 as loader
        else:
            from efdit.data.vegfru import load_vegfru as loader
        return _call(key, loader, root, split, image_size=image_size, channels=channels, on_bad_image=on_bad_image,
                     **kw)
    if key == "folder":
        from efdit.data.folder import load_folder
        if root is None:
            raise EfditError("dataset 'folder' needs root (a folder laid out as root/<superclass>/<subclass>/*.png)")
        _reject(key, super_level=super_level, sub_level=sub_level)
        if kw.pop("lazy", False):
            from efdit.data.files import folder_files
            return _call(key, folder_files, root, split, image_size=image_size, channels=channels,
                         on_bad_image=on_bad_image, **kw)
        return _call(key, load_folder, root, split, image_size=image_size, channels=channels,
                     on_bad_image=on_bad_image, **kw)
    raise EfditError(f"unknown dataset {name!r}{did_you_mean(str(name).lower(), DATASETS)} "
                     f"(known: {', '.join(sorted(DATASETS))})")
