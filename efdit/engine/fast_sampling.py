"""A model's default sampling setting: its fastest quality-matched setting when one was measured, else a rule.

Which sampling settings `efdit sample` and the web page start from (the *setting*: sampler, steps, η, block cache
and its options, guidance interval), in this order:

  1. the command line names any of --sampler, --steps, --eta, --accel, --accel-kw, --guidance-interval (or their
     --sample.* forms): the model config's setting with those options over it, nothing else changed;
  2. the model file holds a `fast_sampling` record (written by `benchmarks/sampling_quality.py --record` after a
     measurement): that setting, the fastest one whose FD-EffNetLite0 stayed within DDIM-50's tolerance (FD ≤
     FD(DDIM-50) + max(5 %, the seed-to-seed spread)) on this very model file;
  3. the model's config still has the schema's DDIM-50 (`ddim`, 50 steps, η 0, no cache, no guidance interval):
     RULE, DPM-Solver++(2M) with 10 steps (it kept DDIM-50's FD on the shipped fmnist-base at a fifth of the
     forwards, benchmarks/RESULTS.md, "Quality-matched sampling");
  4. otherwise the config's own setting (it was chosen when the model was trained: e.g. the paper presets' 250 DDPM
     steps).

Guidance scale, seed, HRIG and every other option are never changed here. `sampling_line` says which settings
were used and why; the record carries its FD evidence and date, so the line can quote them.

The record lives in the JSON metadata of the model file, beside its config:

    "fast_sampling": {"sampler": "dpmpp2m", "steps": "10", "eta": 0.0, "accel": "none", "accel_kwargs": "",
                      "guidance_interval": "", "name": "DPM-Solver++ 10", "measured": "2026-12-01",
                      "by": "benchmarks/sampling_quality.py", "evidence": {"fd": …, "fd_interval": [lo, hi],
                      "fd_ddim50": …, "tolerance": …, "delta_fd": {"value", "low", "high"}, "paired_speedup": …,
                      "forward_rows_per_image": …, "n": …, …}}

`record_fast_sampling` rewrites the file atomically with every tensor and every other metadata entry unchanged.
The file's bytes, hence its SHA-256, change: a PEFT delta file fine-tuned from it names the old hash.
"""
from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..config import Config, apply_overrides
from ..errors import EfditError, EfditWarning
from ..models.checkpoint import file_sha256, load_safetensors, save_safetensors

RECORD_KEY = "fast_sampling"
SETTING_KEYS = ("sampler", "steps", "eta", "accel", "accel_kwargs", "guidance_interval")
OPTION_PATHS = frozenset(f"sample.{k}" for k in SETTING_KEYS)
# the rule for a model without a measured setting whose config still samples the schema's DDIM-50
RULE = {"sampler": "dpmpp2m", "steps": "10", "eta": 0.0, "accel": "none", "accel_kwargs": "", "guidance_interval": ""}
RULE_TEXT = ("efdit's rule for a model without a measured setting: DPM-Solver++(2M), 10 steps, in place of the "
             "schema's DDIM-50 (it kept DDIM-50's FD on fmnist-base, benchmarks/RESULTS.md); "
             "benchmarks/sampling_quality.py --record measures this model's")


def setting_of(cfg: Config) -> dict:
    """The sampling setting of a config: {sampler, steps, eta, accel, accel_kwargs, guidance_interval}."""
    s = cfg.sample
    return {"sampler": str(s.sampler), "steps": str(s.steps), "eta": float(s.eta), "accel": str(s.accel or "none"),
            "accel_kwargs": str(s.accel_kwargs), "guidance_interval": str(s.guidance_interval).strip()}


SCHEMA_SETTING = setting_of(Config())  # ddim, 50 steps, η 0, no cache, no interval


def _normalise(setting: dict) -> dict:
    out = dict(SCHEMA_SETTING)
    out.update({k: setting[k] for k in SETTING_KEYS if k in setting})
    out["sampler"], out["steps"] = str(out["sampler"]), str(out["steps"])
    out["eta"] = float(out["eta"])
    out["accel"] = str(out["accel"] or "none")
    out["accel_kwargs"], out["guidance_interval"] = str(out["accel_kwargs"]), str(out["guidance_interval"]).strip()
    return out


