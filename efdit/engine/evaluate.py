"""Evaluating a model: class-balanced samples against a real split, with the real-vs-real floor.

Metrics (all on the same class-balanced protocol, N per subclass):
  FD-EffNetLite0   Fréchet distance of EfficientNet-Lite0 pooled features (not FID: not comparable with Inception)
  KID              unbiased MMD² with the cubic polynomial kernel, on the same features (mean ± std over subsets)
  precision/recall k-NN manifolds, k = 3 (Kynkäänniemi et al. 2019)
  fine / coarse accuracy, superclass consistency: a classifier trained by efdit on the real train split
The floor is the same protocol with real train images (another class-balanced draw) in place of samples.
Reference features are cached under `.cache/efdit/features`, keyed by dataset, split, resolution, N, seed and the
extractor's weight hash; `metrics.json` records that key, and comparing files with different keys is refused.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Config, apply_overrides
from ..data.hierarchy import Hierarchy
from ..errors import EfditError, atomic_write
from .datasets import load_data
from .paths import ASSETS, cache_dir


def pixel_config(cfg: Config) -> Config:
    """The config whose data are images: a latent run (`data.latent_cache`) is judged against the pixel dataset it
    was encoded from (the same dataset / root / size options), with samples decoded by its VAE."""
    return apply_overrides(copy.deepcopy(cfg), {"data.latent_cache": ""}) if cfg.data.latent_cache else cfg


def real_subset(cfg: Config, split: str, n_per_class: int, seed: int):
    """uint8 images (n_per_class per subclass) and their subclass labels from a split of the config's dataset."""
    ds = load_data(cfg, split)
    sub = in_memory(ds.subset_per_class(n_per_class, seed=seed))
    return sub.images, sub.sub_labels, ds.hierarchy


def in_memory(ds, progress: bool = False):
    """An in-memory dataset: itself, or a file-backed one (iNat, VegFru, a lazy folder) decoded."""
    return ds if hasattr(ds, "images") else ds.to_memory(progress=progress)


# the evaluation classifier of a file-backed dataset trains on up to this many train images per subclass, and on
# at most CLASSIFIER_IMAGES in all (iNat 2021's 10,000 species: 2 each) — memory, not accuracy, sets the limit
CLASSIFIER_PER_CLASS, CLASSIFIER_IMAGES = 100, 20_000


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


