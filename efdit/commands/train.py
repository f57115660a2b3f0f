"""`efdit train`: train or fine-tune a DiT; rerunning the same command resumes it."""
from __future__ import annotations

from ..config import build_config, validate_config
from ..engine import distributed
from ..engine.train import train
from ..errors import EfditError
from .options import overrides, parser


def main(argv: list[str]) -> int:
    from .d2it import train_model_alias
    d2it = train_model_alias(argv)   # --model d2it-dvae|d2it-dgt|d2it-dct|d2it-dit: the D²iT stages
    if d2it is not None:
        return d2it
    p = parser("train", "Train or fine-tune a DiT. Rerunning the same command resumes from the last checkpoint.")
    p.add_argument("--preset", default="fmnist-tiny", help="named preset (default: fmnist-tiny)")
    p.add_argument("--dry-run", "-n", action="store_true", help="print the resolved config and parameter counts")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, rest = p.parse_known_args(argv)
    cfg = build_config(args.preset, overrides(rest))
    if cfg.data.dataset == "folder" and not cfg.run_dir and cfg.data.root:
        cfg.run_dir = folder_run_dir(cfg)
    validate_config(cfg)
    if cfg.model.guidance_embed:
        raise EfditError("--model.guidance_embed: a guidance-distilled student is trained from its teacher by "
                         "`efdit distill-guidance RUN --teacher MODEL`, not by efdit train")
    try:
        train(cfg, progress=not args.no_progress, dry_run=args.dry_run)
    finally:
        distributed.cleanup()
    return 0


def folder_run_dir(cfg) -> str:
    """A folder run's default directory is named after its data: runs/<folder name>[-<preset>]."""
    from pathlib import Path
    name = Path(cfg.data.root).resolve().name or "folder"
    return str(Path("runs") / name)
