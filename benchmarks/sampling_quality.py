"""Quality-matched sampling: FD-EffNetLite0 with intervals, paired differences and s/img of faster settings vs DDIM-50.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sampling_quality.py --threads 2 [--model MODEL] [--student STUDENT]
        [--n-per-class 10] [--only NAME,NAME] [--update NAME,NAME] [--timing-only] [--record] [--no-write]

One run, one teacher model (default: the shipped fmnist-base) with its own sampling config (CFG ×2, x̂0 clipped for
fmnist-base) and, with --student, a guidance-distilled student of it (`efdit distill-guidance`; sampled at w = the
teacher's scale, one forward per step). Every setting samples the same class-balanced labels from the same seed,
so all but the second DDIM-50 share their initial noise x_T with the teacher's DDIM-50 (a paired comparison); the
second DDIM-50 (seed 1) measures the seed-to-seed spread of FD at this N.

Settings (SETTINGS): DDIM-50 (seeds 0 and 1), DDIM-25, DPM-Solver++(2M) 10 / 15 / 20, UniPC 8 / 10; each block cache
on DDIM-50 (FORA, Δ-DiT, TaylorSeer) and caches stacked on the few-step solvers; guidance in a limited interval
(Kynkäänniemi et al. 2024) on DDIM-50 and the few-step solvers; with --student, the student with DDIM-50 and the
few-step solvers (STUDENT_SETTINGS, names starting "student").

Per setting:
  * FD-EffNetLite0 against the real test split (efdit.engine.evaluate's protocol: N per subclass on both sides,
    features at 64 px, cached reference features; the real-vs-real floor is printed too) with its bootstrap 95 %
    interval (efdit.metrics.bootstrap: 200 replicates, re-centred percentile), and KID with its interval;
  * ΔFD = FD − FD(DDIM-50) with its 95 % interval: paired (the same bootstrap indices in both, valid because the
    samples share noise and labels) for every seed-0 setting, unpaired for the seed-1 DDIM-50;
  * the quality-matched rule: matched ⇔ FD ≤ FD(DDIM-50) + tolerance, tolerance = max(5 % · FD(DDIM-50),
    |FD(seed 0) − FD(seed 1)|); stated with the intervals: "✓✓" when even the upper end of ΔFD's interval is within
    the tolerance, "✓" when the point is but the interval reaches past it, "✗" when the point is not;
  * s/img of the quality pass (all N images in one batch) and the paired speed-up: the teacher's DDIM-50 and the
    setting timed back to back on the same `--paired-timing` images (`--timing-rounds` times), so both see about the
    same load — the speed figure to read on a shared machine;
  * the noise-free cost, counted: model forward rows per image (a CFG step runs 2 rows per image, a step outside
    the guidance interval or of the student 1) and the branch share (attention + MLP rows evaluated, vs DDIM-50; a
    cached branch is not evaluated);
  * the mean absolute pixel difference to the teacher's DDIM-50 samples from the same noise.

The fastest quality-matched setting (the highest paired speed-up among matched settings, ties to the lower branch
share; `efdit.engine.fast_sampling.fastest_matched`) is named; `--record` writes it into the model file
(`fast_sampling` metadata, atomically, tensors unchanged), and the student's fastest into the student's file, so that
`efdit sample` and `efdit serve` start from it. benchmarks/peers.py reads it from sampling_quality.json.
Writes the "Quality-matched sampling" section of benchmarks/RESULTS.md (other sections are left alone) and
benchmarks/sampling_quality.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from efdit.engine.evaluate import pixel_config, reference_and_floor, score  # noqa: E402
from efdit.engine.fast_sampling import fastest_matched, make_record, record_fast_sampling  # noqa: E402
from efdit.engine.files import load_model  # noqa: E402
from efdit.engine.generate import check_sampling, generate, guidance_of  # noqa: E402
from efdit.engine.paths import model_file  # noqa: E402
from efdit.errors import EfditError, atomic_write  # noqa: E402
from efdit.metrics.bootstrap import BootstrapResult, paired_difference, unpaired_difference  # noqa: E402
from efdit.models.checkpoint import file_sha256  # noqa: E402

SECTION = "## Quality-matched sampling"
FD = "fd_effnetlite0"
REFERENCE, SEED_1 = "DDIM-50", "DDIM-50 (seed 1)"
INTERVAL = "100,700"   # guidance only for t in [100, 700] (original timesteps): the mid-noise range
GUIDED = "guidance t∈[100..700]"   # how setting names say it (names hold no commas: --only splits at them)


class Setting(NamedTuple):
    name: str
    over: dict          # sample-config fields over DDIM-50 (sampler, steps, accel, accel_kwargs, guidance_interval)
    seed: int = 0
    who: str = "teacher"   # teacher | student


def _ts(m: int, n: int) -> dict:
    return {"accel": "taylorseer", "accel_kwargs": f"interval={n},order={m}"}


def _fora(n: int) -> dict:
    return {"accel": "fora", "accel_kwargs": f"interval={n}"}


DPM = lambda n: {"sampler": "dpmpp2m", "steps": str(n)}  # noqa: E731
UNIPC = lambda n: {"sampler": "unipc", "steps": str(n)}  # noqa: E731
GI = {"guidance_interval": INTERVAL}
SETTINGS = [
    Setting(REFERENCE, {}),
    Setting(SEED_1, {}, 1),
    Setting("DDIM-25", {"steps": "25"}),
    Setting("DPM-Solver++ 10", DPM(10)),
    Setting("DPM-Solver++ 15", DPM(15)),
    Setting("DPM-Solver++ 20", DPM(20)),
    Setting("UniPC 8", UNIPC(8)),
    Setting("UniPC 10", UNIPC(10)),
    # block caches on DDIM-50
    Setting("DDIM-50 + FORA N=2", _fora(2)),
    Setting("DDIM-50 + FORA N=3", _fora(3)),
    Setting("DDIM-50 + Δ-DiT N=3 blocks=3 b=500", {"accel": "delta", "accel_kwargs": "interval=3,blocks=3,boundary=500"}),
    Setting("DDIM-50 + TaylorSeer m=1 N=3", _ts(1, 3)),
    Setting("DDIM-50 + TaylorSeer m=2 N=3", _ts(2, 3)),
    # caches stacked on the few-step solvers
    Setting("DPM-Solver++ 20 + FORA N=2", {**DPM(20), **_fora(2)}),
    Setting("DPM-Solver++ 20 + TaylorSeer m=1 N=2", {**DPM(20), **_ts(1, 2)}),
    Setting("DPM-Solver++ 15 + TaylorSeer m=1 N=2", {**DPM(15), **_ts(1, 2)}),
    Setting("DPM-Solver++ 10 + TaylorSeer m=1 N=2", {**DPM(10), **_ts(1, 2)}),
    Setting("UniPC 10 + TaylorSeer m=1 N=2", {**UNIPC(10), **_ts(1, 2)}),
    # guidance in a limited interval
    Setting(f"DDIM-50 + {GUIDED}", dict(GI)),
    Setting(f"DPM-Solver++ 10 + {GUIDED}", {**DPM(10), **GI}),
    Setting(f"DPM-Solver++ 15 + {GUIDED}", {**DPM(15), **GI}),
    Setting(f"UniPC 8 + {GUIDED}", {**UNIPC(8), **GI}),
    Setting(f"UniPC 10 + {GUIDED}", {**UNIPC(10), **GI}),
]
# the guidance-distilled student (--student): one forward per step at w = the teacher's scale
STUDENT_SETTINGS = [
    Setting("student DDIM-50", {}, 0, "student"),
    Setting("student DPM-Solver++ 10", DPM(10), 0, "student"),
    Setting("student DPM-Solver++ 15", DPM(15), 0, "student"),
    Setting("student DPM-Solver++ 20", DPM(20), 0, "student"),
    Setting("student UniPC 8", UNIPC(8), 0, "student"),
    Setting("student UniPC 10", UNIPC(10), 0, "student"),
    Setting("student DPM-Solver++ 20 + TaylorSeer m=1 N=2", {**DPM(20), **_ts(1, 2)}, 0, "student"),
    Setting("student DPM-Solver++ 15 + TaylorSeer m=1 N=2", {**DPM(15), **_ts(1, 2)}, 0, "student"),
]
ALL_SETTINGS = {s.name: s for s in SETTINGS + STUDENT_SETTINGS}


# ---- models, labels, counting -------------------------------------------------------------------------------
class Loaded(NamedTuple):
    path: Path
    model: torch.nn.Module
    cfg: object
    hierarchy: object
    meta: dict
    sha256: str
    counter: dict


def count_rows(model) -> dict:
    """Counts, through forward pre-hooks, the rows of every model forward and of every attention / MLP branch
    evaluation of its blocks (a cached branch is not evaluated); reset by setting the entries to 0."""
    counter = {"forward_rows": 0, "branch_rows": 0}

    def add(key):
        def hook(_mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            counter[key] += int(x.shape[0])
        return hook
    model.register_forward_pre_hook(add("forward_rows"), with_kwargs=True)
    for block in model.blocks:
        for mod in (block.attn, block.mlp):
            mod.register_forward_pre_hook(add("branch_rows"), with_kwargs=True)
    return counter


def load(path, threads: int) -> Loaded:
    torch.set_num_threads(threads)
    path = model_file(path)
    model, cfg, hierarchy, meta = load_model(path, "cpu")
    model.eval()
    return Loaded(path, model, cfg, hierarchy, meta, file_sha256(path), count_rows(model))


def check_student(teacher: Loaded, student: Loaded) -> list[str]:
    """Refuse a student that cannot be compared with the teacher; -> warnings (e.g. distilled from another file)."""
    if not student.cfg.model.guidance_embed:
        raise EfditError(f"--student {student.path} is not guidance-distilled (model.guidance_embed is off): give "
                         f"the model file `efdit distill-guidance RUN --teacher {teacher.path}` wrote")
    for what, a, b in (("hierarchy", teacher.hierarchy.to_dict(), student.hierarchy.to_dict()),
                       ("input size", teacher.meta["input_size"], student.meta["input_size"]),
                       ("channels", teacher.meta["channels"], student.meta["channels"]),
                       ("label space", teacher.cfg.model.condition_on, student.cfg.model.condition_on)):
        if a != b:
            raise EfditError(f"--student {student.path}: its {what} differs from the teacher's ({b} vs {a})")
    rec = student.meta.get("distill", {})
    if rec.get("teacher_sha256") and rec["teacher_sha256"] != teacher.sha256:
        return [f"the student was distilled from a teacher with sha256 {rec['teacher_sha256']}, not {teacher.path} "
                f"({teacher.sha256}): its FD is still compared with this teacher's DDIM-50"]
    return []


def balanced_labels(cfg, hierarchy, n_per_class: int) -> torch.Tensor:
    """n per subclass, in the model's label space (the parent superclass for a superclass model)."""
    sub = torch.arange(hierarchy.num_sub).repeat_interleave(n_per_class)
    return sub if cfg.model.condition_on == "sub" else hierarchy.parent[sub]


