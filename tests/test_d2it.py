"""D²iT: entropy grain maps, thresholds, DVAE branch use, multi-grained noise / loss / sampling, shapes."""
import math

import numpy as np
import pytest
import torch
from tiny import randomize

from efdit.d2it.dct import DynamicContentTransformer
from efdit.d2it.dgt import DynamicGrainTransformer, grain_loss, sample_grains
from efdit.d2it.dvae import DVAE, project_multigrain
from efdit.d2it.grains import (
    EntropySpec,
    entropy_of_pixels,
    grain_map,
    percentile_thresholds,
    region_entropy,
    threshold_for,
    upsample_map,
)
from efdit.d2it.multigrain import multigrain_noise, multigrain_reduce, sample_dct, training_losses
from efdit.diffusion import create_diffusion
from efdit.diffusion.hooks import SamplerHook


def coarse_constant(x, grain):
    """True where every coarse region of x (N, C, 2h, 2w) is exactly constant over its 2x2 cells."""
    rep = x[:, :, ::2, ::2].repeat_interleave(2, 2).repeat_interleave(2, 3)
    coarse = ~upsample_map(grain, 2).bool()
    return bool(torch.equal(torch.where(coarse, x, rep), rep))


# ---- entropy -----------------------------------------------------------------------------------------------
def test_kde_entropy_hand_computed():
    # 2x2 region with pixels {0, 0, 1, 1}, bins {0, 0.5, 1}, σ = 0.5:
    # p̂(0) = p̂(1) = 2 + 2·e^{-2}, p̂(0.5) = 4·e^{-1/2}  (exp(−Δ²/2σ²), Δ = 1 or 0.5)
    spec = EntropySpec(region=2, bins=3, sigma=0.5)
    a, b = 2 + 2 * math.exp(-2), 4 * math.exp(-0.5)
    p = [a / (2 * a + b), b / (2 * a + b), a / (2 * a + b)]
    expected = -sum(q * math.log(q) for q in p)
    img = torch.tensor([[0, 255], [255, 0]], dtype=torch.uint8).view(1, 1, 2, 2)
    got = region_entropy(img, spec)
    assert got.shape == (1, 1, 1)
    assert got.item() == pytest.approx(expected, abs=1e-8)
    assert entropy_of_pixels(torch.tensor([0.0, 0.0, 1.0, 1.0]), spec).item() == pytest.approx(expected, abs=1e-12)


def test_entropy_reference_values_of_the_spec():
    # spec §1.3 (256 bins, σ = 0.01, 16 px regions): flat black ≈ 1.740, flat mid-grey ≈ 2.355, noise ≈ 5.47
    spec = EntropySpec(region=16, bins=256, sigma=0.01)
    black = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    grey = torch.full((1, 1, 16, 16), 128, dtype=torch.uint8)
    noise = torch.randint(0, 256, (8, 1, 16, 16), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    assert region_entropy(black, spec).item() == pytest.approx(1.740, abs=2e-3)
    assert region_entropy(grey, spec).item() == pytest.approx(2.355, abs=2e-3)
    assert region_entropy(noise, spec).mean().item() == pytest.approx(5.47, abs=0.03)


def test_entropy_rgb_uses_luma_and_regions_are_independent():
    spec = EntropySpec(region=4, bins=64)
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (2, 3, 8, 8), generator=g).to(torch.uint8)
    e = region_entropy(img, spec)
    assert e.shape == (2, 2, 2)
    gray = (img.double() / 255 * torch.tensor([0.2989, 0.5870, 0.1140]).view(1, 3, 1, 1)).sum(1)
    px = gray[0, 4:8, 0:4].reshape(-1)                       # region (1, 0) of image 0
    assert e[0, 1, 0].item() == pytest.approx(entropy_of_pixels(px, spec).item(), abs=1e-3)
    flat = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    assert torch.unique(region_entropy(flat, spec)).numel() == 1   # identical regions tie exactly


# ---- thresholds --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1000, 997])
def test_thresholds_fine_ratio_without_ties(n):
    e = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    th = {"percentiles": percentile_thresholds(e)}
    for r in (0.1, 0.25, 0.5, 0.7, 0.9):
        frac = (e > threshold_for(th, r)).double().mean().item()
        assert frac <= r + 1e-12
        assert frac == math.floor(n * r + 1e-9) / n            # equal up to the integer count


