"""Faster sampling: DPM-Solver++(2M) and the training-free block caches (FORA, Δ-DiT, TaylorSeer)."""
import math

import pytest
import torch
from tiny import randomize, tiny_model

from efdit.config import Config, apply_overrides, parse_kv
from efdit.diffusion import Guidance, SamplerHook, create_diffusion, sample
from efdit.diffusion.hooks.cache import DeltaDiTCache, FORACache, TaylorSeerCache, build_accel
from efdit.diffusion.hooks.hrig import HRIG
from efdit.diffusion.samplers import dpmpp2m_update
from efdit.errors import EfditError
from efdit.models.dit import modulate
from efdit.models.embedders import TieredEmbedder
from efdit.models.peft import add_difffit_scales

CFG = Guidance("cfg", 2.0)


def run(m, y, steps="10", method="ddim", hooks=(), guidance=CFG, seed=5, **kw):
    d = create_diffusion(steps, **{k: kw.pop(k) for k in ("prediction", "learn_sigma") if k in kw})
    return sample(m, y, d, method=method, guidance=guidance, hooks=hooks, progress=False,
                  generator=torch.Generator().manual_seed(seed), **kw)


def caches(interval):
    return [FORACache(interval), DeltaDiTCache(interval, blocks=1, boundary=500),
            TaylorSeerCache(interval, order=2)]


def difffit_model(depth=3):
    """A tiny DiT with DiffFit's γ on every branch, each a different value far from 1."""
    m = tiny_model(depth=depth)
    add_difffit_scales(m)
    with torch.no_grad():
        for k, b in enumerate(m.blocks):
            b.gamma_attn.fill_(0.5 + 0.4 * k)
            b.gamma_mlp.fill_(1.7 - 0.3 * k)
    return m.eval()


# ---------------------------------------------------------------------------------------------------
# DPM-Solver++(2M)
# ---------------------------------------------------------------------------------------------------
def test_dpmpp2m_update_by_hand():
    """One second-order step against the paper's formula written out with α, σ, λ."""
    g = torch.Generator().manual_seed(0)
    x, x0, x0_prev = (torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(3))
    ab_prev_prev, ab, ab_t = 0.2, 0.35, 0.6  # ᾱ at t_{i-2}, t_{i-1} (= s) and t_i
    lam = lambda a: math.log(math.sqrt(a) / math.sqrt(1 - a))  # noqa: E731
    eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
    out, hist = dpmpp2m_update(x, x0, eps, ab, ab_t, (x0_prev, lam(ab_prev_prev)))
    h, h_prev = lam(ab_t) - lam(ab), lam(ab) - lam(ab_prev_prev)
    r = h_prev / h
    D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
    expect = math.sqrt(1 - ab_t) / math.sqrt(1 - ab) * x - math.sqrt(ab_t) * (math.exp(-h) - 1) * D
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    assert hist[0] is x0 and hist[1] == pytest.approx(lam(ab))
    # no history -> first order, which is DDIM: α_t·x̂0 + σ_t·ε
    first, _ = dpmpp2m_update(x, x0, eps, ab, ab_t, None)
    torch.testing.assert_close(first, math.sqrt(ab_t) * x0 + math.sqrt(1 - ab_t) * eps)
    forced, _ = dpmpp2m_update(x, x0, eps, ab, ab_t, (x0_prev, lam(ab_prev_prev)), first_order=True)
    assert torch.equal(forced, first)
    # to the clean end (ᾱ = 1) -> x̂0, whatever the history
    last, _ = dpmpp2m_update(x, x0, eps, ab, 1.0, (x0_prev, 0.0))
    assert torch.equal(last, x0)


def test_dpmpp2m_converges_to_ddim250():
    """Fixed tiny DiT (random, non-zero weights), CFG, no clipping: the ODE solution of DDIM-250 is approached as
    the steps grow, faster than DDIM itself (second vs first order)."""
    m, y = tiny_model(seed=1), torch.arange(4)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = run(m, y, "250", x_T=x_T)
    err = {s: (run(m, y, str(s), "dpmpp2m", x_T=x_T) - ref).abs().max().item() for s in (5, 10, 50)}
    err_ddim = {s: (run(m, y, str(s), "ddim", x_T=x_T) - ref).abs().max().item() for s in (10, 50)}
    scale = ref.abs().max().item()
    assert err[50] < err[10] < err[5]
    assert err[50] < 0.03 * err[5] and err[50] < 0.005 * scale
    assert err[10] < 0.8 * err_ddim[10] and err[50] < 0.3 * err_ddim[50]


