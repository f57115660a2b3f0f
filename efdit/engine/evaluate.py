"""Evaluating a model: class-balanced samples against a real split, with the real-vs-real floor and intervals.

Metrics (all on the same class-balanced protocol, N per subclass), each with a bootstrap 95 % interval over the
generated samples (efdit.metrics.bootstrap: 200 stratified replicates, re-centred percentile intervals):
  FD-EffNetLite0     Fréchet distance of EfficientNet-Lite0 pooled features (not FID: not comparable with Inception)
  KID                unbiased MMD² with the cubic polynomial kernel, on the same features
  precision/recall   k-NN manifolds, k = 3 (Kynkäänniemi et al. 2019)
  fine / coarse accuracy, superclass consistency, fine accuracy among samples whose superclass is right: by the
                     dataset's judge — the shipped CNN for Fashion-MNIST (better there than a probe, measured), a
                     linear probe on the same EfficientNet-Lite0 features trained on the real train split otherwise;
                     the judge's own accuracy on the real reference images stands beside every sample accuracy, and a
                     judge near chance is said so
  per-level          mean intra-class FD (per subclass, averaged) and per-superclass FD (biased at small N: compare
                     only at equal N, beside the floor's)
The floor is the same protocol with real train images (another class-balanced draw) in place of samples.
Reference features are cached under `$EFDIT_CACHE/features`, keyed by dataset, split, resolution, N, seed and the
extractor's weight hash; `metrics.json` records that key and a comparability card (extractor, resolution, N,
reference split, sampler, steps, guidance, seeds), and comparing files whose cards differ is refused.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Config, apply_overrides
from ..data.hierarchy import Hierarchy
from ..errors import EfditError, atomic_write
from .build import build_diffusion
from .datasets import load_data
from .paths import ASSETS, cache_dir


def pixel_config(cfg: Config) -> Config:
    """The config whose data are images: a latent run (`data.latent_cache`) is judged against the pixel dataset it
    was encoded from (the same dataset / root / size options), with samples decoded by its VAE."""
    return apply_overrides(copy.deepcopy(cfg), {"data.latent_cache": ""}) if cfg.data.latent_cache else cfg


def one_set(cfg: Config) -> bool:
    """Whether the config's dataset is one set with no test split (emoji): then evaluation draws its reference and
    its floor from that set, disjoint from each other."""
    from ..data import ALIASES, ONE_SET
    return ALIASES.get(cfg.data.dataset.lower(), cfg.data.dataset.lower()) in ONE_SET


def reference_split(cfg: Config) -> str:
    """The split samples are scored against: "test", or "train" for a dataset without one (emoji)."""
    return "train" if one_set(cfg) else "test"


def real_subset(cfg: Config, split: str, n_per_class: int, seed: int):
    """uint8 images (n_per_class per subclass) and their subclass labels from a split of the config's dataset.
    For a dataset without a test split, the held-out part of `holdout` (all of a subclass smaller than
    n_per_class), so that the floor can be drawn from the rest."""
    ds = load_data(cfg, split)
    sub = in_memory(ds.holdout(n_per_class, seed)[1] if one_set(cfg) else ds.subset_per_class(n_per_class, seed=seed))
    return sub.images, sub.sub_labels, ds.hierarchy


def reference_and_floor_images(cfg: Config, split: str, n_per_class: int, seed: int):
    """(reference images, labels), (floor images, labels), hierarchy, where the floor comes from: the reference
    from `split` (as `real_subset` draws it), the floor from the other of train / test; for a dataset without a
    test split, "disjoint": a class-balanced draw of what the reference leaves of the one set (a subclass with fewer
    than 2·n_per_class images gives the floor only that)."""
    if not one_set(cfg):
        other = "train" if split != "train" else "test"
        ref_images, ref_labels, h = real_subset(cfg, split, n_per_class, seed)
        floor_images, floor_labels, _ = real_subset(cfg, other, n_per_class, seed + 1)
        return (ref_images, ref_labels), (floor_images, floor_labels), h, other
    ds = load_data(cfg, split)
    rest, held = ds.holdout(n_per_class, seed)   # held: what real_subset returns for a one-set dataset
    ref, floor = in_memory(held), in_memory(rest.subset_per_class(n_per_class, seed=seed + 1, allow_fewer=True))
    return (ref.images, ref.sub_labels), (floor.images, floor.sub_labels), ds.hierarchy, "disjoint"


def in_memory(ds, progress: bool = False):
    """An in-memory dataset: itself, or a file-backed one (iNat, VegFru, a lazy folder) decoded."""
    return ds if hasattr(ds, "images") else ds.to_memory(progress=progress)


# a probe judge trains on up to this many train images per subclass and on at most JUDGE_IMAGES in all (iNat 2021's
# 10,000 species: 2 each) — feature extraction time and memory, not accuracy, set the limit
JUDGE_PER_CLASS, JUDGE_IMAGES = 200, 20_000
REPLICATES = 200   # bootstrap replicates of every metric


def _extractor():
    from ..metrics.features import FeatureExtractor
    return FeatureExtractor()


def features_cached(images: torch.Tensor, key: str, extractor, resolution: int, progress: bool) -> np.ndarray:
    path = cache_dir() / "features" / f"{key}.npy"
    if path.is_file():
        return np.load(path)
    feats = extractor.extract(images, resolution=resolution, progress=progress)
    with atomic_write(path, "cached features") as tmp:
        np.save(tmp, feats)
    return feats


class Judge:
    """The dataset's class judge: predicts (fine, coarse) ids of images (a CNN) or of their features (a probe)."""

    def __init__(self, kind: str, model, meta: dict, hierarchy: Hierarchy):
        self.kind, self.model, self.meta, self.hierarchy = kind, model, meta, hierarchy

    def predict(self, images: torch.Tensor, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "cnn":
            from ..metrics.classifier import classify
            return classify(self.model, images)
        return self.model.predict(feats)

    def describe(self) -> str:
        return ("the shipped Fashion-MNIST CNN" if self.kind == "cnn" else
                f"a linear probe on EfficientNet-Lite0 features ({self.meta.get('n_train', '?')} train images)")


def get_judge(cfg: Config, resolution: int, progress: bool) -> Judge:
    """The shipped CNN where one ships for this data at its native size (Fashion-MNIST); otherwise a linear probe
    on EfficientNet-Lite0 features at `resolution`, trained once on a class-balanced part of the train split and
    cached."""
    from ..metrics.classifier import load_classifier
    from ..metrics.features import weights_sha256
    from ..metrics.probe import load_probe, save_probe, train_probe
    shipped = ASSETS / f"{cfg.data.dataset}-classifier.safetensors"
    if shipped.is_file() and not cfg.data.image_size and not cfg.data.channels:
        model, meta = load_classifier(shipped)
        return Judge("cnn", model, meta, model.hierarchy)
    ds = load_data(cfg, "train")
    per_class = min(JUDGE_PER_CLASS, max(2, JUDGE_IMAGES // ds.num_sub))
    key = (f"{cfg.data.dataset}-{ds.image_size[0]}x{ds.image_size[1]}x{ds.num_channels}-{cfg.data.holdout_per_class}"
           f"-n{per_class}-r{resolution}-effnet{weights_sha256()}")
    path = cache_dir() / "probes" / f"{key}.safetensors"
    if path.is_file():
        probe, meta = load_probe(path)
        return Judge("probe", probe, meta, ds.hierarchy)
    part = in_memory(ds.subset_per_class(per_class, seed=0, allow_fewer=True), progress)
    print(f"training the {cfg.data.dataset} judge once: a linear probe on EfficientNet-Lite0 features of "
          f"{len(part):,} train images (cached in {path.parent})")
    feats = _extractor().extract(part.images, resolution=resolution, progress=progress)
    probe = train_probe(feats, part.sub_labels, part.hierarchy)
    meta = {"n_train": len(part), "resolution": resolution, "extractor_sha256": weights_sha256()}
    save_probe(path, probe, meta)
    return Judge("probe", probe, meta, part.hierarchy)


def judge_on_real(judge: Judge, images, feats, sub_labels, hierarchy: Hierarchy) -> dict:
    """The judge's accuracy on real images (the reference): fine and coarse with Wilson 95 % intervals, and whether
    it is near chance (efdit.metrics.probe.judge_reliability)."""
    from ..metrics.probe import judge_reliability, wilson_interval
    fine, coarse = judge.predict(images, feats)
    y = np.asarray(sub_labels)
    n = len(y)
    fine_right = int((fine == y).sum())
    coarse_right = int((coarse == hierarchy.parent.numpy()[y]).sum())
    rel = judge_reliability(fine_right / n, n, hierarchy.num_sub)
    return {"kind": judge.kind, "describe": judge.describe(), "n": n,
            "fine_acc": fine_right / n, "fine_interval": list(wilson_interval(fine_right, n)),
            "coarse_acc": coarse_right / n, "coarse_interval": list(wilson_interval(coarse_right, n)),
            "kappa": rel["kappa"], "near_chance": bool(rel["near_chance"]), "chance": rel["chance"]}


def score(gen_feats, ref_feats, ref_labels, gen_labels, preds, hierarchy: Hierarchy, seed: int = 0) -> dict:
    """Every metric with its bootstrap interval. gen_labels: the requested subclass ids (None: unlabelled samples,
    distribution metrics only); preds: the judge's (fine, coarse) predictions or None.
    -> {"metrics": {name: value}, "intervals": {name: {value, low, high, …}}, "per_class": …, "bootstrap": …}."""
    from ..metrics.bootstrap import bootstrap_metrics
    from ..metrics.per_class import intra_class_fd, per_superclass_fd
    fine, coarse = preds if preds is not None else (None, None)
    res = bootstrap_metrics(gen_feats, ref_feats, sub_labels=gen_labels, fine_pred=fine, coarse_pred=coarse,
                            hierarchy=hierarchy, replicates=REPLICATES, seed=seed)
    out = {"metrics": {k: float(v) for k, v in res.point.items()},
           "intervals": {k: iv.to_dict() for k, iv in res.intervals().items()},
           "bootstrap": res.to_dict(replicates=True)}
    if gen_labels is not None:
        labels, ref_y = np.asarray(gen_labels), np.asarray(ref_labels)
        intra = intra_class_fd(gen_feats, labels, ref_feats, ref_y, hierarchy)
        sup = per_superclass_fd(gen_feats, labels, ref_feats, ref_y, hierarchy)
        out["per_class"] = {"intra": intra, "super": sup}
        for key, part in (("intra_class_fd", intra), ("super_fd", sup)):
            if part["mean"] is not None:   # None: too few samples per class for an FD
                out["metrics"][key] = float(part["mean"])
    return out


def reference_id(cfg: Config, split: str, n_per_class: int, resolution: int, seed: int) -> str:
    from ..metrics.features import weights_sha256
    d = cfg.data
    size = f"{d.image_size}" if d.image_size else "native"
    tag = "-held" if one_set(cfg) else ""   # a held-out draw of a one-set dataset, not subset_per_class
    which = (d.root, d.super_level, d.sub_level, d.categories)   # what else picks the images and their classes
    if any(which):
        tag += "-" + hashlib.sha1(repr(which).encode()).hexdigest()[:8]
    return (f"{d.dataset}-{split}-{size}-c{d.channels or 'n'}-n{n_per_class}-r{resolution}-s{seed}"
            f"-effnet{weights_sha256()}{tag}")


def reference_and_floor(cfg: Config, split: str, n_per_class: int, resolution: int, seed: int, judge: Judge | None,
                        progress: bool):
    """Reference features of the split, the judge's accuracy on them, and the real-vs-real floor (a train draw
    scored against the reference like samples are). -> (ref_id, ref_feats, ref_labels, floor, judge_record,
    extractor, hierarchy)."""
    ref_id = reference_id(cfg, split, n_per_class, resolution, seed)
    extractor = _extractor()
    (ref_images, ref_labels), (floor_images, floor_labels), h, other = reference_and_floor_images(
        cfg, split, n_per_class, seed)
    ref_feats = features_cached(ref_images, ref_id, extractor, resolution, progress)
    floor_feats = features_cached(floor_images, f"{ref_id}-floor-{other}", extractor, resolution, progress)
    judged = judge_on_real(judge, ref_images, ref_feats, ref_labels, h) if judge is not None else None
    preds = judge.predict(floor_images, floor_feats) if judge is not None else None
    floor = score(floor_feats, ref_feats, ref_labels, floor_labels, preds, h)
    floor["note"] = ("real images (N per class) scored against the reference like samples: "
                     + ("a draw of the same set disjoint from the reference" if other == "disjoint" else
                        f"the {other} split"))
    return ref_id, ref_feats, ref_labels, floor, judged, extractor, h


def evaluate_model(model, cfg: Config, hierarchy: Hierarchy, n_per_class: int = 100, split: str = "test",
                   resolution: int = 64, seed: int = 0, progress: bool = True, model_sha: str = "",
                   out_json: Path | None = None, device="cpu", images: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> dict:
    """Sample class-balanced (or score the given images/labels), compute the metrics with intervals and the floor."""
    from ..metrics.card import comparability_card
    from ..metrics.features import weights_sha256
    from .generate import class_labels, generate, guidance_of
    t0 = time.time()
    data_cfg = pixel_config(cfg)
    judge = get_judge(data_cfg, resolution, progress)
    ref_id, ref_feats, ref_labels, floor, judged, extractor, h = reference_and_floor(
        data_cfg, split, n_per_class, resolution, seed, judge, progress)
    if h != hierarchy:
        raise EfditError("the model's hierarchy differs from the evaluation dataset's")
    if images is None:
        labels = class_labels(cfg, hierarchy, None, n_per_class)
        images = generate(model, cfg, labels, device=device, progress=progress)
    t_sample = time.time() - t0
    gen_feats = extractor.extract(images, resolution=resolution, progress=progress)
    sub = cfg.model.condition_on == "sub"
    preds = judge.predict(images, gen_feats)
    scored = score(gen_feats, ref_feats, ref_labels, labels if sub else None, preds if sub else None, hierarchy,
                   seed=cfg.sample.seed)
    if not sub:  # a superclass model: coarse accuracy of its samples only
        from ..metrics.probe import wilson_interval
        right = int((torch.as_tensor(preds[1]) == labels).sum())
        scored["metrics"]["coarse_acc"] = right / len(labels)
        low, high = wilson_interval(right, len(labels))
        scored["intervals"]["coarse_acc"] = {"value": right / len(labels), "low": low, "high": high,
                                             "method": "wilson"}
    g = guidance_of(cfg)
    card = comparability_card(extractor="effnet-lite0", extractor_weights_sha256=weights_sha256(),
                              resize="bilinear-antialias", resolution=resolution, n_generated=int(len(images)),
                              n_reference=int(len(ref_feats)), dataset=cfg.data.dataset, reference_split=split,
                              sampler=cfg.sample.sampler, respacing=str(cfg.sample.steps),
                              steps=build_diffusion(cfg, cfg.sample.steps).num_timesteps, guidance=g.mode,
                              guidance_scales={"scale": g.scale, "scale_super": g.scale_super,
                                               "interval": list(g.interval) if g.interval else None},
                              seeds=[cfg.sample.seed], reference_seed=seed)
    record = {
        "model_sha256": model_sha, "dataset": cfg.data.dataset, "split": split, "reference_id": ref_id,
        "sampler": cfg.sample.sampler, "steps": cfg.sample.steps, "eta": cfg.sample.eta, "guidance": g.mode,
        "cfg_scale": g.scale, "cfg_scale_super": g.scale_super, "cfg_channels": g.channels,
        "clip_x0": cfg.sample.clip_x0, "seed": cfg.sample.seed, "n_per_class": n_per_class, "n": int(len(images)),
        "resolution": resolution, "card": card, **scored, "floor": floor, "judge": judged,
        "classifier": {"test_acc": judged["fine_acc"], "test_coarse_acc": judged["coarse_acc"]},
        "seconds": round(time.time() - t0, 1), "sampling_seconds": round(t_sample, 1),
    }
    if out_json is not None:
        write_json(out_json, record)
    return record


def judge_warning(record: dict) -> str | None:
    """A line for reports when the judge's accuracy on real images is near chance (its sample accuracies then say
    little about the samples)."""
    j = record.get("judge")
    if not j or not j.get("near_chance"):
        return None
    return (f"warning: the judge ({j['describe']}) is near chance on real {record['split']} images: fine accuracy "
            f"{j['fine_acc']:.1%} [{j['fine_interval'][0]:.1%}, {j['fine_interval'][1]:.1%}], chance "
            f"{j['chance']:.1%}; the sample accuracies below say little")


def choose_guidance(model, cfg: Config, hierarchy: Hierarchy, trials: list[dict], n_per_class: int = 20,
                    resolution: int = 64, progress: bool = False, device="cpu") -> tuple[dict, list[dict]]:
    """The guidance setting (one of `trials`: sampling overrides such as {"sample.cfg_scale": 3.0}) with the lowest
    class-conditional FD on the held-out part of the train split (`data.holdout_per_class`; never the test split):
    for each trial, `n_per_class` samples of every subclass, and per subclass the FD between its samples and its
    held-out images, averaged over subclasses — a setting that makes samples sharper but of the wrong subclass, or
    right but implausible, both score worse. The same labels and noise (sample.seed) for every trial.
    -> (the best trial, one row per trial)."""
    from ..metrics.per_class import intra_class_fd
    from .generate import class_labels, generate
    held = in_memory(load_data(pixel_config(cfg), "holdout"))
    if held.hierarchy != hierarchy:
        raise EfditError("the model's hierarchy differs from its held-out data's")
    extractor = _extractor()
    ref = extractor.extract(held.images, resolution=resolution, progress=progress)
    ref_labels = held.sub_labels.numpy()
    labels = class_labels(cfg, hierarchy, None, n_per_class)
    rows = []
    for trial in trials:
        images = generate(model, apply_overrides(copy.deepcopy(cfg), trial), labels, device=device, progress=progress)
        feats = extractor.extract(images, resolution=resolution, progress=progress)
        rows.append({"trial": dict(trial),
                     "class_fd": float(intra_class_fd(feats, labels.numpy(), ref, ref_labels, hierarchy)["mean"])})
    best = min(rows, key=lambda r: r["class_fd"])["trial"]
    return best, rows


def write_json(path: str | Path, record: dict) -> Path:
    """metrics.json and its kin, written atomically."""
    with atomic_write(path, "the metrics") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return Path(path)


def compare(a: dict, b: dict) -> tuple[str, list[dict]]:
    """Two metrics.json records compared: refused unless their comparability cards agree (seeds and sampling may
    differ: that is what is compared); per metric the bootstrap interval of a − b — paired (the same index draws in
    both, valid for samples of the same noise and labels) when the records' plans agree, else unpaired — and the
    verdict "differs" only when that interval excludes 0. -> (how they were paired, one row per metric)."""
    from ..metrics.bootstrap import BootstrapResult, paired_difference, unpaired_difference
    from ..metrics.card import card_differences, describe_differences
    if "card" not in a or "card" not in b or "bootstrap" not in a or "bootstrap" not in b:
        raise EfditError("these metrics.json files predate intervals and comparability cards: re-evaluate them")
    diffs = card_differences(a["card"], b["card"], ignore=("seeds", "sampler", "steps", "respacing", "guidance",
                                                           "guidance_scales"))
    if diffs:
        raise EfditError(f"refusing to compare: {describe_differences(diffs)}")
    ra, rb = BootstrapResult.from_dict(a["bootstrap"]), BootstrapResult.from_dict(b["bootstrap"])
    paired = ra.plan == rb.plan
    found = (paired_difference if paired else unpaired_difference)(ra, rb)
    how = ("paired (same samples count, labels and bootstrap draws: same seed)" if paired else
           "unpaired (independent sample sets)")
    return how, [d.to_dict() for d in found.values()]


METRIC_NAMES = [("fd_effnetlite0", "FD-EffNetLite0 ↓", "{:.2f}"), ("kid", "KID ↓", "{:.3f}"),
                ("precision", "precision ↑", "{:.3f}"), ("recall", "recall ↑", "{:.3f}"),
                ("fine_acc", "fine accuracy ↑", "{:.1%}"), ("coarse_acc", "coarse accuracy ↑", "{:.1%}"),
                ("super_consistency", "superclass consistency ↑", "{:.1%}"),
                ("fine_acc_given_super", "fine acc. given right superclass ↑", "{:.1%}"),
                ("intra_class_fd", "mean intra-class FD ↓", "{:.1f}"), ("super_fd", "mean per-superclass FD ↓", "{:.1f}")]
JUDGED = {"fine_acc": "fine_acc", "coarse_acc": "coarse_acc"}   # the judge's own accuracy on real images


def with_interval(scored: dict, key: str, fmt: str) -> str:
    """"value [low, high]" (the bootstrap 95 % interval) or the value alone when the metric has none."""
    v = scored["metrics"][key]
    iv = scored.get("intervals", {}).get(key)
    return f"{fmt.format(v)} [{fmt.format(iv['low'])}, {fmt.format(iv['high'])}]" if iv else fmt.format(v)


def table_rows(record: dict) -> list[list[str]]:
    """[metric, model with interval, floor with interval, the judge's accuracy on real images]."""
    rows = []
    judge = record.get("judge") or {}
    for key, name, fmt in METRIC_NAMES:
        if key not in record["metrics"]:
            continue
        floor = with_interval(record["floor"], key, fmt) if key in record["floor"].get("metrics", {}) else "—"
        real = fmt.format(judge[JUDGED[key]]) if key in JUDGED and key in judge else ""
        rows.append([name, with_interval(record, key, fmt), floor, real])
    return rows


TABLE_HEADER = ["metric", "model [95 % CI]", "real-vs-real floor", "judge on real images"]


def inception_scores(images: torch.Tensor, labels, cfg: Config, weights: str, split: str, n_per_class: int,
                     seed: int, device="cpu") -> dict:
    """FID / IS with Inception-v3 (torch-fidelity's network and metric code) from a local weights file read with
    weights_only=True, against the same class-balanced reference; FID with its bootstrap interval."""
    from ..metrics.bootstrap import bootstrap_metrics
    from ..metrics.inception import inception_metrics
    ref, _, _ = real_subset(cfg, split, n_per_class, seed)
    out = inception_metrics(images, ref, weights, device=device, return_features=True)
    feats = out.pop("features")
    res = bootstrap_metrics(feats["generated"]["2048"], feats["reference"]["2048"], fd_key="fid_inception",
                            kid=False, prc=False, sub_labels=labels, replicates=REPLICATES, seed=seed)
    return {"metrics": {"fid_inception": out["fid_inception"], "is_inception": out["is_inception"]},
            "intervals": {"fid_inception": res.interval("fid_inception").to_dict()},
            "weights_sha256": out["weights_sha256"]}


def dinov2_scores(images: torch.Tensor, labels, cfg: Config, folder: str, split: str, n_per_class: int,
                  seed: int, device="cpu") -> dict:
    """FD-DINOv2 (Stein et al. 2023: the CLS features of a local DINOv2 folder, through transformers) against the
    same class-balanced reference, with its bootstrap interval."""
    from ..metrics.bootstrap import bootstrap_metrics
    from ..metrics.dinov2 import DinoV2Extractor, dinov2_weights_sha256
    ref, _, _ = real_subset(cfg, split, n_per_class, seed)
    extractor = DinoV2Extractor(folder, device=device)
    res = bootstrap_metrics(extractor.extract(images), extractor.extract(ref), fd_key="fd_dinov2", kid=False,
                            prc=False, sub_labels=labels, replicates=REPLICATES, seed=seed)
    return {"metrics": {"fd_dinov2": res.point["fd_dinov2"]},
            "intervals": {"fd_dinov2": res.interval("fd_dinov2").to_dict()},
            "weights_sha256": dinov2_weights_sha256(folder)}
