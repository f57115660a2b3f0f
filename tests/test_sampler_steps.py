"""The single-step API (guided_forward, ddpm/ddim/dpmpp2m/unipc steps), guidance in a limited interval, and
sample() on any callable model."""
import math

import pytest
import torch
from tiny import randomize, tiny_model

from efdit.diffusion import (
    Guidance,
    SamplerHook,
    create_diffusion,
    ddim_step,
    ddpm_step,
    dpmpp2m_step,
    guided_forward,
    sample,
    sampler_step,
    unipc_step,
)
from efdit.diffusion.hooks.cache import DeltaDiTCache, FORACache, TaylorSeerCache
from efdit.models.embedders import TieredEmbedder

PARENT = torch.tensor([0, 0, 1, 1])


def tiered():
    return randomize(tiny_model(y_embedder=TieredEmbedder(4, 2, PARENT, 32, mode="sum", null_prob=0.1)))


def by_steps(m, y, d, **kw):
    """sample() and the x after every update (captured by `project`)."""
    seen = []
    out = sample(m, y, d, progress=False, project=lambda x: seen.append(x) or x, **kw)
    return out, seen


# ---------------------------------------------------------------------------------------------------
# a hand-written loop reproduces sample(), step by step
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("dpmpp2m", 0.0),
                                        ("unipc", 0.0)])
def test_hand_written_loop_reproduces_sample_step_by_step(method, eta):
    m, y = tiered(), torch.arange(4)
    d = create_diffusion("8")
    g = Guidance("two_term", 3.0, 1.5, interval=(100, 500))  # guided steps and conditional-only ones
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref, ref_steps = by_steps(m, y, d, method=method, eta=eta, guidance=g, clip_x0=True, x_T=x_T,
                              generator=torch.Generator().manual_seed(7))

    gen = torch.Generator().manual_seed(7)
    x, history, mine = x_T, None, []
    with torch.inference_mode():
        for i in reversed(range(d.num_timesteps)):
            t = torch.full((4,), int(d.timestep_map[i]))
            out = guided_forward(m, x, t, y, g)
            pred = d.p_mean_variance(out.float(), x, torch.full((4,), i), clip_x0=True)
            noise = lambda: torch.randn((4, 1, 8, 8), generator=gen)  # noqa: E731
            if method == "ddim":
                x = ddim_step(d, x, i, pred.x0, pred.eps, eta=eta, noise=noise)
            elif method == "ddpm":
                x = ddpm_step(d, x, i, pred.x0, pred.log_variance, noise=noise)
            elif method == "dpmpp2m":
                x, history = dpmpp2m_step(d, x, i, pred.x0, pred.eps, history)
            else:
                x, history = unipc_step(d, x, i, pred.x0, pred.eps, history)
            mine.append(x)
    assert len(mine) == len(ref_steps) == 8
    for k, (a, b) in enumerate(zip(mine, ref_steps)):
        assert torch.equal(a, b), f"step {k}"
    assert torch.equal(x, ref)


def test_the_documented_loop_with_sampler_step():
    """The loop of the samplers module docstring, as written there, equals sample() (DDPM: same generator)."""
    model, labels, N = tiny_model(), torch.arange(3), 3
    diffusion, guidance = create_diffusion("6"), Guidance("cfg", 2.0)
    for method, eta in (("ddpm", 0.0), ("ddim", 0.5), ("dpmpp2m", 0.0), ("unipc", 0.0)):
        x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
        ref = sample(model, labels, diffusion, method=method, eta=eta, guidance=guidance, x_T=x_T, progress=False,
                     generator=torch.Generator().manual_seed(4))
        gen = torch.Generator().manual_seed(4)
        x, history = x_T, None
        with torch.inference_mode():
            for i in reversed(range(diffusion.num_timesteps)):
                t = diffusion.timestep_map[i].repeat(N)
                out = guided_forward(model, x, t, labels, guidance.at(int(t[0])))
                pred = diffusion.p_mean_variance(out.float(), x, torch.full((N,), i))
                x, history = sampler_step(method, diffusion, x, i, pred.x0, pred.eps,
                                          log_variance=pred.log_variance, history=history, eta=eta,
                                          noise=lambda: torch.randn((N, 1, 8, 8), generator=gen))
        assert torch.equal(x, ref), method


