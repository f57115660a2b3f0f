"""The DVAE's perceptual distance, patch discriminator, hinge / generator losses, adaptive weight and warm-up, their
wiring into the DVAE stage, and the PSNR / SSIM measures."""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from efdit.d2it.config import build_d2it_config
from efdit.d2it.dvae import DVAE
from efdit.d2it.losses import (
    DVAELoss,
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_weight,
    adversarial_factor,
    feature_distance,
    gaussian_window,
    generator_loss,
    hinge_d_loss,
    psnr,
    receptive_field,
    ssim,
    unit_normalize,
)
from efdit.errors import EfditError


@pytest.fixture(scope="module")
def perceptual():
    return PerceptualLoss()


def images(n=4, c=1, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, size, size, generator=g) * 2 - 1
    return torch.nn.functional.avg_pool2d(x, 3, 1, 1).clamp(-1, 1)    # some spatial structure


def tiny_dvae():
    return DVAE(in_channels=1, image_size=16, f1=2, z_channels=2, ch=8, ch_mult=(1, 2), num_res_blocks=1, groups=4)


# ---- perceptual distance ------------------------------------------------------------------------------------------
def test_feature_distance_by_hand():
    # depth 1: 2 channels on a 1x2 grid: (3, 4) vs (4, 3) -> unit (.6, .8) vs (.8, .6): 0.04 + 0.04 = 0.08 at
    # the first position, 0 at the second (same vector, scaled by 2 and 5): mean 0.04.
    # depth 2: orthogonal unit vectors at a 1x1 grid: 2.  Total 2.04.
    a1 = torch.tensor([[3.0, 1.0], [4.0, 1.0]]).view(1, 2, 1, 2)
    b1 = torch.tensor([[4.0, 5.0], [3.0, 5.0]]).view(1, 2, 1, 2)
    a2, b2 = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1), torch.tensor([0.0, 7.0]).view(1, 2, 1, 1)
    assert feature_distance([a1, a2], [b1, b2]).item() == pytest.approx(2.04, abs=1e-6)
    # per-channel weights (2, 1) at depth 1, (1, 1) at depth 2: (2·0.04 + 0.04) / 2 + 2 = 2.06
    w = [torch.tensor([2.0, 1.0]), torch.ones(2)]
    assert feature_distance([a1, a2], [b1, b2], w).item() == pytest.approx(2.06, abs=1e-6)


def test_feature_distance_scale_invariance_where_it_should_be():
    g = torch.Generator().manual_seed(1)
    fa = [torch.randn(2, 5, 4, 4, generator=g), torch.randn(2, 7, 2, 2, generator=g)]
    fb = [torch.randn(2, 5, 4, 4, generator=g), torch.randn(2, 7, 2, 2, generator=g)]
    d = feature_distance(fa, fb)
    # a positive scale per (sample, position), different for the two inputs and per depth: unchanged
    sa = [torch.rand(2, 1, *f.shape[-2:], generator=g) * 10 + 0.1 for f in fa]
    sb = [torch.rand(2, 1, *f.shape[-2:], generator=g) * 10 + 0.1 for f in fb]
    scaled = feature_distance([f * s for f, s in zip(fa, sa)], [f * s for f, s in zip(fb, sb)])
    assert torch.allclose(scaled, d, rtol=1e-5)
    # one channel rescaled (the same for both inputs): changes
    ch = torch.ones(1, 5, 1, 1)
    ch[0, 2] = 10.0
    assert not torch.allclose(feature_distance([fa[0] * ch, fa[1]], [fb[0] * ch, fb[1]]), d, rtol=1e-2)
    # unit normalisation: norm 1 everywhere
    assert torch.allclose(unit_normalize(fa[0]).norm(dim=1), torch.ones(2, 4, 4), atol=1e-6)


def test_perceptual_zero_for_identical_inputs_and_grows_with_noise(perceptual):
    x = images(8)
    assert perceptual(x, x).abs().max().item() < 1e-9
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x.shape, generator=g)
    d = [perceptual(x + s * noise, x).mean().item() for s in (0.01, 0.05, 0.2, 0.5)]
    assert all(a < b for a, b in zip(d, d[1:])), d
    assert d[0] > 0 and d[-1] <= 4 * len(perceptual.blocks)