def with_setting(cfg: Config, setting: dict) -> Config:
    """`cfg` (in place) with a sampling setting applied, each value checked like a command-line option."""
    s = _normalise(setting)
    return apply_overrides(cfg, {f"sample.{k}": s[k] for k in SETTING_KEYS})


def _usable(cfg: Config, setting: dict) -> str | None:
    """Why `setting` cannot sample the model of `cfg` (an unknown sampler, too many steps, an interval for a
    guidance-distilled model, …), or None when it can."""
    from .generate import check_sampling
    try:
        check_sampling(with_setting(copy.deepcopy(cfg), setting))
    except (EfditError, ValueError, TypeError, KeyError) as e:
        return str(e)
    return None


def read_record(meta: dict, cfg: Config | None = None, source: str = "the model file") -> dict | None:
    """The `fast_sampling` record of a model file's metadata (as `load_model` returns it), or None. A record this
    efdit cannot use (unknown sampler, not a dict, steps past the chain of `cfg`) is ignored with a warning."""
    rec = (meta or {}).get(RECORD_KEY)
    if rec is None:
        return None
    why = None
    if not isinstance(rec, dict) or not {"sampler", "steps"} <= set(rec):
        why = "it is not a setting (sampler, steps, …)"
    elif cfg is not None:
        why = _usable(cfg, rec)
    if why:
        warnings.warn(EfditWarning(f"{source}: ignoring its recorded fast sampling setting: {why}"), stacklevel=2)
        return None
    return {**rec, **_normalise(rec)}


@dataclass
class Choice:
    """The setting a command samples with and why. source: "options" (the command line named a setting option),
    "recorded" (the model file's measured setting), "rule" (RULE), or "config" (the model config's own)."""
    setting: dict
    source: str
    record: dict | None = None

    def note(self) -> str:
        """Why these settings, in words (for the printed line and the page)."""
        if self.source == "options":
            return "your options over the model's config"
        if self.source == "config":
            return "the sampling settings of the model's config"
        if self.source == "rule":
            return RULE_TEXT
        return recorded_note(self.record or {})

    def matches(self, cfg: Config) -> bool:
        """Whether `cfg` samples with exactly this setting."""
        return _normalise(setting_of(cfg)) == _normalise(self.setting)


def recorded_note(rec: dict) -> str:
    ev = rec.get("evidence", {})
    text = f"the model's fastest quality-matched setting, measured {rec.get('measured', 'on an unknown date')}"
    if {"fd", "fd_ddim50", "tolerance"} <= set(ev):
        iv = ev.get("fd_interval")
        shown = f" [{iv[0]:.1f}, {iv[1]:.1f}]" if iv else ""
        whose = "its teacher's DDIM-50" if ev.get("ddim50_of") == "teacher" else "DDIM-50's"
        text += (f": FD-EffNetLite0 {ev['fd']:.1f}{shown} vs {whose} {ev['fd_ddim50']:.1f} + tolerance "
                 f"{ev['tolerance']:.1f}")
        if ev.get("n"):
            text += f", N = {ev['n']}"
        if ev.get("paired_speedup"):
            text += f", {ev['paired_speedup']:.1f}× DDIM-50's speed"
    return text


def choose_sampling(cfg: Config, meta: dict | None = None, given: Iterable[str] = ()) -> Choice:
    """The default setting for a model (the module docstring's order). given: config paths the command line set
    (e.g. {"sample.steps", "sample.cfg_scale"}); naming any of OPTION_PATHS keeps the config's setting."""
    if {str(k).replace("-", "_") for k in given} & OPTION_PATHS:
        return Choice(setting_of(cfg), "options")
    rec = read_record(meta or {}, cfg)
    if rec is not None:
        return Choice(_normalise(rec), "recorded", rec)
    own = setting_of(cfg)
    if own == SCHEMA_SETTING and _usable(cfg, RULE) is None:
        return Choice(dict(RULE), "rule")
    return Choice(own, "config")


def apply_sampling_default(cfg: Config, meta: dict | None = None, given: Iterable[str] = ()) -> Choice:
    """`choose_sampling`, its setting applied to `cfg` (in place). -> the Choice."""
    choice = choose_sampling(cfg, meta, given)
    if choice.source in ("recorded", "rule"):
        with_setting(cfg, choice.setting)
    return choice


