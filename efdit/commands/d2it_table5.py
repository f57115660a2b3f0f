"""The paper's Table 5 (grain-map source) at small scale, plus Table 3's plain-DiT row and the Fig. 5 trend.

For a trained D²iT run, on the test split (n images per class, their labels):
  * DVAE reconstruction FD-EffNetLite0 at several fine ratios r (Fig. 5: rFID against r),
  * DCT samples with ground-truth grain maps (those of the reference test images, same labels),
    DGT-predicted maps, and random maps (i.i.d. per region at the training fine share),
  * the plain efdit DiT (same width, depth = trunk + RefineNet, same training steps and batch) on the
    all-fine latent, decoded by the same DVAE,
each as FD-EffNetLite0 against the reference images, with the real-vs-real floor (train images vs the
reference) at the same n. Every generated row uses the same seed, sampler and step count.

    efdit d2it table5 runs/d2it-fmnist32 --n-per-class 50 --steps 50
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..errors import EfditError
from .options import Parser


def per_class_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < n:
            raise EfditError(f"class {c} has only {len(idx)} images (< {n})")
        out.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(out)


def mean_pairwise_hamming(maps: torch.Tensor, labels: torch.Tensor) -> float:
    """Average share of differing regions between two maps of the same class (diversity of the maps)."""
    vals = []
    for c in labels.unique().tolist():
        m = maps[labels == c].flatten(1).float()
        if len(m) < 2:
            continue
        d = torch.cdist(m, m, p=1) / m.shape[1]
        vals.append(d.sum() / (len(m) * (len(m) - 1)))
    return float(torch.stack(vals).mean())


def main(argv: list[str]) -> int:
    p = Parser(prog="efdit d2it table5", description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--n-per-class", type=int, default=50)
    p.add_argument("--steps", default="50", help="DDPM steps (respacing) for every generated row")
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--cfg-scale", type=float, default=None, help="DCT / DiT guidance (default: the run's)")
    p.add_argument("--grain-cfg-scale", type=float, default=None, help="DGT guidance (default: the run's)")
    p.add_argument("--ratios", default="0,0.25,0.5,0.75,1", help="fine ratios for the reconstruction rows")
    p.add_argument("--resolution", type=int, default=64, help="EffNet-Lite0 input resolution")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="Markdown output (default: <run>/table5.md, JSON beside it)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    from ..d2it.data import to_signed
    from ..d2it.grains import grain_map, threshold_for
    from ..data.base import to_uint8
    from ..engine.d2it_pipeline import D2iTPipeline
    from ..engine.d2it_train import datasets, load_prepared
    from ..engine.pictures import save_pairs_grid
    from ..metrics.fd import frechet_distance_from_features
    from ..metrics.features import FeatureExtractor

    run = Path(args.run)
    pipe = D2iTPipeline(run, need=("dvae", "dgt", "dct", "dit"))
    cfg = pipe.cfg
    if args.cfg_scale is not None:
        cfg.sample.cfg_scale = args.cfg_scale
    if args.grain_cfg_scale is not None:
        cfg.sample.grain_cfg_scale = args.grain_cfg_scale
    train_ds, test_ds = datasets(cfg)
    th, _, ent_test = load_prepared(cfg, run)
    idx = per_class_indices(test_ds.sub_labels, args.n_per_class, args.seed)
    ref, labels = test_ds.images[idx], test_ds.sub_labels[idx]
    names = test_ds.hierarchy.sub_names
    progress = not args.no_progress
    ext = FeatureExtractor()

    def feats(images):
        return ext.extract(images, resolution=args.resolution, progress=False)

    ref_f = feats(ref)
    n = len(idx)
    floor_idx = per_class_indices(train_ds.sub_labels, args.n_per_class, args.seed + 1)
    rows = [{"row": "real train images (floor)", "fd": frechet_distance_from_features(feats(train_ds.images[floor_idx]),
                                                                                       ref_f), "fine": None}]
    # Fig. 5 trend: reconstruction FD against the fine ratio
    recon = []
    with torch.no_grad():
        for r in [float(v) for v in args.ratios.split(",")]:
            g = grain_map(ent_test[idx], threshold_for(th, r))
            z, _ = pipe.dvae.encode(to_signed(ref), g, sample=False)
            rec = to_uint8(pipe.dvae.decode(z, g))
            recon.append({"r": r, "fine": float(g.float().mean()), "fd": frechet_distance_from_features(feats(rec), ref_f),
                          "l1": float((rec.float() - ref.float()).abs().mean() / 127.5)})
    # Table 5 + the DiT baseline
    gt = grain_map(ent_test[idx], threshold_for(th, cfg.grains.r_fine))
    out_dir = run / "table5"
    gens = {}
    for name, kw in (("ground-truth grain maps", {"grains": gt}), ("DGT-predicted grain maps", {"grain_source": "dgt"}),
                     ("random grain maps", {"grain_source": "random"})):
        t0 = time.time()
        images, maps = pipe(labels, steps=args.steps, sampler=args.sampler, seed=args.seed, progress=progress, **kw)
        gens[name] = (images, maps)
        rows.append({"row": f"D²iT DCT, {name}", "fd": frechet_distance_from_features(feats(images), ref_f),
                     "fine": float(maps.float().mean()), "diversity": mean_pairwise_hamming(maps, labels),
                     "seconds": round(time.time() - t0, 1)})
    t0 = time.time()
    base = pipe.sample_baseline(labels, steps=args.steps, sampler=args.sampler, seed=args.seed, progress=progress)
    rows.append({"row": "plain DiT (all-fine latent), same width / depth / steps", "fd":
                 frechet_distance_from_features(feats(base), ref_f), "fine": 1.0, "seconds": round(time.time() - t0, 1)})
    show = torch.cat([torch.nonzero(labels == c).flatten()[:4] for c in labels.unique().tolist()])
    for name, (images, maps) in gens.items():
        save_pairs_grid(out_dir / f"{name.split()[0].lower()}.png", images[show], maps[show], labels[show], names, 4)
    g = cfg.data.image_size // cfg.f2
    save_pairs_grid(out_dir / "dit.png", base[show], torch.ones(len(show), g, g, dtype=torch.long), labels[show], names, 4)
    save_pairs_grid(out_dir / "real.png", ref[show], gt[show], labels[show], names, 4)
    gt_div = mean_pairwise_hamming(gt, labels)

    meta = json.loads(json.dumps({k: v for k, v in (json.loads((run / "config.json").read_text())).items()
                                  if k in ("dct", "dit", "dgt", "dvae", "grains")}))
    progress_info = {}
    for stage in ("dvae", "dgt", "dct", "dit"):
        from ..models.checkpoint import load_safetensors
        _, m, _ = load_safetensors(run / f"{stage}.safetensors")
        progress_info[stage] = m.get("progress", {})
    lines = [f"# D²iT Table 5 at small scale ({cfg.data.dataset} {cfg.data.image_size}px, run {run})", "",
             f"FD-EffNetLite0 at {args.resolution}px against {n} test images ({args.n_per_class} per class); "
             f"{args.sampler} {args.steps} steps, DCT/DiT CFG {cfg.sample.cfg_scale}, DGT CFG "
             f"{cfg.sample.grain_cfg_scale}, seed {args.seed}. Training: " +
             ", ".join(f"{s} {v.get('steps', '?')} steps / {v.get('seconds', '?')} s" for s, v in progress_info.items()),
             "", "| grain map / model | FD-EffNetLite0 ↓ | fine share | map diversity | sampling s |",
             "|---|---|---|---|---|"]
    for r in rows:
        fine = "–" if r["fine"] is None else f"{r['fine']:.3f}"
        div = f"{r['diversity']:.3f}" if "diversity" in r else "–"
        lines.append(f"| {r['row']} | {r['fd']:.2f} | {fine} | {div} | {r.get('seconds', '–')} |")
    lines += ["", f"map diversity = mean share of differing regions between two maps of the same class "
                  f"(ground-truth maps of the test images: {gt_div:.3f}).", "",
              "DVAE reconstruction (Fig. 5 trend): FD-EffNetLite0 of reconstructions of the same test images",
              "", "| r_fine (threshold) | actual fine share | recon FD ↓ | L1 (in [-1,1] units) |", "|---|---|---|---|"]
    for r in recon:
        lines.append(f"| {r['r']:.2f} | {r['fine']:.3f} | {r['fd']:.2f} | {r['l1']:.4f} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out) if args.out else run / "table5.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "recon": recon, "gt_diversity": gt_div,
                                                    "args": vars(args), "config": meta, "training": progress_info},
                                                   indent=1))
    print(text)
    print(f"grids -> {out_dir}/")
    return 0
