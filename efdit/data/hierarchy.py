"""The label hierarchy: subclass names, superclass names and the sub -> super map.

Every dataset, embedder, sampler and metric that needs the map takes this one object, and it is
saved (as JSON) in every checkpoint's config. A dataset may know a deeper tree (emoji: group ->
subgroup -> emoji); the dataset keeps the full paths and `Hierarchy.from_paths` picks the two levels a model uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import EfditError, did_you_mean


@dataclass
class Hierarchy:
    sub_names: list[str]
    super_names: list[str]
    parent: torch.Tensor  # (num_sub,) long: superclass id of each subclass
    level_names: tuple[str, str] = ("superclass", "subclass")

    def __post_init__(self):
        self.parent = torch.as_tensor(self.parent, dtype=torch.long).clone()
        if self.parent.shape != (len(self.sub_names),):
            raise ValueError(f"parent has shape {tuple(self.parent.shape)}, expected ({len(self.sub_names)},)")
        if len(self.sub_names) and (self.parent.min() < 0 or self.parent.max() >= len(self.super_names)):
            raise ValueError("parent holds a superclass id outside [0, num_super)")
        if len(set(self.sub_names)) != len(self.sub_names):
            raise ValueError("subclass names must be unique")
        if len(set(self.super_names)) != len(self.super_names):
            raise ValueError("superclass names must be unique")

    @property
    def num_sub(self) -> int:
        return len(self.sub_names)

    @property
    def num_super(self) -> int:
        return len(self.super_names)

    def super_of(self, sub_ids: torch.Tensor) -> torch.Tensor:
        """Superclass ids of subclass ids (any shape, any device)."""
        return self.parent.to(sub_ids.device)[sub_ids]

    def children(self, super_id: int) -> list[int]:
        return [i for i in range(self.num_sub) if int(self.parent[i]) == super_id]

    def sub_id(self, name_or_id: str | int) -> int:
        """A subclass id from an id or a name; an unknown name is a ValueError naming close matches."""
        return lookup_class(name_or_id, self.sub_names, "subclass")

    def super_id(self, name_or_id: str | int) -> int:
        return lookup_class(name_or_id, self.super_names, "superclass")

    # ---- (de)serialisation: plain JSON types -------------------------------------------------
    def to_dict(self) -> dict:
        return {"sub_names": list(self.sub_names), "super_names": list(self.super_names),
                "parent": self.parent.tolist(), "level_names": list(self.level_names)}

    @classmethod
    def from_dict(cls, d: dict) -> "Hierarchy":
        return cls(list(d["sub_names"]), list(d["super_names"]), torch.tensor(d["parent"], dtype=torch.long),
                   tuple(d.get("level_names", ("superclass", "subclass"))))

    @classmethod
    def flat(cls, num_classes: int) -> "Hierarchy":
        """A one-superclass hierarchy for data without one (e.g. ImageNet-style class ids)."""
        return cls([str(i) for i in range(num_classes)], ["all"], torch.zeros(num_classes, dtype=torch.long))

    @classmethod
    def from_paths(cls, paths: list[tuple[str, ...]], level_names: tuple[str, ...] | None = None,
                   super_level: int = 0, sub_level: int = -1) -> "Hierarchy":
        """Build from full tree paths (one tuple of names per leaf class, root first), keeping two levels.

        Subclass names are the `sub_level` name of each path (deduplicated in first-seen order); a subclass
        name that appears under two different superclasses is an error.
        """
        sub_names: list[str] = []
        super_names: list[str] = []
        parent: list[int] = []
        for p in paths:
            sup, sub = p[super_level], p[sub_level]
            if sup not in super_names:
                super_names.append(sup)
            s = super_names.index(sup)
            if sub in sub_names:
                if parent[sub_names.index(sub)] != s:
                    raise ValueError(f"subclass {sub!r} lies under two superclasses")
                continue
            sub_names.append(sub)
            parent.append(s)
        names = ("superclass", "subclass")
        if level_names is not None:
            names = (level_names[super_level], level_names[sub_level])
        return cls(sub_names, super_names, torch.tensor(parent, dtype=torch.long), names)

    def __eq__(self, other) -> bool:
        return isinstance(other, Hierarchy) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        sub, sup = self.level_names[1], self.level_names[0]
        return f"Hierarchy({self.num_sub} {sub} classes under {self.num_super} {sup} classes)"


def lookup_class(name_or_id: str | int, names: list[str], what: str) -> int:
    """A class id from its name (exact, then case-insensitive) or its id; an unknown name names close matches."""
    if isinstance(name_or_id, int) or (isinstance(name_or_id, str) and name_or_id.lstrip("-").isdigit()
                                       and name_or_id not in names):
        i = int(name_or_id)
        if not 0 <= i < len(names):
            raise EfditError(f"{what} id {i} is out of range [0, {len(names)})")
        return i
    if name_or_id in names:
        return names.index(name_or_id)
    lower = {n.lower(): k for k, n in enumerate(names)}
    if name_or_id.lower() in lower:
        return lower[name_or_id.lower()]
    raise EfditError(f"unknown {what} {name_or_id!r}{did_you_mean(name_or_id, names)}")
