"""`efdit ablate`: fine-tuning variants at an equal budget, over several seeds, each at its own best guidance,
evaluated under one protocol with intervals, as a Markdown table.

Variant sets (`--set`):
  tiered      the Tiered Embedder's fair trial: flat label table (new rows from the superclass rows, or random)
              with null CFG, against the tiered `sum` embedder with a null drop, under superclass-guided CFG and
              under two-term guidance (superclass and subclass scales chosen separately);
  peft        the label embedding and guidance crossed with the trainable set (full vs the FineDiffusion / EFDiT rule);
  mechanisms  EFDiT's mechanisms one at a time on the PEFT baseline: baseline -> +Tiered Embedder -> +HRIG ->
              +ProAttention -> all;
  proattention  SDPA vs proxy attention under full fine-tuning (the attention weights can adapt).
Protocol: every variant is trained and sampled with each of `--seeds` seeds (train.seed = sample.seed = s, so the
variants of one seed share their sampling noise and labels: paired); with `--scales` and a held-out part of the train
split (`--data.holdout_per_class`), each variant's guidance is chosen per seed on that part, never on the test split
(engine.evaluate.choose_guidance). Metrics carry bootstrap 95 % intervals combined over seeds (two-stage bootstrap:
seeds, then samples); each variant's difference to the first (the baseline) is "differs" only when its interval
excludes 0. Variants whose training config is the same (they differ only in sampling, e.g. +HRIG or two-term
guidance) share one trained model per seed. Rerunning resumes: trained models and measured rows are reused.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import build_config, parse_override_args
from ..engine.evaluate import choose_guidance, evaluate_model, write_json
from ..engine.files import load_model
from ..engine.train import train
from ..engine.trainlog import read_log
from ..errors import EfditError, atomic_write
from .options import number_list, parser, positive_int

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

# The Tiered Embedder's fair trial: every arm at its own best guidance, the same trainable set (FineDiffusion's rule).
_TRIAL = {"model.peft": "finediffusion", "train.lr": 3e-3}
TIERED_VARIANTS = {
    "flat, rows from superclass, null CFG": {**_TRIAL, "model.embedder": "flat", "train.init_labels": "parent",
                                             "sample.guidance": "cfg"},
    "flat, random rows, null CFG": {**_TRIAL, "model.embedder": "flat", "train.init_labels": "random",
                                    "sample.guidance": "cfg"},
    "tiered sum + null drop, super CFG": {**_TRIAL, "model.embedder": "tiered", "model.tiered_mode": "sum",
                                          "model.null_prob": 0.05, "sample.guidance": "super"},
    "tiered sum + null drop, two-term": {**_TRIAL, "model.embedder": "tiered", "model.tiered_mode": "sum",
                                         "model.null_prob": 0.05, "sample.guidance": "two_term", "two_term": True},
}
VARIANT_SETS = {"tiered": TIERED_VARIANTS, "peft": PEFT_VARIANTS, "mechanisms": mechanism_variants(),
                "proattention": PROATTENTION_VARIANTS}
VARIANTS = PEFT_VARIANTS  # the default set
SUPER_SCALES = (1.0, 2.0)  # two-term guidance: superclass scales tried with each subclass scale


def training_key(cfg) -> str:
    """What determines the trained weights: everything but the run folder and the sampling settings."""
    d = cfg.to_dict()
    d.pop("run_dir", None)
    d.pop("sample", None)
    return json.dumps(d, sort_keys=True)


def guidance_trials(variant: dict, scales: list[float]) -> list[dict]:
    """The guidance settings a variant is tried at on the held-out split: its scale, or for two-term guidance the
    subclass scale crossed with SUPER_SCALES."""
    if variant.get("two_term"):
        return [{"sample.cfg_scale": s, "sample.cfg_scale_super": ss} for s in scales for ss in SUPER_SCALES]
    return [{"sample.cfg_scale": s} for s in scales]


def slug_of(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def run_ablation(preset: str, out_dir: Path, variants: dict[str, dict], overrides: dict, n_per_class: int,
                 progress: bool, seeds: list[int] = (0,), scales: list[float] = (), sweep_per_class: int = 20) -> Path:
    """Train, choose guidance, sample and evaluate every variant × seed; write ablation.md and ablation.json."""
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for s in seeds:
        trained: dict[str, Path] = {}
        for name, variant in variants.items():
            t0 = time.time()
            overrides_v = {k: v for k, v in variant.items() if k != "two_term"}
            cfg = build_config(preset, {**overrides, **overrides_v, "train.seed": s, "sample.seed": s,
                                        "run_dir": str(out_dir / slug_of(name) / f"seed-{s}")})
            key = training_key(cfg)
            run = trained.get(key)
            if run is None:
                run = trained[key] = Path(cfg.run_dir)
                if not (run / "model.safetensors").is_file():
                    train(cfg, progress=progress)
            else:
                print(f"{name}, seed {s}: same training config as {run.parent.name}, reusing its model")
            model, mcfg, h, meta = load_model(run / "model.safetensors")
            mcfg.sample = cfg.sample  # this variant's sampling settings
            chosen, sweep = {}, []
            if scales:
                chosen, sweep = choose_guidance(model, mcfg, h, guidance_trials(variant, scales), sweep_per_class,
                                                progress=progress)
                for k, v in chosen.items():
                    setattr(mcfg.sample, k.split(".", 1)[1], v)
            dst = out_dir / slug_of(name) / f"seed-{s}" / "metrics.json"
            record = _reusable(dst, meta["sha256"], mcfg)
            if record is None:
                record = evaluate_model(model, mcfg, h, n_per_class=n_per_class, progress=progress,
                                        model_sha=meta["sha256"])
                record.update(sample_config=mcfg.sample.__dict__, guidance_sweep=sweep, seed=s)
                write_json(dst, record)
            log = read_log(run / "log.jsonl")
            n_tr = sum(p.numel() for p in model.parameters() if p.requires_grad)
            record["_trainable"] = n_tr / sum(p.numel() for p in model.parameters())
            record["_img_per_s"] = sum(r["img_per_s"] for r in log) / max(len(log), 1)
            results[name].append(record)
            print(f"{name}, seed {s}: {chosen or 'its own scale'} -> FD {record['metrics']['fd_effnetlite0']:.1f}, "
                  f"fine {record['metrics'].get('fine_acc', float('nan')):.1%} ({(time.time() - t0) / 60:.1f} min)")
    return write_tables(preset, out_dir, results, overrides, n_per_class, seeds, scales)


def _reusable(path: Path, sha: str, cfg) -> dict | None:
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    return rec if rec.get("model_sha256") == sha and rec.get("sample_config") == cfg.sample.__dict__ else None


SHOWN = [("fd_effnetlite0", "FD ↓", "{:.1f}"), ("fine_acc", "fine acc ↑", "{:.1%}"),
         ("coarse_acc", "coarse acc ↑", "{:.1%}"), ("fine_acc_given_super", "fine | right super ↑", "{:.1%}")]


def combined(records: list[dict]) -> dict:
    from ..metrics.bootstrap import BootstrapResult, combine_seeds
    return combine_seeds([BootstrapResult.from_dict(r["bootstrap"]) for r in records])


def difference_to(records: list[dict], base: list[dict]) -> dict:
    from ..metrics.bootstrap import BootstrapResult, combine_seeds, difference_result
    return combine_seeds([difference_result(BootstrapResult.from_dict(a["bootstrap"]),
                                            BootstrapResult.from_dict(b["bootstrap"])) for a, b in zip(records, base)])


def _ci(c: dict, fmt: str, signed: bool = False) -> str:
    iv = c["interval"]
    f = (lambda v: ("+" if v >= 0 else "") + fmt.format(v)) if signed else fmt.format
    return f"{f(c['mean'])} [{f(iv.low)}, {f(iv.high)}]"


def write_tables(preset: str, out_dir: Path, results: dict[str, list[dict]], overrides: dict, n_per_class: int,
                 seeds, scales) -> Path:
    names = list(results)
    base = results[names[0]]
    header = ["variant", "trainable", "guidance chosen (per seed)"] + [n for _, n, _ in SHOWN] + \
             ["Δ FD vs baseline", "Δ fine acc vs baseline"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    summary = {}
    for name in names:
        recs = results[name]
        comb = combined(recs)
        chosen = ", ".join(f"{r['cfg_scale']:g}" + (f"/{r['cfg_scale_super']:g}" if r["guidance"] == "two_term" else "")
                           for r in recs)
        cells = [name, f"{100 * recs[0]['_trainable']:.2f}%", f"{recs[0]['guidance']} {chosen}"]
        cells += [_ci(comb[k], fmt) if k in comb else "—" for k, _, fmt in SHOWN]
        summary[name] = {k: {"mean": v["mean"], "low": v["interval"].low, "high": v["interval"].high,
                             "per_seed": v["per_seed"]} for k, v in comb.items()}
        if name == names[0]:
            cells += ["(baseline)", "(baseline)"]
        else:
            diff = difference_to(recs, base)
            for k, _, fmt in SHOWN[:2]:
                d = diff[k]
                verdict = "no effect" if d["interval"].contains(0.0) else "differs"
                cells.append(f"{_ci(d, fmt, signed=True)} {verdict}")
                summary[name][f"delta_{k}"] = {"mean": d["mean"], "low": d["interval"].low,
                                              "high": d["interval"].high, "verdict": verdict}
        lines.append("| " + " | ".join(cells) + " |")
    floor = base[0]["floor"]
    lines.append("| real-vs-real floor | | | " + " | ".join(
        (f"{fmt.format(floor['metrics'][k])}" if k in floor["metrics"] else "—") for k, _, fmt in SHOWN) + " | | |")
    judge = base[0].get("judge") or {}
    budget = build_config(preset, overrides).train
    text = (f"# Ablation: {preset}\n\nEqual budget per variant: {budget.total_images:,} images"
            + (f" or {budget.minutes:g} min" if budget.minutes else "") + f"; seeds {list(seeds)} (training and "
            f"sampling; the variants of a seed share noise and labels); {n_per_class} samples per subclass against "
            f"the real test split; " + (f"guidance chosen per variant and seed on the held-out split among scales "
                                        f"{list(scales)}" if scales else "each variant's own guidance scale")
            + f". Brackets: 95 % intervals over seeds and samples (two-stage bootstrap); Δ: against the first row, "
            f"paired by seed; 'no effect' when the interval contains 0. Judge: {judge.get('describe', '?')}, "
            f"{judge.get('fine_acc', float('nan')):.1%} fine / {judge.get('coarse_acc', float('nan')):.1%} coarse "
            f"on the real test images. Overrides: {overrides or 'none'}.\n\n" + "\n".join(lines) + "\n")
    out = out_dir / "ablation.md"
    with atomic_write(out, "the ablation table") as tmp:
        tmp.write_text(text)
    write_json(out_dir / "ablation.json", {"preset": preset, "overrides": overrides, "seeds": list(seeds),
                                           "scales": list(scales), "n_per_class": n_per_class, "variants": summary})
    print(text)
    return out


def main(argv: list[str]) -> int:
    p = parser("ablate", " ".join(__doc__.split("\n\n")[0].split()).split("`: ", 1)[-1])
    p.usage = "efdit ablate [PRESET] [options] [--key value ...]   (PRESET: default fmnist-finetune)"
    p.add_argument("--out", default="", help="output folder (default runs/ablate-<preset>)")
    p.add_argument("--set", default="peft", choices=sorted(VARIANT_SETS), help="variant set (default: peft)")
    p.add_argument("--variants", default="", help="';'-separated subset of the set's variant names")
    p.add_argument("--hrig", default=HRIG_SPEC, help=f"HRIG spec of the mechanisms set (default {HRIG_SPEC!r})")
    p.add_argument("--n-per-class", type=positive_int, default=50)
    p.add_argument("--seeds", type=positive_int, default=1, help="seeds 0..N-1 for training and sampling (default 1)")
    p.add_argument("--scales", default="", type=number_list(0, 100, "guidance scales", "1.5,2,3,4"),
                   help="guidance scales to choose from on the held-out split, e.g. 1.5,2,3,4 (needs "
                        "--data.holdout_per_class N); default: each variant's own scale")
    p.add_argument("--sweep-per-class", type=positive_int, default=20, help="samples per subclass per scale tried")
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
    ov = parse_override_args(rest)
    cfg = build_config(args.preset, ov)   # every override checked before any work
    if args.scales and not cfg.data.holdout_per_class:
        raise EfditError("--scales chooses guidance on a held-out part of the train split: add "
                         "--data.holdout_per_class N (e.g. 20)")
    run_ablation(args.preset, out, chosen, ov, args.n_per_class, not args.no_progress, seeds=list(range(args.seeds)),
                 scales=args.scales, sweep_per_class=args.sweep_per_class)
    return 0

