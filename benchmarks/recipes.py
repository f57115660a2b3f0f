"""Training recipes side by side at equal CPU time: FD against CPU time for each.

    .venv/bin/python benchmarks/recipes.py                       # every base recipe, 12 CPU-minutes each, 3 FD points
    .venv/bin/python benchmarks/recipes.py --recipes current,min-snr --cpu-minutes 6 --points 2
    .venv/bin/python benchmarks/recipes.py --set attention       # ProAttention trained with the model, 256 tokens
    .venv/bin/python benchmarks/recipes.py --set attention --seeds 3 --cpu-minutes 4 --per-subclass 10

Two sets (`--set`). `base`: the `fmnist-base` preset (a superclass-conditioned DiT, 7.4 M parameters) with a few
overrides. `attention`: the attention backend trained with the model from scratch (not swapped into an SDPA-trained
one) at 256 tokens — the whole emoji set at 32 px RGB with patch 2, a 4-block, 192-wide DiT conditioned on the 98
subgroups — SDPA against pooled proxy attention (two-stage, pool 4 → 64 proxies) and its `kv` mode. Each recipe
is trained in chunks by rerunning efdit's training (resume is exact, so a chunked run equals a continuous one);
after each chunk the EMA model is sampled and scored. The budget is the training process's CPU time (user + sys,
`time.process_time`), not wall-clock time, so that other work on the machine does not tilt the comparison; the
run uses one thread. A second table measures training throughput with 1 and 2 threads (interleaved), which turns
the CPU-time curves into wall-clock ones.

Score: FD-EffNetLite0 of `--per-subclass` samples per test subclass (each sampled as its superclass, so the class
proportions match the reference) against the same number of real test images per subclass, DPM-Solver++(2M) 10
steps, CFG 2, seed 0 (the same labels and noise for every recipe and point). Features are saved beside the results
(`features/*.npy`), so intervals can be recomputed from them. With `--seeds N` every recipe is trained N times
(train.seed 0..N-1; the same sampling noise), and a last table gives FD at each point as the mean over seeds with
a two-stage bootstrap 95 % interval, and each recipe's paired difference to the first. Rerunning the command
resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

BASE_RECIPES: dict[str, dict] = {
    "current": {},                                                        # the shipped base's recipe
    "min-snr": {"diffusion.weighting": "min_snr", "diffusion.min_snr_gamma": 5.0},
    "lognormal": {"diffusion.timesteps": "lognormal"},
    "v-pred": {"diffusion.prediction": "v"},
    "batch-128": {"train.batch_size": 128, "train.lr": 1e-3},
    "lr-1e-3": {"train.lr": 1e-3},
}
ATTENTION_RECIPES: dict[str, dict] = {
    "sdpa": {},
    "proxy": {"model.attn_backend": "proxy", "model.attn_kwargs": "pool=4"},
    "proxy-kv": {"model.attn_backend": "proxy", "model.attn_kwargs": "pool=4,proxy_mode=kv"},
}
ATTENTION_BASE = {"data.dataset": "emoji", "data.super_level": "group", "data.sub_level": "subgroup",
                  "data.categories": "all", "data.image_size": 32, "model.patch_size": 2, "model.hidden_size": 192,
                  "model.depth": 4, "model.num_heads": 3, "diffusion.weighting": "min_snr", "train.batch_size": 32,
                  "train.lr": 5e-4, "train.warmup_images": 5_000, "train.ema_decay": 0.999}
SETS = {"base": ("fmnist-base", {}, BASE_RECIPES), "attention": ("emoji-base", ATTENTION_BASE, ATTENTION_RECIPES)}
RECIPES = {**BASE_RECIPES, **ATTENTION_RECIPES}
COMMON = {"train.minutes": 0.0, "train.sample_every": 0, "train.log_every": 2048, "train.ckpt_every": 10 ** 9,
          "sample.per_class": 1, "train.threads": 1}


def _reference(set_name: str, per_subclass: int, extractor):
    """Real images to score against: Fashion-MNIST's test split; for the emoji set (no test split) a
    class-balanced draw of the whole set."""
    from efdit.config import build_config
    from efdit.engine.datasets import load_data
    preset, base, _ = SETS[set_name]
    cfg = build_config(preset, base)
    split = "test" if cfg.data.dataset == "fmnist" else "train"
    real = load_data(cfg, split).subset_per_class(per_subclass, seed=0, allow_fewer=True)
    feats = extractor.extract(real.images, resolution=64, progress=False)
    return feats, real.sub_labels, real.hierarchy


def _score(run: Path, ref_feats, sub_labels, hierarchy, extractor) -> tuple[float, np.ndarray]:
    from efdit.config import apply_overrides
    from efdit.engine.files import load_model
    from efdit.engine.generate import generate
    from efdit.metrics.fd import frechet_distance_from_features
    model, cfg, _, _ = load_model(run / "model.safetensors")
    apply_overrides(cfg, {"sample.sampler": "dpmpp2m", "sample.steps": "10", "sample.cfg_scale": 2.0,
                          "sample.eta": 0.0, "sample.seed": 0})
    # each reference image's own class: its superclass for a superclass-conditioned model
    labels = hierarchy.parent[sub_labels] if cfg.model.condition_on == "super" else sub_labels
    images = generate(model, cfg, labels, progress=False)
    feats = extractor.extract(images, resolution=64, progress=False)
    return frechet_distance_from_features(feats, ref_feats), feats


def run_name(name: str, seed: int) -> str:
    """A recipe's run (and results / features) name: the recipe's own for seed 0, `NAME-sSEED` for the others."""
    return name if seed == 0 else f"{name}-s{seed}"


def run_recipe(name: str, out: Path, cpu_minutes: float, points: int, ref, extractor, set_name: str = "base",
               seed: int = 0) -> list[dict]:
    from efdit.config import build_config
    from efdit.engine.train import train
    from efdit.models.checkpoint import load_safetensors
    tag = run_name(name, seed)
    run = out / tag
    results_path = out / f"{tag}.json"
    rows = json.loads(results_path.read_text()) if results_path.is_file() else []
    preset, base, recipes = SETS[set_name]
    cfg = build_config(preset, {**base, **COMMON, **recipes[name], "train.seed": seed, "run_dir": str(run)})
    # CPU time and images after the last training chunk (written after every chunk, so a run stopped while scoring
    # resumes with the CPU time it had really spent, not as if the saved images had cost nothing)
    spent_path = out / f"{tag}.spent.json"
    spent = json.loads(spent_path.read_text()) if spent_path.is_file() else \
        ({"images": rows[-1]["images"], "cpu_s": rows[-1]["cpu_s"]} if rows else {"images": 0, "cpu_s": 0.0})
    images, cpu = spent["images"], spent["cpu_s"]
    rate = None
    for k in range(len(rows) + 1, points + 1):
        target_cpu = cpu_minutes * 60 * k / points
        # first chunk: a guess; later ones from the measured CPU rate
        step_images = 4096 if rate is None else max(cfg.train.batch_size, int(rate * (target_cpu - cpu)))
        while True:
            goal = images + step_images
            cfg.train.total_images = goal
            t0 = time.process_time()
            train(cfg, progress=False)
            used = time.process_time() - t0
            cpu += used
            done = load_safetensors(run / "model.safetensors")[1]["progress"]["images"]  # whole batches
            rate = (done - images) / used if done > images else (rate or 0.0)
            images = done
            spent_path.write_text(json.dumps({"images": images, "cpu_s": round(cpu, 1)}))
            if cpu >= target_cpu * 0.97:
                break
            step_images = max(cfg.train.batch_size, int(rate * (target_cpu - cpu)))
        fd, feats = _score(run, *ref, extractor)
        (out / "features").mkdir(parents=True, exist_ok=True)
        np.save(out / "features" / f"{tag}-{k}.npy", feats)
        rows.append({"recipe": name, "seed": seed, "point": k, "cpu_s": round(cpu, 1), "images": images, "fd": fd,
                     "img_per_cpu_s": round(rate, 2), "load": os.getloadavg()[0], "time": time.strftime("%H:%M")})
        results_path.write_text(json.dumps(rows, indent=1))
        print(f"{tag:10s} point {k}/{points}: {cpu / 60:5.1f} CPU-min, {images:7,} images, FD {fd:8.1f} "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)
    return rows


def interval_table(out: Path, names: list[str], seeds: int, points: int, ref) -> str:
    """FD at each point, the mean over seeds with its two-stage bootstrap 95 % interval (efdit.metrics.bootstrap:
    seeds, then samples), and each recipe's difference to the first, paired (the same labels, sampling noise and
    bootstrap draws; only the training differs), from the saved features."""
    from efdit.metrics.bootstrap import bootstrap_metrics, combine_seeds, difference_result
    ref_feats, sub_labels, _ = ref

    def result(name, seed, k):
        f = np.load(out / "features" / f"{run_name(name, seed)}-{k}.npy")
        return bootstrap_metrics(f, ref_feats, sub_labels=sub_labels, kid=False, prc=False)

    head = f"| recipe (mean of {seeds} seed{'s' if seeds > 1 else ''}) | " + " | ".join(
        f"FD @ point {k} [95 % CI]" for k in range(1, points + 1)) + f" | Δ vs {names[0]} at point {points} |"
    lines = [head, "|---|" + "---:|" * (points + 1)]
    last = {}
    for n in names:
        cells = []
        for k in range(1, points + 1):
            rs = [result(n, s, k) for s in range(seeds)]
            c = combine_seeds(rs)["fd_effnetlite0"]
            cells.append(f"{c['mean']:.0f} [{c['interval'].low:.0f}, {c['interval'].high:.0f}]")
            if k == points:
                last[n] = rs
        if n == names[0]:
            delta = "—"
        else:
            d = combine_seeds([difference_result(a, b) for a, b in zip(last[n], last[names[0]])])["fd_effnetlite0"]
            iv = d["interval"]
            delta = f"{d['mean']:+.0f} [{iv.low:+.0f}, {iv.high:+.0f}]" + (" no difference" if iv.contains(0.0)
                                                                         else " differs")
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {delta} |")
    return "\n".join(lines)


def plot(out: Path, names: list[str], path: Path) -> Path:
    """FD against CPU-minutes (left) and against images seen (right), one line per recipe."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for n in names:
        rows = json.loads((out / f"{n}.json").read_text()) if (out / f"{n}.json").is_file() else []
        if rows:
            axes[0].plot([r["cpu_s"] / 60 for r in rows], [r["fd"] for r in rows], "o-", label=n)
            axes[1].plot([r["images"] / 1000 for r in rows], [r["fd"] for r in rows], "o-", label=n)
    axes[0].set_xlabel("training CPU-minutes (one thread)")
    axes[1].set_xlabel("thousand images seen")
    for ax in axes:
        ax.set_ylabel("FD-EffNetLite0")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"recipes at equal CPU time ({', '.join(names)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def thread_throughput(out: Path, images: int = 2048, rounds: int = 2) -> dict:
    """img per wall-second of the current recipe with 1 and 2 threads, interleaved (fresh runs each time)."""
    import shutil

    from efdit.config import build_config
    from efdit.engine.train import train
    got: dict[int, list[float]] = {1: [], 2: []}
    for r in range(rounds):
        for threads in (1, 2):
            run = out / f"threads-{threads}"
            shutil.rmtree(run, ignore_errors=True)
            cfg = build_config("fmnist-base", {**COMMON, "train.threads": threads, "run_dir": str(run),
                                               "train.total_images": images, "train.warmup_images": 0})
            t0 = time.time()
            train(cfg, progress=False)
            got[threads].append(images / (time.time() - t0))
            shutil.rmtree(run, ignore_errors=True)
    torch.set_num_threads(1)
    return {t: max(v) for t, v in got.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--set", default="base", choices=sorted(SETS), help="base recipes or attention backends")
    p.add_argument("--recipes", default="", help="comma-separated recipes of the set (default: all of them)")
    p.add_argument("--cpu-minutes", type=float, default=12.0)
    p.add_argument("--points", type=int, default=3)
    p.add_argument("--per-subclass", type=int, default=40)
    p.add_argument("--seeds", type=int, default=1, help="training seeds 0..N-1 per recipe (sampling noise shared)")
    p.add_argument("--out", default="")
    p.add_argument("--no-threads", action="store_true", help="skip the 1 / 2-thread throughput table")
    p.add_argument("--plot-only", default="", help="only draw FD against time from the results in --out to this PNG")
    args = p.parse_args()
    _, _, recipes = SETS[args.set]
    names = [n.strip() for n in args.recipes.split(",") if n.strip()] or list(recipes)
    unknown = [n for n in names if n not in recipes]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown} in set {args.set}; known: {', '.join(recipes)}")
    out = Path(args.out or ("runs/recipes" if args.set == "base" else f"runs/recipes-{args.set}"))
    if args.plot_only:
        print(plot(out, names, Path(args.plot_only)))
        return
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    from efdit.metrics.features import FeatureExtractor
    extractor = FeatureExtractor()
    ref = _reference(args.set, args.per_subclass, extractor)
    table = {}
    for seed in range(args.seeds):
        for n in names:
            rows = run_recipe(n, out, args.cpu_minutes, args.points, ref, extractor, args.set, seed)
            table.setdefault(n, rows)   # the per-point table below shows seed 0
    print("\n" + interval_table(out, names, args.seeds, args.points, ref))
    print("\n| recipe | overrides | " + " | ".join(f"FD @ {args.cpu_minutes * (k + 1) / args.points:g} CPU-min"
                                                 for k in range(args.points)) + " | images | img/CPU-s |")
    print("|---|---|" + "---:|" * (args.points + 2))
    for n, rows in table.items():
        ov = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in recipes[n].items()) or "—"
        print(f"| {n} | {ov} | " + " | ".join(f"{r['fd']:.0f}" for r in rows) +
              f" | {rows[-1]['images']:,} | {rows[-1]['img_per_cpu_s']:.1f} |")
    if args.set == "base" and not args.no_threads:
        tp = thread_throughput(out)
        (out / "threads.json").write_text(json.dumps(tp))
        print(f"\ntraining throughput (img per wall-second, best of 2 interleaved): 1 thread {tp[1]:.1f}, "
              f"2 threads {tp[2]:.1f} ({tp[2] / tp[1]:.2f}x; load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
