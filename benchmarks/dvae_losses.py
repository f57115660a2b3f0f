"""The DVAE with and without the perceptual and adversarial terms: reconstruction quality on measures it trained on
and on measures it did not, with bootstrap intervals and paired differences to the plain DVAE.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dvae_losses.py                       # 4 DVAEs x 300 steps, then measures
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dvae_losses.py --steps 4 --n 200     # a smoke run, about a minute

Variants (VARIANTS; each a `fmnist32` D²iT run folder under --root with only the DVAE stage trained, the same seed,
so two runs agree bit for bit until a term differs):
  none          L1 + β·KL (the default objective)
  perceptual    + 0.1 · the LPIPS-style distance on EfficientNet-Lite0 features (d2it/losses.py)
  adversarial   + 0.5 · λ · hinge PatchGAN generator loss from step --disc-start (default: half the steps)
  both          perceptual and adversarial together

Measured on the first --n test images in class-balanced order (`per_class_indices`, seed 0), each reconstructed
from its posterior mean at its own r = 0.5 grain map (the entropy threshold the DCT uses):
  * PSNR and SSIM (Gaussian window 11, σ 1.5) on [0, 1]: per-image means — pixel measures neither term trains on;
  * FD-EffNetLite0 at 64 px against the originals — the perceptual term trains on these very features, so it is
    never the only measure;
  * FD on the judge's 128-d penultimate features (the shipped Fashion-MNIST CNN, at its 28 px: the padding
    cropped) — a network neither term saw;
  * the floors: as many train images (class-balanced, seed 1) against the same originals, on both features.
Intervals: 200 bootstrap replicates over the test images (stratified by class), the same draws for every variant,
so each difference to `none` is paired (the same images, reconstructed by two DVAEs); a difference whose interval
holds 0 is "no effect". Writes ROOT/dvae_losses.json, ROOT/dvae_losses.md and ROOT/recon-VARIANT.png (originals
over reconstructions) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = {
    "none": {},
    "perceptual": {"dvae.perceptual_weight": 0.1},
    "adversarial": {"dvae.disc_weight": 0.5},
    "both": {"dvae.perceptual_weight": 0.1, "dvae.disc_weight": 0.5},
}
REPLICATES = 200


def per_image_result(values: dict, counts, plan: str):
    """A BootstrapResult of per-image means (name -> (N,) array) on given bootstrap counts (B, N)."""
    import numpy as np

    from efdit.metrics.bootstrap import BootstrapResult
    n = counts.shape[1]
    point = {k: float(np.mean(v)) for k, v in values.items()}
    reps = {k: counts @ np.asarray(v, dtype=np.float64) / n for k, v in values.items()}
    return BootstrapResult(point, reps, plan, n)


def merge(*results):
    from efdit.metrics.bootstrap import BootstrapResult
    if len({r.plan for r in results}) != 1:
        raise SystemExit("internal: the measures were bootstrapped on different draws")
    point, reps = {}, {}
    for r in results:
        point.update(r.point)
        reps.update(r.replicates)
    return BootstrapResult(point, reps, results[0].plan, results[0].n)


def judge_features(judge, images):
    """The judge CNN's 128-d penultimate activations of uint8 (N, 1, 32, 32) padded Fashion-MNIST images, the
    padding cropped back to the judge's 28 px."""
    from efdit.metrics.classifier import embed
    crop = (images.shape[-1] - judge.image_size) // 2
    return embed(judge, images[..., crop:crop + judge.image_size, crop:crop + judge.image_size])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="runs/dvae-losses")
    p.add_argument("--steps", type=int, default=300, help="DVAE steps of every variant (batch 64)")
    p.add_argument("--disc-start", type=int, default=None, help="first adversarial step (default steps // 2)")
    p.add_argument("--n", type=int, default=10_000, help="test images reconstructed (class-balanced)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        p.error(f"--variants: unknown {unknown} (known: {', '.join(VARIANTS)})")
    if "none" not in names:
        names.insert(0, "none")
    import torch
    from torchvision.utils import save_image
    torch.set_num_threads(args.threads)
    from efdit.commands.d2it_table5 import per_class_indices
    from efdit.d2it.config import build_d2it_config
    from efdit.d2it.data import to_signed
    from efdit.d2it.grains import grain_map, threshold_for
    from efdit.d2it.losses import psnr, ssim
    from efdit.data.base import to_uint8
    from efdit.engine.d2it_train import datasets, load_dvae, load_prepared, load_stage, train_d2it
    from efdit.engine.paths import ASSETS
    from efdit.metrics.bootstrap import bootstrap_metrics, counts_of, draw_indices, paired_difference
    from efdit.metrics.classifier import load_classifier
    from efdit.metrics.fd import frechet_distance_from_features
    from efdit.metrics.features import FeatureExtractor

    root = Path(args.root)
    disc_start = args.steps // 2 if args.disc_start is None else args.disc_start
    t0 = time.time()
    runs = {}
    for name in names:
        over = {"run_dir": str(root / name), "dvae.steps": args.steps, "dvae.minutes": 0, **VARIANTS[name]}
        if "dvae.disc_weight" in over:
            over["dvae.disc_start"] = disc_start
        cfg = build_d2it_config("fmnist32", over)
        t = time.time()
        if runs:   # the prepare stage depends on the data and grains only: the first variant's files serve all
            first = next(iter(runs.values()))[1]
            (root / name).mkdir(parents=True, exist_ok=True)
            for f in ("thresholds.json", "entropy.safetensors"):
                if not (root / name / f).is_file():
                    shutil.copyfile(first / f, root / name / f)
        runs[name] = (cfg, train_d2it(cfg, ["prepare", "dvae"], progress=False))
        print(f"{name}: trained or found in {time.time() - t:.0f} s", flush=True)

    cfg = runs["none"][0]
    train_ds, test_ds = datasets(cfg)
    th, _, ent_test = load_prepared(cfg, runs["none"][1])
    per_class = max(1, args.n // test_ds.hierarchy.num_sub)
    idx = per_class_indices(test_ds.sub_labels, per_class, 0)
    x, labels = test_ds.images[idx], test_ds.sub_labels[idx]
    grains = grain_map(ent_test[idx], threshold_for(th, cfg.grains.r_fine))
    floor_x = train_ds.images[per_class_indices(train_ds.sub_labels, per_class, 1)]
    ext = FeatureExtractor()
    judge, _ = load_classifier(ASSETS / "fmnist-classifier.safetensors")
    eff_ref, jd_ref = ext.extract(x, resolution=64, progress=False), judge_features(judge, x)
    floors = {"fd_effnetlite0": frechet_distance_from_features(ext.extract(floor_x, resolution=64, progress=False),
                                                               eff_ref),
              "fd_judge": frechet_distance_from_features(judge_features(judge, floor_x), jd_ref)}
    n = len(idx)
    counts = counts_of(draw_indices(n, REPLICATES, 0, labels.numpy()), n)
    results, info = {}, {}
    for name in names:
        dvae = load_dvae(runs[name][0], runs[name][1])
        with torch.no_grad():
            rec = torch.cat([to_uint8(dvae.decode(dvae.encode(to_signed(x[i:i + 500]), grains[i:i + 500],
                                                             sample=False)[0], grains[i:i + 500]))
                             for i in range(0, n, 500)])
        a, b = rec.double() / 255, x.double() / 255
        eff = bootstrap_metrics(ext.extract(rec, resolution=64, progress=False), eff_ref, sub_labels=labels,
                                replicates=REPLICATES, seed=0, kid=False, prc=False)
        jd = bootstrap_metrics(judge_features(judge, rec), jd_ref, sub_labels=labels, replicates=REPLICATES,
                               seed=0, fd_key="fd_judge", kid=False, prc=False)
        pix = per_image_result({"psnr": psnr(a, b).numpy(), "ssim": ssim(a, b).numpy(),
                                "l1": (a - b).abs().flatten(1).mean(1).numpy()}, counts, eff.plan)
        results[name] = merge(eff, jd, pix)
        info[name] = load_stage(runs[name][1] / "dvae.safetensors")[1].get("progress", {})
        grid = torch.cat([x[:8], rec[:8]]) if n >= 8 else torch.cat([x, rec])
        save_image(grid.float() / 255, root / f"recon-{name}.png", nrow=min(8, n), padding=2)
        print(f"{name}: measured ({time.time() - t0:.0f} s so far)", flush=True)

    metrics = [("psnr", "PSNR dB ↑", 2), ("ssim", "SSIM ↑", 4), ("fd_effnetlite0", "FD-EffNetLite0 ↓", 2),
               ("fd_judge", "FD judge ↓", 3)]
    lines = [f"DVAE `fmnist32`, {args.steps} steps × 64 images per variant (adversarial from step {disc_start}); "
             f"{n:,} test images reconstructed at their r = {cfg.grains.r_fine} grain maps (fine share "
             f"{grains.float().mean():.3f}); floors (train vs test, same N): FD-EffNetLite0 "
             f"{floors['fd_effnetlite0']:.2f}, FD judge {floors['fd_judge']:.3f}. Brackets: bootstrap 95 % intervals "
             f"({REPLICATES} replicates over the test images); Δ: paired, vs `none`.", "",
             "| variant | " + " | ".join(h for _, h, _ in metrics) + " | " +
             " | ".join("Δ " + h.rsplit(" ", 1)[0] for _, h, _ in metrics) + " |",
             "|---|" + "---:|" * (2 * len(metrics))]
    record = {"steps": args.steps, "disc_start": disc_start, "n": n, "floors": floors, "variants": {},
              "command": " ".join(sys.argv), "minutes": None}
    for name in names:
        r = results[name]
        diff = paired_difference(r, results["none"]) if name != "none" else None
        cells = [f"{r.point[k]:.{d}f} [{r.interval(k).low:.{d}f}, {r.interval(k).high:.{d}f}]" for k, _, d in metrics]
        dcells = (["—"] * len(metrics) if diff is None else
                  [f"{diff[k].interval.value:+.{d}f} [{diff[k].interval.low:+.{d}f}, {diff[k].interval.high:+.{d}f}]"
                   + (" *" if diff[k].differs else "") for k, _, d in metrics])
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(dcells) + " |")
        record["variants"][name] = {"overrides": VARIANTS[name], "result": r.to_dict(),
                                    "difference": None if diff is None else {k: v.to_dict() for k, v in diff.items()},
                                    "train": info[name]}
    lines += ["", "`*`: the paired interval excludes 0. Reproduce: `OMP_NUM_THREADS=1 .venv/bin/python "
              f"benchmarks/dvae_losses.py --steps {args.steps} --n {args.n}`."]
    record["minutes"] = (time.time() - t0) / 60
    text = "\n".join(lines)
    (root / "dvae_losses.md").write_text(text + "\n")
    (root / "dvae_losses.json").write_text(json.dumps(record, indent=1, default=float))
    print(text)
    print(f"total {record['minutes']:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
