"""Training loop, resume, presets and overrides, the CLI's clear errors, sampling outputs."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from efdit.cli import main as cli_main
from efdit.config import Config, build_config, get_preset, parse_override_args
from efdit.data import HierarchicalDataset, Hierarchy
from efdit.engine.train import train
from efdit.errors import EfditError
from efdit.models.checkpoint import load_safetensors

CLI = [sys.executable, "-m", "efdit.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_overrides_are_typed_and_checked():
    cfg = build_config("digits-tiny", {"lr": "3e-4", "model.depth": "3", "total_images": "2k", "hflip": "true"})
    assert (cfg.train.lr, cfg.model.depth, cfg.train.total_images, cfg.data.hflip) == (3e-4, 3, 2000, True)
    with pytest.raises(EfditError, match=r"unknown option --lrr; did you mean 'lr'"):
        build_config("digits-tiny", {"lrr": "1"})
    with pytest.raises(EfditError, match="--depth must be an integer"):
        build_config("digits-tiny", {"depth": "deep"})
    with pytest.raises(EfditError, match="ambiguous"):
        build_config("digits-tiny", {"seed": "1"})  # train.seed and sample.seed
    with pytest.raises(EfditError, match="did you mean 'fmnist-tiny'"):
        get_preset("fmnist-tin")
    assert parse_override_args(["--lr", "1e-3", "--model.depth=4", "--eta", "-1"]) == \
        {"lr": "1e-3", "model.depth": "4", "eta": "-1"}
    with pytest.raises(EfditError, match="needs a value"):
        parse_override_args(["--lr"])
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_dry_run_prints_config_and_counts(capsys, tmp_path):
    assert cli_main(["train", "--preset", "digits-tiny", "--dry-run", "--run-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert '"preset": "digits-tiny"' in out and "parameters" in out and "16 tokens" in out
    assert not (tmp_path / "r").exists()


def test_cli_errors_are_one_line(capsys):
    assert cli_main(["train", "--preset", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("efdit: error: unknown preset 'nope'") and "\n" not in err
    assert cli_main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err


def _run(args, **kw):
    return subprocess.run(CLI + args, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def test_sigkill_then_rerun_resumes_with_identical_state(tmp_path):
    common = ["train", "--preset", "digits-tiny", "--no-progress", "--threads", "1", "--ckpt-every", "320",
              "--log-every", "320"]
    # reference: an uninterrupted run of 2560 images
    ref = _run(common + ["--run-dir", str(tmp_path / "ref"), "--total-images", "2560"])
    assert ref.returncode == 0, ref.stderr
    # a long run, killed right after its first checkpoint
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "latest.safetensors"
    proc = subprocess.Popen(CLI + common + ["--run-dir", str(run), "--total-images", "1000000"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not ckpt.exists() and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists()
    saved_step = load_safetensors(ckpt)[1]["progress"]["step"]
    assert 0 < saved_step < 80
    # the same command again (with the reference's budget) continues from the saved step
    again = _run(common + ["--run-dir", str(run), "--total-images", "2560"])
    assert again.returncode == 0, again.stderr
    assert f"resuming {run} from step {saved_step}" in again.stdout
    a, meta_a, _ = load_safetensors(ckpt)
    b, meta_b, _ = load_safetensors(tmp_path / "ref" / "checkpoints" / "latest.safetensors")
    assert meta_a["progress"]["step"] == meta_b["progress"]["step"] == 80
    assert set(a) == set(b)
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k  # model, EMA and optimizer state all identical
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 80
    steps = [r["step"] for r in log]
    assert steps == sorted(set(steps))  # entries logged after the checkpoint were dropped on resume


def test_changed_config_refuses_to_resume(tmp_path):
    cfg = build_config("digits-tiny", {"run_dir": str(tmp_path), "total_images": 96, "threads": 1})
    train(cfg, progress=False)
    cfg2 = build_config("digits-tiny", {"run_dir": str(tmp_path), "total_images": 96, "lr": 0.5})
    with pytest.raises(EfditError, match="another config.*train.lr"):
        train(cfg2, progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import efdit.engine.train as T
    real = T.build_diffusion
    calls = {"n": 0}

    def poisoned(cfg, respacing=None):
        d = real(cfg, respacing)
        orig = d.training_losses

        def losses(*a, **k):
            calls["n"] += 1
            out = orig(*a, **k)
            if calls["n"] >= 5:
                out["loss"] = out["loss"] * float("nan")
            return out
        d.training_losses = losses
        return d

    monkeypatch.setattr(T, "build_diffusion", poisoned)
    cfg = build_config("digits-tiny", {"run_dir": str(tmp_path), "total_images": 3200, "ckpt_every": 64,
                                       "batch_size": 32})
    with pytest.raises(EfditError, match=r"loss became nan at step 5.*latest\.safetensors"):
        train(cfg, progress=False)
    _, meta, _ = load_safetensors(tmp_path / "checkpoints" / "latest.safetensors")
    assert meta["progress"]["step"] == 4
    assert not (tmp_path / "model.safetensors").exists()
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_overfits_two_images_and_samples_them(tmp_path):
    torch.manual_seed(0)
    a = torch.zeros(1, 8, 8, dtype=torch.uint8)
    a[:, 2:6, 2:6] = 255  # a bright square
    b = torch.zeros(1, 8, 8, dtype=torch.uint8)
    b[:, :, :4] = 255     # left half
    ds = HierarchicalDataset(torch.stack([a, b]), torch.tensor([0, 1]),
                             Hierarchy(["square", "half"], ["shapes"], torch.tensor([0, 0])), "two")
    cfg = build_config("digits-tiny", {"run_dir": str(tmp_path), "total_images": 24_000, "batch_size": 32,
                                       "lr": 2e-3, "ckpt_every": 1_000_000, "log_every": 4000, "ema_decay": 0.95,
                                       "sample.steps": "25", "cfg_scale": 1.0, "threads": 1})
    train(cfg, progress=False, dataset=ds)
    from efdit.engine.files import load_model
    from efdit.engine.generate import generate
    model, cfg2, h, _ = load_model(tmp_path / "model.safetensors")
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    images = generate(model, cfg2, labels, progress=False).float() / 255
    targets = torch.stack([a, a, a, b, b, b]).float() / 255
    err = (images - targets).abs().mean(dim=(1, 2, 3))
    assert err.max() < 0.08, err  # each sample is close to its class's image (mean |error| < 8% of the range)


def test_sample_command_writes_grid_pngs_and_npz(tmp_path, capsys):
    cfg = build_config("digits-tiny", {"run_dir": str(tmp_path / "run"), "total_images": 96, "threads": 1})
    train(cfg, progress=False)
    out = tmp_path / "s"
    assert cli_main(["sample", str(tmp_path / "run"), "--classes", "0,seven", "--per-class", "2", "--steps", "5",
                     "--out", str(out), "--no-progress"]) == 2
    assert "unknown subclass 'seven'" in capsys.readouterr().err
    assert cli_main(["sample", str(tmp_path / "run"), "--classes", "0,7", "--superclass", "curves", "--per-class",
                     "2", "--steps", "5", "--out", str(out), "--no-progress"]) == 0
    data = np.load(out / "samples.npz")
    assert data["arr_0"].shape == (10, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    assert sorted(set(data["labels"].tolist())) == [0, 2, 3, 5, 7]
    assert (out / "grid.png").is_file() and len(list((out / "png").rglob("*.png"))) == 10


def test_sample_with_proattention_and_hrig_from_the_cli(tmp_path, capsys):
    cfg = build_config("digits-tiny", {"run_dir": str(tmp_path / "run"), "total_images": 96, "threads": 1})
    train(cfg, progress=False)
    args = ["sample", str(tmp_path / "run"), "--classes", "1", "--per-class", "2", "--steps", "10", "--no-progress"]
    assert cli_main(args + ["--out", str(tmp_path / "a")]) == 0
    assert cli_main(args + ["--out", str(tmp_path / "b"), "--attn", "proxy", "--attn-kw", "pool=2",
                            "--hrig", "band=0:999,gain=-0.5"]) == 0
    a, b = np.load(tmp_path / "a" / "samples.npz")["arr_0"], np.load(tmp_path / "b" / "samples.npz")["arr_0"]
    assert a.shape == b.shape and not np.array_equal(a, b)
    assert cli_main(args + ["--out", str(tmp_path / "c"), "--hrig", "gain=0"]) == 0  # λ = 0: bit-identical
    assert np.array_equal(np.load(tmp_path / "c" / "samples.npz")["arr_0"], a)
    assert cli_main(args + ["--attn", "nope"]) == 2
    assert "unknown attention backend 'nope'" in capsys.readouterr().err
    assert cli_main(args + ["--hrig", "gian=1"]) == 2
    assert "--hrig" in capsys.readouterr().err


def test_fine_tuning_presets_build_the_model_of_their_base():
    """folder-finetune / fmnist-finetune load emoji-base / fmnist-base-v2 strictly: same architecture and recipe."""
    from efdit.config import build_config
    for tune, base in (("folder-finetune", "emoji-base"), ("fmnist-finetune", "fmnist-base-v2")):
        t, b = build_config(tune, {}), build_config(base, {})
        assert t.train.init_from == base
        for f in ("patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "learn_sigma", "pos_embed"):
            assert getattr(t.model, f) == getattr(b.model, f), (tune, f)
        assert (t.data.image_size, t.diffusion.prediction, t.diffusion.schedule) == \
            (b.data.image_size, b.diffusion.prediction, b.diffusion.schedule)


def test_label_lr_scale_moves_the_label_table_that_many_times_further(tmp_path):
    """Three steps (adaLN-Zero keeps the label table's gradient at zero in the first ones, so the two runs compute
    nearly the same gradients): Adam's steps scale with lr, so with label_lr_scale 10 the label table moves 10× as
    far as with 1, and every other parameter just as far."""
    from efdit.engine.build import build_model
    from efdit.engine.datasets import load_data

    def one_step(scale):
        cfg = build_config("digits-tiny", {"run_dir": str(tmp_path / f"s{scale}"), "total_images": 96,
                                           "warmup_images": 0, "lr": 1e-3, "label_lr_scale": scale,
                                           "ema_decay": 0.0, "threads": 1, "ckpt_every": 10 ** 6})
        train(cfg, progress=False)
        return load_safetensors(tmp_path / f"s{scale}" / "model.safetensors")[0], cfg

    after1, cfg = one_step(1.0)
    after10, _ = one_step(10.0)
    ds = load_data(cfg, "train")
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg, ds.hierarchy, ds.image_size, ds.num_channels).state_dict()
    for name in after1:
        if name == "pos_embed":
            continue
        d1, d10 = (after1[name] - init[name]).abs().max(), (after10[name] - init[name]).abs().max()
        want = 10.0 if name.startswith("y_embedder.") else 1.0
        assert float(d10) == pytest.approx(want * float(d1), rel=0.05), name
    moved = float((after1["y_embedder.embedding_table.weight"] - init["y_embedder.embedding_table.weight"]).abs().max())
    assert 1e-4 < moved <= 3e-3   # the table did train (else the ratios above say nothing)
