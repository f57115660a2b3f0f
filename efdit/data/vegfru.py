"""VegFru (Hou et al., ICCV 2017): 292 vegetable / fruit subclasses under 25 superclasses, read lazily from disk.

Expected layout (the official release):

    root/veg200_images/<subclass>/v_SS_CC_NNNN.jpg    root/fru92_images/<subclass>/f_SS_CC_NNNN.jpg
    root/vegfru_list/vegfru_{train,val,test}.txt       lines "veg200_images/<subclass>/<file>.jpg <subclass id>"
    root/vegfru_list/supvegfru_{train,val,test}.txt    (optional) the same paths with their superclass id 0..24

Subclass ids are the list files' ids (0..291), named by their image folder. The superclass of an image comes from
`supvegfru_*.txt` when present, otherwise from its file name (`v_SS_…` vegetable superclass SS, `f_SS_…` fruit
superclass SS; 15 vegetable + 10 fruit superclasses, numbered vegetables first). Superclass names are `veg-SS` /
`fru-SS` (the release has no name file). The hierarchy is built from every list present, so train, val and test
share it; with all 292 subclasses it must have 25 superclasses. split "trainval" is train + val.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..errors import EfditError
from .files import FileDataset
from .hierarchy import Hierarchy

SPLITS = ("train", "val", "test", "trainval")
NUM_SUB, NUM_SUPER = 292, 25
_CODE = re.compile(r"^([vf])_(\d+)_\d+_\d+")


def _read_list(path: Path) -> list[tuple[str, int]]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise EfditError(f"{path}:{n}: expected '<image path> <class id>', got {line.strip()!r}")
        out.append((parts[0], int(parts[1])))
    return out


def _code_of(path: str) -> tuple[str, int] | None:
    m = _CODE.match(Path(path).name)
    return (m.group(1), int(m.group(2))) if m else None


def _code_name(code: tuple[str, int]) -> str:
    return f"{'veg' if code[0] == 'v' else 'fru'}-{code[1]:02d}"


def vegfru_hierarchy(root: str | os.PathLike) -> Hierarchy:
    """The sub -> super map from every list file under root/vegfru_list."""
    lists = Path(root).expanduser() / "vegfru_list"
    subs: dict[int, str] = {}
    sup_of: dict[int, int | tuple[str, int]] = {}   # subclass id -> superclass id (sup lists) or file code
    sup_code: dict[int, tuple[str, int] | None] = {}
    use_lists = all((lists / f"supvegfru_{s}.txt").is_file() for s in ("train", "val", "test")
                    if (lists / f"vegfru_{s}.txt").is_file())
    for s in ("train", "val", "test"):
        f = lists / f"vegfru_{s}.txt"
        if not f.is_file():
            continue
        sup_ids = dict(_read_list(lists / f"supvegfru_{s}.txt")) if use_lists else {}
        for path, k in _read_list(f):
            name = Path(path).parent.name or f"sub-{k:03d}"
            if subs.setdefault(k, name) != name:
                raise EfditError(f"{f}: subclass id {k} names two folders ({subs[k]!r} and {name!r})")
            code = _code_of(path)
            if use_lists:
                if path not in sup_ids:
                    raise EfditError(f"{path} is in {f.name} but not in supvegfru_{s}.txt")
                sup = sup_ids[path]
            elif code is None:
                raise EfditError(f"cannot tell the superclass of {path}: its name is not v_SS_CC_NNNN / f_SS_CC_NNNN "
                                 f"and {lists}/supvegfru_{s}.txt is missing")
            else:
                sup = code
            if sup_of.setdefault(k, sup) != sup:
                raise EfditError(f"VegFru subclass {name!r} (id {k}) lies under two superclasses")
            if k not in sup_code or sup_code[k] is None:
                sup_code[k] = code
    if not subs:
        raise EfditError(f"VegFru: no list files in {lists} (expected vegfru_train.txt, vegfru_val.txt, "
                         f"vegfru_test.txt from the official release)")
    ids = sorted(subs)
    if ids != list(range(len(ids))):
        missing = sorted(set(range(max(ids) + 1)) - set(ids))
        raise EfditError(f"VegFru lists skip subclass ids {missing[:5]}{' …' if len(missing) > 5 else ''}")
    if use_lists:
        sup_ids_sorted = sorted({sup_of[k] for k in ids})
        names = []
        for s in sup_ids_sorted:          # name a superclass by its file code when all its images agree on one
            codes = {sup_code[k] for k in ids if sup_of[k] == s}
            names.append(_code_name(codes.pop()) if len(codes) == 1 and None not in codes else f"sup-{s:02d}")
        if len(set(names)) != len(names):
            names = [f"sup-{s:02d}" for s in sup_ids_sorted]
        parent = [sup_ids_sorted.index(sup_of[k]) for k in ids]
    else:
        codes = sorted({sup_of[k] for k in ids}, key=lambda c: (c[0] != "v", c[1]))  # vegetables first
        names = [_code_name(c) for c in codes]
        parent = [codes.index(sup_of[k]) for k in ids]
    h = Hierarchy([subs[k] for k in ids], names, torch.tensor(parent, dtype=torch.long), ("superclass", "subclass"))
    if h.num_sub == NUM_SUB and h.num_super != NUM_SUPER:
        raise EfditError(f"VegFru's 292 subclasses lie under {NUM_SUPER} superclasses; the lists give {h.num_super}")
    return h


def reference_hierarchy() -> Hierarchy:
    """A VegFru-shaped placeholder (292 under 25, the map unknown without the lists): dry runs and counts only."""
    parent = torch.arange(NUM_SUB) * NUM_SUPER // NUM_SUB
    return Hierarchy([f"sub-{i:03d}" for i in range(NUM_SUB)], [f"sup-{s:02d}" for s in range(NUM_SUPER)], parent)


def load_vegfru(root: str | os.PathLike, split: str = "train", image_size: int | tuple[int, int] | None = None,
                channels: int | None = None, on_bad_image: str = "fail",
                allow_empty_classes: bool = False) -> FileDataset:
    """VegFru `split` (train | val | test | trainval) as a lazy FileDataset (default 256x256 RGB)."""
    if split not in SPLITS:
        raise EfditError(f"VegFru split must be one of {', '.join(SPLITS)}, got {split!r}")
    root = Path(root).expanduser()
    h = vegfru_hierarchy(root)
    items = []
    for s in (("train", "val") if split == "trainval" else (split,)):
        f = root / "vegfru_list" / f"vegfru_{s}.txt"
        if not f.is_file():
            raise EfditError(f"VegFru: {f} not found (the official vegfru_list folder)")
        items += _read_list(f)
    if not items:
        raise EfditError(f"VegFru: the {split} list(s) under {root / 'vegfru_list'} are empty")
    files, labels = zip(*items)
    return FileDataset(files, list(labels), h, "vegfru", split, image_size, channels, root=root,
                       on_bad_image=on_bad_image, allow_empty_classes=allow_empty_classes,
                       info={"source": str(root)},
                       missing_hint=f"expected veg200_images/ and fru92_images/ under {root}")
