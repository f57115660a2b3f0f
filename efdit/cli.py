"""`efdit` command line: dispatches `efdit <command> …` to `efdit.commands.<command>.main(argv)`.

Every subcommand takes `--key value` overrides of the config (see `efdit presets` and `--dry-run`). Bad input
ends with a one-line `efdit: error: …` and exit status 2, no traceback (set EFDIT_DEBUG=1 for one).
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings

from .errors import EfditError, EfditWarning, did_you_mean

USAGE = """efdit <command> [options] [--key value ...]

commands:
  train     train or fine-tune a DiT (rerun the same command to resume)
  sample    sample a trained model: a labelled grid per superclass, PNGs and an .npz
  evaluate  FD-EffNetLite0, KID, precision/recall and class accuracy of a model's samples
  ablate    fine-tuning variants at an equal budget, evaluated, as a Markdown table
  hrig      HRIG tools: train the learned enhancer of a run, sweep HRIG settings (same noise per row)
  demo      the main job on the embedded default (Fashion-MNIST): fine-tune, sample, evaluate, report
  export    write a run's EMA model as a standalone (fp16) model file
  distill-guidance  distil a guided model: the guidance scale as an input, one forward per step (resumable)
  cache-latents  encode a dataset once with a local VAE into sharded latent files (resumable; torchrun splits it)
  d2it      D²iT: train the stages, sample (grain maps beside images), the Table 5 benchmark
  grains    entropy grain maps: compute-thresholds (dataset percentiles, once), show (overlay PNG)
  serve     a local web page (Gradio, efdit[web]): browse the hierarchy and generate
  presets   list the named presets

`efdit <command> --help` for the options of one command."""

# command -> the module of efdit.commands whose main(argv) runs it (imported only when used)
COMMANDS = {"train": "train", "sample": "sample", "evaluate": "evaluate", "ablate": "ablate", "hrig": "hrig",
            "demo": "demo", "export": "export", "cache-latents": "cache_latents", "d2it": "d2it",
            "grains": "grains", "serve": "serve", "presets": "presets",
            "distill-guidance": "distill_guidance"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    warnings.formatwarning = _one_line_warnings(warnings.formatwarning)
    if cmd not in COMMANDS:
        print(f"efdit: error: unknown command {cmd!r}{did_you_mean(cmd, COMMANDS, n=2)} "
              f"(commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f".commands.{COMMANDS[cmd]}", __package__)
        return module.main(rest) or 0
    except EfditError as e:
        if os.environ.get("EFDIT_DEBUG"):
            raise
        print(f"efdit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("efdit: interrupted", file=sys.stderr)
        return 130


def _one_line_warnings(plain):
    """efdit's own warnings as `efdit: warning: …` (no source line under them); others as Python prints them."""
    if getattr(plain, "efdit", False):
        return plain

    def format_warning(message, category, filename, lineno, line=None):
        if issubclass(category, EfditWarning):
            return f"efdit: warning: {message}\n"
        return plain(message, category, filename, lineno, line)
    format_warning.efdit = True
    return format_warning


if __name__ == "__main__":
    sys.exit(main())
