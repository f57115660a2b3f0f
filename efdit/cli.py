"""`efdit` command line: train, sample, evaluate, demo, presets.

Every subcommand takes `--key value` overrides of the config (see `efdit presets` and `--dry-run`). Bad input
ends with a one-line `efdit: error: …`, no traceback (set EFDIT_DEBUG=1 for one).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import EfditError

USAGE = """efdit <command> [options] [--key value ...]

commands:
  train     train or fine-tune a DiT (rerun the same command to resume)
  sample    sample a trained model: a labelled grid per superclass, PNGs and an .npz
  evaluate  FD-EffNetLite0, KID, precision/recall and class accuracy of a model's samples
  ablate    fine-tuning variants at an equal budget, evaluated, as a Markdown table
  hrig      HRIG tools: train the learned enhancer of a run, sweep HRIG settings (same noise per row)
  demo      the main job on the embedded default (Fashion-MNIST): fine-tune, sample, evaluate, report
  export    write a run's EMA model as a standalone (fp16) model file
  cache-latents  encode a dataset once with a local VAE into sharded latent files (resumable; torchrun splits it)
  d2it      D²iT (issue 9): train the stages, sample (grain maps beside images), the Table 5 benchmark
  grains    entropy grain maps: compute-thresholds (dataset percentiles, once), show (overlay PNG)
  serve     a local web page (Gradio, efdit[web]): browse the hierarchy and generate
  presets   list the named presets

