"""`efdit d2it ...` (also `efdit train --model d2it-dvae|d2it-dgt|d2it-dct`): D²iT's stages, samples, Table 5.

    efdit d2it train [--stage all|prepare,dvae,latents,dgt,dct,dit] [--run-dir DIR] [--force] [--key value ...]
    efdit d2it sample RUN [--per-class 8] [--grains dgt|random] [--out DIR]
    efdit d2it table5 RUN [--n-per-class 50] [--steps 50]
"""
from __future__ import annotations

from pathlib import Path

from ..errors import EfditError
from .options import Parser, positive_int

MODEL_STAGES = {"d2it-dvae": ["prepare", "dvae", "latents"], "d2it-dgt": ["prepare", "dgt"],
                "d2it-dct": ["dct"], "d2it-dit": ["dit"], "d2it": ["prepare", "dvae", "latents", "dgt", "dct", "dit"]}


def d2it_parser(cmd: str, description: str) -> Parser:
    return Parser(prog=f"efdit {cmd}", description=description,
                  epilog="D²iT config fields can be overridden with --key value "
                         "(e.g. --grains.bins 64, --dct.minutes 5); presets: fmnist32, emoji32, imagenet256.")


def d2it_config(args, rest):
    from ..config import parse_override_args
    from ..d2it.config import build_d2it_config
    ov = parse_override_args(rest)
    if getattr(args, "run_dir", None):
        ov["run_dir"] = args.run_dir
    return build_d2it_config(args.preset, ov)


# ---- d2it -------------------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    action, rest = argv[0], argv[1:]
    if action == "train":
        return d2it_train(rest)
    if action == "sample":
        return d2it_sample(rest)
    if action == "table5":
        from .d2it_table5 import main as table5_main
        return table5_main(rest)
    raise EfditError(f"unknown d2it action {action!r} (train | sample | table5)")


def d2it_train(argv: list[str], stages: list[str] | None = None) -> int:
    from ..engine.d2it_train import STAGES, train_d2it
    p = d2it_parser("d2it train", "Train the D²iT stages into one run directory (a finished stage is skipped).")
    p.add_argument("--preset", default="fmnist32")
    p.add_argument("--run-dir", default="")
    p.add_argument("--stage", default="all", help=f"all, or a comma list of {', '.join(STAGES)}")
    p.add_argument("--force", action="store_true", help="retrain the named stages even if their files exist")
    p.add_argument("--no-progress", action="store_true")
    args, rest = p.parse_known_args(argv)
    cfg = d2it_config(args, rest)
    if stages is None:
        stages = list(STAGES) if args.stage == "all" else [s.strip() for s in args.stage.split(",") if s.strip()]
    run = train_d2it(cfg, stages, force=args.force, progress=not args.no_progress)
    print(f"run directory: {run}")
    return 0


def train_model_alias(argv: list[str]) -> int | None:
    """`efdit train --model d2it-dvae|d2it-dgt|d2it-dct|d2it-dit|d2it ...` -> the D²iT stages; None if not D²iT."""
    for i, a in enumerate(argv):
        name = a.split("=", 1)[1] if a.startswith("--model=") else (argv[i + 1] if a == "--model" and i + 1 < len(argv)
                                                                     else None)
        if name is not None and name.startswith("d2it"):
            if name not in MODEL_STAGES:
                raise EfditError(f"unknown D²iT model {name!r} (known: {', '.join(MODEL_STAGES)})")
            rest = argv[:i] + argv[i + (1 if a.startswith("--model=") else 2):]
            if "--preset" not in rest and not any(r.startswith("--preset=") for r in rest):
                rest = ["--preset", "fmnist32"] + rest
            return d2it_train(rest, MODEL_STAGES[name])
    return None


def d2it_sample(argv: list[str]) -> int:
    import torch

    from ..engine.d2it_pipeline import D2iTPipeline
    from ..engine.pictures import save_pairs_grid
    p = d2it_parser("d2it sample", "Sample a D²iT run: DGT grain map -> DCT -> DVAE decode; grid with the grain maps.")
    p.add_argument("run", help="a D²iT run directory")
    p.add_argument("--per-class", type=positive_int, default=None)
    p.add_argument("--classes", default="", help="comma-separated class ids (default: all)")
    p.add_argument("--grains", default="dgt", choices=["dgt", "random"], help="grain map source")
    p.add_argument("--out", default="", help="output folder (default: <run>/samples)")
    p.add_argument("--no-progress", action="store_true")
    args, rest = p.parse_known_args(argv)
    from ..config import apply_overrides, parse_override_args
    pipe = D2iTPipeline(args.run)
    ov = {(k if "." in k else f"sample.{k}"): v for k, v in parse_override_args(rest).items()}
    apply_overrides(pipe.cfg, ov)
    n_classes = pipe.dct.y_embedder.num_classes
    classes = [int(c) for c in args.classes.split(",") if c.strip()] or list(range(n_classes))
    per = args.per_class or pipe.cfg.sample.per_class
    labels = torch.tensor(classes).repeat_interleave(per)
    images, grains = pipe(labels, grain_source=args.grains, progress=not args.no_progress)
    out = Path(args.out) if args.out else Path(args.run) / "samples"
    from ..engine.d2it_train import datasets
    names = datasets(pipe.cfg)[1].hierarchy.sub_names
    grid = save_pairs_grid(out / f"grid-{args.grains}.png", images, grains, labels, names)
    import numpy as np
    np.savez_compressed(out / f"samples-{args.grains}.npz", images=images.numpy(), grains=grains.numpy(),
                        labels=labels.numpy())
    print(f"{len(images)} samples (fine share {grains.float().mean():.2f}) -> {grid}")
    return 0
