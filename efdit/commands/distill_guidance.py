"""`efdit distill-guidance RUN --teacher MODEL`: distil a guided model into a student that takes the guidance scale
as an input (one forward per sampling step); rerunning the same command resumes it."""
from __future__ import annotations

import argparse
import math

from ..config import MAX_SCALE
from ..engine.distill import DEFAULTS, W_RANGE, distill, plan_distillation
from .options import overrides, parser, writable

DESCRIPTION = ("Guidance distillation (Meng et al. 2023, first stage): a student initialised from a guided teacher, "
               "taking the guidance scale w as an input, trained to match the teacher's guided output at w ~ "
               "U[w_min, w_max] on noised real images. Sample it like any model (`efdit sample RUN --cfg-scale W`): "
               "one forward per step instead of two. Rerunning the same command resumes the run.")
EPILOG = (f"Training options (the defaults over the teacher's): --batch-size {DEFAULTS['train.batch_size']}, "
          f"--lr {DEFAULTS['train.lr']:g}, --total-images {DEFAULTS['train.total_images']}, --minutes (0 = none), "
          f"--ema-decay {DEFAULTS['train.ema_decay']:g}, --warmup-images, --weight-decay, --grad-clip, --precision, "
          f"--log-every, --ckpt-every, --seed, --threads, --device, --data.root; --sample.* set the student's "
          f"sampling defaults (--sample.cfg_scale: its w).")


def scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= MAX_SCALE):
        raise argparse.ArgumentTypeError(f"must be a guidance scale from 0 to {MAX_SCALE:g}, got {text!r}")
    return value


def main(argv: list[str]) -> int:
    p = parser("distill-guidance", DESCRIPTION, EPILOG)
    p.add_argument("run", help="the run folder (created; a folder holding a distillation resumes it)")
    p.add_argument("--teacher", default=None,
                   help="the guided model: a model file, its run folder, or a shipped name (fmnist-base); "
                        "a resumed run's own by default")
    p.add_argument("--w-min", type=scale, default=None, help=f"lowest guidance scale (default {W_RANGE[0]:g})")
    p.add_argument("--w-max", type=scale, default=None, help=f"highest guidance scale (default {W_RANGE[1]:g})")
    p.add_argument("--guidance", default=None, choices=("auto", "cfg", "super", "two_term"),
                   help="the teacher's guided output to match (default: the teacher's sample.guidance)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, rest = p.parse_known_args(argv)
    plan = plan_distillation(args.run, args.teacher, args.w_min, args.w_max, args.guidance, overrides(rest))
    writable(plan.run_dir, "run folder")
    distill(plan, progress=not args.no_progress)
    return 0
