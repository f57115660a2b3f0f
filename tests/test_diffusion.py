"""Gaussian diffusion and samplers against hand-computed values and invariants."""
import math

import numpy as np
import pytest
import torch
from tiny import tiny_model

from efdit.diffusion import Guidance, SamplerHook, create_diffusion, get_betas, sample, space_timesteps
from efdit.models.dit import DiT


def alpha_bar_by_hand(t):
    betas = [1e-4 + (0.02 - 1e-4) * s / 999 for s in range(t + 1)]
    return math.prod(1 - b for b in betas), betas


def test_linear_schedule_endpoints_and_snr_band():
    b = get_betas("linear", 1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    ab = np.cumprod(1 - b)
    snr = ab / (1 - ab)
    # the perceptual band of efdit.md §2.2: SNR in [1e-2, 1) is exactly t in [259, 673]
    assert snr[258] == pytest.approx(1.00098, abs=1e-5) and snr[259] == pytest.approx(0.99050, abs=1e-5)
    assert snr[673] >= 1e-2 > snr[674]
    cos = get_betas("cosine", 1000)
    assert cos.max() <= 0.999 and np.all(cos > 0)


def test_q_sample_and_posterior_by_hand():
    d = create_diffusion()
    x0, noise = torch.tensor([[0.5, -0.25]]), torch.tensor([[1.0, 2.0]])
    t = torch.tensor([2])
    ab, betas = alpha_bar_by_hand(2)
    ab_prev, _ = alpha_bar_by_hand(1)
    xt = d.q_sample(x0, t, noise)
    expect = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise
    torch.testing.assert_close(xt, expect, rtol=1e-6, atol=1e-7)
    mean, var, logvar = d.q_posterior(x0, xt, t)
    beta = betas[2]
    c1 = beta * math.sqrt(ab_prev) / (1 - ab)
    c2 = (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)
    torch.testing.assert_close(mean, c1 * x0 + c2 * xt, rtol=1e-6, atol=1e-7)
    assert var.item() == pytest.approx(beta * (1 - ab_prev) / (1 - ab), rel=1e-6)
    assert logvar.item() == pytest.approx(math.log(beta * (1 - ab_prev) / (1 - ab)), rel=1e-6)


def test_respacing_keeps_alpha_bar_and_maps_timesteps():
    full = create_diffusion()
    for spec, n in (("250", 250), ("ddim50", 50), ("10,20", 30)):
        d = create_diffusion(spec)
        assert d.num_timesteps == n
        kept = d.timestep_map
        torch.testing.assert_close(d.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-12, atol=0)
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    kept = space_timesteps(1000, "250")
    assert kept == [round(i * 999 / 249) for i in range(250)]
    assert sum(1 for t in kept if 259 <= t <= 673) == 103  # efdit.md §2.2


def test_learned_range_variance_interpolates_log_beta_and_log_beta_tilde():
    d = create_diffusion()
    x = torch.zeros(1, 1, 2, 2)
    t = torch.tensor([10])
    for v, table in ((1.0, d.log_betas), (-1.0, d.posterior_log_variance_clipped)):
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1)
        pred = d.p_mean_variance(out, x, t)
        torch.testing.assert_close(pred.log_variance, torch.full_like(x, float(table[10])))


def test_v_prediction_recovers_x0_and_eps():
    d = create_diffusion(prediction="v", learn_sigma=False)
    x0, eps, t = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.tensor([100, 900])
    xt = d.q_sample(x0, t, eps)
    pred = d.p_mean_variance(d.v_target(x0, t, eps), xt, t)
    torch.testing.assert_close(pred.x0, x0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pred.eps, eps, rtol=1e-4, atol=1e-5)