def describe_settings(cfg: Config) -> str:
    """The exact sampling settings of a config in words: "dpmpp2m 10 steps, cfg ×2, seed 0"."""
    from .generate import guidance_of
    s = cfg.sample
    text = f"{s.sampler} {s.steps} steps"
    if s.sampler in ("ddpm", "ddim") and float(s.eta):
        text += f" (η {s.eta:g})"
    if str(s.accel).lower() not in ("", "none", "off"):
        text += f" + {s.accel}" + (f" {s.accel_kwargs}" if str(s.accel_kwargs).strip() else "")
    g = guidance_of(cfg)
    if cfg.model.guidance_embed:
        text += f", one forward per step at w = {s.cfg_scale:g} (guidance-distilled)"
    elif g.mode == "none":
        text += ", no guidance"
    else:
        text += f", {g.mode} ×{g.scale:g}" + (f" (superclass ×{g.scale_super:g})" if g.mode == "two_term" else "")
        if g.interval is not None:
            text += f" for t in [{g.interval[0]}, {g.interval[1]}]"
    if str(s.hrig).strip().lower() not in ("", "off", "none"):
        text += f", HRIG {s.hrig}"
    return text + f", seed {s.seed}"


def sampling_line(cfg: Config, choice: Choice) -> str:
    """"sampling: dpmpp2m 10 steps, cfg ×2, seed 0 (the model's fastest quality-matched setting, measured …)"."""
    return f"sampling: {describe_settings(cfg)} ({choice.note()})"


# ---- writing the record ----------------------------------------------------------------------------------------
def make_record(setting: dict, evidence: dict, name: str = "", measured: str | None = None,
                by: str = "benchmarks/sampling_quality.py") -> dict:
    """A `fast_sampling` record: the setting, its name, the FD evidence and the date (today unless given)."""
    return {**_normalise(setting), "name": name, "measured": measured or time.strftime("%Y-%m-%d"), "by": by,
            "evidence": dict(evidence)}


def record_fast_sampling(path: str | os.PathLike, record: dict | None) -> tuple[str, str]:
    """Write `record` into the model file at `path` (None removes it), atomically: the tensors, their dtypes and
    every other metadata entry stay as they are. A setting the model cannot sample with is refused.
    -> (SHA-256 before, SHA-256 after)."""
    from .generate import check_sampling
    path = Path(path)
    before = file_sha256(path)
    tensors, meta, raw = load_safetensors(path)
    if "config" not in meta or "hierarchy" not in meta:
        raise EfditError(f"{path} is not an efdit model file (no model config in its metadata)")
    if record is None:
        meta.pop(RECORD_KEY, None)
    else:
        cfg = Config.from_dict(meta["config"])
        try:
            check_sampling(with_setting(cfg, record))
        except (EfditError, ValueError) as e:
            raise EfditError(f"cannot record this setting in {path}: {e}") from None
        meta[RECORD_KEY] = {**record, **_normalise(record)}
    extra = {k: v for k, v in raw.items() if k not in ("format", "format_version", "config")}
    save_safetensors(path, tensors, meta, extra_metadata=extra)
    return before, file_sha256(path)


def fastest_matched(rows: list[dict], key: str = "paired_speedup", who: str | None = None) -> dict | None:
    """The fastest quality-matched row of a measurement (`benchmarks/sampling_quality.py`'s rows): among rows with
    `within` true that are not a DDIM-50 reference (`reference`), the highest `key` (falling back to `speedup`),
    ties to the lower counted branch share. who: only rows of that model ("teacher" | "student")."""
    def is_reference(r):
        return r.get("reference", r.get("name") in ("DDIM-50", "DDIM-50 (seed 1)"))

    def speed(r):
        v = r.get(key, r.get("speedup"))
        return float(v) if v is not None else 0.0
    pool = [r for r in rows if r.get("within") and not is_reference(r) and (who is None or r.get("who", "teacher") == who)]
    if not pool:
        return None
    return max(pool, key=lambda r: (speed(r), -float(r.get("branch_share", r.get("compute_share", 1.0)))))