def get_classifier(cfg: Config, progress: bool):
    """The dataset's evaluation classifier: shipped (fmnist) or trained once on the real train split and cached."""
    from ..metrics.classifier import load_classifier, load_or_train_classifier
    shipped = ASSETS / f"{cfg.data.dataset}-classifier.safetensors"
    if shipped.is_file() and not cfg.data.image_size and not cfg.data.channels:
        return load_classifier(shipped)
    ds = load_data(cfg, "train")
    name = f"{cfg.data.dataset}-{ds.image_size[0]}x{ds.image_size[1]}x{ds.num_channels}"
    if not hasattr(ds, "images"):  # file-backed (iNat, VegFru): a class-balanced part of the train split, decoded
        per_class = min(CLASSIFIER_PER_CLASS, max(2, CLASSIFIER_IMAGES // ds.num_sub))
        ds = ds.subset_per_class(per_class, seed=0, allow_fewer=True).to_memory(progress)
        name += f"-n{per_class}"
        print(f"evaluation classifier: up to {per_class} train images per subclass ({len(ds):,} in all)")
    print(f"training the {cfg.data.dataset} evaluation classifier once (cached in {cache_dir() / 'classifiers'})")
    return load_or_train_classifier(cache_dir() / "classifiers" / f"{name}.safetensors", ds.images, ds.sub_labels,
                                    ds.hierarchy, progress=progress)


def score(gen_feats, ref_feats, gen_images, gen_sub_labels, classifier, hierarchy: Hierarchy,
          kid_subset: int = 1000) -> dict:
    from ..metrics.classifier import accuracy_report
    from ..metrics.fd import frechet_distance_from_features
    from ..metrics.kid import kernel_distance
    from ..metrics.prdc import precision_recall
    kid = kernel_distance(ref_feats, gen_feats, subset_size=min(kid_subset, len(gen_feats), len(ref_feats)))
    pr = precision_recall(ref_feats, gen_feats, k=3)
    out = {"fd_effnetlite0": frechet_distance_from_features(gen_feats, ref_feats), "kid": kid.mean,
           "kid_std": kid.std, "precision": pr.precision, "recall": pr.recall}
    if gen_sub_labels is not None and classifier is not None:
        acc = accuracy_report(classifier, gen_images, gen_sub_labels, hierarchy)
        out.update(fine_acc=acc["fine_acc"], coarse_acc=acc["coarse_acc"], super_consistency=acc["super_consistency"])
    return {k: float(v) for k, v in out.items()}


def reference_id(cfg: Config, split: str, n_per_class: int, resolution: int, seed: int) -> str:
    from ..metrics.features import weights_sha256
    d = cfg.data
    size = f"{d.image_size}" if d.image_size else "native"
    return f"{d.dataset}-{split}-{size}-c{d.channels or 'n'}-n{n_per_class}-r{resolution}-s{seed}-effnet{weights_sha256()}"


def reference_and_floor(cfg: Config, split: str, n_per_class: int, resolution: int, seed: int, classifier,
                        progress: bool):
    """Reference features of the split, and the real-vs-real floor (train draw vs the reference)."""
    ref_id = reference_id(cfg, split, n_per_class, resolution, seed)
    extractor = _extractor()
    ref_images, ref_labels, h = real_subset(cfg, split, n_per_class, seed)
    ref_feats = features_cached(ref_images, ref_id, extractor, resolution, progress)
    other_split = "train" if split != "train" else "test"
    floor_images, floor_labels, _ = real_subset(cfg, other_split, n_per_class, seed + 1)
    floor_feats = features_cached(floor_images, f"{ref_id}-floor-{other_split}", extractor, resolution, progress)
    floor = score(floor_feats, ref_feats, ref_images, ref_labels, classifier, h)
    floor["note"] = (f"real {other_split} images (N per class) vs the reference; accuracies are the classifier's "
                     f"on the real {split} reference images")
    return ref_id, ref_feats, floor, extractor, h


def evaluate_model(model, cfg: Config, hierarchy: Hierarchy, n_per_class: int = 100, split: str = "test",
                   resolution: int = 64, seed: int = 0, progress: bool = True, model_sha: str = "",
                   out_json: Path | None = None, device="cpu", images: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> dict:
    """Sample class-balanced (or score the given images/labels), compute the metrics and the floor."""
    from .generate import class_labels, generate, guidance_of
    t0 = time.time()
    data_cfg = pixel_config(cfg)
    classifier, cmeta = get_classifier(data_cfg, progress)
    ref_id, ref_feats, floor, extractor, h = reference_and_floor(data_cfg, split, n_per_class, resolution, seed,
                                                                 classifier, progress)
    if h != hierarchy:
        raise EfditError("the model's hierarchy differs from the evaluation dataset's")
    if images is None:
        labels = class_labels(cfg, hierarchy, None, n_per_class)
        images = generate(model, cfg, labels, device=device, progress=progress)
    t_sample = time.time() - t0
    gen_feats = extractor.extract(images, resolution=resolution, progress=progress)
    sub_labels = labels if cfg.model.condition_on == "sub" else None
    metrics = score(gen_feats, ref_feats, images, sub_labels, classifier, hierarchy)
    if cfg.model.condition_on == "super":  # a superclass model: coarse accuracy of its samples only
        from ..metrics.classifier import classify
        _, coarse = classify(classifier, images)
        metrics["coarse_acc"] = float((torch.as_tensor(coarse) == labels).float().mean())
    g = guidance_of(cfg)
    record = {
        "model_sha256": model_sha, "dataset": cfg.data.dataset, "split": split, "reference_id": ref_id,
        "sampler": cfg.sample.sampler, "steps": cfg.sample.steps, "eta": cfg.sample.eta, "guidance": g.mode,
        "cfg_scale": g.scale, "cfg_scale_super": g.scale_super, "cfg_channels": g.channels,
        "clip_x0": cfg.sample.clip_x0, "seed": cfg.sample.seed, "n_per_class": n_per_class, "n": int(len(images)),
        "resolution": resolution, "metrics": metrics, "floor": floor,
        "classifier": {"test_acc": cmeta.get("test_acc"), "test_coarse_acc": cmeta.get("test_coarse_acc")},
        "seconds": round(time.time() - t0, 1), "sampling_seconds": round(t_sample, 1),
    }
    if out_json is not None:
        write_json(out_json, record)
    return record


def choose_guidance(model, cfg: Config, hierarchy: Hierarchy, scales: list[float], n_per_class: int = 20,
                    resolution: int = 64, progress: bool = False, device="cpu") -> tuple[float, list[dict]]:
    """The guidance scale with the lowest class-conditional FD on the held-out part of the train split
    (`data.holdout_per_class`; never the test split): for each scale, `n_per_class` samples of every subclass, and
    per subclass the FD between its samples and its held-out images, averaged over subclasses — a scale that makes
    samples sharper but of the wrong subclass, or right but implausible, both score worse. The same labels and
    noise (sample.seed) for every scale. -> (best scale, one row per scale)."""
    from ..metrics.fd import frechet_distance_from_features
    from .generate import class_labels, generate
    held = in_memory(load_data(pixel_config(cfg), "holdout"))
    if held.hierarchy != hierarchy:
        raise EfditError("the model's hierarchy differs from its held-out data's")
    extractor = _extractor()
    ref = extractor.extract(held.images, resolution=resolution, progress=progress)
    ref_labels = held.sub_labels.numpy()
    labels = class_labels(cfg, hierarchy, None, n_per_class)
    rows = []
    for scale in scales:
        trial = apply_overrides(copy.deepcopy(cfg), {"sample.cfg_scale": float(scale)})
        images = generate(model, trial, labels, device=device, progress=progress)
        feats = extractor.extract(images, resolution=resolution, progress=progress)
        per_class = [frechet_distance_from_features(feats[labels.numpy() == c], ref[ref_labels == c])
                     for c in range(hierarchy.num_sub)]
        rows.append({"cfg_scale": float(scale), "class_fd": float(np.mean(per_class))})
    best = min(rows, key=lambda r: r["class_fd"])["cfg_scale"]
    return best, rows


def write_json(path: str | Path, record: dict) -> Path:
    """metrics.json and its kin, written atomically."""
    with atomic_write(path, "the metrics") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return Path(path)


def compare(a: dict, b: dict) -> list[tuple[str, float, float]]:
    if a["reference_id"] != b["reference_id"]:
        raise EfditError(f"refusing to compare metrics against different reference stats: "
                         f"{a['reference_id']} vs {b['reference_id']}")
    return [(k, a["metrics"][k], b["metrics"].get(k, float("nan"))) for k in a["metrics"]]


METRIC_NAMES = [("fd_effnetlite0", "FD-EffNetLite0 ↓", "{:.2f}"), ("kid", "KID ↓", "{:.3f}"),
                ("precision", "precision ↑", "{:.3f}"), ("recall", "recall ↑", "{:.3f}"),
                ("fine_acc", "fine accuracy ↑", "{:.1%}"), ("coarse_acc", "coarse accuracy ↑", "{:.1%}"),
                ("super_consistency", "superclass consistency ↑", "{:.1%}")]


def table_rows(record: dict) -> list[list[str]]:
    rows = []
    for key, name, fmt in METRIC_NAMES:
        if key not in record["metrics"]:
            continue
        m, f = record["metrics"][key], record["floor"].get(key)
        rows.append([name, fmt.format(m), fmt.format(f) if f is not None else "—"])
    return rows


def inception_metrics(images: torch.Tensor, cfg: Config, weights: str, split: str, n_per_class: int, seed: int) -> dict:
    """FID / IS with Inception-v3 through torch-fidelity, from a local weights file only."""
    if not Path(weights).is_file():
        raise EfditError(f"Inception weights not found: {weights} (torch-fidelity's "
                         f"weights-inception-2015-12-05-6726825d.pth; efdit never downloads it)")
    import torch_fidelity

    class _Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x if x.shape[1] == 3 else x.repeat(1, 3, 1, 1)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    ref, _, _ = real_subset(cfg, split, n_per_class, seed)
    out = torch_fidelity.calculate_metrics(input1=_Images(images), input2=_Images(ref), fid=True, isc=True,
                                           feature_extractor_weights_path=weights, verbose=False, cuda=False)
    return {"fid_inception": float(out["frechet_inception_distance"]), "is_inception": float(out["inception_score_mean"])}