def setting_cfg(models: dict, s: Setting):
    """The config a setting samples with: DDIM-50 (η 0, no cache, no interval) with the setting's fields over it; a
    student at the teacher's guidance scale and x̂0 clipping."""
    teacher = models["teacher"].cfg
    m = models.get(s.who)
    if m is None:
        raise EfditError(f"setting {s.name!r} needs --student")
    c = copy.deepcopy(m.cfg)
    for k, v in {"sampler": "ddim", "steps": "50", "eta": 0.0, "accel": "none", "accel_kwargs": "",
                 "guidance_interval": "", **s.over}.items():
        setattr(c.sample, k, v)
    if s.who == "student":
        c.sample.cfg_scale, c.sample.clip_x0 = teacher.sample.cfg_scale, teacher.sample.clip_x0
    check_sampling(c)
    return c


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
            f"Python {platform.python_version()}")


def _short(path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# ---- the quality pass ---------------------------------------------------------------------------------------
class Reference(NamedTuple):
    ref_id: str
    feats: object
    labels: object
    floor: dict
    extractor: object
    gen_labels: object   # requested subclass ids for the bootstrap strata (None for a superclass model)
    labels_model: torch.Tensor


def reference(models: dict, n_per_class: int, progress: bool) -> Reference:
    t = models["teacher"]
    ref_id, feats, ref_labels, floor, _, extractor, h = reference_and_floor(pixel_config(t.cfg), "test", n_per_class,
                                                                             64, 0, None, progress)
    if h != t.hierarchy:
        raise EfditError("the model's hierarchy differs from its test split's")
    labels = balanced_labels(t.cfg, h, n_per_class)
    gen_labels = labels.numpy() if t.cfg.model.condition_on == "sub" else None
    return Reference(ref_id, feats, ref_labels, floor, extractor, gen_labels, labels)


def measure(models: dict, ref: Reference, s: Setting, progress: bool) -> tuple[dict, BootstrapResult, torch.Tensor]:
    """Sample one setting, time and count it, score it with intervals. -> (row, its bootstrap, images)."""
    m = models[s.who]
    c = setting_cfg(models, s)
    m.counter.update(forward_rows=0, branch_rows=0)
    t0 = time.perf_counter()
    images = generate(m.model, c, ref.labels_model, progress=progress, seed=s.seed)
    dt = time.perf_counter() - t0
    feats = ref.extractor.extract(images, resolution=64, progress=False)
    scored = score(feats, ref.feats, ref.labels, ref.gen_labels, None, m.hierarchy, seed=s.seed)
    n = len(images)
    iv = scored["intervals"]
    row = {"name": s.name, "who": s.who, "model_file": _short(m.path), "model_sha256": m.sha256,
           "sampler": c.sample.sampler, "steps": c.sample.steps, "eta": c.sample.eta, "accel": c.sample.accel,
           "accel_kwargs": c.sample.accel_kwargs, "guidance_interval": c.sample.guidance_interval, "seed": s.seed,
           "reference": s.name in (REFERENCE, SEED_1),
           "fd": scored["metrics"][FD], "fd_interval": [iv[FD]["low"], iv[FD]["high"]],
           "kid": scored["metrics"]["kid"], "kid_interval": [iv["kid"]["low"], iv["kid"]["high"]],
           "s_per_img": dt / n, "forward_rows": m.counter["forward_rows"] / n,
           "branch_rows": m.counter["branch_rows"] / n}
    return row, BootstrapResult.from_dict(scored["bootstrap"]), images


def selected(args, student: bool) -> list[Setting]:
    pool = SETTINGS + (STUDENT_SETTINGS if student else [])
    if not args.only:
        return pool
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in ALL_SETTINGS]
    if unknown:
        raise EfditError(f"--only: unknown setting(s) {', '.join(map(repr, unknown))}; known: "
                         + "; ".join(ALL_SETTINGS))
    if any(ALL_SETTINGS[w].who == "student" for w in wanted) and not student:
        raise EfditError("--only names student settings: give --student")
    return [s for s in pool if s.name in (REFERENCE, SEED_1) or s.name in wanted]