def test_hybrid_loss_is_finite_and_has_both_terms():
    d = create_diffusion()
    m = tiny_model()
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    terms = d.training_losses(m, x0, torch.tensor([0, 1, 500, 999]), dict(y=torch.arange(4)))
    assert set(terms) == {"loss", "mse", "vb"}
    assert torch.isfinite(terms["loss"]).all() and (terms["vb"][1:] >= 0).all()
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_weighted_mse_matches_formula():
    d = create_diffusion(learn_sigma=False, loss="mse")
    m = tiny_model(learn_sigma=False)
    x0, noise, t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([5, 600])
    W = torch.rand(2, 1, 8, 8)
    out = m(d.q_sample(x0, t, noise), t, torch.tensor([0, 1]))
    got = d.training_losses(m, x0, t, dict(y=torch.tensor([0, 1])), noise=noise, weight=W)["mse"]
    torch.testing.assert_close(got, ((noise - out) ** 2 * W).sum((1, 2, 3)) / 1)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    d = create_diffusion()
    m = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=4)
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    t, noise, y = torch.randint(0, 1000, (8,)), torch.randn(8, 1, 8, 8), torch.arange(8) % 4
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    m.train()
    m.y_embedder.dropout_prob = 0.0
    losses = []
    for _ in range(300):
        loss = d.training_losses(m, x0, t, dict(y=y), noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_guidance_combinations():
    c, s, n = torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([-1.0])
    assert Guidance("cfg", 4.0).combine([c, n]).item() == pytest.approx(-1 + 4 * 4)
    assert Guidance("super", 2.0).combine([c, s]).item() == pytest.approx(1 + 2 * 2)
    two = lambda ss, sb: Guidance("two_term", sb, ss).combine([c, s, n]).item()  # noqa: E731
    assert two(1.0, 3.0) == pytest.approx(Guidance("super", 3.0).combine([c, s]).item())
    assert two(3.0, 3.0) == pytest.approx(Guidance("cfg", 3.0).combine([c, n]).item())
    assert two(1.0, 1.0) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        Guidance("bogus")


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_sampling_is_deterministic_given_a_seed(method):
    m, d = tiny_model(), create_diffusion("10")
    y = torch.arange(4)
    a = sample(m, y, d, method=method, generator=torch.Generator().manual_seed(3), progress=False)
    b = sample(m, y, d, method=method, generator=torch.Generator().manual_seed(3), progress=False)
    assert torch.equal(a, b)


def test_ddim_eta0_is_deterministic_given_x_T():
    m, d = tiny_model(), create_diffusion("ddim10")
    y, xT = torch.arange(4), torch.randn(4, 1, 8, 8)
    a = sample(m, y, d, method="ddim", x_T=xT, generator=torch.Generator().manual_seed(1), progress=False)
    b = sample(m, y, d, method="ddim", x_T=xT, generator=torch.Generator().manual_seed(2), progress=False)
    assert torch.equal(a, b)
    c = sample(m, y, d, method="ddim", eta=1.0, x_T=xT, generator=torch.Generator().manual_seed(2), progress=False)
    assert not torch.allclose(a, c)


def test_cfg_scale_one_equals_conditional():
    m, d = tiny_model(), create_diffusion("ddim10")
    y, xT = torch.arange(4), torch.randn(4, 1, 8, 8)
    cond = sample(m, y, d, method="ddim", x_T=xT, progress=False)
    g1 = sample(m, y, d, method="ddim", x_T=xT, guidance=Guidance("cfg", 1.0), progress=False)
    torch.testing.assert_close(g1, cond, rtol=1e-4, atol=1e-4)
    g4 = sample(m, y, d, method="ddim", x_T=xT, guidance=Guidance("cfg", 4.0), progress=False)
    assert not torch.allclose(g4, cond, atol=1e-3)


def test_cfg_uses_one_batched_forward_and_null_id_from_num_classes():
    m, d = tiny_model(num_classes=7), create_diffusion("ddim3")
    seen = []
    m.register_forward_pre_hook(lambda mod, args: seen.append(args[2].clone()))
    sample(m, torch.tensor([0, 6]), d, method="ddim", guidance=Guidance("cfg", 2.0), progress=False)
    assert len(seen) == 3  # one forward per step
    assert seen[0].tolist() == [0, 6, 7, 7]


def test_first3_channels_guides_only_three():
    from efdit.diffusion.samplers import _model_forward
    m = tiny_model(in_channels=4)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.tensor([0, 1])
    cond = m(x, t, y)
    null = m(x, t, m.y_embedder.null_labels(y))
    for channels, n in (("all", 4), ("first3", 3)):
        out = _model_forward(m, x, t, y, Guidance("cfg", 3.0, channels=channels), {}, None, 4)
        expect = torch.cat([null[:, :n] + 3.0 * (cond[:, :n] - null[:, :n]), cond[:, n:]], 1)
        torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    assert out.shape == (2, 8, 8, 8)  # learned-Σ channels come from the conditional branch


class Identity(SamplerHook):
    def __init__(self):
        self.resets, self.begins, self.steps = 0, [], []

    def reset(self):
        self.resets += 1

    def on_step_begin(self, step_index, t):
        self.begins.append((step_index, int(t[0])))

    def on_step(self, state):
        self.steps.append(state.step_index)
        return state


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_identity_hook_gives_bit_identical_samples(method):
    m, d = tiny_model(), create_diffusion("10")
    y = torch.arange(4)
    a = sample(m, y, d, method=method, generator=torch.Generator().manual_seed(5), progress=False)
    h = Identity()
    b = sample(m, y, d, method=method, generator=torch.Generator().manual_seed(5), hooks=[h], progress=False)
    assert torch.equal(a, b)
    assert h.resets == 1 and h.steps == list(range(10))
    assert h.begins[0] == (0, int(d.timestep_map[-1])) and h.begins[-1] == (9, 0)


def test_hook_replacing_x0_changes_next_x_t_by_the_formula():
    m, d = tiny_model(), create_diffusion("ddim5")
    y, xT = torch.arange(2), torch.randn(2, 1, 8, 8)
    new_x0 = torch.full((2, 1, 8, 8), 0.3)

    class SetX0(SamplerHook):
        def on_step(self, state):
            self.state = state
            return state.replace(x0=new_x0)

    class Stop(Exception):
        pass

    h = SetX0()
    captured = {}

    def project(x):  # runs right after the first update: capture x_{t-1} and stop
        captured["x"] = x
        raise Stop

    with pytest.raises(Stop):
        sample(m, y, d, method="ddim", x_T=xT, hooks=[h], project=project, progress=False)
    ab, ab_prev = h.state.alpha_bar, h.state.alpha_bar_prev
    eps = (xT - math.sqrt(ab) * new_x0) / math.sqrt(1 - ab)
    expect = math.sqrt(ab_prev) * new_x0 + math.sqrt(1 - ab_prev) * eps
    torch.testing.assert_close(captured["x"], expect, rtol=1e-5, atol=1e-5)

    class Both(SamplerHook):
        def on_step(self, state):
            return state.replace(x0=state.x0 * 1, eps=state.eps * 1)

    with pytest.raises(RuntimeError, match="both"):
        sample(m, y, d, method="ddim", hooks=[Both()], progress=False)


def test_ddpm_hook_x0_uses_posterior_mean():
    m, d = tiny_model(learn_sigma=False), create_diffusion("4", learn_sigma=False)
    xT = torch.randn(2, 1, 8, 8)
    new_x0 = torch.full((2, 1, 8, 8), -0.2)

    class SetX0(SamplerHook):
        def on_step(self, state):
            self.i = state.chain_index
            return state.replace(x0=new_x0)

    h = SetX0()
    out = {}

    def project(x):
        out.setdefault("x", x)
        return x

    g = torch.Generator().manual_seed(0)
    sample(m, torch.arange(2), d, method="ddpm", x_T=xT, hooks=[h], project=project, generator=g, progress=False)
    t = torch.full((2,), 3)
    mean, _, logvar = d.q_posterior(new_x0, xT, t)
    z = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["x"], mean + torch.exp(0.5 * logvar) * z, rtol=1e-5, atol=1e-5)