@pytest.mark.parametrize("mode", ["none", "cfg", "super", "two_term"])
def test_dpmpp2m_with_every_guidance_mode(mode):
    """Three chain steps are all first order (warm-up, lower-order final into t = 0, then t = 0 -> clean), so they
    equal DDIM bit for bit; with four the second-order step changes the sample."""
    parent = torch.tensor([0, 0, 1, 1])
    m = randomize(tiny_model(y_embedder=TieredEmbedder(4, 2, parent, 32, mode="sum", null_prob=0.1)))
    y, g = torch.arange(4), Guidance(mode, 3.0, scale_super=1.5)
    assert torch.equal(run(m, y, "3", "dpmpp2m", guidance=g), run(m, y, "3", "ddim", guidance=g))
    a, b = run(m, y, "4", "dpmpp2m", guidance=g), run(m, y, "4", "ddim", guidance=g)
    assert torch.isfinite(a).all() and not torch.equal(a, b)


def test_dpmpp2m_uses_hook_x0_and_hrig_works():
    m, y = tiny_model(), torch.arange(4)

    class ConstX0(SamplerHook):
        def __init__(self, c):
            self.c = c

        def on_step(self, state):
            return state.replace(x0=torch.full_like(state.x0, self.c))

    # x̂0 fixed to a constant: the data-prediction ODE is solved exactly, by 2M and by DDIM alike
    assert torch.equal(run(m, y, "6", "dpmpp2m", hooks=[ConstX0(0.0)]), torch.zeros(4, 1, 8, 8))
    torch.testing.assert_close(run(m, y, "6", "dpmpp2m", hooks=[ConstX0(0.4)]),
                               run(m, y, "6", "ddim", hooks=[ConstX0(0.4)]), rtol=1e-5, atol=1e-5)
    # HRIG: λ = 0 is bit-identical, λ ≠ 0 modifies the steps of its band and changes the sample
    plain = run(m, y, "10", "dpmpp2m", clip_x0=True)
    assert torch.equal(run(m, y, "10", "dpmpp2m", hooks=[HRIG(gain=0.0)], clip_x0=True), plain)
    h = HRIG(gain=-0.5)
    out = run(m, y, "10", "dpmpp2m", hooks=[h], clip_x0=True)
    assert h.modified_steps and not torch.equal(out, plain)


def test_dpmpp2m_rejects_eta():
    with pytest.raises(ValueError, match="eta"):
        run(tiny_model(), torch.arange(2), "4", "dpmpp2m", eta=1.0)


# ---------------------------------------------------------------------------------------------------
# Block caches
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("difffit", [False, True])
@pytest.mark.parametrize("method", ["ddim", "dpmpp2m"])
def test_interval_one_and_accel_none_are_bit_identical(method, difffit):
    """Nothing reused: the cache path (un-gated output, then γ·gate) is the plain block, bit for bit, also with γ."""
    m, y = (difffit_model() if difffit else tiny_model(depth=3)), torch.arange(4)
    plain = run(m, y, "8", method)
    assert build_accel("none") is None
    for cache in caches(1):
        assert torch.equal(run(m, y, "8", method, hooks=[cache]), plain), cache
        assert cache.skipped == 0 and cache.computed > 0


def test_caches_change_the_sample_and_skip_work():
    m, y = tiny_model(depth=3), torch.arange(4)
    plain = run(m, y, "8")
    for cache in caches(3):
        out = run(m, y, "8", hooks=[cache])
        assert not torch.equal(out, plain) and torch.isfinite(out).all()
        assert cache.skipped > 0


def test_taylorseer_order0_equals_fora():
    m, y = tiny_model(depth=3), torch.arange(4)
    for interval, warmup in ((2, 0), (3, 0), (3, 2), (4, 1)):
        fora = run(m, y, "10", hooks=[FORACache(interval, warmup=warmup)])
        ts0 = run(m, y, "10", hooks=[TaylorSeerCache(interval, order=0, warmup=warmup)])
        assert torch.equal(fora, ts0)
        ts1 = run(m, y, "10", hooks=[TaylorSeerCache(interval, order=1, warmup=warmup)])
        assert not torch.equal(fora, ts1)


def _squares_through(cache, steps: int) -> dict[int, float]:
    """Run one branch whose output at step s is s² through `cache` for `steps` steps: {step: returned value}."""
    cache.reset()
    values, x = {}, torch.zeros(1, 1, 1)
    for step in range(steps):
        cache.on_step_begin(step, torch.tensor([999 - step]))
        values[step] = cache(0, "attn", lambda x_, c_, s=step: torch.full((1, 1, 1), float(s) ** 2), x, None).item()
    return values