def test_perceptual_rgb_and_symmetric(perceptual):
    x, y = images(2, c=3, seed=1), images(2, c=3, seed=2)
    assert torch.allclose(perceptual(x, y), perceptual(y, x), atol=1e-6)
    grey = images(2, c=1, seed=4)
    assert torch.allclose(perceptual(grey, x[:, :1]), perceptual(grey.expand(-1, 3, -1, -1),
                                                               x[:, :1].expand(-1, 3, -1, -1)), atol=1e-6)


def test_perceptual_network_frozen_gradients_reach_the_input(perceptual):
    assert not any(p.requires_grad for p in perceptual.parameters())
    perceptual.train()
    assert not perceptual.net.training
    x = images(2).requires_grad_(True)
    perceptual(x, images(2, seed=5)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in perceptual.parameters())


def test_perceptual_invariant_to_the_scale_of_a_tapped_layer(perceptual):
    """The last tap (block 15, no skip) scaled by s > 0 scales its features by s: d unchanged; scaling one of
    its output channels is not a scale of the feature vector: d changes."""
    x, y = images(3, seed=6), images(3, seed=7)
    d = perceptual(x, y)
    other = copy.deepcopy(perceptual)
    conv = other.net._blocks[15]._project_conv
    assert not other.net._blocks[15].has_skip
    with torch.no_grad():
        conv.weight.mul_(7.5)
        conv.bias.mul_(7.5)
    assert torch.allclose(other(x, y), d, rtol=1e-5)
    with torch.no_grad():
        conv.weight[:40].mul_(20.0)
        conv.bias[:40].mul_(20.0)
    assert not torch.allclose(other(x, y), d, rtol=1e-3)


def test_perceptual_taps_are_the_networks_activations_of_the_unit_range_image(perceptual):
    """features(x) for x in [-1, 1] = the shipped (unfused) network's block outputs on (x + 1)/2 at 64 px."""
    from efdit.metrics.features import load_effnet_lite0, resize
    net = load_effnet_lite0()
    taps = {}
    for i in perceptual.blocks:
        net._blocks[i].register_forward_hook(lambda m, inp, out, i=i: taps.__setitem__(i, out))
    x = images(2, c=3, seed=8)
    with torch.no_grad():
        net.features(resize((x + 1) / 2, 64))
        got = perceptual.features(x)
    assert [tuple(f.shape[-2:]) for f in got] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    for f, i in zip(got, perceptual.blocks):
        assert torch.allclose(f, taps[i], atol=1e-4, rtol=1e-4), i


def test_perceptual_blocks_are_checked():
    with pytest.raises(ValueError):
        PerceptualLoss(blocks=(4, 2))
    with pytest.raises(ValueError):
        PerceptualLoss(blocks=(0, 16))


# ---- discriminator and its losses ---------------------------------------------------------------------------------
def test_hinge_and_generator_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 − real) = (0, .5, 2) -> 5/6; relu(1 + fake) = (0, 1, 2.5) -> 7/6; ½(5/6 + 7/6) = 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(1.0)
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0    # confident and right
    assert generator_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)


@pytest.mark.parametrize("n_layers,out", [(1, 14), (2, 6), (3, 2)])
def test_patch_discriminator_shapes(n_layers, out):
    d = PatchDiscriminator(in_channels=3, channels=8, n_layers=n_layers)
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, out, out)
    assert receptive_field(n_layers) == {1: 16, 2: 34, 3: 70}[n_layers]
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2] * n_layers + [1, 1] and convs[-1].out_channels == 1


