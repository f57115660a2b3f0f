"""`efdit export`: a run's EMA model as a standalone model file (a PEFT delta merged with its base)."""
from __future__ import annotations

from pathlib import Path

from ..engine.files import export_model
from .options import parser, writable


def main(argv: list[str]) -> int:
    p = parser("export", "Write a run's EMA model as a standalone model file (e.g. fp16 for shipping).", epilog="")
    p.add_argument("run", help="a run directory, its model.safetensors, or its checkpoints/latest.safetensors")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    args = p.parse_args(argv)
    out = writable(Path(args.out), "model file")
    out = export_model(Path(args.run), out, args.dtype)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0
