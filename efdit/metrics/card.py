"""The comparability card: what has to be equal for two FD / FID / KID values to be compared.

FD-type metrics depend on the feature extractor and its exact weights, on how images were resized to its input, on
the number of generated and reference images (FD is biased by ~1 / N), on which real images form the reference, and
on everything that decides the samples: sampler, steps, guidance mode and scales, seeds. A card records these from
explicit arguments; `card_differences` names the fields in which two cards differ. Two values are comparable when
their cards agree on every field except those that are the object of the comparison (e.g. the guidance scale in a
guidance sweep): `card_differences(a, b, ignore=("guidance_scales",))`.
"""
from __future__ import annotations

from typing import Any

from efdit.errors import EfditError

CARD_FIELDS = ("extractor", "extractor_weights_sha256", "resize", "resolution", "n_generated", "n_reference",
               "dataset", "reference_split", "sampler", "steps", "guidance", "guidance_scales", "seeds")


def _plain(value: Any) -> Any:
    """JSON-plain form used for comparing: tuples -> lists, dict keys sorted, numpy / torch scalars -> Python."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def comparability_card(*, extractor: str, extractor_weights_sha256: str, resize: str, resolution: int,
                       n_generated: int, n_reference: int, reference_split: str, sampler: str, steps: int,
                       guidance: str, guidance_scales: dict | None, seeds, dataset: str = "", **extra) -> dict:
    """A card (plain dict) of what makes FD-type values comparable, from explicit arguments.

    extractor: e.g. "effnet-lite0", "inception-v3-compat", "dinov2-vitl14"; extractor_weights_sha256: the weights
    file's hash (features.weights_sha256); resize: e.g. "bilinear-antialias" (EfficientNet-Lite0, efdit),
    "tf1-bilinear" (torch-fidelity's Inception), "bicubic-antialias" (DINOv2); resolution: the extractor's input
    side; n_generated / n_reference: image counts; dataset / reference_split: e.g. "fmnist" / "test";
    sampler / steps; guidance: the guidance mode ("none", "cfg", "super", "two_term"), guidance_scales: its
    scales by name, e.g. {"sub": 2.0, "super": 1.5}; seeds: the sampling (and training) seeds, order ignored.
    extra: further fields that must match (e.g. the reference draw's seed), added as given.
    """
    if not isinstance(seeds, (list, tuple)):
        seeds = [seeds]
    for name, v in (("resolution", resolution), ("n_generated", n_generated), ("n_reference", n_reference),
                    ("steps", steps)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise EfditError(f"card field {name} must be a non-negative int, got {v!r}")
    card = {"extractor": str(extractor), "extractor_weights_sha256": str(extractor_weights_sha256),
            "resize": str(resize), "resolution": resolution, "n_generated": n_generated, "n_reference": n_reference,
            "dataset": str(dataset), "reference_split": str(reference_split), "sampler": str(sampler),
            "steps": steps, "guidance": str(guidance),
            "guidance_scales": _plain(dict(guidance_scales or {})),
            "seeds": sorted(int(s) for s in seeds)}
    for k, v in extra.items():
        if k in card:
            raise EfditError(f"card field {k!r} given twice")
        card[k] = _plain(v)
    return card


def card_differences(a: dict, b: dict, ignore=()) -> list[tuple[str, Any, Any]]:
    """(field, value in a, value in b) for every field in which the cards differ (a field missing from one card
    counts, with value None), except those in `ignore`; [] means comparable."""
    out = []
    for k in list(a) + [k for k in b if k not in a]:
        if k in ignore:
            continue
        va, vb = _plain(a.get(k)), _plain(b.get(k))
        if va != vb:
            out.append((k, a.get(k), b.get(k)))
    return out


def describe_differences(diffs: list[tuple[str, Any, Any]]) -> str:
    """One line: "comparable" or "not comparable: steps 50 vs 10; seeds [0] vs [0, 1, 2]"."""
    if not diffs:
        return "comparable"
    return "not comparable: " + "; ".join(f"{k} {va!r} vs {vb!r}" for k, va, vb in diffs)
