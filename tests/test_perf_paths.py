"""Fast paths: torch.compile with a clean eager fallback, inference mode while sampling, no weight gradients for
frozen PEFT parameters (with and without gradient checkpointing), and the peer benchmark's FLOP formula."""
import importlib.util
import os
import warnings
from pathlib import Path

import pytest
import torch
from tiny import tiny_model

from efdit.config import Config
from efdit.diffusion import Guidance, create_diffusion, sample
from efdit.engine.generate import generate
from efdit.errors import EfditError, EfditWarning
from efdit.models.compiled import CompiledModel, maybe_compile
from efdit.models.peft import apply_peft

ROOT = Path(__file__).resolve().parent.parent


def _inputs(n=3):
    return torch.randn(n, 1, 8, 8), torch.tensor([10, 500, 999][:n]), torch.tensor([0, 3, 1][:n])


def test_compile_disabled_returns_the_model_itself():
    m = tiny_model()
    assert maybe_compile(m, False) is m


def test_compile_raising_at_compile_time_falls_back_with_one_warning(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("no C++ compiler found\nsecond line of the traceback")
    monkeypatch.setattr(torch, "compile", boom)
    m = tiny_model()
    with pytest.warns(EfditWarning, match=r"torch.compile failed \(RuntimeError: no C\+\+ compiler found\)") as rec:
        w = maybe_compile(m, True)
    assert len(rec) == 1 and "\n" not in str(rec[0].message)  # one line
    assert not w.is_compiled and w.module is m
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(w(x, t, y), m(x, t, y))


def test_compile_failing_at_first_call_falls_back_once(monkeypatch):
    calls = []

    def lazy_compile(model, **kw):  # torch.compile is lazy: the failure comes with the first call
        def compiled(*a, **k):
            calls.append(1)
            raise RuntimeError("inductor: C++ compile error")
        return compiled
    monkeypatch.setattr(torch, "compile", lazy_compile)
    m = tiny_model()
    w = maybe_compile(m, True, dynamic=False)
    assert w.is_compiled
    x, t, y = _inputs()
    with torch.no_grad(), pytest.warns(EfditWarning, match="inductor: C\\+\\+ compile error"):
        out = w(x, t, y)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second compile attempt
        out2 = w(x, t, y)
    assert not w.is_compiled and len(calls) == 1
    with torch.no_grad():
        ref = m(x, t, y)
    assert torch.equal(out, ref) and torch.equal(out2, ref)


def test_bad_input_is_reported_as_such_and_keeps_compile(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # a "compiled" model that behaves like eager
    m = tiny_model()
    w = maybe_compile(m, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(EfditError, match="expects 8x8"):
            w(torch.randn(1, 1, 6, 6), torch.tensor([1]), torch.tensor([0]))
    assert w.is_compiled


def test_wrapper_stands_in_for_the_model_in_the_sampler(monkeypatch):
    seen = []

    def fake_compile(model, **kw):
        def compiled(*a, **k):
            seen.append(k.get("block_cache"))
            return model(*a, **k)
        return compiled
    monkeypatch.setattr(torch, "compile", fake_compile)
    m = tiny_model()
    w = maybe_compile(m, True)
    assert isinstance(w, CompiledModel) and w.y_embedder is m.y_embedder and w.in_channels == m.in_channels
    d = create_diffusion("4")
    y = torch.tensor([0, 2])
    kw = dict(method="ddim", guidance=Guidance("cfg", 3.0), progress=False)
    a = sample(m, y, d, generator=torch.Generator().manual_seed(0), **kw)
    b = sample(w, y, d, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a, b)
    assert len(seen) == 4  # one batched forward per step through the compiled path


def test_calls_with_a_block_cache_run_eager(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, **kw: (lambda *a, **k: pytest.fail("compiled path used")))
    m = tiny_model()
    w = maybe_compile(m, True)

    class PassThrough:
        granularity = "branch"

        def __call__(self, i, branch, fn, x, c):
            return fn(x, c)
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(w(x, t, y, block_cache=PassThrough()), m(x, t, y))


def _cfg(**sample_kw) -> Config:
    cfg = Config()
    cfg.sample.steps, cfg.sample.cfg_scale = "3", 2.0
    for k, v in sample_kw.items():
        setattr(cfg.sample, k, v)
    return cfg


def test_generate_runs_in_inference_mode_and_compile_flag_falls_back(monkeypatch):
    m = tiny_model()
    modes = []
    m.register_forward_pre_hook(lambda mod, a: modes.append(torch.is_inference_mode_enabled()))
    labels = torch.tensor([0, 1, 3])
    ref = generate(m, _cfg(), labels, progress=False)
    assert modes and all(modes)  # every forward of the sampler ran under torch.inference_mode

    def boom(*a, **k):
        raise RuntimeError("compile unavailable")
    monkeypatch.setattr(torch, "compile", boom)
    with pytest.warns(EfditWarning, match="compile unavailable"):
        out = generate(m, _cfg(compile=True), labels, progress=False)
    assert torch.equal(out, ref)


def test_compile_keys_exist_and_bare_compile_is_ambiguous():
    from efdit.config import apply_overrides
    cfg = apply_overrides(Config(), {"train.compile": "true", "sample.compile": "yes"})
    assert cfg.train.compile is True and cfg.sample.compile is True and Config().train.compile is False
    with pytest.raises(EfditError, match="ambiguous"):
        apply_overrides(Config(), {"compile": "true"})


@pytest.mark.parametrize("checkpointing", [False, True])
def test_frozen_peft_parameters_get_no_gradients(checkpointing):
    m = tiny_model()
    apply_peft(m, "finediffusion")
    m.train()
    m.grad_checkpointing = checkpointing
    x, t, y = _inputs()
    m(x, t, y).square().mean().backward()
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert frozen and trainable
    params = dict(m.named_parameters())
    assert all(params[n].grad is None for n in frozen), [n for n in frozen if params[n].grad is not None]
    assert all(params[n].grad is not None for n in trainable)
    assert any(n.endswith("attn.qkv.weight") for n in frozen)  # the big matrices are frozen under this rule


def test_checkpointing_under_peft_gives_the_same_gradients():
    grads = []
    x, t, y = _inputs()
    for ckpt in (False, True):
        m = tiny_model()
        apply_peft(m, "finediffusion")
        m.train()
        m.y_embedder.dropout_prob = 0.0
        m.grad_checkpointing = ckpt
        m(x, t, y).square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n])


# ---- the peer benchmark's pieces (the full run is minutes long: benchmarks/peers.py --quick is not a unit test)
def _peers():
    spec = importlib.util.spec_from_file_location("peers_bench", ROOT / "benchmarks" / "peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flop_formula_matches_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    peers = _peers()
    from efdit.models.dit import DiT
    m = DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10).eval()
    m.set_attention_backend("math")  # explicit matmuls, which the counter sees (CPU flash SDPA is not counted)
    x = torch.randn(3, 4, 16, 16)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(x, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]))
    assert fc.get_total_flops() == 3 * peers.dit_flops(depth=2, hidden_size=64, patch_size=2, input_size=16)
    # DiT-S/2 on 32x32 latents: 6.06 G multiply-adds per image in the DiT paper (Table 4)
    assert abs(peers.dit_flops(12, 384, 2, 32) / 2e9 - 6.06) < 0.01


@pytest.mark.skipif(not os.environ.get("EFDIT_BENCH_TESTS"),
                    reason="imports diffusers (~12 s of CPU): set EFDIT_BENCH_TESTS=1 to run")
def test_peer_models_have_equal_size_and_the_peer_loop_runs():
    pytest.importorskip("diffusers")
    peers = _peers()
    tied, untied = peers.check_same_size("tiny", 8)
    assert untied > tied  # diffusers ships one embedder per block; the benchmark ties them
    m = peers.build_diffusers("tiny", 8).eval()
    x = peers.ddim_cfg_loop(m, torch.tensor([0, 5]), torch.randn(2, 4, 8, 8), create_diffusion("3"), 4.0)
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