def test_thresholds_with_ties_go_coarse():
    g = torch.Generator().manual_seed(0)
    e = torch.cat([torch.full((400,), 0.5, dtype=torch.float64), 1 + torch.rand(600, generator=g, dtype=torch.float64)])
    th = {"percentiles": percentile_thresholds(e)}
    for r in (0.3, 0.6, 0.7, 0.9):
        frac = (e > threshold_for(th, r)).double().mean().item()
        assert frac <= r
    assert (e > threshold_for(th, 0.9)).double().mean().item() == 0.6   # the 400 tied flat regions stay coarse
    assert grain_map(e.view(1, 10, 100), threshold_for(th, 0.0)).sum() == 0
    assert grain_map(e.view(1, 10, 100), threshold_for(th, 1.0)).all()


def test_thresholds_on_images_are_dataset_fixed():
    spec = EntropySpec(region=4, bins=64)
    g = torch.Generator().manual_seed(3)
    imgs = torch.randint(0, 256, (40, 1, 16, 16), generator=g).to(torch.uint8)
    imgs[:20, :, :8] = 0                                        # flat regions: many ties at the minimum
    e = region_entropy(imgs, spec)
    th = {"percentiles": percentile_thresholds(e)}
    tau = threshold_for(th, 0.5)
    assert (e > tau).double().mean() <= 0.5
    batch = e[20:]                                               # a batch's share is not forced to r_fine
    assert (batch > tau).double().mean() > 0.5


# ---- DVAE --------------------------------------------------------------------------------------------------
def tiny_dvae():
    return DVAE(in_channels=1, image_size=16, f1=2, z_channels=3, ch=8, ch_mult=(1, 2), num_res_blocks=1, groups=4)


def _grads(module):
    return [p.grad for p in module.parameters()]


@pytest.mark.parametrize("r", [0, 1])
def test_dvae_uses_only_the_selected_branch(r):
    m = tiny_dvae()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    grain = torch.full((2, 4, 4), r, dtype=torch.long)
    m.loss(x, grain, kl_weight=1e-3)["loss"].backward()
    enc = m.encoder
    unused = [enc.fine_head] if r == 0 else [enc.coarse_head, enc.E2]
    used = [enc.coarse_head, enc.E2] if r == 0 else [enc.fine_head]
    for mod in unused:
        assert all(g is None or torch.count_nonzero(g) == 0 for g in _grads(mod))
    for mod in used:
        assert any(g is not None and torch.count_nonzero(g) > 0 for g in _grads(mod))
    # and the output does not depend on the unused branch's weights
    with torch.no_grad():
        z0, _ = m.encode(x, grain, sample=False)
        for mod in unused:
            for p in mod.parameters():
                p.add_(torch.randn_like(p))
        z1, _ = m.encode(x, grain, sample=False)
    assert torch.equal(z0, z1)


def test_dvae_neighbour_copying_and_shapes():
    m = tiny_dvae()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    grain = (torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5).long()
    z, kl = m.encode(x, grain, sample=True)                    # sampled before copying: copies identical
    assert z.shape == (3, 3, 8, 8) and kl.shape == (3,)
    assert coarse_constant(z, grain)
    assert not coarse_constant(z, torch.zeros_like(grain))     # fine regions differ within their cells
    assert m.decode(z, grain).shape == (3, 1, 16, 16)


# ---- multi-grained noise and loss --------------------------------------------------------------------------
def test_multigrain_noise_copies_and_variance():
    grain = torch.tensor([[[1, 0], [0, 1]]]).repeat(4000, 1, 1)
    eps = multigrain_noise((4000, 2, 4, 4), grain, torch.Generator().manual_seed(0))
    assert coarse_constant(eps, grain)
    code = eps[:, :, 0, 2]                                      # a coarse code (region (0, 1))
    assert abs(code.mean().item()) < 0.05 and abs(code.var().item() - 1) < 0.06
    assert abs(eps[:, :, 0, 0].var().item() - 1) < 0.06        # a fine cell