def test_patch_discriminator_receptive_field_is_what_it_says():
    """The gradient of one output logit reaches exactly a receptive_field-wide window of the input."""
    d = PatchDiscriminator(in_channels=1, channels=4, n_layers=2).eval()
    x = torch.randn(1, 1, 64, 64, requires_grad=True)
    out = d(x)
    out[0, 0, out.shape[-2] // 2, out.shape[-1] // 2].backward()
    rows = torch.nonzero(x.grad[0, 0].abs().sum(1)).flatten()
    assert int(rows.max() - rows.min() + 1) == receptive_field(2)


def test_adaptive_weight_by_hand_on_a_toy_decoder():
    """Decoder x̂ = W z (W: 2x3), L_rec = mean |x̂ − x|, L_G = −mean(a ⊙ x̂):
    ∇_W L_rec = sign(x̂ − x) zᵀ / 2, ∇_W L_G = −a zᵀ / 2 -> λ = ‖sign(x̂ − x)‖‖z‖/2 / (‖a‖‖z‖/2 + 1e-4)."""
    W = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]], requires_grad=True)
    z = torch.tensor([1.0, 2.0, -1.0])
    x = torch.tensor([0.3, -4.0])
    a = torch.tensor([3.0, -0.5])
    rec = W @ z
    l_rec = (rec - x).abs().mean()
    l_g = -(a * rec).mean()
    lam = adaptive_weight(l_rec, l_g, W)
    s = np.sign((W @ z - x).detach().numpy())
    zn, an = float(np.linalg.norm(z.numpy())), float(np.linalg.norm(a.numpy()))
    expected = np.linalg.norm(s) * zn / 2 / (an * zn / 2 + 1e-4)
    assert lam.item() == pytest.approx(expected, rel=1e-6)
    assert not lam.requires_grad
    (l_rec + lam * l_g).backward()          # the graphs were kept
    # clamped: an adversarial loss with no gradient at W gives ‖∇L_rec‖ / 1e-4, clamped to max_weight
    W.grad = None
    rec = W @ z
    lam = adaptive_weight((rec - x).abs().mean(), 0.0 * rec.sum(), W, max_weight=50.0)
    assert lam.item() == 50.0


