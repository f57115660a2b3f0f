"""The single-step API (guided_forward, ddpm/ddim/dpmpp2m steps) and sample() on any callable model."""
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
)
from efdit.diffusion.hooks.cache import DeltaDiTCache
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
@pytest.mark.parametrize("method,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("dpmpp2m", 0.0)])
def test_hand_written_loop_reproduces_sample_step_by_step(method, eta):
    m, y = tiered(), torch.arange(4)
    d = create_diffusion("8")
    g = Guidance("two_term", 3.0, 1.5)
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
            else:
                x, history = dpmpp2m_step(d, x, i, pred.x0, pred.eps, history)
            mine.append(x)
    assert len(mine) == len(ref_steps) == 8
    for k, (a, b) in enumerate(zip(mine, ref_steps)):
        assert torch.equal(a, b), f"step {k}"
    assert torch.equal(x, ref)


def test_the_documented_loop_with_sampler_step():
    """The loop of the samplers module docstring, as written there, equals sample() (DDPM: same generator)."""
    model, labels, N = tiny_model(), torch.arange(3), 3
    diffusion, guidance = create_diffusion("6"), Guidance("cfg", 2.0)
    for method, eta in (("ddpm", 0.0), ("ddim", 0.5), ("dpmpp2m", 0.0)):
        x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
        ref = sample(model, labels, diffusion, method=method, eta=eta, guidance=guidance, x_T=x_T, progress=False,
                     generator=torch.Generator().manual_seed(4))
        gen = torch.Generator().manual_seed(4)
        x, history = x_T, None
        with torch.inference_mode():
            for i in reversed(range(diffusion.num_timesteps)):
                t = diffusion.timestep_map[i].repeat(N)
                out = guided_forward(model, x, t, labels, guidance)
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
                      (lambda: sampler_step("dpmpp2m", d, x, 1, x, x, eta=0.5), "eta must be 0"),
                      (lambda: sampler_step("euler", d, x, 1, x, x), "ddpm | ddim | dpmpp2m")):
        with pytest.raises(ValueError, match=msg):
            call()


# ---------------------------------------------------------------------------------------------------
# sample() on any callable model
# ---------------------------------------------------------------------------------------------------
def linear_eps(x, t, y):
    """A callable ε-model with no label table: ε̂ = 0.5·x + 0.01·y."""
    return 0.5 * x + 0.01 * y.view(-1, 1, 1, 1).float()


def test_sample_takes_any_callable_model():
    d = create_diffusion("ddim10", learn_sigma=False)
    y = torch.arange(2)
    for method in ("ddpm", "ddim", "dpmpp2m"):
        out = sample(linear_eps, y, d, method=method, shape=(2, 3, 4, 4), progress=False,
                     generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 3, 4, 4) and torch.isfinite(out).all()
    x_T = torch.randn(2, 3, 4, 4)
    a = sample(linear_eps, y, d, method="ddim", x_T=x_T, progress=False)  # the shape comes from x_T
    b = sample(linear_eps, y, d, method="ddim", x_T=x_T, shape=(2, 3, 4, 4), progress=False)
    assert torch.equal(a, b)

    class Hook(SamplerHook):
        def on_step(self, state):
            return state.replace(x0=state.x0.clamp(-1, 1))

    out = sample(linear_eps, y, d, method="dpmpp2m", x_T=x_T, hooks=[Hook()], progress=False)
    assert out.abs().max() <= 1


def test_sample_errors_are_one_clear_sentence():
    d = create_diffusion("ddim10", learn_sigma=False)
    y = torch.arange(2)
    cases = (
        (dict(), "needs shape=\\(N, C, H, W\\) or x_T"),
        (dict(shape=(3, 1, 4, 4)), "N = 2, the number of labels"),
        (dict(shape=(2, 1, 4, 4), guidance=Guidance("cfg", 2.0)), "needs the model's label embedder"),
        (dict(shape=(2, 1, 4, 4), guidance=Guidance("super", 2.0)), "superclass labels"),
        (dict(shape=(2, 1, 4, 4), method="dpm"), "ddpm | ddim | dpmpp2m"),
        (dict(shape=(2, 1, 4, 4), method="dpmpp2m", eta=1.0), "eta must be 0"),
        (dict(shape=(2, 1, 4, 4), method="ddim", eta=-1.0), "eta must be a number ≥ 0"),
        (dict(shape=(2, 1, 4, 4), hooks=[DeltaDiTCache(2)]), "has no blocks"),
    )
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            sample(linear_eps, y, d, progress=False, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="callable"):
        sample(object(), y, d, shape=(2, 1, 4, 4), progress=False)