def test_multigrain_loss_counts_each_code_once():
    grain = torch.tensor([[[1, 0], [0, 0]]])                    # 1 fine region (4 cells), 3 coarse regions
    v = torch.zeros(1, 1, 4, 4)
    v[0, 0, :2, :2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])    # fine cells: S_f = 10, N_f = 4
    v[0, 0, :2, 2:] = 5.0                                       # coarse regions (constant): S_c = 5 + 6 + 7
    v[0, 0, 2:, :2] = 6.0
    v[0, 0, 2:, 2:] = 7.0
    assert multigrain_reduce(v, grain).item() == pytest.approx(18 / 3 + 10 / 4)
    assert multigrain_reduce(v, grain, w_coarse=2.0, w_fine=0.5).item() == pytest.approx(2 * 6 + 0.5 * 2.5)
    assert multigrain_reduce(v, grain, weighting="per_code").item() == pytest.approx((18 + 10) / 7)
    # per_code = dense MSE with weight 1/4 per coarse cell and 1 per fine cell
    w = torch.where(upsample_map(grain, 2).bool(), 1.0, 0.25)
    assert multigrain_reduce(v, grain, weighting="per_code").item() == pytest.approx(((w * v).sum() / w.sum()).item())
    two_ch = torch.cat([v, 3 * v], dim=1)                       # channels are averaged (DiT's mean_flat scale)
    assert multigrain_reduce(two_ch, grain).item() == pytest.approx(2 * (18 / 3 + 10 / 4))
    all_coarse = torch.zeros_like(grain)
    out = multigrain_reduce(v * 0 + 1, all_coarse)
    assert torch.isfinite(out) and out.item() == pytest.approx(1.0)


# ---- DCT ---------------------------------------------------------------------------------------------------
def tiny_dct(**kw):
    return randomize(DynamicContentTransformer(input_size=8, in_channels=2, hidden_size=32, trunk_depth=2,
                                               refine_depth=1, num_heads=2, num_classes=3, **kw), seed=2, scale=0.1)


@pytest.mark.parametrize("attn", ["global", "region"])
def test_dct_shapes_and_coarse_outputs_constant(attn):
    m = tiny_dct(refine_attention=attn)
    grain = (torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.5).long()
    x = project_multigrain(torch.randn(3, 2, 8, 8), grain)
    out = m(x, torch.tensor([1, 500, 999]), torch.tensor([0, 1, 2]), grain=grain)
    assert out.shape == (3, 4, 8, 8)
    assert coarse_constant(out, grain)
    assert not coarse_constant(out, torch.zeros_like(grain))


@pytest.mark.parametrize("attn", ["global", "region"])
def test_sparse_refinenet_equals_the_dense_masked_one(attn):
    """Gathering only the needed sub-tokens gives the dense masked RefineNet's output (and gradients)."""
    dense = tiny_dct(refine_attention=attn, sparse_refine=False)
    sparse = tiny_dct(refine_attention=attn, sparse_refine=True)
    sparse.load_state_dict(dense.state_dict())
    g = torch.Generator().manual_seed(3)
    grain = (torch.rand(4, 4, 4, generator=g) < 0.3).long()
    grain[0] = 0          # all coarse
    grain[1] = 1          # all fine
    x = project_multigrain(torch.randn(4, 2, 8, 8, generator=g), grain)
    t, y = torch.tensor([1, 200, 600, 999]), torch.tensor([0, 1, 2, 1])
    a, b = dense(x, t, y, grain=grain), sparse(x, t, y, grain=grain)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, pa), pb in zip(dense.named_parameters(), sparse.parameters()):
        scale = float(pa.grad.abs().max()) + 1e-12  # elementwise rtol fails on near-zero entries: float rounding
        assert float((pb.grad - pa.grad).abs().max()) <= 1e-5 * scale, name
    all_coarse = torch.zeros_like(grain)
    torch.testing.assert_close(sparse(x, t, y, grain=all_coarse), dense(x, t, y, grain=all_coarse),
                               rtol=1e-5, atol=1e-6)


class _Record(SamplerHook):
    def __init__(self):
        self.xs = []

    def on_step(self, state):
        self.xs.append(state.x_t.clone())
        return state