@pytest.mark.parametrize("pw", [0.0, 0.3])
def test_dvae_loss_adaptive_weight_and_gradients_match_the_reference_formula(pw, perceptual):
    """DVAELoss takes ∂/∂x̂ once and builds ∇_w by the chain rule: same λ as adaptive_weight and the same DVAE
    gradients as backpropagating L_rec + λ·L_G + β·KL directly, L_rec = L1 + pw·d."""
    torch.manual_seed(0)
    model = tiny_dvae()
    obj = DVAELoss(1, kl_weight=1e-2, perceptual_weight=pw, disc_weight=0.7, disc_start=0, disc_channels=8,
                   disc_layers=1, perceptual=perceptual).eval()
    x = images(4, size=16)
    grain = torch.randint(0, 2, (4, 4, 4), generator=torch.Generator().manual_seed(1))

    def run(seed):
        torch.manual_seed(seed)
        return model(x, grain)

    rec, kl = run(5)
    terms = obj.generator_terms(x, rec, kl, step=0, last_layer=model.last_layer())
    model.zero_grad()
    terms["loss"].backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    rec, kl = run(5)
    l_rec = (rec - x).abs().mean() + (pw * perceptual(rec, x).mean() if pw else 0.0)
    g = generator_loss(obj.discriminator(rec))
    lam = adaptive_weight(l_rec, g, model.last_layer()) * 0.7
    loss = l_rec + 1e-2 * kl.mean() / x[0].numel() + lam * g
    assert terms["disc_lambda"].item() == pytest.approx(lam.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    model.zero_grad()
    obj.discriminator.zero_grad()
    loss.backward()
    for n, p in model.named_parameters():
        if n in fast:
            assert torch.allclose(fast[n], p.grad, rtol=1e-4, atol=1e-7), n
    assert set(fast) == {n for n, p in model.named_parameters() if p.grad is not None}


def test_perceptual_term_enters_the_loss_with_its_weight(perceptual):
    model = tiny_dvae()
    obj = DVAELoss(1, kl_weight=1e-3, perceptual_weight=0.25, perceptual=perceptual)
    x = images(3, size=16)
    rec, kl = model(x, torch.randint(0, 2, (3, 4, 4)))
    t = obj.generator_terms(x, rec, kl, 0)
    assert t["perceptual"].item() == pytest.approx(perceptual(rec, x).mean().item(), rel=1e-6)
    assert t["loss"].item() == pytest.approx((t["l1"] + 0.25 * t["perceptual"] + 1e-3 * t["kl"]).item(), rel=1e-6)


def test_the_generator_step_leaves_the_discriminator_alone():
    model = tiny_dvae()
    obj = DVAELoss(1, disc_weight=1.0, disc_channels=8, disc_layers=1)
    x = images(2, size=16)
    rec, kl = model(x, torch.ones(2, 4, 4, dtype=torch.long))
    obj.generator_terms(x, rec, kl, 0, model.last_layer())["loss"].backward()
    assert all(p.grad is None for p in obj.discriminator.parameters())
    assert all(p.requires_grad for p in obj.discriminator.parameters())


def test_warm_up_switch():
    assert [adversarial_factor(s, 3) for s in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]
    model = tiny_dvae()
    obj = DVAELoss(1, kl_weight=1e-6, disc_weight=1.0, disc_start=3, disc_channels=8, disc_layers=1)
    x = images(2, size=16)
    grain = torch.ones(2, 4, 4, dtype=torch.long)
    for step in range(3):
        torch.manual_seed(step)
        ref = model.loss(x, grain, 1e-6)
        torch.manual_seed(step)
        rec, kl = model(x, grain)
        terms = obj.generator_terms(x, rec, kl, step, model.last_layer())
        assert "g_loss" not in terms and torch.equal(terms["loss"], ref["loss"])
        assert obj.discriminator_terms(x, rec, step) is None
    torch.manual_seed(3)
    ref = model.loss(x, grain, 1e-6)
    torch.manual_seed(3)
    rec, kl = model(x, grain)
    terms = obj.generator_terms(x, rec, kl, 3, model.last_layer())
    assert "g_loss" in terms and terms["disc_lambda"] > 0 and not torch.equal(terms["loss"], ref["loss"])
    assert obj.discriminator_terms(x, rec, 3)["loss"] > 0


def test_everything_off_is_the_plain_dvae_loss_bit_for_bit():
    model = tiny_dvae()
    obj = DVAELoss(1, kl_weight=1e-6)
    assert obj.perceptual is None and obj.discriminator is None
    x, grain = images(3, size=16), torch.randint(0, 2, (3, 4, 4))
    torch.manual_seed(9)
    ref = model.loss(x, grain, 1e-6)
    torch.manual_seed(9)
    rec, kl = model(x, grain)
    terms = obj.generator_terms(x, rec, kl, 0)
    assert all(torch.equal(terms[k], ref[k]) for k in ("loss", "l1", "kl"))


# ---- the DVAE stage -------------------------------------------------------------------------------------------------
def synthetic_batch(n=4, size=16):
    gen = torch.Generator().manual_seed(0)

    def batch(g):
        return images(n, size=size, seed=int(torch.randint(0, 1000, (1,), generator=g))), \
            torch.randint(0, 2, (n, size // 4, size // 4), generator=gen)
    return batch


@pytest.mark.parametrize("steps,changed", [(3, False), (5, True)])
def test_stage_alternates_and_the_discriminator_waits_for_disc_start(tmp_path, steps, changed):
    from efdit.engine.d2it_train import dvae_objective, fit
    cfg = build_d2it_config("fmnist32", {"data.image_size": 16, "dvae.ch": 8, "dvae.groups": 4,
                                         "dvae.disc_weight": 0.5, "dvae.disc_start": 3, "dvae.disc_channels": 8,
                                         "dvae.disc_layers": 1})
    model = tiny_dvae()
    loss_fn, after_step, objective = dvae_objective(cfg, model, synthetic_batch(), 1)
    disc = objective.discriminator
    before = copy.deepcopy(disc.state_dict())
    fit("dvae", model, loss_fn, 1e-3, steps, 0, 0.999, tmp_path, 4, progress=False, log_every=1,
        after_step=after_step)
    params = dict(disc.named_parameters())
    assert all(torch.equal(before[k], v) for k, v in disc.state_dict().items()) != changed   # incl. BN statistics
    assert all(torch.equal(before[k], p) for k, p in params.items()) != changed              # the optimizer stepped
    log = [json.loads(line) for line in (tmp_path / "log-dvae.jsonl").read_text().splitlines()]
    assert ["d_loss" in r for r in log] == [s >= 3 for s in range(steps)]
    assert ["disc_lambda" in r for r in log] == [s >= 3 for s in range(steps)]


def test_cli_dvae_stage_with_both_terms_logs_them(tmp_path):
    from efdit.cli import main as cli_main
    run = tmp_path / "run"
    assert cli_main(["d2it", "train", "--stage", "prepare,dvae", "--preset", "fmnist32", "--run-dir", str(run),
                     "--data.dataset", "digits", "--data.image_size", "16", "--no-progress", "--dvae.steps", "20",
                     "--dvae.batch_size", "4", "--dvae.minutes", "0", "--dvae.perceptual_weight", "0.1",
                     "--dvae.disc_weight", "0.5", "--dvae.disc_start", "10", "--dvae.disc_layers", "1"]) == 0
    rec = json.loads((run / "log-dvae.jsonl").read_text().splitlines()[-1])
    assert {"perceptual", "d_loss", "disc_lambda", "g_loss", "logits_real"} <= set(rec)
    assert (run / "dvae.safetensors").is_file()


def test_cli_dvae_stage_default_never_builds_the_objective(tmp_path, monkeypatch):
    import efdit.engine.d2it_train as t
    from efdit.cli import main as cli_main

    def refuse(*a, **k):
        raise AssertionError("the default DVAE stage must not build the perceptual / adversarial objective")
    monkeypatch.setattr(t, "dvae_objective", refuse)
    assert cli_main(["d2it", "train", "--stage", "prepare,dvae", "--preset", "fmnist32", "--run-dir",
                     str(tmp_path / "run"), "--data.dataset", "digits", "--data.image_size", "16", "--no-progress",
                     "--dvae.steps", "2", "--dvae.batch_size", "4", "--dvae.minutes", "0"]) == 0


@pytest.mark.parametrize("key,value", [("dvae.perceptual_weight", -1), ("dvae.disc_weight", -0.1),
                                       ("dvae.disc_start", -5), ("dvae.disc_layers", 0),
                                       ("dvae.perceptual_blocks", "4,2"), ("dvae.perceptual_blocks", "0,16"),
                                       ("dvae.perceptual_resolution", 16), ("dvae.disc_weight_max", 0)])
def test_config_refuses_out_of_range_loss_options(key, value):
    with pytest.raises(EfditError, match=key):
        build_d2it_config("fmnist32", {key: value})
    build_d2it_config("fmnist32", {"dvae.perceptual_weight": 1.0, "dvae.disc_weight": 0.5})


# ---- PSNR / SSIM ----------------------------------------------------------------------------------------------------
def ssim_reference(a: np.ndarray, b: np.ndarray, size=11, sigma=1.5, k1=0.01, k2=0.03, L=1.0) -> float:
    """SSIM of two 2-D arrays by its definition: explicit weighted sums over every valid window."""
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-r ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (k1 * L) ** 2, (k2 * L) ** 2
    vals = []
    for i in range(a.shape[0] - size + 1):
        for j in range(a.shape[1] - size + 1):
            pa, pb = a[i:i + size, j:j + size], b[i:i + size, j:j + size]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_against_its_definition():
    rng = np.random.default_rng(0)
    a = rng.random((2, 2, 16, 14))
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    got = ssim(torch.from_numpy(a), torch.from_numpy(b))
    for n in range(2):
        want = np.mean([ssim_reference(a[n, c], b[n, c]) for c in range(2)])
        assert got[n].item() == pytest.approx(want, abs=1e-10)


def test_ssim_special_values():
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    # two flat images a, b: σ = 0, so SSIM = (2ab + C1) / (a² + b² + C1)
    a, b, c1 = 0.2, 0.7, 0.01 ** 2
    flat = dict(size=(1, 1, 12, 12), dtype=torch.float64)
    got = ssim(torch.full(fill_value=a, **flat), torch.full(fill_value=b, **flat)).item()
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-9)
    assert ssim(x, 1 - x).mean() < 0.2
    assert gaussian_window().sum().item() == pytest.approx(1.0) and len(gaussian_window()) == 11


def test_psnr_by_hand():
    x = torch.zeros(2, 1, 4, 4)
    y = x.clone()
    y[0] += 0.1                                  # MSE 0.01 -> 20 dB
    y[1, 0, 0, 0] = 1.0                          # MSE 1/16 -> 10·log10(16)
    got = psnr(x, y)
    assert got[0].item() == pytest.approx(20.0) and got[1].item() == pytest.approx(10 * math.log10(16))