def test_taylorseer_forecast_by_hand():
    """Finite differences over the full steps and the Taylor forecast, on a branch whose output is step²."""
    c = TaylorSeerCache(interval=2, order=2)
    values = _squares_through(c, 7)
    # full steps 0, 2, 4, 6: F = 0, 4, 16, 36. At step 5: factors from steps 4 (F=16), ΔF = (16−4)/2 = 6,
    # Δ²F = (6 − (4−0)/2)/2 = 2 -> 16 + 6·1 + 2·1/2 = 23
    assert values[1] == 0.0  # only F known after step 0: order-0 reuse
    assert values[3] == 4.0 + (4.0 - 0.0) / 2 * 1  # F + ΔF·1
    assert values[5] == 23.0
    assert c.computed == 4 and c.skipped == 3


def test_taylorseer_forecast_grows_with_the_steps_since_the_full_one():
    """With interval 3 a skipped step is k = 1 or 2 steps after the full one: the series uses k^j / j!
    (with interval 2, k is always 1 and a forecast that ignored k would pass)."""
    values = _squares_through(TaylorSeerCache(interval=3, order=2), 9)
    # full steps 0, 3, 6: F = 0, 9, 36. After step 3: ΔF = 9/3 = 3 -> steps 4, 5: 9 + 3·1, 9 + 3·2.
    # After step 6: ΔF = 27/3 = 9, Δ²F = (9 − 3)/3 = 2 -> step 8 (k = 2): 36 + 9·2 + 2·2²/2 = 58
    assert (values[4], values[5]) == (12.0, 15.0)
    assert (values[7], values[8]) == (36.0 + 9.0 + 1.0, 58.0)


def test_cache_reset_between_runs():
    m, y = tiny_model(depth=3), torch.arange(4)
    for cache in caches(3):
        first = run(m, y, "9", hooks=[cache])
        assert torch.equal(run(m, y, "9", hooks=[cache]), first)  # same seed twice, same samples
        # after a run with other labels and another batch size, the cache holds nothing stale
        other = run(m, torch.tensor([3, 2, 1]), "9", hooks=[cache], seed=7)
        fresh = type(cache)(**{k: v for k, v in cache.describe().items()})
        assert torch.equal(other, run(m, torch.tensor([3, 2, 1]), "9", hooks=[fresh], seed=7))
        assert torch.equal(run(m, y, "9", hooks=[cache]), first)


def test_reset_is_what_protects_taylorseer(monkeypatch):
    """Without reset() the second run would extrapolate from the first run's features (this test can fail)."""
    m, y = tiny_model(depth=3), torch.arange(4)
    cache = TaylorSeerCache(3, order=2)
    first = run(m, y, "9", hooks=[cache])
    monkeypatch.setattr(cache, "reset", lambda: None)
    assert not torch.equal(run(m, y, "9", hooks=[cache]), first)


