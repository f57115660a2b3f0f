"""iNaturalist 2021 (visipedia/inat_comp): 10,000 species under 11 supercategories, read lazily from disk.

Expected layout (the official archives, extracted side by side):

    root/train_mini.json   root/train_mini/<image_dir_name>/<uuid>.jpg     500,000 images (50 per species)
    root/train.json        root/train/…                                  2,686,843 images
    root/val.json          root/val/…                                      100,000 images (10 per species)

The JSON files are COCO-style: `categories` (id, name, supercategory, image_dir_name, …), `images` (id,
file_name relative to root), `annotations` (image_id, category_id). Subclass ids are the category ids (the same
order as torchvision's ImageFolder over the sorted `00000_…` directories, as in FineDiffusion); the superclass
comes from each category's `supercategory`, ordered as FineDiffusion numbers them (Plants 0 … Animalia 10).
A JSON with all 10,000 categories is cross-checked against the official per-supercategory counts and index ranges
(efdit.md §1.2); a mismatch is an error (a wrong or edited file).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import EfditError
from .files import FileDataset
from .hierarchy import Hierarchy

SPLITS = ("train_mini", "train", "val")
SUPERCATEGORIES = ("Plants", "Insects", "Birds", "Fungi", "Reptiles", "Mammals", "Ray-finned Fishes", "Amphibians",
                   "Mollusks", "Arachnids", "Animalia")
SPECIES_PER_SUPERCATEGORY = (4271, 2526, 1486, 341, 313, 246, 183, 170, 169, 153, 142)
NUM_SPECIES = 10_000
# inclusive subclass index ranges per superclass id (efdit.md §1.2); Animalia (10) holds all the rest
INDEX_RANGES = {0: [(5729, 9999)], 1: [(175, 2700)], 2: [(3111, 4596)], 3: [(5388, 5728)], 4: [(4859, 5171)],
                5: [(4613, 4858)], 6: [(2756, 2938)], 7: [(2939, 3108)], 8: [(5219, 5387)], 9: [(4, 156)]}


def reference_parent() -> torch.Tensor:
    """long (10000,): the superclass id of every species from the published index ranges."""
    parent = torch.full((NUM_SPECIES,), 10, dtype=torch.long)
    for s, ranges in INDEX_RANGES.items():
        for lo, hi in ranges:
            parent[lo:hi + 1] = s
    return parent


def reference_hierarchy() -> Hierarchy:
    """The iNat 2021 hierarchy without its JSON (species named by id): for dry runs and parameter counts."""
    return Hierarchy([f"species-{i:05d}" for i in range(NUM_SPECIES)], list(SUPERCATEGORIES), reference_parent(),
                     ("supercategory", "species"))


def read_inat_json(path: str | os.PathLike) -> tuple[list[dict], list[tuple[str, int]]]:
    """-> (categories sorted by id, [(file_name, category_id)] for every annotated image)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        cats = sorted(d["categories"], key=lambda c: c["id"])
        cat_of = {a["image_id"]: a["category_id"] for a in d["annotations"]}
        images = [(im["file_name"], cat_of[im["id"]]) for im in d["images"] if im["id"] in cat_of]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EfditError(f"{path} is not an iNat 2021 annotation file ({type(e).__name__}: {e})") from None
    return cats, images


def hierarchy_from_categories(cats: list[dict], check: bool = True) -> Hierarchy:
    """Species (by category id) under their supercategories; with all 10,000 species, cross-checked."""
    ids = [c["id"] for c in cats]
    if ids != list(range(len(cats))):
        raise EfditError("iNat categories must have ids 0..N-1 (got gaps or duplicates)")
    names = [c.get("name") or c.get("image_dir_name") or str(c["id"]) for c in cats]
    if len(set(names)) != len(names):  # not the case in the official files; keep ids unique anyway
        names = [c.get("image_dir_name") or f"{c['id']:05d}_{n}" for c, n in zip(cats, names)]
    found = sorted({c["supercategory"] for c in cats},
                   key=lambda s: (SUPERCATEGORIES.index(s) if s in SUPERCATEGORIES else len(SUPERCATEGORIES), s))
    parent = torch.tensor([found.index(c["supercategory"]) for c in cats], dtype=torch.long)
    h = Hierarchy(names, found, parent, ("supercategory", "species"))
    if check and len(cats) == NUM_SPECIES:
        check_counts(h)
    return h


def check_counts(h: Hierarchy) -> None:
    """EfditError unless `h` has iNat 2021's 11 supercategories, their species counts and index ranges."""
    if tuple(h.super_names) != SUPERCATEGORIES:
        raise EfditError(f"iNat 2021 has the supercategories {', '.join(SUPERCATEGORIES)}; "
                         f"the JSON has {', '.join(h.super_names)}")
    counts = torch.bincount(h.parent, minlength=len(SUPERCATEGORIES)).tolist()
    if tuple(counts) != SPECIES_PER_SUPERCATEGORY:
        bad = [f"{n} {c} (expected {e})" for n, c, e in zip(SUPERCATEGORIES, counts, SPECIES_PER_SUPERCATEGORY)
               if c != e]
        raise EfditError(f"iNat 2021 species per supercategory differ from the official table: {', '.join(bad)}")
    wrong = torch.nonzero(h.parent != reference_parent()).flatten().tolist()
    if wrong:
        raise EfditError(f"iNat 2021 species {wrong[:5]} lie under other supercategories than the official "
                         f"index ranges say ({len(wrong)} in all)")


def load_inat21(root: str | os.PathLike, split: str = "train_mini", image_size: int | tuple[int, int] | None = None,
                channels: int | None = None, on_bad_image: str = "fail", check: bool = True,
                allow_empty_classes: bool = False) -> FileDataset:
    """iNat 2021 `split` (train_mini | train | val) under `root` as a lazy FileDataset (default 256x256 RGB)."""
    if split not in SPLITS:
        raise EfditError(f"iNat 2021 split must be one of {', '.join(SPLITS)}, got {split!r}")
    root = Path(root).expanduser()
    js = root / f"{split}.json"
    if not js.is_file():
        raise EfditError(f"iNat 2021: {js} not found (expected root/{split}.json and root/{split}/…, the official "
                         f"{split}.json.tar.gz and {split}.tar.gz extracted into one folder)")
    cats, images = read_inat_json(js)
    h = hierarchy_from_categories(cats, check=check)
    if not images:
        raise EfditError(f"{js} lists no annotated images")
    files, labels = zip(*images)
    return FileDataset(files, list(labels), h, "inat21", split, image_size, channels, root=root,
                       on_bad_image=on_bad_image, allow_empty_classes=allow_empty_classes,
                       info={"source": str(js), "licence": "iNat 2021 images: per-image licences (see the JSON)"},
                       missing_hint=f"listed in {js.name}: extract {split}.tar.gz into {root}")
