"""UniPC (bh2, data prediction): its update against the paper's formulas written out, exactness on polynomial data
predictions, and convergence to DDIM-250 on the same respaced chain as DDIM and DPM-Solver++(2M)."""
import math

import pytest
import torch
from tiny import randomize, tiny_model

from efdit.diffusion import SAMPLERS, Guidance, SamplerHook, UniPCHistory, create_diffusion, sample, unipc_update
from efdit.diffusion.hooks.cache import DeltaDiTCache, FORACache, TaylorSeerCache
from efdit.diffusion.hooks.hrig import HRIG
from efdit.diffusion.solvers import dpmpp2m_update
from efdit.models.embedders import TieredEmbedder


def lam(a):
    return math.log(math.sqrt(a) / math.sqrt(1 - a))


def run(m, y, steps, method, guidance=Guidance("cfg", 2.0), seed=5, **kw):
    return sample(m, y, create_diffusion(steps), method=method, guidance=guidance, progress=False,
                  generator=torch.Generator().manual_seed(seed), **kw)


def test_unipc_update_by_hand():
    """UniC-2 then UniP-2, from ᾱ = 0.2, 0.35 (history) and 0.6 (this step) to 0.8, written out with α, σ, λ."""
    g = torch.Generator().manual_seed(0)
    x_s1, m_s2, m_s1, m_s, x_p = (torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(5))
    a_s2, a_s1, a_s, a_t = 0.2, 0.35, 0.6, 0.8
    # the previous step s1 -> s left its DDIM part x̃_s (from x_s1) and its two points
    h_prev = lam(a_s) - lam(a_s1)
    base_s = math.sqrt(1 - a_s) / math.sqrt(1 - a_s1) * x_s1 + math.sqrt(a_s) * (1 - math.exp(-h_prev)) * m_s1
    hist = UniPCHistory(base_s, (m_s1, m_s2), (lam(a_s1), lam(a_s2)), 2, a_s)
    eps = (x_p - math.sqrt(a_s) * m_s) / math.sqrt(1 - a_s)
    out, new = unipc_update(x_p, m_s, eps, a_s, a_t, hist)

    # corrector UniC-2 of s1 -> s: B = e^{−h} − 1, b_j = j!·(e^{−h} − Σ_{n≤j} (−h)^n/n!)/(−h)^j / B
    h, u = h_prev, -h_prev
    B = math.exp(u) - 1
    b1 = (math.exp(u) - 1 - u) / u / B
    b2 = 2 * (math.exp(u) - 1 - u - u * u / 2) / u ** 2 / B
    r1 = (lam(a_s2) - lam(a_s1)) / h
    rho1 = (b1 - b2) / (1 - r1)   # ρ1 + ρt = b1, r1·ρ1 + ρt = b2
    rho_t = b1 - rho1
    x_c = base_s - math.sqrt(a_s) * B * (rho1 * (m_s2 - m_s1) / r1 + rho_t * (m_s - m_s1))
    # predictor UniP-2 of s -> t from the corrected x, ρ = ½
    h = lam(a_t) - lam(a_s)
    r = (lam(a_s1) - lam(a_s)) / h
    ddim_part = math.sqrt(1 - a_t) / math.sqrt(1 - a_s) * x_c + math.sqrt(a_t) * (1 - math.exp(-h)) * m_s
    expect = ddim_part - math.sqrt(a_t) * (math.exp(-h) - 1) * 0.5 * (m_s1 - m_s) / r
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new.base, ddim_part, rtol=1e-12, atol=1e-12)
    assert new.x0[0] is m_s and new.x0[1] is m_s1 and new.order == 2 and new.alpha_bar_next == a_t
    assert new.lam == pytest.approx((lam(a_s), lam(a_s1)), abs=1e-14)

    # without the corrector UniP-2 is DPM-Solver++(2M)
    no_c, _ = unipc_update(x_p, m_s, eps, a_s, a_t, hist, corrector=False)
    two_m, _ = dpmpp2m_update(x_p, m_s, eps, a_s, a_t, (m_s1, lam(a_s1)))
    torch.testing.assert_close(no_c, two_m, rtol=1e-12, atol=1e-12)
    # no history: DDIM (η = 0), bit for bit; the clean end: x̂0
    first, h1 = unipc_update(x_p, m_s, eps, a_s, a_t, None)
    assert torch.equal(first, math.sqrt(a_t) * m_s + math.sqrt(1 - a_t) * eps) and h1.order == 1
    last, h_end = unipc_update(x_p, m_s, eps, a_s, 1.0, hist)
    assert last is m_s and h_end is None
    # UniC-1 (ρ = ½) after a first-order step
    hist1 = UniPCHistory(base_s, (m_s1,), (lam(a_s1),), 1, a_s)
    x_c1 = base_s + math.sqrt(a_s) * (1 - math.exp(-h_prev)) * 0.5 * (m_s - m_s1)
    out1, _ = unipc_update(x_p, m_s, eps, a_s, a_t, hist1, order=1)
    expect1 = math.sqrt(1 - a_t) / math.sqrt(1 - a_s) * x_c1 + math.sqrt(a_t) * (1 - math.exp(-h)) * m_s
    torch.testing.assert_close(out1, expect1, rtol=1e-12, atol=1e-12)
    # a history from another chain, or another order, is refused
    with pytest.raises(ValueError, match="same chain"):
        unipc_update(x_p, m_s, eps, 0.55, a_t, hist)
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        unipc_update(x_p, m_s, eps, a_s, a_t, hist, order=4)


