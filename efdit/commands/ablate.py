"""`efdit ablate`: fine-tuning variants at an equal budget, evaluated under one protocol, as a Markdown table.

Two variant sets (`--set`):
  peft        the label embedding and guidance (flat table + null CFG vs Tiered Embedder + superclass-guided CFG)
              crossed with the trainable set (full fine-tuning vs the FineDiffusion / EFDiT PEFT rule);
  mechanisms  EFDiT's mechanisms one at a time on the PEFT baseline: baseline -> +Tiered Embedder -> +HRIG ->
              +ProAttention -> all;
  proattention  SDPA vs proxy attention under full fine-tuning (the attention weights can adapt).
Variants whose training config is the same (they differ only in sampling, e.g. +HRIG) share one trained model.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import build_config, parse_override_args
from ..engine.evaluate import METRIC_NAMES, evaluate_model
from ..engine.files import load_model
from ..engine.train import train
from ..engine.trainlog import read_log
from ..errors import EfditError, atomic_write
from .options import parser, positive_int

PEFT_VARIANTS: dict[str, dict] = {
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

HRIG_SPEC = "gain=-0.3"          # HRIG's default (bicubic E, perceptual band); `--hrig` to change
PROXY = {"model.attn_backend": "proxy", "model.attn_kwargs": "pool=2"}  # ProAttention, EFDiT's default backend
_BASE = {"model.peft": "finediffusion", "train.lr": 3e-3}


def mechanism_variants(hrig: str = HRIG_SPEC) -> dict[str, dict]:
    flat = {**_BASE, "model.embedder": "flat", "sample.guidance": "cfg"}
    tiered = {**_BASE, "model.embedder": "tiered", "sample.guidance": "super"}
    return {"baseline (flat + null CFG)": flat,
            "+ Tiered Embedder (super CFG)": tiered,
            "+ HRIG": {**flat, "sample.hrig": hrig},
            "+ ProAttention (proxy)": {**flat, **PROXY},
            "all": {**tiered, **PROXY, "sample.hrig": hrig}}


# ProAttention swaps the attention of a model pre-trained with SDPA: does it need the attention weights trainable?
PROATTENTION_VARIANTS = {
    "sdpa, full fine-tuning": {"model.embedder": "flat", "sample.guidance": "cfg", "model.peft": "full",
                               "train.lr": 3e-4},
    "proxy, full fine-tuning": {"model.embedder": "flat", "sample.guidance": "cfg", "model.peft": "full",
                                "train.lr": 3e-4, **PROXY},
}

VARIANT_SETS = {"peft": PEFT_VARIANTS, "mechanisms": mechanism_variants(), "proattention": PROATTENTION_VARIANTS}
VARIANTS = PEFT_VARIANTS  # the default set


def training_key(cfg) -> str:
    """What determines the trained weights: everything but the run folder and the sampling settings."""
    d = cfg.to_dict()
    d.pop("run_dir", None)
    d.pop("sample", None)
    return json.dumps(d, sort_keys=True)


def run_ablation(preset: str, out_dir: Path, variants: dict[str, dict], overrides: dict, n_per_class: int,
                 progress: bool) -> Path:
    rows, floor, trained = [], None, {}
    for name, variant in variants.items():
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        cfg = build_config(preset, {**overrides, **variant, "run_dir": str(out_dir / slug)})
        t0 = time.time()
        key = training_key(cfg)
        run = trained.get(key)
        if run is None:
            train(cfg, progress=progress)
            run = trained[key] = out_dir / slug
        else:
            print(f"{name}: same training config as {run.name}, reusing its model")
        model, mcfg, h, meta = load_model(run / "model.safetensors")
        mcfg.sample = cfg.sample  # sampling settings of this variant
        (out_dir / slug).mkdir(parents=True, exist_ok=True)
        record = evaluate_model(model, mcfg, h, n_per_class=n_per_class, progress=progress,
                                model_sha=meta["sha256"], out_json=out_dir / slug / "metrics.json")
        log = read_log(run / "log.jsonl")
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
    with atomic_write(out, "the ablation table") as tmp:
        tmp.write_text(text)
    print(text)
    return out


def _fmt(v, key, fmt) -> str:
    if v is None:
        return "—"
    return fmt.format(v)


def main(argv: list[str]) -> int:
    p = parser("ablate", __doc__.split("\n")[0].strip("`"))
    p.usage = "efdit ablate [PRESET] [options] [--key value ...]   (PRESET: default fmnist-finetune)"
    p.add_argument("--out", default="", help="output folder (default runs/ablate-<preset>)")
    p.add_argument("--set", default="peft", choices=sorted(VARIANT_SETS), help="variant set (default: peft)")
    p.add_argument("--variants", default="", help="';'-separated subset of the set's variant names")
    p.add_argument("--hrig", default=HRIG_SPEC, help=f"HRIG spec of the mechanisms set (default {HRIG_SPEC!r})")
    p.add_argument("--n-per-class", type=positive_int, default=50)
    p.add_argument("--no-progress", action="store_true")
    # the preset is the first word if any (argparse would take a negative override value, `--lr -1`, for it)
    preset, argv = (argv[0], argv[1:]) if argv and not argv[0].startswith("-") else ("fmnist-finetune", argv)
    args, rest = p.parse_known_args(argv)
    args.preset = preset
    pool = mechanism_variants(args.hrig) if args.set == "mechanisms" else VARIANT_SETS[args.set]
    chosen = pool
    if args.variants:
        wanted = [s.strip() for s in args.variants.split(";") if s.strip()]
        unknown = [w for w in wanted if w not in pool]
        if unknown:
            raise EfditError(f"unknown variant(s) {unknown}; the {args.set} set has: {'; '.join(pool)}")
        chosen = {k: pool[k] for k in pool if k in wanted}
    out = Path(args.out or f"runs/ablate-{args.preset}" + ("" if args.set == "peft" else f"-{args.set}"))
    run_ablation(args.preset, out, chosen, parse_override_args(rest), args.n_per_class, not args.no_progress)
    return 0
