"""D²iT against a plain DiT at equal training FLOPs and at equal sampling FLOPs, seeds with bootstrap intervals.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/d2it_compute.py --preset fmnist32 --seeds 3
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/d2it_compute.py --preset emoji32 --seeds 3 --dct-steps 1200

Protocol
  Shared once per dataset (`OUT/shared`): entropy thresholds, the DVAE, the stage-2 latents and the DGT. Both sides
  need the DVAE (the DiT runs on its all-fine latent and is decoded by it), so its cost is reported but moves
  no budget. Per seed s (training init and batch order, sampling noise):
    * D²iT: the DCT (trunk + RefineNet) trained `--dct-steps` steps on ground-truth grain maps; sampled with
      DGT-predicted maps (the whole pipeline: DGT → DCT → decoder).
    * DiT/p for each `--patches` p on the all-fine latent, same width / depth / lr / batch as `cfg.dit`, trained for
      as many steps as make its training FLOPs equal to D²iT's own (DGT + DCT: 3 forwards per image). p = 2 gives
      as many tokens as the DCT's trunk (one per region); p = 1 one token per fine code (the all-fine grain,
      more than D²iT's mean R·(1 + 3r) codes; no integer patch matches that mean exactly).
  Sampling: D²iT with DDPM `--steps` on the DCT (the DGT with its own `dgt.sample_steps`); each DiT once at the
  same step count and once at equal sampling FLOPs (steps = D²iT's GFLOP per sample minus the decoder, over the
  DiT's GFLOP per forward). FLOPs are counted as the code runs (`d2it/flops.py`): the DCT's RefineNet length is
  each batch's largest, as in training.
  Evaluation: FD-EffNetLite0 (64 px) of `--n-per-class` samples per class against as many test images, with a
  bootstrap interval per seed (stratified by class), the mean over seeds with its two-stage interval, and the
  difference to D²iT (unpaired: the latents differ in shape, so no noise is shared). The real-vs-real floor:
  train images against the same reference at the same n.
Rerunning the same command resumes: trained stages and saved features are reused.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BATCH = 250      # D2iTPipeline's sampling batch: the DCT's RefineNet is padded to each batch's largest grain count
SHARED_FILES = ("thresholds.json", "entropy.safetensors", "dvae.safetensors", "latents.safetensors",
                "dgt.safetensors")


def cfg_for(args, run_dir: Path, seed: int = 0, **over):
    from efdit.d2it.config import build_d2it_config
    o = {"run_dir": str(run_dir), "seed": seed, "dvae.steps": args.dvae_steps, "dvae.minutes": 0,
         "dgt.steps": args.dgt_steps, "dgt.minutes": 0, "dct.steps": args.dct_steps, "dct.minutes": 0,
         "dit.minutes": 0, **over}
    return build_d2it_config(args.preset, o)


def link_shared(shared: Path, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    for f in SHARED_FILES:
        dst = run_dir / f
        if not dst.exists():
            dst.symlink_to((shared / f).resolve())


def stage_info(path: Path) -> dict:
    from efdit.engine.d2it_train import load_stage
    return load_stage(path)[1].get("progress", {})


def dct_train_forward(cfg, shared: Path, draws: int = 200) -> float:
    """Mean per-image forward FLOPs of the DCT over training batches (the RefineNet runs on each batch's largest
    sub-token count), from `draws` batches drawn from the latents' grain maps as training draws them."""
    from efdit.d2it.dct import build_dct
    from efdit.d2it.flops import dct_model_flops
    from efdit.engine.d2it_train import load_latents
    lat = load_latents(shared)
    model = build_dct(cfg, lat["z"].shape[1], int(lat["labels"].max()) + 1)
    gen = torch.Generator().manual_seed(0)
    b = cfg.dct.batch_size
    return float(np.mean([dct_model_flops(model, grain=lat["grain"][torch.randint(0, len(lat["grain"]), (b,),
                                                                                  generator=gen)])["total"]
                          for _ in range(draws)]))


