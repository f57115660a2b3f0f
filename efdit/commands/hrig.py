"""`efdit hrig`: train HRIG's learned enhancer for a run, and sweep HRIG settings on a trained model.

  efdit hrig train-refiner RUN [--steps 600]          -> RUN/hrig-refiner.safetensors
  efdit hrig sweep RUN [--specs "gain=-0.3;gain=0.5"] -> RUN/hrig-sweep/sweep.md (+ metrics JSON per spec)

The sweep samples every spec with the same seed and the same labels (paired noise), so differences between rows
come from HRIG, not from a different draw; the first row is always HRIG off.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from ..config import apply_overrides, parse_override_args
from ..engine.build import apply_attention
from ..engine.datasets import load_data
from ..engine.evaluate import evaluate_model, with_interval, write_json
from ..engine.files import load_model
from ..engine.paths import model_file
from ..errors import EfditError, atomic_write
from .options import Parser, nonneg_int, number_list, positive, positive_int, sample_overrides, writable

DEFAULT_SPECS = ["gain=-0.5", "gain=-0.3", "gain=-0.1", "gain=0.3", "gain=0.5", "gain=1"]


REFINER_ITEMS = 4096  # training items drawn from a dataset that is not held in memory


def train_refiner_for(run: str, steps: int = 600, r: float = 2.0, hidden: int = 32, depth: int = 3,
                      out: str = "", seed: int = 0, self_supervised: bool = False, progress: bool = False) -> Path:
    """HRIG's learned enhancer for a run: by default the detail refiner E(x̂0, SNR), trained on the model's own
    x̂0 at SNRs inside HRIG's band against the real x0 (`train_detail_refiner`: it adds the detail x̂0 lacks);
    with `self_supervised`, the older refiner that inverts bicubic∘D on the training images."""
    from ..diffusion.hooks.hrig import train_detail_refiner, train_refiner
    from ..engine.build import build_diffusion, labels_for
    path = model_file(run)
    model, cfg, _, meta = load_model(path)
    data = load_data(cfg, "train")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:REFINER_ITEMS]
    images, sub, sup = data.batch(idx, g)   # a random part, in the model's space ([-1, 1] pixels / latents)
    t0 = time.time()
    if self_supervised:
        refiner, losses = train_refiner(images, r=r, hidden=hidden, depth=depth, steps=steps, seed=seed)
        what = "self-supervised refiner (bicubic∘D inverted)"
    else:
        refiner, losses = train_detail_refiner(model, build_diffusion(cfg), images, labels_for(cfg, sub, sup),
                                               steps=steps, hidden=hidden, depth=depth, seed=seed, progress=progress)
        what = "detail refiner (the model's x̂0 in the band -> x0)"
    dst = Path(out) if out else path.parent / "hrig-refiner.safetensors"
    refiner.save(dst)
    k = max(1, steps // 10)
    print(f"{what}: {steps} steps in {time.time() - t0:.0f} s; loss {sum(losses[:k]) / k:.5f} (first {k} steps) "
          f"-> {sum(losses[-k:]) / k:.5f} (last {k}) -> {dst}")
    return dst


def unsharp_mask(images: torch.Tensor, amount: float, sigma: float = 1.0) -> torch.Tensor:
    """The plain baseline HRIG is compared with: x + amount·(x − G_σ * x) on the final uint8 images (N, C, H, W)."""
    x = images.float()
    r = max(1, int(round(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    pad = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect")
    blur = torch.nn.functional.conv2d(pad, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    blur = torch.nn.functional.conv2d(blur, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return (x + amount * (x - blur)).round().clamp(0, 255).to(torch.uint8)


def sweep(run: str, specs: list[str], n_per_class: int = 20, out_dir: str = "", progress: bool = True,
          overrides: dict | None = None, unsharp: list[float] = ()) -> Path:
    """Every HRIG spec (and the unsharp-mask baseline at each amount, applied to the HRIG-off samples) sampled
    with the same labels and noise as HRIG off: FD with its interval and the paired difference to off, class
    accuracy, and two spectral measures against the real test images (radially averaged power-spectrum distance,
    high-band energy ratio: 1 = real)."""
    from ..engine.evaluate import pixel_config, real_subset, reference_split
    from ..engine.generate import class_labels, generate, hrig_hooks
    from ..metrics.bootstrap import BootstrapResult, paired_difference
    from ..metrics.spectrum import high_band_energy_ratio, spectral_distance
    path = model_file(run)
    out = writable(Path(out_dir) if out_dir else path.parent / "hrig-sweep", "sweep folder")
    model, cfg, h, meta = load_model(path)
    if overrides:
        apply_overrides(cfg, overrides)
        apply_attention(model, cfg)
    for spec in specs:   # every spec parses before the first row is sampled
        cfg.sample.hrig = spec
        try:
            hrig_hooks(cfg)
        except EfditError as e:
            raise EfditError(f"--specs: {e}") from None
    labels = class_labels(cfg, h, None, n_per_class)
    split = reference_split(cfg)   # "test"; the emoji set has none: a held-out draw of it
    real, _, _ = real_subset(pixel_config(cfg), split, n_per_class, 0)
    rows, records, off_images = [], {}, None
    for i, spec in enumerate([""] + list(specs) + [f"unsharp={a:g}" for a in unsharp]):
        is_unsharp = spec.startswith("unsharp=")
        cfg.sample.hrig = "" if is_unsharp else spec
        dst = out / f"metrics-{hashlib.sha1(spec.encode()).hexdigest()[:10]}.json"
        rec = _reusable(dst, spec, meta["sha256"], n_per_class, cfg)
        if rec is None:  # rerunning the same sweep reuses the rows already measured
            if is_unsharp:
                if off_images is None:
                    off_images = generate(model, cfg, labels, progress=progress)
                images = unsharp_mask(off_images, float(spec.split("=", 1)[1]))
            else:
                images = generate(model, cfg, labels, progress=progress)
                off_images = images if not spec else off_images
            rec = evaluate_model(model, cfg, h, n_per_class=n_per_class, split=split, progress=progress,
                                 model_sha=meta["sha256"], images=images, labels=labels)
            rec.update(hrig=spec, spectral_distance=spectral_distance(images, real),
                       high_band_energy_ratio=high_band_energy_ratio(images, real))
            write_json(dst, rec)
        records[spec] = rec
        base = BootstrapResult.from_dict(records[""]["bootstrap"])
        d = paired_difference(BootstrapResult.from_dict(rec["bootstrap"]), base)["fd_effnetlite0"]
        verdict = "—" if not spec else ("differs" if d.differs else "no effect")
        delta = "—" if not spec else f"{d.interval.value:+.1f} [{d.interval.low:+.1f}, {d.interval.high:+.1f}] {verdict}"
        m = rec["metrics"]
        rows.append([f"`{spec}`" if spec else "off", with_interval(rec, "fd_effnetlite0", "{:.1f}"), delta,
                     with_interval(rec, "fine_acc", "{:.1%}") if "fine_acc" in m else "—",
                     f"{rec['spectral_distance']:.3f}", f"{rec['high_band_energy_ratio']:.2f}"])
        print(f"[{i}] {spec or 'off'}: FD {m['fd_effnetlite0']:.1f} (Δ {delta}), spectral distance "
              f"{rec['spectral_distance']:.3f}, high-band ratio {rec['high_band_energy_ratio']:.2f}")
    header = ["HRIG spec", "FD-EffNetLite0 ↓", "Δ FD vs off (paired)", "fine accuracy ↑",
              "spectral distance to real ↓", "high-band energy ratio (1 = real)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    fl = records[""]["floor"]
    lines.append(f"| real-vs-real floor | {with_interval(fl, 'fd_effnetlite0', '{:.1f}')} | | | "
                 f"{spectral_distance(real, real):.3f} | 1.00 |")
    s = cfg.sample
    text = (f"# HRIG sweep: {path}\n\n{len(labels)} samples ({n_per_class} per class), {s.sampler} {s.steps} steps, "
            f"guidance {s.guidance} scale {s.cfg_scale:g}, seed {s.seed}: the same labels and noise for every row "
            f"(Δ is paired). Unsharp rows sharpen the HRIG-off samples (Gaussian σ = 1 px). Spectral measures "
            f"against {len(real)} real {split} images. Unset HRIG keys take its defaults (band 259:673 as SNR "
            f"[1e-2, 1), r=2, cutoff=0.25, gaussian mask, bicubic E).\n\n" + "\n".join(lines) + "\n")
    dst = out / "sweep.md"
    with atomic_write(dst, "the sweep table") as tmp:
        tmp.write_text(text)
    print(text)
    return dst


def _reusable(path: Path, spec: str, sha: str, n_per_class: int, cfg) -> dict | None:
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    s = cfg.sample
    same = (rec.get("hrig") == spec and rec.get("model_sha256") == sha and rec.get("n_per_class") == n_per_class
            and (rec.get("sampler"), rec.get("steps"), rec.get("seed"), rec.get("cfg_scale"))
            == (s.sampler, s.steps, s.seed, s.cfg_scale))
    return rec if same else None


def main(argv: list[str]) -> int:
    p = Parser(prog="efdit hrig", description=__doc__.split("\n")[0].split("`: ", 1)[-1])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train-refiner", help="train the learned enhancer E on the run's training images")
    t.add_argument("run")
    t.add_argument("--steps", type=positive_int, default=600)
    t.add_argument("--r", type=positive, default=2.0)
    t.add_argument("--hidden", type=positive_int, default=32)
    t.add_argument("--out", default="")
    t.add_argument("--seed", type=nonneg_int, default=0, help="the refiner's init, training images and noise")
    t.add_argument("--self-supervised", action="store_true",
                   help="the older refiner that inverts bicubic∘D (default: the detail refiner on the model's x̂0)")
    t.add_argument("--no-progress", action="store_true")
    s = sub.add_parser("sweep", help="evaluate HRIG specs (';'-separated) against HRIG off, same noise")
    s.add_argument("run")
    s.add_argument("--specs", default=";".join(DEFAULT_SPECS))
    s.add_argument("--n-per-class", type=positive_int, default=20)
    s.add_argument("--unsharp", default="", type=number_list(0, 10, "amounts", "0.5,1", low_open=True), help="unsharp-mask baseline amounts, e.g. 0.5,1")
    s.add_argument("--out", default="")
    s.add_argument("--no-progress", action="store_true")
    args, rest = p.parse_known_args(argv)
    torch.manual_seed(0)
    if args.what == "train-refiner":
        if rest:
            raise EfditError(f"unknown options for train-refiner: {' '.join(rest)}")
        train_refiner_for(args.run, args.steps, args.r, args.hidden, out=args.out, seed=args.seed,
                          self_supervised=args.self_supervised, progress=not args.no_progress)
    else:
        specs = [x.strip() for x in args.specs.split(";") if x.strip()]
        sweep(args.run, specs, args.n_per_class, args.out, not args.no_progress,
              sample_overrides(parse_override_args(rest)), unsharp=args.unsharp)
    return 0

