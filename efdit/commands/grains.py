"""`efdit grains ...`: entropy grain maps — the dataset's thresholds (computed once) and overlays.

    efdit grains compute-thresholds [--preset fmnist32] [--hist docs/d2it-entropy-hist.png]
    efdit grains show [--split test] [--n 32] [--r-fine 0.5] [--out grains.png]
"""
from __future__ import annotations

from pathlib import Path

from .d2it import d2it_config, d2it_parser
from .options import positive_int


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
    from .report import save_figure
    return save_figure(fig, path)


def main(argv: list[str]) -> int:
    import torch

    from ..d2it.grains import grain_map, region_entropy, threshold_for
    from ..engine.d2it_train import datasets, get_thresholds
    from ..engine.paths import cache_dir
    p = d2it_parser("grains", "Entropy grain maps: dataset thresholds (computed once) and overlays.")
    p.add_argument("action", choices=["compute-thresholds", "show"])
    p.add_argument("--preset", default="fmnist32")
    p.add_argument("--hist", default="", help="compute-thresholds: also write a histogram PNG of region entropies")
    p.add_argument("--split", default="test", help="show: which split's images")
    p.add_argument("--n", type=positive_int, default=32, help="show: number of images")
    p.add_argument("--out", default="grains.png", help="show: output PNG")
    p.add_argument("--no-progress", action="store_true")
    args, rest = p.parse_known_args(argv)
    cfg = d2it_config(args, rest)
    train_ds, test_ds = datasets(cfg)
    th, ent = get_thresholds(cfg, train_ds.images, progress=not args.no_progress)
    spec = cfg.entropy_spec()
    if args.action == "compute-thresholds":
        from ..d2it.grains import thresholds_path
        path = thresholds_path(cache_dir(), cfg.data.dataset + (f"-c{cfg.data.channels}" if cfg.data.channels else ""),
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
    from ..engine.pictures import save_pairs_grid
    names = ds.hierarchy.sub_names
    out = save_pairs_grid(args.out, images, maps, ds.sub_labels[idx], names)
    print(f"{args.n} {args.split} images with their grain maps (r_fine {cfg.grains.r_fine}, fine share "
          f"{maps.float().mean():.2f}) -> {out}")
    return 0