def test_ddim_and_ddpm_steps_by_hand():
    d = create_diffusion("5", learn_sigma=False)
    g = torch.Generator().manual_seed(0)
    x, x0, eps, z = (torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64) for _ in range(4))
    i = 3
    ab, ab_prev = float(d.alphas_cumprod[i]), float(d.alphas_cumprod[i - 1])
    torch.testing.assert_close(ddim_step(d, x, i, x0, eps), math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps,
                               rtol=1e-12, atol=1e-12)
    eta = 0.7
    sig = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    expect = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sig ** 2) * eps + sig * z
    torch.testing.assert_close(ddim_step(d, x, i, x0, eps, eta=eta, noise=z), expect, rtol=1e-12, atol=1e-12)
    # DDPM: posterior mean (β, ᾱ written out) plus exp(½ log σ̂²)·z; no noise into the clean end
    beta = 1 - ab / ab_prev
    mean = beta * math.sqrt(ab_prev) / (1 - ab) * x0 + (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab) * x
    logvar = torch.full_like(x, -3.0)
    got = ddpm_step(d, x.float(), i, x0.float(), logvar.float(), noise=z.float())
    torch.testing.assert_close(got, (mean + math.exp(-1.5) * z).float(), rtol=1e-5, atol=1e-6)
    drawn = []
    noise = lambda: drawn.append(1) or z  # noqa: E731
    ddpm_step(d, x, 0, x0, logvar, noise=noise)
    ddim_step(d, x, 2, x0, eps, eta=0.0, noise=noise)
    ddim_step(d, x, 0, x0, eps, eta=1.0, noise=noise)
    assert drawn == []  # noise is drawn only by steps that inject it
    ddpm_step(d, x, 1, x0, logvar, noise=noise)
    assert drawn == [1]


def test_step_api_rejects_bad_input_in_one_sentence():
    d, x = create_diffusion("4"), torch.zeros(1, 1, 2, 2)
    for call, msg in ((lambda: ddim_step(d, x, 4, x, x), r"chain index must be in \[0, 3\], got 4"),
                      (lambda: sampler_step("ddpm", d, x, 1, x, x), "log_variance"),
                      (lambda: sampler_step("unipc", d, x, 1, x, x, eta=0.5), "eta must be 0"),
                      (lambda: sampler_step("euler", d, x, 1, x, x), "ddpm | ddim | dpmpp2m | unipc")):
        with pytest.raises(ValueError, match=msg):
            call()


# ---------------------------------------------------------------------------------------------------
# guidance in a limited interval
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["none", "cfg", "super", "two_term"])
def test_interval_inside_is_plain_guidance_and_outside_the_conditional_output(mode):
    m = tiered()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    plain = Guidance(mode, 3.0, 1.5)
    limited = Guidance(mode, 3.0, 1.5, interval=(300, 600))
    for t0 in (300, 450, 600):  # inside, both ends included
        t = torch.full((4,), t0)
        assert torch.equal(guided_forward(m, x, t, y, limited), guided_forward(m, x, t, y, plain))
    for t0 in (0, 299, 601, 999):
        t = torch.full((4,), t0)
        assert torch.equal(guided_forward(m, x, t, y, limited), m(x, t, y))
    # whole chains: an interval holding every timestep is plain guidance, one holding none is mode "none"
    d = create_diffusion("10")  # t = 999, 888, …, 111, 0
    run = lambda g: sample(m, y, d, method="ddim", guidance=g, progress=False,  # noqa: E731
                           generator=torch.Generator().manual_seed(3))
    assert torch.equal(run(Guidance(mode, 3.0, 1.5, interval=(0, 999))), run(plain))
    assert torch.equal(run(Guidance(mode, 3.0, 1.5, interval=(1, 110))), run(Guidance()))


@pytest.mark.parametrize("mode,k", [("cfg", 2), ("super", 2), ("two_term", 3)])
def test_interval_runs_n_rows_outside_and_k_n_inside(mode, k):
    m, y = tiered(), torch.arange(4)
    rows = []
    m.register_forward_pre_hook(lambda mod, args: rows.append((int(args[1][0]), args[0].shape[0])))
    sample(m, y, create_diffusion("10"), method="ddim", guidance=Guidance(mode, 2.0, interval=(300, 600)),
           progress=False)
    expect = [(t, k * 4 if 300 <= t <= 600 else 4) for t in (999, 888, 777, 666, 555, 444, 333, 222, 111, 0)]
    assert rows == expect
    rows.clear()  # guided_forward alone: a batch outside the interval is one N-row forward
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 700)
    guided_forward(m, x, t, y, Guidance(mode, 2.0, interval=(300, 600)))
    guided_forward(m, x, t - 300, y, Guidance(mode, 2.0, interval=(300, 600)))
    assert rows == [(700, 4), (400, k * 4)]


