"""`efdit evaluate`: FD-EffNetLite0, KID, precision/recall and class accuracy of a model's class-balanced samples
against a real split, with the real-vs-real floor; or two metrics.json files compared."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..engine.build import apply_attention
from ..engine.evaluate import compare, evaluate_model, inception_metrics, pixel_config, table_rows, write_json
from ..engine.files import load_model
from ..engine.generate import check_sampling, class_labels, generate
from ..engine.paths import model_file
from ..errors import EfditError
from ..models.dit import resolve_device
from .options import apply_sampling_options, parser, positive_int, writable


def read_samples(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, H, W) images and (N,) labels from an `efdit sample` samples.npz (no pickles are read)."""
    try:
        with np.load(path) as data:
            images = torch.from_numpy(data["arr_0"]).permute(0, 3, 1, 2).contiguous()
            labels = torch.from_numpy(data["labels"]).long()
    except (OSError, ValueError, KeyError) as e:
        raise EfditError(f"cannot read samples from {path} (an efdit samples.npz with arr_0 and labels): "
                         f"{type(e).__name__}: {e}") from None
    if images.dtype != torch.uint8 or len(images) != len(labels):
        raise EfditError(f"{path}: arr_0 must be uint8 NHWC images with one label each")
    return images, labels


def read_metrics(path: str) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise EfditError(f"cannot read {path} as a metrics.json: {e}") from None
    if not isinstance(record, dict) or "metrics" not in record:
        raise EfditError(f"{path} is not an efdit metrics.json (no metrics)")
    return record


def main(argv: list[str]) -> int:
    p = parser("evaluate", __doc__.split("\n")[0].strip("`"))
    p.add_argument("model", nargs="?", help="an efdit model file or run directory")
    p.add_argument("--npz", default="", help="score these samples (efdit sample's samples.npz) instead of sampling")
    p.add_argument("--n-per-class", type=positive_int, default=100)
    p.add_argument("--split", default="test", choices=["test", "train", "val"])
    p.add_argument("--resolution", type=positive_int, default=64, help="feature-extractor input size")
    p.add_argument("--out", default="", help="metrics.json path (default: beside the model)")
    p.add_argument("--compare", nargs=2, metavar="METRICS_JSON", help="compare two metrics.json files")
    p.add_argument("--inception-weights", default="", help="a local Inception-v3 weights file for FID / IS")
    p.add_argument("--no-progress", action="store_true")
    args, rest = p.parse_known_args(argv)
    if args.compare:
        a, b = (read_metrics(f) for f in args.compare)
        for k, x, y in compare(a, b):
            print(f"{k:20s} {x:10.4f} {y:10.4f}")
        return 0
    if not args.model:
        raise EfditError("a model (or --compare A B) is required")
    if args.inception_weights and not Path(args.inception_weights).is_file():
        raise EfditError(f"--inception-weights: Inception weights not found at {args.inception_weights} "
                         f"(a local file; efdit never downloads it)")
    path = model_file(args.model)
    out = writable(Path(args.out) if args.out else path.parent / "metrics.json", "metrics file")
    device = resolve_device(os.environ.get("EFDIT_DEVICE", "auto"))
    model, cfg, h, meta = load_model(path, device)
    apply_sampling_options(cfg, rest)
    check_sampling(cfg)
    apply_attention(model, cfg)
    images = labels = None
    if args.npz:
        images, labels = read_samples(args.npz)
    record = evaluate_model(model, cfg, h, n_per_class=args.n_per_class, split=args.split,
                            resolution=args.resolution, progress=not args.no_progress, model_sha=meta["sha256"],
                            out_json=out, device=device, images=images, labels=labels)
    if args.inception_weights:
        if images is None:
            labels = class_labels(cfg, h, None, args.n_per_class)
            images = generate(model, cfg, labels, device=device, progress=not args.no_progress)
        record["metrics"].update(inception_metrics(images, pixel_config(cfg), args.inception_weights, args.split,
                                                   args.n_per_class, 0))
        write_json(out, record)
    print(f"{'metric':26s} {'model':>10s} {'floor':>10s}")
    for name, m, f in table_rows(record):
        print(f"{name:26s} {m:>10s} {f:>10s}")
    print(f"-> {out}")
    return 0