def budget(args, shared: Path) -> dict:
    """Training FLOPs of each side and the DiT step counts that equal D²iT's."""
    from efdit.d2it.flops import dgt_flops, dvae_flops_of, training_flops
    from efdit.models.flops import dit_flops
    cfg = cfg_for(args, shared)
    from efdit.engine.d2it_train import load_stage
    dvae_meta = load_stage(shared / "dvae.safetensors")[1]
    dvae_info, dgt_info = dvae_meta.get("progress", {}), stage_info(shared / "dgt.safetensors")
    in_ch = int(dvae_meta["in_channels"])
    vae = dvae_flops_of(cfg, in_ch)
    f_dgt = dgt_flops(cfg.data.image_size // cfg.f2, cfg.dgt.hidden_size, cfg.dgt.depth)["total"]
    f_dct = dct_train_forward(cfg, shared)
    out = {"dvae_train": training_flops(vae["total"], dvae_info["images"]),
           "dgt_train": training_flops(f_dgt, dgt_info["images"]),
           "dct_train": training_flops(f_dct, args.dct_steps * cfg.dct.batch_size),
           "dct_forward_train": f_dct, "dgt_forward": f_dgt, "decoder": vae["decoder"], "dit": {}}
    d2it = out["dgt_train"] + out["dct_train"]
    lat = cfg.data.image_size // cfg.dvae.f1
    for p in args.patches:
        f = dit_flops(lat, p, cfg.dvae.z_channels, cfg.dit.hidden_size, cfg.dit.depth, cfg.dct.learn_sigma)
        steps = int(round(d2it / (3 * f["total"] * cfg.dit.batch_size)))
        out["dit"][p] = {"forward": f["total"], "tokens": f["tokens"], "steps": steps,
                         "train": training_flops(f["total"], steps * cfg.dit.batch_size)}
    return out


def train_shared(args, shared: Path) -> None:
    from efdit.engine.d2it_train import train_d2it
    shared.mkdir(parents=True, exist_ok=True)
    if args.shared_from:
        src = Path(args.shared_from)
        for f in ("config.json", "thresholds.json", "entropy.safetensors", "dvae.safetensors"):
            if not (shared / f).exists():
                shutil.copy(src / f, shared / f)
    cfg = cfg_for(args, shared)
    train_d2it(cfg, ["prepare", "dvae", "latents", "dgt"])


def train_seed(args, out: Path, shared: Path, seed: int, B: dict) -> dict:
    from efdit.engine.d2it_train import train_d2it
    dirs = {"d2it": out / f"s{seed}" / "d2it"}
    link_shared(shared, dirs["d2it"])
    train_d2it(cfg_for(args, dirs["d2it"], seed), ["dct"])
    for p, d in B["dit"].items():
        dirs[p] = out / f"s{seed}" / f"dit-p{p}"
        link_shared(shared, dirs[p])
        train_d2it(cfg_for(args, dirs[p], seed, **{"dit.patch_size": p, "dit.steps": d["steps"]}), ["dit"])
    return dirs


def sample_arms(args, out: Path, dirs: dict, seed: int, labels, B: dict) -> list[dict]:
    """Samples of every arm for one seed -> rows {arm, steps, gflop_sample, tokens, images, maps}; features are
    saved under OUT/features and reused."""
    from efdit.d2it.flops import dct_model_flops, sampling_flops
    from efdit.engine.d2it_pipeline import D2iTPipeline
    rows = []
    pipe = D2iTPipeline(dirs["d2it"])
    cfg = pipe.cfg
    t0 = time.time()
    images, maps = pipe(labels, grain_source="dgt", steps=str(args.steps), sampler="ddpm", cfg_scale=args.cfg_scale,
                        grain_cfg_scale=args.grain_cfg_scale, seed=1000 + seed, progress=False, batch_size=BATCH)
    dct_fwd = sum(dct_model_flops(pipe.dct, grain=maps[i:i + BATCH])["total"] * len(maps[i:i + BATCH])
                  for i in range(0, len(maps), BATCH)) / len(maps)
    r = pipe.dct.grid[0] * pipe.dct.grid[1]
    fine = float(maps.float().mean())
    d2it_sample = (sampling_flops(B["dgt_forward"], cfg.dgt.sample_steps, args.grain_cfg_scale)
                   + sampling_flops(dct_fwd, args.steps, args.cfg_scale) + B["decoder"])
    rows.append({"arm": "D²iT (DGT maps)", "key": "d2it", "steps": args.steps, "tokens": r * (1 + 3 * fine),
                 "gflop_sample": d2it_sample / 1e9, "fine_share": fine, "images": images, "maps": maps,
                 "seconds": time.time() - t0})
    for p, d in B["dit"].items():
        dit = D2iTPipeline(dirs[p], need=("dvae", "dit"))
        per_step = sampling_flops(d["forward"], 1, args.cfg_scale)
        matched = max(1, int(round((d2it_sample - B["decoder"]) / per_step)))
        for label, steps in (("same steps", args.steps), ("same sampling FLOPs", matched)):
            t0 = time.time()
            imgs = dit.sample_baseline(labels, steps=str(steps), sampler="ddpm", cfg_scale=args.cfg_scale,
                                       seed=1000 + seed, progress=False, batch_size=BATCH)
            g = cfg.data.image_size // cfg.f2
            rows.append({"arm": f"DiT/{p}, {label}", "key": f"dit-p{p}-{steps}", "steps": steps,
                         "tokens": d["tokens"], "gflop_sample": (per_step * steps + B["decoder"]) / 1e9,
                         "images": imgs, "maps": torch.ones(len(imgs), g, g, dtype=torch.long),
                         "seconds": time.time() - t0})
    return rows


def same_counts(pool: torch.Tensor, labels: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Indices into `pool` (labels) with as many items of every class as `labels` has (random, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c, n in zip(*torch.unique(labels, return_counts=True)):
        idx = (pool == c).nonzero().flatten()
        if len(idx) < n:
            raise SystemExit(f"class {int(c)}: {len(idx)} train images for {int(n)} test images")
        out.append(idx[torch.randperm(len(idx), generator=gen)[:n]])
    return torch.cat(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="fmnist32")
    p.add_argument("--out", default="", help="default runs/d2it-compute-<preset>")
    p.add_argument("--shared-from", default="", help="a D²iT run whose thresholds / entropy / DVAE to reuse")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--patches", default="2,1")
    p.add_argument("--dvae-steps", type=int, default=300)
    p.add_argument("--dgt-steps", type=int, default=800)
    p.add_argument("--dct-steps", type=int, default=2000)
    p.add_argument("--steps", type=int, default=25, help="DDPM steps of the DCT chain (and the DiTs' 'same steps')")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance on the DCT and the DiTs (1 = off)")
    p.add_argument("--grain-cfg-scale", type=float, default=1.5, help="the DGT's guidance")
    p.add_argument("--n-per-class", type=int, default=30, help="0: the whole test split")
    args = p.parse_args()
    args.patches = [int(v) for v in args.patches.split(",")]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from efdit.commands.d2it_table5 import per_class_indices
    from efdit.engine.d2it_train import datasets
    from efdit.engine.pictures import save_pairs_grid
    from efdit.metrics.bootstrap import bootstrap_metrics, combine_seeds, difference_result
    from efdit.metrics.features import FeatureExtractor

    out = Path(args.out or f"runs/d2it-compute-{args.preset}")
    shared = out / "shared"
    train_shared(args, shared)
    B = budget(args, shared)
    G = 1e9
    print(f"training GFLOP: DVAE {B['dvae_train'] / G:,.0f} (shared), DGT {B['dgt_train'] / G:,.0f}, DCT "
          f"{B['dct_train'] / G:,.0f} -> DiT steps " + ", ".join(f"/{k}: {v['steps']}" for k, v in B["dit"].items()),
          flush=True)

    cfg = cfg_for(args, shared)
    train_ds, test_ds = datasets(cfg)
    if args.n_per_class > 0:
        idx = per_class_indices(test_ds.sub_labels, args.n_per_class, 0)
        floor_idx = per_class_indices(train_ds.sub_labels, args.n_per_class, 1)
    else:                       # the whole test split; the floor from train images with the same class counts
        idx = torch.arange(len(test_ds))
        floor_idx = same_counts(train_ds.sub_labels, test_ds.sub_labels)
    ref, labels = test_ds.images[idx], test_ds.sub_labels[idx]
    names = test_ds.hierarchy.sub_names
    ext = FeatureExtractor()
    fdir = out / "features"
    fdir.mkdir(parents=True, exist_ok=True)

    def feats(name, images):
        path = fdir / f"{name}.npy"
        if path.is_file():
            return np.load(path)
        f = ext.extract(images, resolution=64, progress=False)
        np.save(path, f)
        return f

    ref_f = feats("reference", ref)
    floor = bootstrap_metrics(feats("floor", train_ds.images[floor_idx]), ref_f, sub_labels=train_ds.sub_labels[floor_idx],
                              kid=False, prc=False, seed=99)
    results, meta = {}, {}
    for s in range(args.seeds):
        t0 = time.process_time()
        dirs = train_seed(args, out, shared, s, B)
        print(f"seed {s}: trained ({(time.process_time() - t0) / 60:.1f} CPU-min, load {os.getloadavg()[0]:.2f})",
              flush=True)
        done = fdir / f"s{s}.json"
        if done.is_file():
            rows = json.loads(done.read_text())
        else:
            rows = sample_arms(args, out, dirs, s, labels, B)
            show = torch.cat([torch.nonzero(labels == c).flatten()[:4] for c in labels.unique().tolist()[:12]])
            for r in rows:
                feats(f"{r['key']}-s{s}", r["images"])
                if s == 0:
                    save_pairs_grid(out / f"grid-{r['key']}.png", r["images"][show], r["maps"][show], labels[show],
                                    names, 4)
                del r["images"], r["maps"]
            done.write_text(json.dumps(rows, indent=1))
        for k, r in enumerate(rows):
            f = np.load(fdir / f"{r['key']}-s{s}.npy")
            # grouped by arm, not by key: the equal-FLOPs step count can differ by one between seeds (D²iT's
            # FLOPs follow its sampled grain maps)
            results.setdefault(r["arm"], []).append(bootstrap_metrics(f, ref_f, sub_labels=labels, kid=False,
                                                                      prc=False, seed=100 * s + k))
            meta.setdefault(r["arm"], []).append(r)
        print(f"seed {s}: " + ", ".join(f"{r['arm']} FD {results[r['arm']][-1].point['fd_effnetlite0']:.0f}"
                                        for r in rows), flush=True)

    key = "fd_effnetlite0"
    training = {"d2it": stage_info(out / "s0" / "d2it" / "dct.safetensors"),
                **{p: stage_info(out / "s0" / f"dit-p{p}" / "dit.safetensors") for p in args.patches}}
    lines = [f"# D²iT vs DiT at equal compute ({args.preset}, {args.seeds} seed{'s' if args.seeds > 1 else ''})", "",
             f"FD-EffNetLite0 (64 px) of {len(labels)} samples (" +
             (f"{args.n_per_class} per class" if args.n_per_class > 0 else "the test split's labels") +
             ") against as many test images; mean over seeds [two-stage bootstrap 95 % CI]; Δ to D²iT, unpaired. DDPM, DCT / DiT guidance "
             f"{args.cfg_scale}, DGT guidance {args.grain_cfg_scale} ({cfg.dgt.sample_steps} steps).", "",
             f"Training GFLOP (3 forwards per image): DVAE {B['dvae_train'] / G:,.0f} (shared by both sides), "
             f"DGT {B['dgt_train'] / G:,.0f} + DCT {B['dct_train'] / G:,.0f} ({args.dct_steps} steps × "
             f"{cfg.dct.batch_size}, {B['dct_forward_train'] / G:.4f} GFLOP / image forward) = "
             f"{(B['dgt_train'] + B['dct_train']) / G:,.0f} for D²iT; " +
             "; ".join(f"DiT/{p} {d['steps']} steps × {cfg.dit.batch_size} = {d['train'] / G:,.0f}"
                       for p, d in B["dit"].items()) + ". Seed-0 wall time: " +
             ", ".join(f"{k if k == 'd2it' else f'DiT/{k}'} {v.get('seconds', '?')} s" for k, v in training.items()) +
             ".", "",
             "| arm | tokens / image | sampling steps | GFLOP / sample | FD [95 % CI] | per seed | Δ FD vs D²iT [95 % CI] |",
             "|---|---:|---:|---:|---:|---|---:|",
             f"| real train images (floor) | – | – | – | {floor.point[key]:.0f} [{floor.interval(key).low:.0f}, "
             f"{floor.interval(key).high:.0f}] | – | – |"]
    summary = {}
    first = next(iter(results))                   # D²iT
    for k, rs in results.items():
        c = combine_seeds(rs)[key]
        if k == first:
            delta = "—"
        else:
            d = combine_seeds([difference_result(a, b, paired=False) for a, b in zip(rs, results[first])])[key]
            iv = d["interval"]
            verdict = "no difference" if iv.contains(0.0) else ("D²iT better" if d["mean"] > 0 else "DiT better")
            delta = f"{d['mean']:+.0f} [{iv.low:+.0f}, {iv.high:+.0f}] {verdict}"
            summary[k] = {"delta": d["mean"], "low": iv.low, "high": iv.high, "verdict": verdict}
        ms = meta[k]
        steps = sorted({r["steps"] for r in ms})
        m = {"arm": k, "key": ms[0]["key"], "tokens": float(np.mean([r["tokens"] for r in ms])),
             "steps": f"{steps[0]}–{steps[-1]}" if len(steps) > 1 else steps[0],
             "gflop_sample": float(np.mean([r["gflop_sample"] for r in ms]))}
        lines.append(f"| {m['arm']} | {m['tokens']:.0f} | {m['steps']} | {m['gflop_sample']:.2f} | {c['mean']:.0f} "
                     f"[{c['interval'].low:.0f}, {c['interval'].high:.0f}] | "
                     f"{', '.join(f'{v:.0f}' for v in c['per_seed'])} | {delta} |")
        summary.setdefault(k, {}).update({"fd": c["mean"], "low": c["interval"].low, "high": c["interval"].high,
                                          "per_seed": c["per_seed"], **{x: m[x] for x in ("key", "steps", "tokens",
                                                                                          "gflop_sample")}})
    text = "\n".join(lines) + "\n"
    (out / "compute.md").write_text(text)
    (out / "compute.json").write_text(json.dumps({"args": vars(args), "budget": {k: v for k, v in B.items()
                                                                                if k != "dit"},
                                                  "dit": {str(k): v for k, v in B["dit"].items()},
                                                  "floor": floor.point[key], "rows": summary}, indent=1))
    print(text)
    print(f"-> {out}/compute.md, grids {out}/grid-*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
