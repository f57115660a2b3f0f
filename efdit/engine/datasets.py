"""A config's data: the training split (or a latent cache), another split, and shapes without the data."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import Config
from ..data import ALIASES, build_dataset
from ..errors import EfditError

FEW_SHOT_SEED = 31_415   # the few-shot training images are the same whatever else is seeded


def load_data(cfg: Config, split: str = "train", lazy: bool = False):
    """The config's training data (`data.latent_cache` if set: a LatentDataset), or another split.
    With `data.holdout_per_class`, "train" is the training split less a class-balanced held-out part and
    "holdout" is that part. lazy: the folder format as a FileDataset (read on access), e.g. to encode a big tree."""
    d = cfg.data
    if split == "train" and d.latent_cache:
        from ..latent.cache import LatentDataset
        return LatentDataset(d.latent_cache)
    if split in ("train", "holdout") and d.holdout_per_class:
        whole = _build(cfg, d.split or default_split(d.dataset), lazy)
        rest, held = whole.holdout(d.holdout_per_class)
        return few_shot(rest, d.train_per_class) if split == "train" else held
    if split == "holdout":
        raise EfditError("there is no held-out split: set --data.holdout_per_class N")
    if split == "train":
        return few_shot(_build(cfg, d.split or default_split(d.dataset), lazy), d.train_per_class)
    return _build(cfg, split, lazy)


def few_shot(ds, n_per_class: int):
    """The first `n_per_class` images of every subclass by a fixed draw (data.train_per_class; 0 = all of them)."""
    return ds.subset_per_class(n_per_class, seed=FEW_SHOT_SEED, allow_fewer=True) if n_per_class else ds


def _build(cfg: Config, split: str, lazy: bool):
    d = cfg.data
    kw = {"lazy": True} if lazy and d.dataset == "folder" else {}
    if d.super_level:
        kw["super_level"] = d.super_level
    if d.sub_level:
        kw["sub_level"] = d.sub_level
    if d.categories:
        kw["categories"] = d.categories if d.categories == "all" else tuple(c.strip() for c in d.categories.split(","))
    return build_dataset(d.dataset, split=split, image_size=d.image_size or None, channels=d.channels or None,
                         root=d.root or None, on_bad_image=d.on_bad_image, **kw)


def default_split(dataset: str) -> str:
    return "train_mini" if ALIASES.get(dataset.lower(), dataset.lower()) == "inat21" else "train"


def reference_shape(cfg: Config):
    """(hierarchy, input size, channels) of iNat 2021 / VegFru from their published description, without the data
    (dry runs): SD-VAE latents (4 channels, /8, or the config of a local VAE folder) when `data.vae` is set."""
    key = ALIASES.get(cfg.data.dataset.lower(), cfg.data.dataset.lower())
    if key == "inat21":
        from ..data.inat import reference_hierarchy
    elif key == "vegfru":
        from ..data.vegfru import reference_hierarchy
    else:
        return None
    size, channels = cfg.data.image_size or 256, 3
    if cfg.data.vae or cfg.data.latent_cache:
        latent_channels, factor = 4, 8
        conf = Path(cfg.data.vae).expanduser() / "config.json"
        if conf.is_file():
            vc = json.loads(conf.read_text())
            latent_channels, factor = vc.get("latent_channels", 4), 2 ** (len(vc.get("block_out_channels", [0] * 4)) - 1)
        size, channels = size // factor, latent_channels
    return reference_hierarchy(), (size, size), channels