@pytest.mark.parametrize("method,cfg", [("ddpm", 1.5), ("ddim", 1.0)])
def test_sampling_keeps_coarse_regions_constant_at_every_step(method, cfg):
    m = tiny_dct()
    grain = (torch.rand(4, 4, 4, generator=torch.Generator().manual_seed(5)) < 0.5).long()
    diffusion = create_diffusion("8", learn_sigma=True)
    rec = _Record()
    x = sample_dct(m, torch.tensor([0, 1, 2, 0]), grain, diffusion, method=method, cfg_scale=cfg,
                   generator=torch.Generator().manual_seed(0), hooks=[rec], progress=False)
    assert len(rec.xs) == 8
    for x_t in rec.xs + [x]:
        assert coarse_constant(x_t, grain)
        assert not coarse_constant(x_t, torch.zeros_like(grain))


def test_dct_training_loss_and_gradients():
    m = tiny_dct()
    m.train()
    diffusion = create_diffusion(None, learn_sigma=True)
    grain = (torch.rand(2, 4, 4) < 0.5).long()
    x0 = project_multigrain(torch.randn(2, 2, 8, 8), grain)
    terms = training_losses(m, diffusion, x0, grain, torch.tensor([0, 1]), torch.tensor([0, 700]))
    assert set(terms) == {"mse", "vb", "loss"} and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert m.refine_final.linear.weight.grad.abs().sum() > 0


