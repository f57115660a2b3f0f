"""Official-checkpoint import and efdit's safetensors format."""
import os
import pickle

import pytest
import torch

from efdit.errors import EfditError
from efdit.models.checkpoint import load_official_dit, load_safetensors, load_state_dict_checked, save_safetensors
from efdit.models.dit import DiT, build_dit

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def official_like(tmp_path, **kw):
    m = DiT(**{**TINY, **kw})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    path = tmp_path / "DiT-tiny.pt"
    torch.save(m.state_dict(), path)  # a plain state dict, like DiT-XL-2-256x256.pt
    return m.eval(), path


def test_official_key_layout_of_xl2():
    with torch.device("meta"):
        sd = build_dit("DiT-XL/2", input_size=32).state_dict()
    expect = {
        "pos_embed": (1, 256, 1152), "x_embedder.proj.weight": (1152, 4, 2, 2), "x_embedder.proj.bias": (1152,),
        "t_embedder.mlp.0.weight": (1152, 256), "t_embedder.mlp.2.weight": (1152, 1152),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "blocks.27.attn.qkv.weight": (3456, 1152), "blocks.27.attn.proj.weight": (1152, 1152),
        "blocks.27.mlp.fc1.weight": (4608, 1152), "blocks.27.mlp.fc2.weight": (1152, 4608),
        "blocks.27.adaLN_modulation.1.weight": (6912, 1152), "final_layer.linear.weight": (32, 1152),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    # 4 embedder tensors + pos_embed + 2 x_embedder + 1 table + 28 blocks x 10 + 4 final = 292 tensors
    assert len(sd) == 1 + 2 + 4 + 1 + 28 * 10 + 4
    assert not any("norm" in k for k in sd)  # LayerNorms have no affine parameters


def test_official_roundtrip_is_strict_and_exact(tmp_path):
    ref, path = official_like(tmp_path)
    loaded = load_official_dit(path, num_heads=2).eval()
    assert set(loaded.state_dict()) == set(ref.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 10])
    assert torch.equal(loaded(x, t, y), ref(x, t, y))
    assert loaded.y_embedder.num_classes == 10 and loaded.learn_sigma


def test_train_py_checkpoint_loads_with_its_ema_weights(tmp_path):
    """facebookresearch/DiT train.py saves {"model", "ema", "opt", "args"} with args an argparse.Namespace."""
    import argparse
    ref, _ = official_like(tmp_path)
    raw = {k: v + 1.0 for k, v in ref.state_dict().items()}  # the raw model differs from the EMA
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4)
    args = argparse.Namespace(model="DiT-tiny", image_size=16, num_classes=10, global_batch_size=256)
    torch.save({"model": raw, "ema": ref.state_dict(), "opt": opt.state_dict(), "args": args}, tmp_path / "w.pt")
    loaded = load_official_dit(tmp_path / "w.pt", num_heads=2)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_wrong_shape_is_a_clear_error(tmp_path):
    _, path = official_like(tmp_path)
    sd = torch.load(path, weights_only=True)
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(5, 32)
    with pytest.raises(EfditError, match=r"shape mismatch: blocks\.1\.mlp\.fc1\.weight: \(5, 32\) in ckpt, \(128, 32\)"):
        load_state_dict_checked(DiT(**TINY), sd, source="ckpt")


def test_unknown_and_missing_keys_are_listed(tmp_path):
    _, path = official_like(tmp_path)
    sd = torch.load(path, weights_only=True)
    sd["blocks.0.attn.extra"] = torch.zeros(1)
    del sd["final_layer.linear.bias"]
    with pytest.raises(EfditError) as e:
        load_state_dict_checked(DiT(**TINY), sd, source="ckpt")
    assert "missing: final_layer.linear.bias" in str(e.value)
    assert "unexpected: blocks.0.attn.extra" in str(e.value)


def test_label_table_replacement_reports_exactly_the_reinitialised_keys(tmp_path, capsys):
    ref, path = official_like(tmp_path)
    m = load_official_dit(path, num_classes=5, num_heads=2)
    assert "re-initialised (not in DiT-tiny.pt): y_embedder.embedding_table.weight" in capsys.readouterr().out
    assert m.y_embedder.embedding_table.weight.shape == (6, 32)
    for k, v in ref.state_dict().items():
        if not k.startswith("y_embedder."):
            assert torch.equal(m.state_dict()[k], v), k
    reinit = load_state_dict_checked(DiT(**{**TINY, "num_classes": 3}), ref.state_dict(), replace_label_table=True,
                                     verbose=False)
    assert reinit == ["y_embedder.embedding_table.weight"]
    with pytest.raises(EfditError, match="different label set"):
        load_state_dict_checked(DiT(**{**TINY, "num_classes": 3}), ref.state_dict())


def test_missing_official_file_says_what_and_where(tmp_path):
    with pytest.raises(EfditError) as e:
        load_official_dit(tmp_path / "DiT-XL-2-256x256.pt")
    msg = str(e.value)
    assert "DiT-XL-2-256x256.pt" in msg and "facebookresearch/DiT" in msg and "never downloads" in msg
    assert "\n" not in msg


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_with_code_are_refused(tmp_path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(EfditError, match="weights-only") as e:
        load_official_dit(p)
    assert "\x1b" not in str(e.value) and "\n" not in str(e.value) and "weights_only` set to `False" not in str(e.value)


def test_code_beside_a_namespace_is_still_refused(tmp_path, capsys):
    """Allowing argparse.Namespace allows nothing else: a train.py-shaped file with code in it is refused, unrun."""
    import argparse
    ref, _ = official_like(tmp_path)
    p = tmp_path / "evil-train.pt"
    torch.save({"ema": ref.state_dict(), "args": argparse.Namespace(x=Evil())}, p)
    with pytest.raises(EfditError, match="never runs code") as e:
        load_official_dit(p)
    assert "pwned" not in capsys.readouterr().out and "\x1b" not in str(e.value)


def test_truncated_torch_file_is_one_clear_line(tmp_path):
    _, path = official_like(tmp_path)
    bad = tmp_path / "cut.pt"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(EfditError, match="truncated or not a torch file") as e:
        load_official_dit(bad)
    assert "\n" not in str(e.value)


def test_safetensors_roundtrip_version_and_atomicity(tmp_path):
    m = DiT(**TINY)
    cfg = {"model": TINY, "note": "x"}
    path = save_safetensors(tmp_path / "ckpt" / "model.safetensors", m.state_dict(), cfg)
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp file left behind
    umask = os.umask(0o022)
    try:  # the mode a plain open() would give (mkstemp and safetensors both create 0600 files)
        assert (save_safetensors(tmp_path / "mode.safetensors", {"a": torch.zeros(1)}).stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(umask)
    tensors, config, meta = load_safetensors(path)
    assert config == cfg and meta["format_version"] == "1"
    assert all(torch.equal(tensors[k], v) for k, v in m.state_dict().items())
    save_safetensors(tmp_path / "new.safetensors", m.state_dict(), cfg, extra_metadata={"format_version": "99"})
    with pytest.raises(EfditError, match="newer"):
        load_safetensors(tmp_path / "new.safetensors")
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(EfditError, match="no efdit format version"):
        load_safetensors(tmp_path / "plain.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EfditError, match="cannot read"):
        load_safetensors(tmp_path / "corrupt.safetensors")
