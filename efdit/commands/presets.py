"""`efdit presets`: the named presets and what each sets."""
from __future__ import annotations

from ..config import PRESETS
from .options import parser


def main(argv: list[str]) -> int:
    parser("presets", "List the named presets (each a set of config overrides).", epilog="").parse_args(argv)
    for name, ov in PRESETS.items():
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in ov.items()))
    return 0
