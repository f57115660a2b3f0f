"""`efdit grains ...` and `efdit d2it ...` subcommands (also `efdit train --model d2it-dvae|d2it-dgt|d2it-dct`).

    efdit grains compute-thresholds [--preset fmnist32] [--hist docs/d2it-entropy-hist.png]
    efdit grains show [--split test] [--n 32] [--r-fine 0.5] [--out grains.png]
    efdit d2it train [--stage all|prepare,dvae,latents,dgt,dct,dit] [--run-dir DIR] [--force] [--key value ...]
    efdit d2it sample RUN [--per-class 8] [--grains dgt|random] [--out DIR]
    efdit d2it table5 RUN [--n-per-class 50] [--steps 50]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import EfditError

MODEL_STAGES = {"d2it-dvae": ["prepare", "dvae", "latents"], "d2it-dgt": ["prepare", "dgt"],
                "d2it-dct": ["dct"], "d2it-dit": ["dit"], "d2it": ["prepare", "dvae", "latents", "dgt", "dct", "dit"]}


def _parser(cmd: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"efdit {cmd}", description=description,
                                   epilog="D²iT config fields can be overridden with --key value "
                                          "(e.g. --grains.bins 64, --dct.minutes 5); presets: fmnist32, emoji32, "
                                          "imagenet256.")


def _config(args, rest):
    from ..config import parse_override_args
    from .config import build_d2it_config
    ov = parse_override_args(rest)
    if getattr(args, "run_dir", None):
        ov["run_dir"] = args.run_dir
    return build_d2it_config(args.preset, ov)


# ---- grains -----------------------------------------------------------------------------------------------
def entropy_histogram(path, entropies, thresholds: dict, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    e = np.asarray(entropies).ravel()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.hist(e, bins=120, color="#4a6fb5")
    ax.set_yscale("log")
    for p, c in (("30", "#999999"), ("50", "#d62728"), ("70", "#999999")):
        ax.axvline(thresholds["percentiles"][p], color=c, ls="--", lw=1, label=f"p{p} = {thresholds['percentiles'][p]:.3f}")
    ax.set_xlabel("region entropy (nats)")
    ax.set_ylabel("regions (log)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    from ..report import save_figure
    return save_figure(fig, path)


def cmd_grains(argv: list[str]) -> int:
    import torch
    from .grains import grain_map, region_entropy, threshold_for
    from .train import CACHE, datasets, get_thresholds
    p = _parser("grains", "Entropy grain maps: dataset thresholds (computed once) and overlays.")
    p.add_argument("action", choices=["compute-thresholds", "show"])
    p.add_argument("--preset", default="fmnist32")
    p.add_argument("--hist", default="", help="compute-thresholds: also write a histogram PNG of region entropies")
    p.add_argument("--split", default="test", help="show: which split's images")
    p.add_argument("--n", type=int, default=32, help="show: number of images")
    p.add_argument("--out", default="grains.png", help="show: output PNG")
    p.add_argument("--no-progress", action="store_true")
    args, rest = p.parse_known_args(argv)
    cfg = _config(args, rest)
    train_ds, test_ds = datasets(cfg)
    th, ent = get_thresholds(cfg, train_ds.images, progress=not args.no_progress)
    spec = cfg.entropy_spec()
    if args.action == "compute-thresholds":
        from .grains import thresholds_path
        path = thresholds_path(CACHE, cfg.data.dataset + (f"-c{cfg.data.channels}" if cfg.data.channels else ""),
                               cfg.data.image_size, spec)
        pc = th["percentiles"]
        print(f"{path}: {th['n_regions']:,} regions of {th['n_images']:,} images ({spec.key()}); "
              f"min {pc['0']:.4f}, p30 {pc['30']:.4f}, p50 {pc['50']:.4f}, p70 {pc['70']:.4f}, max {pc['100']:.4f}")
        if args.hist:
            if ent is None:
                ent = torch.cat([region_entropy(train_ds.images[i:i + 4096], spec)
                                 for i in range(0, len(train_ds), 4096)])
            at_min = float((ent == ent.min()).double().mean())
            title = (f"{cfg.data.dataset} {cfg.data.image_size}px train: {spec.key()}, natural log; "
                     f"{at_min:.1%} of regions tie at the minimum (flat)")
            print(f"histogram -> {entropy_histogram(args.hist, ent, th, title)}")
        return 0
    ds = test_ds if args.split == "test" else train_ds
    idx = torch.linspace(0, len(ds) - 1, args.n).long()
    images = ds.images[idx]
    maps = grain_map(region_entropy(images, spec), threshold_for(th, cfg.grains.r_fine))
    from .pipeline import save_pairs_grid
    names = ds.hierarchy.sub_names
    out = save_pairs_grid(args.out, images, maps, ds.sub_labels[idx], names)
    print(f"{args.n} {args.split} images with their grain maps (r_fine {cfg.grains.r_fine}, fine share "
          f"{maps.float().mean():.2f}) -> {out}")
    return 0


# ---- d2it -------------------------------------------------------------------------------------------------
def cmd_d2it(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    action, rest = argv[0], argv[1:]
    if action == "train":
        return d2it_train(rest)
    if action == "sample":
        return d2it_sample(rest)
    if action == "table5":
        from .table5 import main as table5_main
        return table5_main(rest)
    raise EfditError(f"unknown d2it action {action!r} (train | sample | table5)")


def d2it_train(argv: list[str], stages: list[str] | None = None) -> int:
    from .train import STAGES, train_d2it
    p = _parser("d2it train", "Train the D²iT stages into one run directory (a finished stage is skipped).")
    p.add_argument("--preset", default="fmnist32")
    p.add_argument("--run-dir", default="")
    p.add_argument("--stage", default="all", help=f"all, or a comma list of {', '.join(STAGES)}")
    p.add_argument("--force", action="store_true", help="retrain the named stages even if their files exist")
    p.add_argument("--no-progress", action="store_true")
    args, rest = p.parse_known_args(argv)
    cfg = _config(args, rest)
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
    from .pipeline import D2iTPipeline, save_pairs_grid
    p = _parser("d2it sample", "Sample a D²iT run: DGT grain map -> DCT -> DVAE decode; grid with the grain maps.")
    p.add_argument("run", help="a D²iT run directory")
    p.add_argument("--per-class", type=int, default=None)
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
    from .train import datasets
    names = datasets(pipe.cfg)[1].hierarchy.sub_names
    grid = save_pairs_grid(out / f"grid-{args.grains}.png", images, grains, labels, names)
    import numpy as np
    np.savez_compressed(out / f"samples-{args.grains}.npz", images=images.numpy(), grains=grains.numpy(),
                        labels=labels.numpy())
    print(f"{len(images)} samples (fine share {grains.float().mean():.2f}) -> {grid}")
    return 0
