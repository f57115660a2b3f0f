"""Where things live: shipped assets, the cache, run folders, and the one "run folder or file -> model file" lookup.

  ASSETS                  efdit/assets (shipped model files and the Fashion-MNIST judge)
  cache_dir()             $EFDIT_CACHE or .cache/efdit (feature statistics, evaluation judges, grain thresholds)
  shipped(name)           a shipped file by name ("fmnist-base" -> efdit/assets/fmnist-base.safetensors) or None
  run_dir_of(cfg)         a config's run folder (`run_dir`, else runs/<preset>)
  model_file(path)        a model file given itself or its run folder (RUN/model.safetensors, RUN/train/… as
                          `efdit demo` writes it), or a one-line error saying what was looked for
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import EfditError

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def cache_dir() -> Path:
    return Path(os.environ.get("EFDIT_CACHE", ".cache/efdit"))


def shipped(name: str) -> Path | None:
    """A file shipped in efdit/assets, by name with or without its suffix; None if there is none."""
    for candidate in (ASSETS / name, ASSETS / f"{name}.safetensors"):
        if name and candidate.is_file() and candidate.parent == ASSETS:
            return candidate
    return None


def shipped_names() -> list[str]:
    """The shipped model files (base models), by name."""
    return sorted(p.stem for p in ASSETS.glob("*.safetensors") if not p.stem.endswith("-classifier"))


def run_dir_of(cfg) -> Path:
    """The run folder of a training config: `run_dir`, else runs/<preset> (runs/run without a preset)."""
    return Path(cfg.run_dir or os.path.join("runs", cfg.preset or "run"))


def model_file(path: str | os.PathLike, allow_training_state: bool = False) -> Path:
    """The model file `path` names: the file itself, or RUN/model.safetensors or RUN/train/model.safetensors of a
    run folder (with `allow_training_state`, a run still training gives its checkpoints/latest.safetensors)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise EfditError(f"no model file or run folder at {path}")
    looked = [path / "model.safetensors", path / "train" / "model.safetensors"]
    for p in looked:
        if p.is_file():
            return p
    states = [path / "checkpoints" / "latest.safetensors", path / "train" / "checkpoints" / "latest.safetensors"]
    state = next((p for p in states if p.is_file()), None)
    if state is not None and allow_training_state:
        return state
    hint = f" (a run still training? `efdit export {path} model.safetensors` writes a model file)" if state else ""
    raise EfditError(f"no model file in {path}: looked for {' and '.join(str(p) for p in looked)}{hint}")