def run(args, models: dict) -> dict:
    progress = not args.no_progress
    ref = reference(models, args.n_per_class, progress)
    rows, boots, ref_images = [], {}, None
    load0, t_start = os.getloadavg(), time.time()
    for s in selected(args, "student" in models):
        row, boot, images = measure(models, ref, s, progress)
        if ref_images is None:
            ref_images = images
        row["mae_vs_ddim50"] = (images.float() - ref_images.float()).abs().mean().item()
        rows.append(row)
        boots[s.name] = boot
        print(f"{s.name:46s} FD {row['fd']:8.2f} [{row['fd_interval'][0]:.2f}, {row['fd_interval'][1]:.2f}]  "
              f"{row['s_per_img']:.3f} s/img  rows/img {row['forward_rows']:.0f}", flush=True)
    t = models["teacher"]
    g = guidance_of(t.cfg)
    res = {"version": 2, "rows": rows, "n": len(ref.labels_model), "n_per_class": args.n_per_class,
           "reference_id": ref.ref_id, "floor_fd": ref.floor["metrics"][FD],
           "floor_fd_interval": [ref.floor["intervals"][FD]["low"], ref.floor["intervals"][FD]["high"]],
           "model": _short(t.path), "model_sha256": t.sha256, "guidance": f"{g.mode} ×{g.scale:g}",
           "cfg_scale": t.cfg.sample.cfg_scale, "clip_x0": t.cfg.sample.clip_x0,
           "student": _short(models["student"].path) if "student" in models else None,
           "student_sha256": models["student"].sha256 if "student" in models else None,
           "machine": machine(), "threads": torch.get_num_threads(), "load_before": load0,
           "load_after": os.getloadavg(), "minutes": (time.time() - t_start) / 60,
           "date": time.strftime("%Y-%m-%d %H:%M"),
           "command": ".venv/bin/python " + shlex.join(["benchmarks/sampling_quality.py", *args.argv])}
    res["reference_bootstrap"] = boots[REFERENCE].to_dict(replicates=True)
    finish(res, boots)
    return res


