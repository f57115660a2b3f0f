"""PEFT runs store a delta over their base model: smaller files, exact reloads, clear errors without the base."""
import os
import shutil

import pytest
import torch
from tiny import trained_digits_base

from efdit.config import build_config
from efdit.engine.files import export_model, frozen_keys, load_model
from efdit.engine.train import train
from efdit.errors import EfditError
from efdit.models.checkpoint import load_safetensors

X, T = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((10,), 300)
Y = torch.arange(10)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return trained_digits_base(tmp_path_factory.mktemp("base"), 320)


def _ft(run_dir, base_file, **over):
    o = {"run_dir": str(run_dir), "total_images": 320, "embedder": "tiered", "peft": "efdit",
         "init_from": str(base_file), "threads": 1, "ckpt_every": 160, "log_every": 160}
    o.update(over)
    return build_config("digits-tiny", o)


def test_delta_files_hold_only_what_trains_and_reload_exactly(base, tmp_path):
    held = {}
    train(_ft(tmp_path / "ft", base), progress=False, on_finish=lambda m, e: held.update(model=m, ema=e))
    frozen = frozen_keys(held["model"])
    assert len(frozen) > 0
    tensors, meta, _ = load_safetensors(tmp_path / "ft" / "model.safetensors")
    assert set(tensors) == set(held["ema"].state_dict()) - set(frozen)
    assert meta["base"]["sha256"] and meta["base"]["path"] == str(base.resolve())
    state, smeta, _ = load_safetensors(tmp_path / "ft" / "checkpoints" / "latest.safetensors")
    assert not any(k[6:] in frozen for k in state if k.startswith("model."))
    assert not any(k[4:] in frozen for k in state if k.startswith("ema."))
    assert smeta["base"] == meta["base"]
    n_frozen = sum(held["model"].state_dict()[k].numel() for k in frozen)
    n_delta = sum(v.numel() for v in tensors.values())
    assert n_delta < n_frozen  # the digits-tiny efdit preset trains a minority of the weights

    model, _, _, _ = load_model(tmp_path / "ft" / "model.safetensors")
    held["ema"].eval()
    with torch.no_grad():
        assert torch.equal(model(X, T, Y), held["ema"](X, T, Y))
    for k, v in model.state_dict().items():
        assert torch.equal(v, held["ema"].state_dict()[k]), k

    # export merges base and delta into a standalone file that loads without the base
    out = export_model(tmp_path / "ft", tmp_path / "standalone.safetensors", dtype="fp32")
    st, stmeta, _ = load_safetensors(out)
    assert "base" not in stmeta and set(st) == set(held["ema"].state_dict())
    moved = tmp_path / "elsewhere.safetensors"
    shutil.move(base, moved)
    try:
        with pytest.raises(EfditError, match=r"needs its base model .*model\.safetensors \(sha256 [0-9a-f]{16}\)"):
            load_model(tmp_path / "ft" / "model.safetensors")
        alone, _, _, _ = load_model(out)
        with torch.no_grad():
            assert torch.equal(alone(X, T, Y), held["ema"](X, T, Y))
    finally:
        shutil.move(moved, base)


def test_changed_base_is_refused(base, tmp_path):
    copy = tmp_path / "base-copy.safetensors"
    shutil.copy(base, copy)
    train(_ft(tmp_path / "ft", copy, total_images=64), progress=False)
    tensors, meta, _ = load_safetensors(copy)
    from efdit.models.checkpoint import save_safetensors
    tensors = {k: (v + 1e-3 if k == "final_layer.linear.weight" else v) for k, v in tensors.items()}
    save_safetensors(copy, tensors, meta)  # same path, other weights
    with pytest.raises(EfditError, match="now has sha256"):
        load_model(tmp_path / "ft" / "model.safetensors")
    with pytest.raises(EfditError, match="now has sha256"):  # resuming the run is refused as well
        train(_ft(tmp_path / "ft", copy, total_images=128), progress=False)


def test_delta_run_resumes_to_the_uninterrupted_state(base, tmp_path):
    train(_ft(tmp_path / "ref", base), progress=False)
    train(_ft(tmp_path / "run", base, total_images=160), progress=False)
    train(_ft(tmp_path / "run", base), progress=False)  # the same run, a larger budget: resumes from 160 images
    a, ma, _ = load_safetensors(tmp_path / "run" / "checkpoints" / "latest.safetensors")
    b, mb, _ = load_safetensors(tmp_path / "ref" / "checkpoints" / "latest.safetensors")
    assert ma["progress"]["step"] == mb["progress"]["step"] and set(a) == set(b)
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k


def test_save_frozen_writes_standalone_files(base, tmp_path):
    train(_ft(tmp_path / "ft", base, total_images=64, save_frozen=True), progress=False)
    tensors, meta, _ = load_safetensors(tmp_path / "ft" / "model.safetensors")
    assert "base" not in meta
    model, _, _, _ = load_model(tmp_path / "ft" / "model.safetensors")
    assert set(tensors) == set(model.state_dict())
    assert os.path.getsize(tmp_path / "ft" / "model.safetensors") > os.path.getsize(base) // 2


def test_dry_run_says_what_a_model_file_will_hold(capsys):
    from efdit.cli import main as cli_main
    assert cli_main(["train", "--preset", "inat21-dit-xl2-256-efdit", "--dry-run"]) == 0
    out = capsys.readouterr().out  # 12,153,632 trainable by the efdit rule + 1,548,288 LoRA on the proxy attention
    assert f"model file: {(12_153_632 + 1_548_288) * 4 / 2**20:,.1f} MiB fp32, a PEFT delta over pretrained/DiT-XL-2-256x256.pt" in out
    assert cli_main(["train", "--preset", "inat21-dit-xl2-256-efdit", "--dry-run", "--save-frozen", "true"]) == 0
    assert f"model file: {(685_640_480 + 1_548_288) * 4 / 2**20:,.1f} MiB fp32\n" in capsys.readouterr().out