def exact_step(x_s, a_s, a_t, coef):
    """The data-prediction ODE solved exactly for x̂0(λ) = Σ_n coef[n]·λ^n:
    x_t = (σ_t/σ_s)·x_s + σ_t·∫_{λ_s}^{λ_t} e^λ x̂0(λ) dλ, with ∫ e^λ P = e^λ·Σ_k (−1)^k P^(k)."""
    def F(l):
        return math.exp(l) * sum((-1) ** k * sum(c * math.perm(n, k) * l ** (n - k)
                                                  for n, c in enumerate(coef) if n >= k)
                                 for k in range(len(coef)))
    return math.sqrt(1 - a_t) / math.sqrt(1 - a_s) * x_s + math.sqrt(1 - a_t) * (F(lam(a_t)) - F(lam(a_s)))


@pytest.mark.parametrize("part,order,degree", [("predictor", 3, 2), ("corrector", 2, 2), ("corrector", 3, 3)])
def test_unipc_is_exact_for_polynomial_data_predictions(part, order, degree):
    """With as many coefficients as equations, UniP-p is exact for x̂0 of degree p − 1 in λ and UniC-p for degree p
    (the coefficient system, checked against the ODE's own solution rather than against its formula)."""
    g = torch.Generator().manual_seed(1)
    coef = [torch.randn(4, generator=g, dtype=torch.float64) for _ in range(degree + 1)]
    x0_at = lambda a: sum(c * lam(a) ** n for n, c in enumerate(coef))  # noqa: E731
    x_s = torch.randn(4, generator=g, dtype=torch.float64)
    older, a_s, a_t = [0.35, 0.2, 0.1], 0.6, 0.8
    if part == "predictor":
        hist = UniPCHistory(x_s, tuple(x0_at(a) for a in older[:order - 1]), tuple(lam(a) for a in older[:order - 1]),
                            order - 1, a_s)
        eps = (x_s - math.sqrt(a_s) * x0_at(a_s)) / math.sqrt(1 - a_s)
        out, _ = unipc_update(x_s, x0_at(a_s), eps, a_s, a_t, hist, order=order, corrector=False)
        torch.testing.assert_close(out, exact_step(x_s, a_s, a_t, coef), rtol=1e-12, atol=1e-12)
        return
    # corrector of the step s -> t (points s and older), read back from the DDIM part of the next step t -> 0.9
    pts = [a_s] + older[:order - 1]
    h = lam(a_t) - lam(a_s)
    base = math.sqrt(1 - a_t) / math.sqrt(1 - a_s) * x_s + math.sqrt(a_t) * (1 - math.exp(-h)) * x0_at(a_s)
    hist = UniPCHistory(base, tuple(x0_at(a) for a in pts), tuple(lam(a) for a in pts), order, a_t)
    _, nxt = unipc_update(torch.zeros(4), x0_at(a_t), torch.zeros(4), a_t, 0.9, hist, order=1)
    h2 = lam(0.9) - lam(a_t)
    x_c = (nxt.base - math.sqrt(0.9) * (1 - math.exp(-h2)) * x0_at(a_t)) * math.sqrt(1 - a_t) / math.sqrt(1 - 0.9)
    torch.testing.assert_close(x_c, exact_step(x_s, a_s, a_t, coef), rtol=1e-12, atol=1e-12)


