"""`efdit ablate`: fine-tuning variants at an equal budget, evaluated under one protocol, as a Markdown table.

The default variants compare the label embedding and guidance (flat table + null CFG vs Tiered Embedder +
superclass-guided CFG) and the trainable set (full fine-tuning vs the FineDiffusion / EFDiT PEFT rule).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from .config import build_config, parse_override_args
from .report import read_log

VARIANTS: dict[str, dict] = {
    "flat + null CFG, full": {"model.embedder": "flat", "sample.guidance": "cfg", "model.peft": "full",
                              "train.lr": 3e-4},
    "tiered + super CFG, full": {"model.embedder": "tiered", "sample.guidance": "super", "model.peft": "full",
                                 "train.lr": 3e-4},
    # bias / LN / table-only sets train at 10x the full fine-tuning lr (DiffFit's recommendation)
    "flat + null CFG, finediffusion": {"model.embedder": "flat", "sample.guidance": "cfg",
                                       "model.peft": "finediffusion", "train.lr": 3e-3},
    "tiered + super CFG, efdit": {"model.embedder": "tiered", "sample.guidance": "super", "model.peft": "efdit",
                                  "train.lr": 3e-3},
}


def run_ablation(preset: str, out_dir: Path, variants: dict[str, dict], overrides: dict, n_per_class: int,
                 progress: bool) -> Path:
    from .metrics.evaluate import METRIC_NAMES, evaluate_model
    from .runs import load_model
    from .train import train
    rows, floor = [], None
    for name, variant in variants.items():
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        cfg = build_config(preset, {**overrides, **variant, "run_dir": str(out_dir / slug)})
        t0 = time.time()
        train(cfg, progress=progress)
        model, mcfg, h, meta = load_model(out_dir / slug / "model.safetensors")
        mcfg.sample = cfg.sample  # sampling settings of this variant
        record = evaluate_model(model, mcfg, h, n_per_class=n_per_class, progress=progress,
                                model_sha=meta["sha256"], out_json=out_dir / slug / "metrics.json")
        log = read_log(out_dir / slug / "log.jsonl")
        n_tr = sum(p.numel() for p in model.parameters() if p.requires_grad)  # set by the PEFT preset
        n_all = sum(p.numel() for p in model.parameters())
        rows.append([name, f"{100 * n_tr / n_all:.2f}%", f"{sum(r['img_per_s'] for r in log) / max(len(log), 1):.1f}",
                     f"{log[-1]['loss']:.4f}" if log else "—"]
                    + [_fmt(record["metrics"].get(k), k, f) for k, _, f in METRIC_NAMES])
        floor = record["floor"]
        print(f"{name}: {json.dumps(record['metrics'])} ({(time.time() - t0) / 60:.1f} min)")
    header = ["variant", "trainable", "img/s", "final loss"] + [n for _, n, _ in METRIC_NAMES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if floor:
        lines.append("| real-vs-real floor | | | | " + " | ".join(_fmt(floor.get(k), k, f) for k, _, f in METRIC_NAMES)
                     + " |")
    budget = build_config(preset, overrides).train
    text = (f"# Ablation: {preset}\n\nEqual budget per variant: {budget.total_images:,} images"
            + (f" or {budget.minutes:g} min" if budget.minutes else "") + f"; {n_per_class} samples per subclass "
            f"against the real test split.\n\n" + "\n".join(lines) + "\n")
    out = out_dir / "ablation.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(".ablation.md.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(text)
    return out


def _fmt(v, key, fmt) -> str:
    if v is None:
        return "—"
    return fmt.format(v)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="efdit ablate", description=__doc__.split("\n")[0])
    p.add_argument("preset", nargs="?", default="fmnist-finetune")
    p.add_argument("--out", default="", help="output folder (default runs/ablate-<preset>)")
    p.add_argument("--variants", default="", help="comma-separated subset of: " + "; ".join(VARIANTS))
    p.add_argument("--n-per-class", type=int, default=50)
    p.add_argument("--no-progress", action="store_true")
    args, rest = p.parse_known_args(argv)
    chosen = VARIANTS
    if args.variants:
        chosen = {k: VARIANTS[k] for k in VARIANTS if any(s.strip() == k for s in args.variants.split(";"))}
    out = Path(args.out or f"runs/ablate-{args.preset}")
    run_ablation(args.preset, out, chosen, parse_override_args(rest), args.n_per_class, not args.no_progress)
    return 0
