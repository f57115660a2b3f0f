"""`efdit evaluate`: FD-EffNetLite0, KID, precision/recall and class accuracy of a model's class-balanced samples
against a real split, with the real-vs-real floor; or two metrics.json files compared."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..engine.build import apply_attention
from ..engine.evaluate import (
    TABLE_HEADER,
    compare,
    dinov2_scores,
    evaluate_model,
    inception_scores,
    judge_warning,
    pixel_config,
    reference_split,
    table_rows,
    write_json,
)
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
    p = parser("evaluate", __doc__.split("\n")[0].split("`: ", 1)[-1])
    p.add_argument("model", nargs="?", help="an efdit model file or run directory")
    p.add_argument("--npz", default="", help="score these samples (efdit sample's samples.npz) instead of sampling")
    p.add_argument("--n-per-class", type=positive_int, default=100)
    p.add_argument("--split", default="", choices=["test", "train", "val"],
                   help="the real split to score against (default: test; train for a set without one, emoji)")
    p.add_argument("--resolution", type=positive_int, default=64, help="feature-extractor input size")
    p.add_argument("--out", default="", help="metrics.json path (default: beside the model)")
    p.add_argument("--compare", nargs=2, metavar="METRICS_JSON", help="compare two metrics.json files")
    p.add_argument("--inception-weights", default="", help="a local Inception-v3 weights file for FID / IS")
    p.add_argument("--dinov2-weights", default="", help="a local DINOv2 folder (transformers Dinov2Model: "
                                                       "config.json + model.safetensors) for FD-DINOv2")
    p.add_argument("--no-progress", action="store_true")
    args, rest = p.parse_known_args(argv)
    if args.compare:
        a, b = (read_metrics(f) for f in args.compare)
        how, rows = compare(a, b)
        print(f"A = {args.compare[0]}\nB = {args.compare[1]}\n{how}; 95 % bootstrap interval of A − B:")
        print(f"{'metric':22s} {'A':>10s} {'B':>10s} {'A − B [95 % CI]':>30s}  verdict")
        for r in rows:
            d = r["difference"]
            print(f"{r['metric']:22s} {r['a']:10.4g} {r['b']:10.4g} "
                  f"{d['value']:+10.4g} [{d['low']:+.4g}, {d['high']:+.4g}]  {r['verdict']}")
        return 0
    if not args.model:
        raise EfditError("a model (or --compare A B) is required")
    if args.inception_weights and not Path(args.inception_weights).is_file():
        raise EfditError(f"--inception-weights: Inception weights not found at {args.inception_weights} "
                         f"(a local file; efdit never downloads it)")
    if args.dinov2_weights and not (Path(args.dinov2_weights) / "config.json").is_file():
        raise EfditError(f"--dinov2-weights: no DINOv2 folder at {args.dinov2_weights} (config.json + "
                         f"model.safetensors; efdit never downloads it)")
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
    split = args.split or reference_split(cfg)
    record = evaluate_model(model, cfg, h, n_per_class=args.n_per_class, split=split,
                            resolution=args.resolution, progress=not args.no_progress, model_sha=meta["sha256"],
                            out_json=out, device=device, images=images, labels=labels)
    if (args.inception_weights or args.dinov2_weights) and images is None:
        labels = class_labels(cfg, h, None, args.n_per_class)
        images = generate(model, cfg, labels, device=device, progress=not args.no_progress)
    if args.dinov2_weights:
        dino = dinov2_scores(images, labels, pixel_config(cfg), args.dinov2_weights, split, args.n_per_class, 0,
                             device=device)
        record["metrics"].update(dino["metrics"])
        record["intervals"].update(dino["intervals"])
        record["dinov2"] = {"weights_sha256": dino["weights_sha256"], "resolution": 224, "resize": "bicubic"}
        write_json(out, record)
    if args.inception_weights:
        if images is None:
            labels = class_labels(cfg, h, None, args.n_per_class)
            images = generate(model, cfg, labels, device=device, progress=not args.no_progress)
        inc = inception_scores(images, labels, pixel_config(cfg), args.inception_weights, split,
                               args.n_per_class, 0, device=device)
        record["metrics"].update(inc["metrics"])
        record["intervals"].update(inc["intervals"])
        record["inception"] = {"weights_sha256": inc["weights_sha256"], "resolution": 299,
                               "resize": "torch-fidelity (tf1-bilinear)"}
        write_json(out, record)
    widths = (30, 28, 28, 20)
    print("  ".join(f"{h:{w}s}" for h, w in zip(TABLE_HEADER, widths)))
    for row in table_rows(record):
        print("  ".join(f"{c:{w}s}" for c, w in zip(row, widths)))
    for key in ("fid_inception", "is_inception", "fd_dinov2"):
        if key in record["metrics"]:
            iv = record["intervals"].get(key)
            print(f"{key:30s}  {record['metrics'][key]:.3f}" + (f" [{iv['low']:.3f}, {iv['high']:.3f}]" if iv else ""))
    c = record["card"]
    print(f"{c['n_generated']} samples vs {c['n_reference']} real {c['reference_split']} images; {c['sampler']} "
          f"{c['steps']} steps, {c['guidance']} guidance {c['guidance_scales']}; judge: {record['judge']['describe']}")
    if note := judge_warning(record):
        print(note)
    print(f"-> {out}")
    return 0
