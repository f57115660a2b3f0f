"""What every command shares at the command-line boundary: an argument parser whose errors are one line, typed
option values with their allowed ranges, config overrides, and the check that an output place is writable
before any work starts."""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

from ..config import apply_overrides, parse_override_args
from ..errors import EfditError

EPILOG = ("Any config field can be overridden with --key value (e.g. --lr 3e-4, --model.depth 8); "
          "`efdit presets` lists presets.")


class Parser(argparse.ArgumentParser):
    """argparse whose errors become one EfditError line: `--per-class must be a positive integer, got '-1'`."""

    def error(self, message: str):
        if message.startswith("argument "):
            opt, _, why = message[len("argument "):].partition(": ")
            opt = opt.split("/")[-1]
            message = f"{opt} {why}" if why.startswith("must ") else f"{opt}: {why}"
        raise EfditError(message)


def parser(cmd: str, description: str, epilog: str = EPILOG) -> Parser:
    return Parser(prog=f"efdit {cmd}", description=description, epilog=epilog)


def _typed(test, words: str, cast=float):
    def parse(text: str):
        try:
            value = cast(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {words}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {words}, got {text!r}")
        return value
    parse.__name__ = words
    return parse


positive_int = _typed(lambda v: v >= 1, "a positive integer", int)
nonneg_int = _typed(lambda v: v >= 0, "an integer ≥ 0", int)
positive = _typed(lambda v: math.isfinite(v) and v > 0, "a positive number")
nonneg = _typed(lambda v: math.isfinite(v) and v >= 0, "a number ≥ 0")
port = _typed(lambda v: 0 < v < 65536, "a port from 1 to 65535", int)


def number_list(low: float, high: float, words: str, example: str, low_open: bool = False):
    """An option of comma-separated numbers in [low, high] (or (low, high] with low_open)."""
    def parse(text: str) -> list[float]:
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated {words} such as {example}, got {text!r}") \
                from None
        if not all(math.isfinite(v) and (v > low if low_open else v >= low) and v <= high for v in values):
            span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be comma-separated {words} in {span}, got {text!r}")
        return values
    return parse


def nonempty(what: str):
    def parse(text: str):
        if not text.strip():
            raise argparse.ArgumentTypeError(f"must name at least one {what}, got {text!r}")
        return text
    return parse


def overrides(rest: list[str]) -> dict:
    """The `--key value` config overrides left after a command's own options."""
    return parse_override_args(rest)


def sample_overrides(ov: dict) -> dict:
    """Sampling-time options: bare keys are sample.* fields; --attn / --attn-kw switch the attention backend,
    --accel / --accel-kw the training-free cache (none | fora | delta | taylorseer, e.g. --accel-kw interval=3)."""
    alias = {"attn": "model.attn_backend", "attn_kw": "model.attn_kwargs", "attn-kw": "model.attn_kwargs",
             "accel_kw": "sample.accel_kwargs", "accel-kw": "sample.accel_kwargs"}
    return {alias.get(k, k if "." in k else f"sample.{k}"): v for k, v in ov.items()}


def apply_sampling_options(cfg, rest: list[str]):
    """A loaded model's config with the command line's sampling options applied, each checked (naming the option
    as typed), then the whole config."""
    from ..config import validate_config
    given = parse_override_args(rest)
    mapped = sample_overrides(given)
    shown = dict(zip(mapped, given))
    for path, value in mapped.items():
        try:
            apply_overrides(cfg, {path: value})
        except EfditError as e:   # name the option as typed (--steps), not the field (--sample.steps)
            raise EfditError(str(e).replace(f"--{path}", f"--{shown[path]}", 1)) from None
    return validate_config(cfg)


def writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Check, before any work, that a file can be written at `path` (or inside the folder `path`): the nearest
    existing folder takes a probe file (removed at once); no folder is created. -> the path."""
    path = Path(path)
    where = path.parent if path.suffix or path.is_file() else path
    while not where.exists():
        if where.parent == where:
            break
        where = where.parent
    if where.exists() and not where.is_dir():
        raise EfditError(f"cannot write the {what} {path}: {where} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise EfditError(f"cannot write the {what} {path}: {e.strerror or e} ({where})") from None
    return path