def _count_forwards(modules):
    counts = [0] * len(modules)
    for i, mod in enumerate(modules):
        mod.register_forward_pre_hook(lambda _m, _a, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def test_delta_dit_skips_the_cached_blocks():
    """4 blocks, 10 steps (t = 999, 888, …, 0), interval 2, 2 cached blocks, boundary 500:
    full steps 0, 2, 4, 6, 8; cached steps 1, 3 (t ≥ 500: rear blocks 2, 3) and 5, 7, 9 (t < 500: front 0, 1).
    A skipped block still runs its adaLN modulation (the current gates), not its attention or MLP."""
    m = tiny_model(depth=4)
    blocks = _count_forwards(m.blocks)
    attn = _count_forwards([b.attn for b in m.blocks])
    mlp = _count_forwards([b.mlp for b in m.blocks])
    cache = DeltaDiTCache(interval=2, blocks=2, boundary=500)
    run(m, torch.arange(4), "10", hooks=[cache])
    assert attn == mlp == [7, 7, 8, 8] and blocks == [10] * 4
    assert cache.skipped == 2 * (3 * 2 + 2 * 2) and cache.computed == sum(attn) + sum(mlp)
    attn[:], mlp[:] = [0] * 4, [0] * 4
    run(m, torch.arange(4), "10")
    assert attn == mlp == [10] * 4


def test_delta_dit_reuses_the_range_residual():
    """On a cached step the range's output is the current input plus Δ = out − in of the last full step."""
    m = tiny_model(depth=4)
    cache = DeltaDiTCache(interval=2, blocks=2, boundary=500)
    cache.bind(m)
    cache.reset()
    g = torch.Generator().manual_seed(0)
    x_old, x_new = torch.randn(2, 16, 32, generator=g), torch.randn(2, 16, 32, generator=g)
    c = torch.randn(2, 32, generator=g)
    with torch.no_grad():
        cache.on_step_begin(0, torch.tensor([900]))
        full = m.forward_blocks(x_old, c, block_cache=cache)
        assert torch.equal(full, m.forward_blocks(x_old, c))
        h_old = m.forward_blocks(x_old, c, 0, 2)
        delta_rear = full - h_old
        delta_front = h_old - x_old
        cache.on_step_begin(1, torch.tensor([800]))  # t ≥ 500: rear blocks cached
        torch.testing.assert_close(m.forward_blocks(x_new, c, block_cache=cache),
                                   m.forward_blocks(x_new, c, 0, 2) + delta_rear, rtol=0, atol=1e-6)
        cache.on_step_begin(3, torch.tensor([100]))  # t < 500: front blocks cached
        torch.testing.assert_close(m.forward_blocks(x_new, c, block_cache=cache),
                                   m.forward_blocks(x_new + delta_front, c, 2, 4), rtol=0, atol=1e-6)


def _blocks_by_hand(m, x, c, reuse=None, reuse_c=None):
    """The DiT blocks written out: x + γ·gate·F per branch, F computed with the gates of c, or taken from
    `reuse[(i, branch)]` with the gates of `reuse_c` (default c; another step's c gives the stale-gate result).
    Returns the output and the F of every branch (computed or reused)."""
    reuse, outs = reuse or {}, {}
    for i, b in enumerate(m.blocks):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = b.adaLN_modulation(c).chunk(6, dim=1)
        stale_msa, stale_mlp = b.adaLN_modulation(c if reuse_c is None else reuse_c).chunk(6, dim=1)[2::3]
        a = reuse.get((i, "attn"))
        if a is None:
            a = b.attn(modulate(b.norm1(x), shift_msa, scale_msa), grid=m.grid_size)
            x = x + gate_msa.unsqueeze(1) * a * b.gamma_attn
        else:
            x = x + stale_msa.unsqueeze(1) * a * b.gamma_attn
        f = reuse.get((i, "mlp"))
        if f is None:
            f = b.mlp(modulate(b.norm2(x), shift_mlp, scale_mlp))
            x = x + gate_mlp.unsqueeze(1) * f * b.gamma_mlp
        else:
            x = x + stale_mlp.unsqueeze(1) * f * b.gamma_mlp
        outs[(i, "attn")], outs[(i, "mlp")] = a, f
    return x, outs


def _steps(n, seed=0):
    """n (tokens, conditioning) pairs (N = 2, T = 16, D = 32) with conditionings far apart, so gates differ."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 16, 32, generator=g), 3 * torch.randn(2, 32, generator=g)) for _ in range(n)]


def _run_steps(m, cache, steps, ts):
    outs = []
    if hasattr(cache, "bind"):
        cache.bind(m)
    cache.reset()
    for step, ((x, c), t) in enumerate(zip(steps, ts)):
        cache.on_step_begin(step, torch.tensor([t]))
        outs.append(m.forward_blocks(x, c, block_cache=cache))
    return outs


@torch.no_grad()
def test_fora_cached_step_uses_the_current_gate():
    """A cached step adds γ·gate_now·F with F the un-gated output of the last full step, exactly; the stale
    gate of the full step would give another result."""
    m = difffit_model()
    steps = _steps(3)
    outs = _run_steps(m, FORACache(interval=3), steps, (900, 800, 700))
    full, F0 = _blocks_by_hand(m, *steps[0])
    assert torch.equal(outs[0], full)
    for k in (1, 2):
        expect, _ = _blocks_by_hand(m, *steps[k], reuse=F0)
        assert torch.equal(outs[k], expect)
        stale, _ = _blocks_by_hand(m, *steps[k], reuse=F0, reuse_c=steps[0][1])  # the gates of step 0
        assert (outs[k] - stale).abs().max() > 1e-2


@torch.no_grad()
def test_taylorseer_forecasts_the_ungated_branch():
    """Order 1, interval 2: step 3 forecasts F₂ + (F₂ − F₀)/2 · 1 from the un-gated outputs of steps 0 and 2 and
    applies the gates of step 3."""
    m = difffit_model()
    steps = _steps(4)
    outs = _run_steps(m, TaylorSeerCache(interval=2, order=1), steps, (900, 800, 700, 600))
    _, F0 = _blocks_by_hand(m, *steps[0])
    full2, F2 = _blocks_by_hand(m, *steps[2])
    assert torch.equal(outs[2], full2)
    assert torch.equal(outs[1], _blocks_by_hand(m, *steps[1], reuse=F0)[0])
    forecast = {key: F2[key] + (F2[key] - F0[key]) / 2 * 1.0 for key in F2}
    assert torch.equal(outs[3], _blocks_by_hand(m, *steps[3], reuse=forecast)[0])
    stale, _ = _blocks_by_hand(m, *steps[3], reuse=forecast, reuse_c=steps[2][1])
    assert (outs[3] - stale).abs().max() > 1e-2


@torch.no_grad()
def test_delta_dit_rebuilds_the_range_residual_with_the_current_gates():
    """3 blocks, 1 cached: step 1 (t ≥ 500) reuses the rear block's F, step 2 (t < 500) the front block's, each
    with the current step's gates; the other blocks are computed from the current input."""
    m = difffit_model()
    steps = _steps(3)
    outs = _run_steps(m, DeltaDiTCache(interval=3, blocks=1, boundary=500), steps, (900, 800, 100))
    full, F0 = _blocks_by_hand(m, *steps[0])
    assert torch.equal(outs[0], full)
    for k, i in ((1, 2), (2, 0)):
        reuse = {key: F0[key] for key in ((i, "attn"), (i, "mlp"))}
        assert torch.equal(outs[k], _blocks_by_hand(m, *steps[k], reuse=reuse)[0])
        stale = _blocks_by_hand(m, *steps[k], reuse=reuse, reuse_c=steps[0][1])[0]
        assert (outs[k] - stale).abs().max() > 1e-2


def test_fora_skips_attention_and_mlp():
    m = tiny_model(depth=2)
    calls = {"attn": 0, "mlp": 0}
    for b in m.blocks:
        b.attn.register_forward_pre_hook(lambda *a: calls.__setitem__("attn", calls["attn"] + 1))
        b.mlp.register_forward_pre_hook(lambda *a: calls.__setitem__("mlp", calls["mlp"] + 1))
    run(m, torch.arange(2), "9", hooks=[FORACache(3)])  # full steps 0, 3, 6
    assert calls == {"attn": 3 * 2, "mlp": 3 * 2}


def test_cache_under_cfg_holds_the_doubled_batch():
    m, y = tiny_model(), torch.arange(3)
    for cache in caches(2):
        run(m, y, "4", hooks=[cache])
        assert cache.store and all(entry[0][0] == 2 * 3 for entry in cache.store.values())


def test_build_accel_and_config_wiring():
    from efdit.commands.options import sample_overrides
    from efdit.engine.generate import accel_hooks, generate
    cfg = apply_overrides(Config(), sample_overrides({"accel": "taylorseer", "accel-kw": "interval=3,order=2",
                                                      "steps": "6"}))
    (hook,) = accel_hooks(cfg)
    assert isinstance(hook, TaylorSeerCache) and hook.interval == 3 and hook.order == 2
    assert isinstance(build_accel("delta", parse_kv("blocks=3,boundary=400")), DeltaDiTCache)
    for name, kw, msg in (("fora2", "", "did you mean 'fora'"), ("fora", "intervall=3", "did you mean 'interval'"),
                          ("taylorseer", "order=1.5", "integer"), ("none", "interval=2", "without")):
        cfg.sample.accel, cfg.sample.accel_kwargs = name, kw
        with pytest.raises(EfditError, match=msg):
            accel_hooks(cfg)
    from efdit.engine.generate import check_sampler
    bad = Config()
    bad.sample.sampler = "dpm"
    with pytest.raises(EfditError, match="ddpm | ddim | dpmpp2m"):
        check_sampler(bad)
    bad.sample.sampler, bad.sample.eta = "dpmpp2m", 1.0
    with pytest.raises(EfditError, match="eta"):
        check_sampler(bad)
    # generate(): FORA with interval 1 is the plain sampler; the cache is reset between batches
    m, y = tiny_model(num_classes=4), torch.tensor([0, 1, 2, 3, 0])
    cfg.model.learn_sigma = True
    cfg.sample.accel, cfg.sample.accel_kwargs = "none", ""
    plain = generate(m, cfg, y, progress=False, batch_size=2)
    cfg.sample.accel, cfg.sample.accel_kwargs = "fora", "interval=1"
    assert torch.equal(generate(m, cfg, y, progress=False, batch_size=2), plain)
    cfg.sample.accel_kwargs = "interval=2"
    assert torch.equal(generate(m, cfg, y, progress=False, batch_size=2),
                       generate(m, cfg, y, progress=False, batch_size=2))