`efdit <command> --help` for the options of one command."""


def _parser(cmd: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"efdit {cmd}", description=description,
                                   epilog="Any config field can be overridden with --key value (e.g. --lr 3e-4, "
                                          "--model.depth 8); `efdit presets` lists presets.")


def cmd_train(argv: list[str]) -> int:
    from .config import build_config, parse_override_args
    from .train import train
    from .d2it.cli import train_model_alias
    d2it = train_model_alias(argv)   # --model d2it-dvae|d2it-dgt|d2it-dct|d2it-dit: the D²iT stages
    if d2it is not None:
        return d2it
    p = _parser("train", "Train or fine-tune a DiT. Rerunning the same command resumes from the last checkpoint.")
    p.add_argument("--preset", default="fmnist-tiny", help="named preset (default: fmnist-tiny)")
    p.add_argument("--dry-run", "-n", action="store_true", help="print the resolved config and parameter counts")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, rest = p.parse_known_args(argv)
    cfg = build_config(args.preset, parse_override_args(rest))
    from . import distributed
    try:
        train(cfg, progress=not args.no_progress, dry_run=args.dry_run)
    finally:
        distributed.cleanup()
    return 0


def parse_classes(spec: str, names: list[str], what: str) -> list[int]:
    from .data.hierarchy import _lookup
    return [_lookup(s.strip(), names, what) for s in spec.split(",") if s.strip()]


def cmd_sample(argv: list[str]) -> int:
    from .config import apply_overrides, parse_override_args
    from .models.dit import resolve_device
    from .runs import load_model
    from .sample import generate, save_grid, save_samples
    import torch
    p = _parser("sample", "Sample a trained efdit model (model.safetensors of a run). Faster sampling: "
                          "--sampler dpmpp2m --steps 15 (DPM-Solver++(2M)), or a training-free cache "
                          "--accel fora|delta|taylorseer --accel-kw interval=3[,order=2 | ,blocks=3,boundary=500].")
    p.add_argument("model", help="an efdit model file, or a run directory holding model.safetensors")
    p.add_argument("--classes", default="", help="comma-separated class names or ids (default: all)")
    p.add_argument("--superclass", default="", help="comma-separated superclasses: sample all their subclasses")
    p.add_argument("--per-class", type=int, default=None, help="samples per class (default: the config's)")
    p.add_argument("--out", default="", help="output folder (default: <run>/samples/<timestamp>)")
    p.add_argument("--no-progress", action="store_true")
    args, rest = p.parse_known_args(argv)
    path = Path(args.model)
    if path.is_dir():
        path = path / "model.safetensors"
    device = resolve_device(os.environ.get("EFDIT_DEVICE", "auto"))
    model, cfg, h, _ = load_model(path, device)
    apply_overrides(cfg, sample_overrides(parse_override_args(rest)))
    from .runs import apply_attention
    apply_attention(model, cfg)
    names = h.sub_names if cfg.model.condition_on == "sub" else h.super_names
    what = "subclass" if cfg.model.condition_on == "sub" else "superclass"
    classes = parse_classes(args.classes, names, what) if args.classes else []
    if args.superclass:
        for s in parse_classes(args.superclass, h.super_names, "superclass"):
            classes += h.children(s) if cfg.model.condition_on == "sub" else [s]
    classes = classes or list(range(len(names)))
    per_class = args.per_class or cfg.sample.per_class
    labels = torch.tensor(classes).repeat_interleave(per_class)
    images = generate(model, cfg, labels, device=device, progress=not args.no_progress)
    import time
    out = Path(args.out) if args.out else path.parent / "samples" / time.strftime("%Y%m%d-%H%M%S")
    save_grid(out / "grid.png", images, labels, h, cfg.model.condition_on)
    npz = save_samples(out, images, labels, h, cfg.model.condition_on)
    print(f"{len(images)} samples -> {out / 'grid.png'}, {out / 'png'}/, {npz}")
    return 0


def sample_overrides(ov: dict) -> dict:
    """Sampling-time options: bare keys are sample.* fields; --attn / --attn-kw switch the attention backend,
    --accel / --accel-kw the training-free cache (none | fora | delta | taylorseer, e.g. --accel-kw interval=3)."""
    alias = {"attn": "model.attn_backend", "attn_kw": "model.attn_kwargs", "attn-kw": "model.attn_kwargs",
             "accel_kw": "sample.accel_kwargs", "accel-kw": "sample.accel_kwargs"}
    return {alias.get(k, k if "." in k else f"sample.{k}"): v for k, v in ov.items()}


def cmd_evaluate(argv: list[str]) -> int:
    from .metrics.evaluate import main as evaluate_main
    return evaluate_main(argv)


def cmd_ablate(argv: list[str]) -> int:
    from .ablate import main as ablate_main
    return ablate_main(argv)


def cmd_hrig(argv: list[str]) -> int:
    from .hrig_tools import main as hrig_main
    return hrig_main(argv)


def cmd_demo(argv: list[str]) -> int:
    from .demo import run_demo
    p = _parser("demo", "Fine-tune the shipped Fashion-MNIST base onto the 10 subclasses, sample every class, "
                        "evaluate and write runs/demo/report.html.")
    p.add_argument("--from-scratch", action="store_true", help="train without the shipped base checkpoint")
    p.add_argument("--minutes", type=float, default=None, help="fine-tuning budget in minutes")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--fresh", action="store_true", help="delete an earlier demo run first (default: reuse it)")
    p.add_argument("--no-progress", action="store_true")
    args, rest = p.parse_known_args(argv)
    from .config import parse_override_args
    run_demo(Path(args.run_dir), from_scratch=args.from_scratch, minutes=args.minutes,
             overrides=parse_override_args(rest), progress=not args.no_progress,
             fresh=args.fresh)
    return 0


def cmd_export(argv: list[str]) -> int:
    from .runs import export_model
    p = _parser("export", "Write a run's EMA model as a standalone model file (e.g. fp16 for shipping).")
    p.add_argument("run", help="a run directory, its model.safetensors, or its checkpoints/latest.safetensors")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    args = p.parse_args(argv)
    out = export_model(Path(args.run), Path(args.out), args.dtype)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_serve(argv: list[str]) -> int:
    from .web import main as serve_main
    return serve_main(argv)


def cmd_cache_latents(argv: list[str]) -> int:
    from . import distributed
    from .config import build_config, parse_override_args
    from .latent import cache_latents, load_autoencoder
    from .train import default_split, load_data
    p = _parser("cache-latents", "Encode a dataset with a local VAE into sharded safetensors (posterior mean + std, "
                                 "optional mirrored pair). Rerun to resume; under torchrun the shards are split.")
    p.add_argument("--preset", default="", help="a preset naming the dataset, size and VAE (e.g. "
                                                 "inat21-dit-xl2-256-efdit)")
    p.add_argument("--out", required=True, help="the cache folder (train with --latent-cache OUT)")
    p.add_argument("--split", default="", help="the split to encode (default: the dataset's training split)")
    p.add_argument("--shard-size", type=int, default=4096, help="items per shard file (default 4096)")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE call (default 32)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"], help="storage of mean / std")
    p.add_argument("--workers", type=int, default=4, help="image decoding threads")
    p.add_argument("--no-progress", action="store_true")
    args, rest = p.parse_known_args(argv)
    cfg = build_config(args.preset or None, parse_override_args(rest))
    cfg.data.latent_cache = ""
    info = distributed.setup(cfg.device)
    try:
        ds = load_data(cfg, args.split or cfg.data.split or default_split(cfg.data.dataset), lazy=True)
        vae = load_autoencoder(cfg.data.vae, device=info.device, channels=ds.num_channels)
        out = cache_latents(ds, vae, args.out, shard_size=args.shard_size, batch_size=args.batch_size,
                            hflip=cfg.data.hflip, dtype=args.dtype, progress=not args.no_progress and info.is_main,
                            rank=info.rank, world_size=info.world_size, num_workers=args.workers)
        distributed.barrier()
    finally:
        distributed.cleanup()
    if info.is_main:
        print(f"{len(ds):,} images of {ds.name} -> {out} ({vae.describe()['kind']}, flips: {cfg.data.hflip})")
    return 0


def cmd_presets(argv: list[str]) -> int:
    from .config import PRESETS
    for name, ov in PRESETS.items():
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in ov.items()))
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate, "ablate": cmd_ablate,
            "hrig": cmd_hrig, "cache-latents": cmd_cache_latents, "demo": cmd_demo, "export": cmd_export,
            "serve": cmd_serve,
            "presets": cmd_presets}



def cmd_d2it(argv: list[str]) -> int:
    from .d2it.cli import cmd_d2it as d2it_main
    return d2it_main(argv)


def cmd_grains(argv: list[str]) -> int:
    from .d2it.cli import cmd_grains as grains_main
    return grains_main(argv)


COMMANDS.update(d2it=cmd_d2it, grains=cmd_grains)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(cmd, COMMANDS, n=2)
        print(f"efdit: error: unknown command {cmd!r}" + (f"; did you mean {' or '.join(close)}?" if close else "")
              + f" (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        return COMMANDS[cmd](rest) or 0
    except EfditError as e:
        if os.environ.get("EFDIT_DEBUG"):
            raise
        print(f"efdit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("efdit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