# ---- DGT ---------------------------------------------------------------------------------------------------
def test_dgt_shapes_and_sampling():
    m = randomize(DynamicGrainTransformer(grid_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=3),
                  seed=3, scale=0.1)
    diffusion = create_diffusion(None, noise_schedule="cosine", learn_sigma=False, loss="mse")
    grain = (torch.rand(5, 4, 4) < 0.5).long()
    m.train()
    loss = grain_loss(m, diffusion, grain, torch.tensor([0, 1, 2, 0, 1]), torch.randint(0, 1000, (5,)))
    assert loss.ndim == 0 and torch.isfinite(loss)
    m.eval()
    maps = sample_grains(m, torch.tensor([0, 1, 2, 0]), steps=4, cfg_scale=1.5,
                         generator=torch.Generator().manual_seed(0))
    assert maps.shape == (4, 4, 4) and set(maps.unique().tolist()) <= {0, 1}
    again = sample_grains(m, torch.tensor([0, 1, 2, 0]), steps=4, cfg_scale=1.5,
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(maps, again)                             # deterministic given the generator


def test_percentiles_match_numpy_inverted_cdf():
    e = np.random.default_rng(0).random(101)
    th = percentile_thresholds(e)
    assert th["50"] == pytest.approx(np.sort(e)[50]) and th["0"] == e.min() and th["100"] == e.max()


def test_d2it_cli_trains_every_stage_then_samples(tmp_path, capsys):
    """`efdit d2it train` end to end on 16 px digits (2 steps a stage), then `efdit d2it sample` from its files."""
    from efdit.cli import main as cli_main
    from efdit.d2it.config import build_d2it_config
    from efdit.engine.d2it_train import STAGES, load_dct, load_dgt, load_dit
    run = tmp_path / "run"
    args = ["d2it", "train", "--preset", "fmnist32", "--run-dir", str(run), "--data.dataset", "digits",
            "--data.image_size", "16", "--no-progress"]
    for stage in ("dvae", "dgt", "dct", "dit"):
        args += [f"--{stage}.steps", "2", f"--{stage}.batch_size", "4", f"--{stage}.minutes", "0"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    for line in ("DVAE: 2 steps (8 images", "DGT: 2 steps (8 maps", "DCT: 2 steps (8 latents", "DiT: 2 steps (8 latents"):
        assert line in out
    cfg = build_d2it_config("fmnist32", {})
    dgt, dct, dit = load_dgt(cfg, run), load_dct(cfg, run), load_dit(cfg, run)
    assert not (dgt.training or dct.training or dit.training)
    assert dit.in_channels == 4 and dit.input_size == (8, 8)  # 16 px / f1 = 2
    assert len(STAGES) >= 5
    assert cli_main(["d2it", "sample", str(run), "--per-class", "1", "--classes", "0,1", "--sample.steps", "3",
                     "--no-progress", "--out", str(tmp_path / "s")]) == 0
    data = np.load(tmp_path / "s" / "samples-dgt.npz")
    assert data["images"].shape == (2, 1, 16, 16) and data["grains"].shape == (2, 4, 4)
    assert data["labels"].tolist() == [0, 1] and (tmp_path / "s" / "grid-dgt.png").is_file()


def test_baseline_dit_patch_size_and_seeded_batches(tmp_path):
    """dit.patch_size reaches the baseline DiT (and must divide the fine latent); fit's batches follow the seed."""
    from efdit.d2it.config import build_d2it_config
    from efdit.engine.d2it_train import build_baseline_dit, fit
    from efdit.errors import EfditError
    for p, tokens in ((1, 256), (2, 64), (4, 16)):
        m = build_baseline_dit(build_d2it_config("fmnist32", {"dit.patch_size": p}), 4, 10)
        assert m.patch_size == p and m.x_embedder.num_patches == tokens    # 32 px / f1 = 2 -> 16x16 latent
    with pytest.raises(EfditError, match="dit.patch_size 3"):
        build_d2it_config("fmnist32", {"dit.patch_size": 3})
    drawn = {}
    for seed in (0, 0, 1):
        model = torch.nn.Linear(1, 1)
        seen = []

        def loss_fn(gen):
            seen.append(int(torch.randint(0, 10**6, (1,), generator=gen)))
            return {"loss": model(torch.ones(1, 1)).sum()}
        fit("m", model, loss_fn, 1e-3, 3, 0, 0, tmp_path, 1, progress=False, seed=seed)
        drawn.setdefault(seed, []).append(seen)
    assert drawn[0][0] == drawn[0][1] and drawn[0][0] != drawn[1][0]


def test_split_by_share_holds_out_a_share_of_every_class():
    """A dataset without a test split (emoji): floor(share · n_c) of every class held out, disjoint, seeded."""
    from efdit.d2it.data import split_by_share
    from efdit.data.base import HierarchicalDataset
    from efdit.data.hierarchy import Hierarchy
    counts = [10, 4, 5, 1]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    ds = HierarchicalDataset(images, labels, Hierarchy(["a", "b", "c", "d"], ["x", "y"], torch.tensor([0, 0, 1, 1])),
                             "toy")
    train, test = split_by_share(ds, 0.2)
    assert torch.bincount(test.sub_labels, minlength=4).tolist() == [2, 0, 1, 0]
    assert torch.bincount(train.sub_labels, minlength=4).tolist() == [8, 4, 4, 1]
    seen = set(train.images[:, 0, 0, 0].tolist()) | set(test.images[:, 0, 0, 0].tolist())
    assert len(seen) == len(ds) and test.split == "test"
    assert torch.equal(split_by_share(ds, 0.2)[1].images, test.images)
    assert not torch.equal(split_by_share(ds, 0.5, seed=1)[1].images[:5], split_by_share(ds, 0.5)[1].images[:5])


def test_cached_thresholds_are_keyed_by_what_changes_the_train_images():
    """The thresholds cache name (`data_tag`) changes with the emoji hierarchy, categories and held-out share, and
    stays the plain dataset name where nothing of that applies (existing caches keep their names)."""
    from efdit.d2it.config import build_d2it_config
    from efdit.engine.d2it_train import data_tag
    from efdit.errors import EfditError
    assert data_tag(build_d2it_config("fmnist32", {})) == "fmnist"
    assert data_tag(build_d2it_config("fmnist32", {"data.channels": 3})) == "fmnist-c3"
    emoji = build_d2it_config("emoji32", {})
    tags = {data_tag(emoji), data_tag(build_d2it_config("emoji32", {"data.test_share": 0.3})),
            data_tag(build_d2it_config("emoji32", {"data.sub_level": "emoji"})),
            data_tag(build_d2it_config("emoji32", {"data.categories": "Food & Drink"}))}
    assert len(tags) == 4 and all(t.startswith("emoji-") and " " not in t for t in tags)
    with pytest.raises(EfditError, match="test_share"):
        build_d2it_config("emoji32", {"data.test_share": 1.0})
