"""`efdit demo`: the main job on the embedded default, in a few CPU minutes.

EFDiT's recipe in miniature: a base DiT pretrained on the coarse labels (Fashion-MNIST's 4 superclasses,
shipped in `efdit/assets/fmnist-base.safetensors`) is fine-tuned onto the 10 subclasses; every class is
sampled into a grid (one block per superclass), the samples are evaluated, and `report.html` / `report.md`
collect the grid, the loss curve and the metrics.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch

from ..config import Config, build_config
from ..data.hierarchy import Hierarchy
from ..engine.evaluate import evaluate_model, table_rows
from ..engine.files import load_model
from ..engine.generate import generate_per_class
from ..engine.paths import ASSETS
from ..engine.pictures import save_grid
from ..engine.train import train
from ..engine.trainlog import read_log
from ..errors import EfditError
from ..models.checkpoint import file_sha256
from .options import nonneg, overrides, parser, writable
from .report import plot_loss, write_report

BASE_CHECKPOINT = ASSETS / "fmnist-base.safetensors"


def run_demo(run_dir: Path, from_scratch: bool = False, minutes: float | None = None, overrides: dict | None = None,
             progress: bool = True, fresh: bool = False) -> Path:
    t0 = time.time()
    overrides = dict(overrides or {})
    if minutes is not None:
        overrides["train.minutes"] = minutes
    if from_scratch:
        cfg = build_config("fmnist-tiny", overrides)
    else:
        if not BASE_CHECKPOINT.is_file():
            raise EfditError(f"the shipped base checkpoint is missing: {BASE_CHECKPOINT} (a broken checkout? "
                             f"`efdit demo --from-scratch` trains without it)")
        overrides.setdefault("train.init_from", str(BASE_CHECKPOINT))
        cfg = build_config("fmnist-finetune", overrides)
    cfg.run_dir = str(run_dir / "train")
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    threads = torch.get_num_threads()
    print(f"efdit demo: {'training from scratch' if from_scratch else 'fine-tuning the base onto the subclasses'} "
          f"({cfg.train.minutes:g} min budget, {threads} threads) -> {run_dir}")
    train(cfg, progress=progress)
    t_train = time.time() - t0

    model_path = run_dir / "train" / "model.safetensors"
    model, cfg, h, meta = load_model(model_path)
    per_class = cfg.sample.per_class
    images, labels = generate_per_class(model, cfg, h, per_class=per_class, progress=progress)
    grid = save_grid(run_dir / "grid.png", images, labels, h, cfg.model.condition_on)
    loss_png = plot_loss(read_log(run_dir / "train" / "log.jsonl"), run_dir / "loss.png",
                         "fine-tuning loss" if not from_scratch else "training loss")
    t_sample = time.time() - t0 - t_train

    metrics_blocks = _evaluate(model, cfg, h, run_dir, progress)
    log = read_log(run_dir / "train" / "log.jsonl")
    prog = meta.get("progress", {})
    blocks = [
        ("text", "Fashion-MNIST, 10 subclasses under 4 superclasses (tops / bottoms+dresses / footwear / bag). "
                 + ("Trained from scratch." if from_scratch else
                    f"Base: {BASE_CHECKPOINT.name} (conditioned on the 4 superclasses), fine-tuned onto the "
                    "10 subclasses with every subclass label starting at its superclass's embedding.")),
        ("code", " ".join(["efdit demo"] + sys.argv[2:]) if sys.argv[1:2] == ["demo"] else "efdit demo"),
        ("table", (["what", "value"], [
            ["images seen", f"{prog.get('images', 0):,}"],
            ["optimizer steps", prog.get("step", 0)],
            ["training time", f"{prog.get('seconds', 0) / 60:.1f} min"],
            ["final loss (last log window)", f"{log[-1]['loss']:.4f}" if log else "n/a"],
            ["throughput", f"{log[-1]['img_per_s']:.1f} img/s" if log else "n/a"],
            ["sampler", f"{cfg.sample.sampler} {cfg.sample.steps} steps, {cfg.sample.guidance} guidance "
                        f"scale {cfg.sample.cfg_scale}, seed {cfg.sample.seed}"],
            ["model", f"{model_path} (sha256 {file_sha256(model_path)})"],
            ["wall time (train / sample)", f"{t_train / 60:.1f} / {t_sample / 60:.1f} min"],
        ])),
        ("heading", "Samples (one row per subclass, grouped by superclass)"),
        ("image", grid.name),
    ]
    if loss_png:
        blocks += [("heading", "Loss"), ("image", loss_png.name)]
    blocks += metrics_blocks
    md, page = write_report(run_dir, "efdit demo: Fashion-MNIST fine-grained generation", blocks)
    print(f"report: {page} ({(time.time() - t0) / 60:.1f} min in all)")
    return page


def _evaluate(model, cfg, hierarchy, run_dir: Path, progress: bool) -> list:
    """The report's metric blocks (or a line saying why they are missing)."""
    try:
        return demo_metrics(model, cfg, hierarchy, run_dir, progress=progress)
    except EfditError as e:
        return [("text", f"Metrics skipped: {e}")]


def demo_metrics(model, cfg: Config, hierarchy: Hierarchy, run_dir: Path, progress: bool = True,
                 n_per_class: int = 20) -> list:
    record = evaluate_model(model, cfg, hierarchy, n_per_class=n_per_class, progress=progress,
                            model_sha=file_sha256(run_dir / "train" / "model.safetensors"),
                            out_json=run_dir / "metrics.json")
    c = record["classifier"]
    return [("heading", "Metrics"),
            ("text", f"{record['n']} samples ({n_per_class} per subclass, {record['sampler']} {record['steps']} steps, "
                     f"{record['guidance']} guidance ×{record['cfg_scale']}) against {n_per_class} real test images "
                     f"per subclass; features at {record['resolution']}px. The floor is real train images under the "
                     f"same protocol. The classifier's own test accuracy: fine {c['test_acc']:.1%}, coarse "
                     f"{c['test_coarse_acc']:.1%}." if c.get("test_acc") is not None else
                     f"{record['n']} samples against the real test split."),
            ("table", (["metric", "model", "real-vs-real floor"], table_rows(record))),
            ("text", f"reference: {record['reference_id']}; metrics.json beside this report.")]


def main(argv: list[str]) -> int:
    p = parser("demo", "Fine-tune the shipped Fashion-MNIST base onto the 10 subclasses, sample every class, "
                       "evaluate and write runs/demo/report.html.")
    p.add_argument("--from-scratch", action="store_true", help="train without the shipped base checkpoint")
    p.add_argument("--minutes", type=nonneg, default=None, help="fine-tuning budget in minutes")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--fresh", action="store_true", help="delete an earlier demo run first (default: reuse it)")
    p.add_argument("--no-progress", action="store_true")
    args, rest = p.parse_known_args(argv)
    writable(args.run_dir, "demo folder")
    run_demo(Path(args.run_dir), from_scratch=args.from_scratch, minutes=args.minutes,
             overrides=overrides(rest), progress=not args.no_progress, fresh=args.fresh)
    return 0