def test_unipc_converges_to_ddim250_faster_than_dpmpp2m():
    """Fixed tiny DiT (random, non-zero weights), CFG, no clipping, the same x_T: the error to DDIM-250 falls as
    the steps grow, and at 10 steps it is below DPM-Solver++(2M)'s (and far below DDIM's)."""
    m, y = tiny_model(seed=1), torch.arange(4)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = run(m, y, "250", "ddim", x_T=x_T)
    err = {s: (run(m, y, str(s), "unipc", x_T=x_T) - ref).abs().max().item() for s in (5, 10, 20, 50)}
    err_2m = (run(m, y, "10", "dpmpp2m", x_T=x_T) - ref).abs().max().item()
    err_ddim = (run(m, y, "10", "ddim", x_T=x_T) - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err[50] < err[20] < err[10] < err[5]
    assert err[50] < 0.05 * err[5] and err[50] < 0.005 * scale
    assert err[10] < 0.95 * err_2m and err[10] < 0.6 * err_ddim


@pytest.mark.parametrize("mode", ["none", "cfg", "super", "two_term"])
def test_unipc_with_every_guidance_mode(mode):
    parent = torch.tensor([0, 0, 1, 1])
    m = randomize(tiny_model(y_embedder=TieredEmbedder(4, 2, parent, 32, mode="sum", null_prob=0.1)))
    y, g = torch.arange(4), Guidance(mode, 3.0, scale_super=1.5)
    # two chain steps: DDIM into t = 0, then the clean end (x̂0 at t = 0; the correction there is discarded)
    assert torch.equal(run(m, y, "2", "unipc", guidance=g), run(m, y, "2", "ddim", guidance=g))
    a, b = run(m, y, "5", "unipc", guidance=g), run(m, y, "5", "dpmpp2m", guidance=g)
    assert torch.isfinite(a).all() and not torch.equal(a, b)


def test_unipc_keeps_the_hook_contract():
    m, y = tiny_model(depth=3), torch.arange(4)

    class ConstX0(SamplerHook):
        def __init__(self, c):
            self.c = c

        def on_step(self, state):
            return state.replace(x0=torch.full_like(state.x0, self.c))

    # a constant x̂0 is integrated exactly by every data-prediction solver
    assert torch.equal(run(m, y, "6", "unipc", hooks=[ConstX0(0.0)]), torch.zeros(4, 1, 8, 8))
    torch.testing.assert_close(run(m, y, "6", "unipc", hooks=[ConstX0(0.4)]),
                               run(m, y, "6", "ddim", hooks=[ConstX0(0.4)]), rtol=1e-5, atol=1e-5)
    plain = run(m, y, "8", "unipc", clip_x0=True)
    assert torch.equal(run(m, y, "8", "unipc", hooks=[HRIG(gain=0.0)], clip_x0=True), plain)
    h = HRIG(gain=-0.5)
    assert not torch.equal(run(m, y, "8", "unipc", hooks=[h], clip_x0=True), plain) and h.modified_steps
    for cache in (FORACache(1), DeltaDiTCache(1, blocks=1), TaylorSeerCache(1, order=2)):
        assert torch.equal(run(m, y, "8", "unipc", hooks=[cache], clip_x0=True), plain)
    for cache in (FORACache(2), TaylorSeerCache(2, order=1)):
        out = run(m, y, "8", "unipc", hooks=[cache], clip_x0=True)
        assert torch.isfinite(out).all() and not torch.equal(out, plain) and cache.skipped > 0


def test_unipc_step_orders_along_the_chain():
    """First order without a history, then UniP-2 (each step corrected by UniC), first order into t = 0 (lower-order
    final), and x̂0 at the clean end."""
    from efdit.diffusion import unipc_step
    m, y, d = tiny_model(), torch.arange(2), create_diffusion("6")
    x, history, orders = torch.randn(2, 1, 8, 8), None, []
    with torch.inference_mode():
        for i in reversed(range(6)):
            t = d.timestep_map[i].repeat(2)
            pred = d.p_mean_variance(m(x, t, y), x, torch.full((2,), i))
            x, history = unipc_step(d, x, i, pred.x0, pred.eps, history)
            orders.append(None if history is None else history.order)
    assert orders == [1, 2, 2, 2, 1, None] and torch.equal(x, pred.x0)


def test_unipc_is_registered_and_deterministic():
    assert "unipc" in SAMPLERS
    m, y = tiny_model(), torch.arange(2)
    assert torch.equal(run(m, y, "6", "unipc", seed=1), run(m, y, "6", "unipc", seed=1))
    with pytest.raises(ValueError, match="eta must be 0"):
        run(m, y, "4", "unipc", eta=1.0)
