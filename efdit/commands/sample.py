"""`efdit sample`: sample a trained model into a labelled grid per superclass, PNGs and an .npz."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..data.hierarchy import lookup_class
from ..engine.build import apply_attention
from ..engine.fast_sampling import apply_sampling_default, sampling_line
from ..engine.files import load_model
from ..engine.generate import check_sampling, generate
from ..engine.paths import model_file
from ..engine.pictures import save_grid, save_samples
from ..errors import EfditError
from ..models.dit import resolve_device
from .options import apply_sampling_options, nonempty, overrides, parser, positive_int, sample_overrides, writable

DESCRIPTION = ("Sample a trained efdit model (model.safetensors of a run). Default sampling: the model's fastest "
               "quality-matched setting when its file records one (benchmarks/sampling_quality.py --record), "
               "else DPM-Solver++(2M) 10 steps for a model whose config samples DDIM-50, else its config's; the "
               "line `sampling: …` names what was used. Any of --sampler, --steps, --eta, --accel, --accel-kw, "
               "--guidance-interval replaces that default by the config's setting with your options: e.g. "
               "--sampler unipc --steps 8, or a training-free cache --accel fora|delta|taylorseer "
               "--accel-kw interval=3[,order=2 | ,blocks=3,boundary=500].")


def parse_classes(spec: str, names: list[str], what: str, option: str = "--classes") -> list[int]:
    try:
        return [lookup_class(s.strip(), names, what) for s in spec.split(",") if s.strip()]
    except EfditError as e:
        raise EfditError(f"{option}: {e}") from None


def main(argv: list[str]) -> int:
    p = parser("sample", DESCRIPTION)
    p.add_argument("model", help="an efdit model file, or a run directory holding model.safetensors")
    p.add_argument("--classes", default=None, type=nonempty("class"),
                   help="comma-separated class names or ids (default: all)")
    p.add_argument("--superclass", default=None, type=nonempty("superclass"),
                   help="comma-separated superclasses: sample all their subclasses")
    p.add_argument("--per-class", type=positive_int, default=None, help="samples per class (default: the config's)")
    p.add_argument("--out", default="", help="output folder (default: <run>/samples/<timestamp>)")
    p.add_argument("--no-progress", action="store_true")
    args, rest = p.parse_known_args(argv)
    path = model_file(args.model)
    out = Path(args.out) if args.out else path.parent / "samples" / time.strftime("%Y%m%d-%H%M%S")
    writable(out, "samples folder")
    device = resolve_device(os.environ.get("EFDIT_DEVICE", "auto"))
    model, cfg, h, meta = load_model(path, device)
    choice = apply_sampling_default(cfg, meta, sample_overrides(overrides(rest)))  # options named: the config's
    apply_sampling_options(cfg, rest)
    check_sampling(cfg)
    apply_attention(model, cfg)
    sub = cfg.model.condition_on == "sub"
    names, what = (h.sub_names, "subclass") if sub else (h.super_names, "superclass")
    classes = parse_classes(args.classes, names, what) if args.classes else []
    if args.superclass:
        for s in parse_classes(args.superclass, h.super_names, "superclass", "--superclass"):
            classes += h.children(s) if sub else [s]
    classes = classes or list(range(len(names)))
    per_class = args.per_class or cfg.sample.per_class
    labels = torch.tensor(classes).repeat_interleave(per_class)
    print(sampling_line(cfg, choice), flush=True)
    images = generate(model, cfg, labels, device=device, progress=not args.no_progress)
    save_grid(out / "grid.png", images, labels, h, cfg.model.condition_on)
    npz = save_samples(out, images, labels, h, cfg.model.condition_on)
    print(f"{len(images)} samples -> {out / 'grid.png'}, {out / 'png'}/, {npz}")
    return 0
