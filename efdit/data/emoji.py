"""Emoji drawings with the Unicode group -> subgroup -> emoji hierarchy.

These are DRAWINGS (flat vector-style artwork of one concept each), not photos: the same emoji drawn
by independent artists gives a few images per fine class ("eagle" by Google and by Twitter). Useful as a
real, small, colour, three-level hierarchical set (e.g. `Animals & Nature / animal-bird / eagle`); not a
stand-in for natural-image benchmarks.

Sources (64x64 RGBA PNGs, skin-tone variants not used, the "Component" group skipped):
    google   npm `emoji-datasource-google@16.0.0`  - Noto Emoji artwork, Apache-2.0 (package MIT)
    twitter  npm `emoji-datasource-twitter@16.0.0` - Twemoji artwork, CC BY 4.0 (package MIT)
    emojione optional: EmojiOne 2 PNGs (Debian `ruby-gemojione`), CC BY-SA 4.0; used only when the env
             var GEMOJIONE_PNG names an existing folder of `<CODEPOINTS>.png` files
The npm packages live in `<repo>/data/npm/node_modules` (`scripts/install_data.sh --emoji`); the env var
EFDIT_EMOJI_NPM (or the `root` argument) points elsewhere. Metadata (`category` = group, `subcategory` =
subgroup, `short_name` = emoji) comes from the packages' `emoji.json`.

Images are composited on white at 64x64, then resized (Lanczos) to `image_size` (default 32), RGB.
The default filter ("Animals & Nature", "Food & Drink") gives 290 emoji in 15 subgroups, 580 images
with the two npm styles. Splits: "train" and "all" are the whole set (2-3 images per emoji leave
nothing to hold out).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from efdit.data.base import HierarchicalDataset, as_size, convert_channels
from efdit.data.hierarchy import Hierarchy
from efdit.errors import EfditError, did_you_mean

LEVELS = ("group", "subgroup", "emoji")
DEFAULT_CATEGORIES = ("Animals & Nature", "Food & Drink")
NPM_STYLES = ("google", "twitter")
VERSION = "16.0.0"
NPM_ENV = "EFDIT_EMOJI_NPM"
EMOJIONE_ENV = "GEMOJIONE_PNG"
SKIN_TONES = {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}
SPLITS = ("train", "all")
LICENCES = {"google": "Apache-2.0 (Noto Emoji)", "twitter": "CC BY 4.0 (Twemoji)",
            "emojione": "CC BY-SA 4.0 (EmojiOne 2)"}
INSTALL_HINT = ("run `scripts/install_data.sh --emoji` (= `npm install --prefix data/npm --no-audit --no-fund "
                f"emoji-datasource-google@{VERSION} emoji-datasource-twitter@{VERSION}` in the repo), "
                f"or set {NPM_ENV} to the node_modules folder holding them")


def emoji_npm_root(root: str | os.PathLike | None = None) -> Path:
    """`root` if given, else $EFDIT_EMOJI_NPM, else <repo>/data/npm/node_modules (or ./data/npm/node_modules)."""
    if root or os.environ.get(NPM_ENV):
        return Path(root or os.environ[NPM_ENV])
    repo = Path(__file__).resolve().parents[2] / "data" / "npm" / "node_modules"
    cwd = Path("data") / "npm" / "node_modules"
    return repo if repo.is_dir() or not cwd.is_dir() else cwd


def _style_dirs(npm: Path, styles: Sequence[str]) -> dict[str, Path]:
    dirs = {}
    for s in styles:
        if s in NPM_STYLES:
            d = npm / f"emoji-datasource-{s}" / "img" / s / "64"
            if not d.is_dir():
                raise EfditError(f"emoji images for style {s!r} not found ({d} is missing); {INSTALL_HINT}")
        elif s == "emojione":
            env = os.environ.get(EMOJIONE_ENV)
            if not env or not Path(env).is_dir():
                raise EfditError(f"style 'emojione' needs {EMOJIONE_ENV} set to the EmojiOne 2 PNG folder "
                                 "(Debian ruby-gemojione: .../gems/gemojione-3.3.0/assets/png)")
            d = Path(env)
        else:
            raise EfditError(f"unknown emoji style {s!r}; known: google, twitter, emojione")
        dirs[s] = d
    return dirs


def _metadata(npm: Path) -> list[dict]:
    for s in NPM_STYLES:  # both packages ship the same emoji.json
        p = npm / f"emoji-datasource-{s}" / "emoji.json"
        if p.is_file():
            with open(p, encoding="utf-8") as f:
                return json.load(f)
    raise EfditError(f"emoji metadata not found in {npm}; {INSTALL_HINT}")


def _check_categories(categories: Sequence[str], known: list[str]) -> None:
    for c in categories:
        if c == "Component":
            raise EfditError("the 'Component' group (skin tones, hair styles) holds modifiers, not emoji; "
                             "it is always skipped")
        if c not in known:
            raise EfditError(f"unknown emoji group {c!r}{did_you_mean(c, known, cutoff=0.4)} "
                             f"(known: {', '.join(known)})")


def _render(path: Path, size: tuple[int, int]) -> np.ndarray:
    """PNG -> RGB on white -> (H, W, 3) uint8. Composite before resizing so edges blend with white."""
    with Image.open(path) as im:
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        bg.alpha_composite(im)
        rgb = bg.convert("RGB")
    if rgb.size != (size[1], size[0]):
        rgb = rgb.resize((size[1], size[0]), Image.LANCZOS)
    return np.asarray(rgb)


def load_emoji(split: str = "train", image_size: int | tuple[int, int] | None = None, channels: int | None = None,
               root: str | os.PathLike | None = None, super_level: str | None = None, sub_level: str | None = None,
               categories: Sequence[str] | str | None = DEFAULT_CATEGORIES, styles: Sequence[str] | None = None,
               allow_empty_classes: bool = False) -> HierarchicalDataset:
    """The emoji set as a `HierarchicalDataset` (see the module docstring).

    super_level / sub_level: two of "group", "subgroup", "emoji", super above sub (default subgroup / emoji).
    categories: groups to keep; None or "all" = every group but "Component".
    styles: default google + twitter, + emojione when $GEMOJIONE_PNG is an existing folder.
    Extra attributes: `paths` (one (group, subgroup, emoji) tuple per emoji present), per image
    `emoji_labels` (long (N,), index into `paths`) and `style_labels` (long (N,), index into `styles`).
    """
    if split not in SPLITS:
        raise EfditError(f"unknown emoji split {split!r}; known: {', '.join(SPLITS)} (both are the whole set)")
    super_level, sub_level = super_level or "subgroup", sub_level or "emoji"
    for lv in (super_level, sub_level):
        if lv not in LEVELS:
            raise EfditError(f"unknown emoji level {lv!r}; known: {', '.join(LEVELS)}")
    if LEVELS.index(super_level) >= LEVELS.index(sub_level):
        raise EfditError(f"super_level {super_level!r} must lie above sub_level {sub_level!r} "
                         f"(order: {' -> '.join(LEVELS)})")
    size = as_size(image_size, (32, 32))
    if styles is None:
        env = os.environ.get(EMOJIONE_ENV)
        styles = NPM_STYLES + (("emojione",) if env and Path(env).is_dir() else ())
    styles = tuple(styles)
    npm = emoji_npm_root(root)
    if not npm.is_dir():
        raise EfditError(f"emoji data not found: {npm} does not exist; {INSTALL_HINT}")
    dirs = _style_dirs(npm, styles)
    meta = _metadata(npm)
    known = sorted({e["category"] for e in meta} - {"Component"})
    if categories is None or categories == "all":
        categories = known
    elif isinstance(categories, str):
        categories = (categories,)
    _check_categories(categories, known)

    paths: list[tuple[str, str, str]] = []
    pixels: list[np.ndarray] = []  # each (H, W, 3) uint8
    emoji_ids: list[int] = []
    style_ids: list[int] = []
    for e in sorted(meta, key=lambda e: e["sort_order"]):
        if e["category"] not in categories or SKIN_TONES & set(e["unified"].upper().split("-")):
            continue
        found = False
        for si, s in enumerate(styles):
            if s in NPM_STYLES:
                p = dirs[s] / e["image"]
                ok = e.get(f"has_img_{s}", True) and p.is_file()
            else:
                p = dirs[s] / f"{e['unified'].upper()}.png"
                ok = p.is_file()
            if ok:
                pixels.append(_render(p, size))
                emoji_ids.append(len(paths))
                style_ids.append(si)
                found = True
        if found:
            paths.append((e["category"], e["subcategory"], e["short_name"]))
    if not paths:
        raise EfditError(f"emoji dataset has no images for groups {list(categories)} and styles {list(styles)} "
                         f"in {npm}")

    lo, hi = LEVELS.index(super_level), LEVELS.index(sub_level)
    hierarchy = Hierarchy.from_paths(paths, level_names=LEVELS, super_level=lo, sub_level=hi)
    sub_index = {name: i for i, name in enumerate(hierarchy.sub_names)}
    sub_of_emoji = torch.tensor([sub_index[p[hi]] for p in paths])  # (num_emoji,)
    emoji_labels = torch.tensor(emoji_ids)  # (N,)
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    ds = HierarchicalDataset(convert_channels(images, channels), sub_of_emoji[emoji_labels], hierarchy, "emoji", split,
                             allow_empty_classes=allow_empty_classes,
                             info={"source": str(npm), "styles": list(styles), "categories": list(categories),
                                   "licence": "; ".join(f"{s}: {LICENCES[s]}" for s in styles),
                                   "note": "drawings, not photos"})
    ds.paths = paths
    ds.styles = styles
    ds.set_per_image("emoji_labels", emoji_labels)
    ds.set_per_image("style_labels", torch.tensor(style_ids))
    return ds