def finish(res: dict, boots: dict) -> None:
    """The tolerance, every row's ΔFD interval, verdict, speed-ups and shares, and the fastest matched settings.
    boots: the bootstrap of each row measured now (rows not in it keep their stored ΔFD)."""
    rows = {r["name"]: r for r in res["rows"]}
    base, other = rows[REFERENCE], rows[SEED_1]
    base_boot = boots.get(REFERENCE) or BootstrapResult.from_dict(res["reference_bootstrap"])
    spread = abs(other["fd"] - base["fd"])
    tol = max(0.05 * base["fd"], spread)
    res.update(fd_ddim50=base["fd"], fd_ddim50_interval=base["fd_interval"], seed_spread=spread, tolerance=tol,
               threshold=base["fd"] + tol)
    t_base = 0.5 * (base["s_per_img"] + other["s_per_img"])
    for r in res["rows"]:
        boot = boots.get(r["name"])
        if boot is not None:
            paired = boot.plan == base_boot.plan
            diff = (paired_difference if paired else unpaired_difference)(boot, base_boot, metrics=[FD])[FD]
            r["delta_fd"] = {"value": diff.interval.value, "low": diff.interval.low, "high": diff.interval.high,
                             "paired": paired}
        r["within"] = r["fd"] <= res["threshold"]
        r["verdict"] = ("✓✓" if r["delta_fd"]["high"] <= tol else "✓") if r["within"] else "✗"
        r["speedup"] = t_base / r["s_per_img"]
        r["forward_share"] = r["forward_rows"] / base["forward_rows"]
        r["branch_share"] = r["branch_rows"] / base["branch_rows"]
    choose(res)