def test_interval_with_rows_on_both_sides():
    """A batch whose rows have different t: guided rows inside, the conditional branch outside."""
    m = tiny_model()
    x, y, t = torch.randn(3, 1, 8, 8), torch.arange(3), torch.tensor([100, 500, 900])
    g = Guidance("cfg", 4.0, interval=(400, 600))
    out = guided_forward(m, x, t, y, g)
    full = guided_forward(m, x, t, y, Guidance("cfg", 4.0))
    cond = m(x, t, y)
    torch.testing.assert_close(out[1], full[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[[0, 2]], cond[[0, 2]], rtol=1e-5, atol=1e-5)


def test_interval_keeps_hooks_and_caches_working():
    m, y = tiny_model(depth=3), torch.arange(4)
    g = Guidance("cfg", 2.0, interval=(300, 700))
    for method in ("ddim", "unipc"):
        plain = sample(m, y, create_diffusion("8"), method=method, guidance=g, progress=False,
                       generator=torch.Generator().manual_seed(0))
        for cache in (FORACache(1), DeltaDiTCache(1, blocks=1), TaylorSeerCache(1, order=2)):
            out = sample(m, y, create_diffusion("8"), method=method, guidance=g, hooks=[cache], progress=False,
                         generator=torch.Generator().manual_seed(0))
            assert torch.equal(out, plain), cache
        cache = FORACache(2)  # skipping across the switch between 2N- and N-row batches stays finite
        out = sample(m, y, create_diffusion("8"), method=method, guidance=g, hooks=[cache], progress=False)
        assert torch.isfinite(out).all() and cache.skipped > 0


def test_guidance_validation_is_one_sentence():
    for kw, msg in (({"interval": (5, 2)}, "0 <= t_lo <= t_hi"), ({"interval": (-1, 3)}, "0 <= t_lo"),
                    ({"interval": (1.5, 3)}, "integer"), ({"interval": (1, 2, 3)}, "two integer"),
                    ({"scale": float("nan")}, "scale must be a finite number"),
                    ({"scale_super": "2"}, "scale_super must be a finite number")):
        with pytest.raises(ValueError, match=msg):
            Guidance("cfg", **{"scale": 2.0, **kw})
    assert Guidance("cfg", 2.0, interval=[10, 20]).interval == (10, 20)
    g = Guidance("cfg", 2.0, interval=(10, 20))
    assert g.at(15) == Guidance("cfg", 2.0) and g.at(21) == Guidance() and g.branches == 2


# ---------------------------------------------------------------------------------------------------
# sample() on any callable model
# ---------------------------------------------------------------------------------------------------
def linear_eps(x, t, y):
    """A callable ε-model with no label table: ε̂ = 0.5·x + 0.01·y."""
    return 0.5 * x + 0.01 * y.view(-1, 1, 1, 1).float()


def test_sample_takes_any_callable_model():
    d = create_diffusion("ddim10", learn_sigma=False)
    y = torch.arange(2)
    for method in ("ddpm", "ddim", "dpmpp2m", "unipc"):
        out = sample(linear_eps, y, d, method=method, shape=(2, 3, 4, 4), progress=False,
                     generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 3, 4, 4) and torch.isfinite(out).all()
    x_T = torch.randn(2, 3, 4, 4)
    a = sample(linear_eps, y, d, method="ddim", x_T=x_T, progress=False)  # the shape comes from x_T
    b = sample(linear_eps, y, d, method="ddim", x_T=x_T, shape=(2, 3, 4, 4), progress=False)
    assert torch.equal(a, b)
    # guidance with an interval that holds no timestep of the chain needs no label table
    g = Guidance("cfg", 3.0, interval=(1, 17))  # ddim10: t = 0, 100, …, 900
    assert torch.equal(sample(linear_eps, y, d, method="ddim", x_T=x_T, guidance=g, progress=False), a)

    class Hook(SamplerHook):
        def on_step(self, state):
            return state.replace(x0=state.x0.clamp(-1, 1))

    out = sample(linear_eps, y, d, method="unipc", x_T=x_T, hooks=[Hook()], progress=False)
    assert out.abs().max() <= 1


def test_sample_errors_are_one_clear_sentence():
    d = create_diffusion("ddim10", learn_sigma=False)
    y = torch.arange(2)
    cases = (
        (dict(), "needs shape=\\(N, C, H, W\\) or x_T"),
        (dict(shape=(3, 1, 4, 4)), "N = 2, the number of labels"),
        (dict(shape=(2, 1, 4, 4), guidance=Guidance("cfg", 2.0)), "needs the model's label embedder"),
        (dict(shape=(2, 1, 4, 4), guidance=Guidance("super", 2.0, interval=(0, 50))), "superclass labels"),
        (dict(shape=(2, 1, 4, 4), method="dpm"), "ddpm | ddim | dpmpp2m | unipc"),
        (dict(shape=(2, 1, 4, 4), method="unipc", eta=1.0), "eta must be 0"),
        (dict(shape=(2, 1, 4, 4), method="ddim", eta=-1.0), "eta must be a number ≥ 0"),
        (dict(shape=(2, 1, 4, 4), hooks=[DeltaDiTCache(2)]), "has no blocks"),
    )
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            sample(linear_eps, y, d, progress=False, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="callable"):
        sample(object(), y, d, shape=(2, 1, 4, 4), progress=False)