def choose(res: dict) -> None:
    key = "paired_speedup" if any("paired_speedup" in r for r in res["rows"]) else "speedup"
    res["fastest_key"] = key
    res["fastest"] = {who: (b["name"] if (b := fastest_matched(res["rows"], key, who)) else None)
                      for who in ("teacher", "student")}
    best = fastest_matched(res["rows"], key)
    res["fastest"]["overall"] = best["name"] if best else None


def paired_timing(res: dict, models: dict, n_images: int, rounds: int, progress: bool) -> None:
    """Speed-up measured back to back: the teacher's DDIM-50, then the setting, on the same `n_images` (one per
    subclass first), `rounds` times; paired_speedup = Σ DDIM-50 seconds / Σ setting seconds."""
    t = models["teacher"]
    one_each = balanced_labels(t.cfg, t.hierarchy, 1)
    labels = one_each.repeat(-(-n_images // len(one_each)))[:n_images]
    ref_cfg = setting_cfg(models, ALL_SETTINGS[REFERENCE])
    for r in res["rows"]:
        if r["name"] in (REFERENCE, SEED_1):
            r["paired_speedup"] = 1.0
            continue
        s = ALL_SETTINGS.get(r["name"])
        if s is None or s.who not in models:
            continue   # a stored row of a model not loaded now: its stored timing stays
        c, m = setting_cfg(models, s), models[s.who]
        t50 = ts = 0.0
        for _ in range(rounds):
            t0 = time.perf_counter()
            generate(t.model, ref_cfg, labels, progress=False, seed=s.seed)
            t1 = time.perf_counter()
            generate(m.model, c, labels, progress=False, seed=s.seed)
            t50, ts = t50 + t1 - t0, ts + time.perf_counter() - t1
        r["paired_speedup"] = t50 / ts
        r["paired_seconds"] = [t50, ts]
        if progress:
            print(f"{r['name']:46s} paired: DDIM-50 {t50:.1f} s, setting {ts:.1f} s -> {t50 / ts:.2f}x", flush=True)
    res["paired_timing_images"], res["paired_timing_rounds"] = n_images, rounds
    choose(res)


def update_rows(args, res: dict, models: dict) -> dict:
    """Re-measure (or add) some settings against the stored DDIM-50 numbers; their pixel difference is left out."""
    names = [s.strip() for s in args.update.split(",") if s.strip()]
    unknown = [n for n in names if n not in ALL_SETTINGS]
    if unknown:
        raise EfditError(f"--update: unknown setting(s) {', '.join(map(repr, unknown))}")
    if res.get("n_per_class") != args.n_per_class:
        args.n_per_class = res["n_per_class"]
    ref = reference(models, res["n_per_class"], not args.no_progress)
    rows = {r["name"]: r for r in res["rows"]}
    boots = {}
    for name in names:
        row, boot, _ = measure(models, ref, ALL_SETTINGS[name], not args.no_progress)
        row.update(mae_vs_ddim50=None, rerun=time.strftime("%Y-%m-%d %H:%M"))
        if name in rows:
            rows[name].clear()
            rows[name].update(row)
        else:
            res["rows"].append(row)
        boots[name] = boot
        print(f"{name:46s} FD {row['fd']:8.2f}  {row['s_per_img']:.3f} s/img (rerun)", flush=True)
    if REFERENCE in boots:
        res["reference_bootstrap"] = boots[REFERENCE].to_dict(replicates=True)
    res["updated"] = sorted(set(res.get("updated", [])) | set(names))
    finish(res, boots)
    return res


# ---- recording the fastest setting ----------------------------------------------------------------------------
def evidence(res: dict, row: dict) -> dict:
    return {"fd": row["fd"], "fd_interval": row["fd_interval"], "fd_ddim50": res["fd_ddim50"],
            "fd_ddim50_interval": res["fd_ddim50_interval"], "seed_spread": res["seed_spread"],
            "tolerance": res["tolerance"], "delta_fd": row["delta_fd"], "verdict": row["verdict"],
            "paired_speedup": row.get("paired_speedup"), "speedup": row["speedup"],
            "forward_rows_per_image": row["forward_rows"], "branch_share": row["branch_share"],
            "ddim50_model": res["model"], "ddim50_model_sha256": res["model_sha256"],
            "guidance": res["guidance"], "n": res["n"], "n_per_class": res["n_per_class"],
            "reference_id": res["reference_id"], "settings_measured": len(res["rows"]),
            "ddim50_of": "teacher" if row["who"] == "student" else "self"}


def record(res: dict, models: dict) -> list[str]:
    """Write each model's fastest matched setting into its model file; -> the lines to print."""
    lines, res["recorded"] = [], res.get("recorded", {})
    for who, m in models.items():
        name = res["fastest"].get(who)
        if name is None:
            lines.append(f"{who} {m.path}: no faster setting is quality-matched at this N: nothing recorded")
            continue
        row = next(r for r in res["rows"] if r["name"] == name)
        if m.sha256 not in (row["model_sha256"], res["recorded"].get(who, {}).get("sha256_after")):
            raise EfditError(f"--record: {name} was measured on another {m.path} (sha256 {row['model_sha256']}, "
                             f"now {m.sha256}): measure this file first")
        rec = make_record({k: row[k] for k in ("sampler", "steps", "eta", "accel", "accel_kwargs",
                                              "guidance_interval")}, evidence(res, row), name=name)
        before, after = record_fast_sampling(m.path, rec)
        res["recorded"][who] = {"path": _short(m.path), "setting": name, "sha256_before": before, "sha256_after": after}
        lines.append(f"recorded {name} as the default sampling of {m.path} (its sha256 {before} -> {after}: PEFT delta "
                     f"files fine-tuned from it name the old hash; export them first with `efdit export`)")
    return lines


# ---- the report -----------------------------------------------------------------------------------------------
def _iv(v) -> str:
    return f"[{v[0]:.1f}, {v[1]:.1f}]"


def markdown(res: dict) -> str:
    rows = res["rows"]
    key = res.get("fastest_key", "speedup")
    student = f" and its guidance-distilled student `{res['student']}`" if res.get("student") else ""
    lines = [SECTION, "",
             f"Model `{res['model']}`{student}, guidance {res['guidance']} (the model's sampling config; the student at "
             f"w = {res['cfg_scale']:g}, one forward per step), clip x̂0 {res['clip_x0']}; {res['n']} samples per "
             f"setting ({res['n_per_class']} per subclass) against {res['n_per_class']} real test images per subclass, "
             f"FD-EffNetLite0 at 64 px with its bootstrap 95 % interval (real-vs-real floor at this N: "
             f"{res['floor_fd']:.1f} {_iv(res['floor_fd_interval'])}). All settings but `DDIM-50 (seed 1)` start from "
             "the noise of `DDIM-50`, so ΔFD = FD − FD(DDIM-50) is a paired difference (the same bootstrap draws in "
             "both); the seed-1 row's is unpaired. Machine: " + res["machine"] + f"; load average "
             f"{res['load_before'][0]:.1f} before / {res['load_after'][0]:.1f} after, so wall-clock s/img carry "
             "noise on a shared machine: *forward rows* (model rows per image: 2 per guided step, 1 per unguided or "
             "student step) and *branch share* (attention + MLP rows evaluated vs DDIM-50) are the noise-free cost. "
             "Speed-up = mean s/img of the two DDIM-50 runs / the setting's (quality pass, one batch); *paired* "
             f"speed-up = the teacher's DDIM-50 and the setting timed back to back on the same "
             f"{res.get('paired_timing_images', 0)} images ({res.get('paired_timing_rounds', 1)} round(s)), the "
             "better speed estimate.",
             "",
             f"DDIM-50 FD {res['fd_ddim50']:.2f} {_iv(res['fd_ddim50_interval'])}; seed-to-seed spread "
             f"{res['seed_spread']:.2f}; tolerance = max(5 % of FD, spread) = {res['tolerance']:.2f}, so "
             f"**quality-matched ⇔ FD ≤ {res['threshold']:.2f}** (ΔFD ≤ {res['tolerance']:.2f}). ✓✓: matched with "
             "ΔFD's whole 95 % interval within the tolerance; ✓: the point is within, the interval reaches past "
             "it; ✗: not matched.",
             "",
             "| setting | FD-EffNetLite0 ↓ [95 % CI] | ΔFD vs DDIM-50 [95 % CI] | matched | KID ↓ | s/img | speed-up | "
             "paired speed-up | forward rows / img | branch share | pixel diff vs DDIM-50 (0–255) |",
             "|---|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = r["delta_fd"]
        lines.append(f"| {r['name']} | {r['fd']:.1f} {_iv(r['fd_interval'])} | {d['value']:+.1f} "
                     f"[{d['low']:+.1f}, {d['high']:+.1f}]{'' if d['paired'] or r['name'] == REFERENCE else ' (unpaired)'}"
                     f" | {r['verdict']} | {r['kid']:.3f} | {r['s_per_img']:.3f} | {r['speedup']:.2f}× | "
                     + (f"{r['paired_speedup']:.2f}× | " if "paired_speedup" in r else "— | ")
                     + f"{r['forward_rows']:.0f} | {r['branch_share']:.2f} | "
                     + (f"{r['mae_vs_ddim50']:.2f} |" if r.get("mae_vs_ddim50") is not None else "— (rerun) |"))
    lines.append("")
    by_name = {r["name"]: r for r in rows}
    how = "paired timing" if key == "paired_speedup" else "timed in the quality pass"
    for who, label in (("teacher", "the teacher"), ("student", "the student")):
        if who == "student" and not res.get("student"):
            continue
        name = res["fastest"].get(who)
        if name is None:
            lines.append(f"Fastest quality-matched setting of {label}: none faster than DDIM-50 is within the tolerance "
                         "at this N.")
            continue
        b = by_name[name]
        speed, timed = (b[key], how) if key in b else (b["speedup"], "timed in the quality pass")
        lines.append(f"Fastest quality-matched setting of {label}: **{name}** (`{b['model_file']}`), {speed:.2f}× "
                     f"DDIM-50's speed ({timed}), {b['forward_rows']:.0f} forward rows / img (DDIM-50: "
                     f"{by_name[REFERENCE]['forward_rows']:.0f}), FD {b['fd']:.1f} {_iv(b['fd_interval'])}, ΔFD "
                     f"{b['delta_fd']['value']:+.1f} [{b['delta_fd']['low']:+.1f}, {b['delta_fd']['high']:+.1f}] "
                     f"{b['verdict']}.")
        lines.append("")
    if res.get("fastest", {}).get("overall"):
        lines += [f"Fastest overall: **{res['fastest']['overall']}**; `benchmarks/peers.py` times it against the "
                  "diffusers DDIM-50 loop on the same teacher (section \"Peer benchmark\").", ""]
    for who, rec in res.get("recorded", {}).items():
        lines += [f"Recorded as the default sampling of `{rec['path']}` (`--record`): {rec['setting']} — "
                  f"`efdit sample` and `efdit serve` start from it.", ""]
    if res.get("updated"):
        lines += [f"Rows re-measured later with `--update`: {', '.join(res['updated'])}; their pixel difference "
                  f"to DDIM-50 is not recomputed.", ""]
    lines += [f"Total {res['minutes']:.1f} min ({res['date']}). Reproduce: `{res['command']}`; raw numbers in "
              f"`{res.get('json', 'benchmarks/sampling_quality.json')}`.", ""]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace (or append) this script's section of RESULTS.md; every other section stays as it is."""
    old = path.read_text() if path.is_file() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old, count=1) if pattern.search(old) else \
        old.rstrip("\n") + "\n\n" + text + "\n"
    with atomic_write(path, "the results") as tmp:
        tmp.write_text(new.rstrip("\n") + "\n")


def write_json(path: Path, res: dict) -> None:
    with atomic_write(path, "the results") as tmp:
        tmp.write_text(json.dumps(res, indent=1, default=str) + "\n")


# ---- main -----------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "efdit" / "assets" / "fmnist-base.safetensors"),
                   help="the teacher: an efdit model file or run folder (default: the shipped fmnist base)")
    p.add_argument("--student", default="", help="a guidance-distilled student of it (its model file or run folder)")
    p.add_argument("--n-per-class", type=int, default=10, help="samples (and real images) per subclass")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated setting names (the two DDIM-50 runs always run): "
                                              + "; ".join(ALL_SETTINGS))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and the JSON alone")
    p.add_argument("--paired-timing", type=int, default=10, metavar="N",
                   help="images for the back-to-back timing of each setting against DDIM-50 (0 = off)")
    p.add_argument("--timing-rounds", type=int, default=1, help="rounds of the paired timing (seconds summed)")
    p.add_argument("--timing-only", action="store_true",
                   help="redo only the paired timing, on the FD numbers of the last run's sampling_quality.json")
    p.add_argument("--update", default="", help="rerun only these settings (comma-separated names) and merge them "
                                                "into the last run's sampling_quality.json (pixel diff left out)")
    p.add_argument("--record", action="store_true",
                   help="write the fastest quality-matched setting into the model file (and the student's into its "
                        "file): efdit sample / serve then default to it")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    out = Path(args.results).with_name("sampling_quality.json")
    models = {"teacher": load(args.model, args.threads)}
    stored = json.loads(out.read_text()) if (args.update or args.timing_only) and out.is_file() else None
    if (args.update or args.timing_only) and (stored is None or stored.get("version") != 2):
        raise EfditError(f"--update / --timing-only need a {out.name} of this script's format: run it in full first")
    student = args.student or (stored or {}).get("student") or ""
    if student:
        models["student"] = load(student if Path(student).is_absolute() or Path(student).exists() else ROOT / student,
                                 args.threads)
        for w in check_student(models["teacher"], models["student"]):
            print(f"warning: {w}", flush=True)
    if stored is not None:
        known = {stored["model_sha256"], stored.get("recorded", {}).get("teacher", {}).get("sha256_after")}
        if models["teacher"].sha256 not in known:
            raise EfditError(f"{out} was measured on another teacher file (sha256 {stored['model_sha256']}, "
                             f"{models['teacher'].path} has {models['teacher'].sha256})")
    if args.update:
        res = update_rows(args, stored, models)
    elif args.timing_only:
        res = stored
        res["load_before_timing"] = os.getloadavg()
    else:
        res = run(args, models)
    if args.paired_timing:
        paired_timing(res, models, args.paired_timing, args.timing_rounds, not args.no_progress)
    if args.record:
        for line in record(res, models):
            print(line, flush=True)
    res["minutes"], res["json"] = (time.time() - t_start) / 60, _short(out)
    text = markdown(res)
    print("\n" + text)
    if not args.no_write:
        write_section(Path(args.results), text)
        write_json(out, res)
        print(f"wrote the section to {args.results} and {out}")
    return res


if __name__ == "__main__":
    try:
        main()
    except EfditError as e:
        sys.exit(f"sampling_quality: {e}")
