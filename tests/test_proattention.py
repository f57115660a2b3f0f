"""ProAttention backends against dense references written out by hand, and the switch on a trained DiT."""
import io
import math

import pytest
import torch
import torch.nn.functional as F

from efdit.diffusion import create_diffusion, sample
from efdit.models.attention import Attention, get_backend
from efdit.models.dit import DiT
from efdit.models.proattention import irls_weight, pool_tokens, proxy_attention, robust_attention


def qkv(N=2, heads=3, L=16, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(N, heads, L, d, generator=g).to(dtype) for _ in range(3))


def dense(q, k, v):
    """softmax(QKᵀ/√d)·V in float64."""
    q, k, v = q.double(), k.double(), v.double()
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1) @ v


def pool_by_hand(x, h, w, p):
    """Average over the windows of adaptive pooling, written out: rows ⌊i·h/m⌋ .. ⌈(i+1)·h/m⌉ − 1."""
    N, heads, L, d = x.shape
    g = x.reshape(N, heads, h, w, d)
    mh, mw = math.ceil(h / p), math.ceil(w / p)
    out = []
    for i in range(mh):
        for j in range(mw):
            r0, r1 = (i * h) // mh, math.ceil((i + 1) * h / mh)
            c0, c1 = (j * w) // mw, math.ceil((j + 1) * w / mw)
            out.append(g[:, :, r0:r1, c0:c1].mean((2, 3)))
    return torch.stack(out, dim=2)  # (N, heads, M, d), row-major proxies


# ---- robust ------------------------------------------------------------------------------------------
def test_robust_l2_equals_sdpa_with_and_without_mask():
    q, k, v = qkv()
    torch.testing.assert_close(robust_attention(q, k, v, penalty="l2"), F.scaled_dot_product_attention(q, k, v),
                               atol=1e-5, rtol=0)
    mask = torch.rand(16, 16, generator=torch.Generator().manual_seed(1)) > 0.3
    mask |= torch.eye(16, dtype=torch.bool)
    torch.testing.assert_close(robust_attention(q, k, v, penalty="l2", attn_mask=mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=0)


def robust_by_hand(q, k, v, penalty, iters, eps=1e-2, gamma=4.0, delta=4.0):
    """One (query, head): plain Python lists, the IRLS of ProTransformer step by step."""
    d = len(q[0])
    out = []
    for qi in q:
        logits = [sum(a * b for a, b in zip(qi, kj)) / math.sqrt(d) for kj in k]
        e = [math.exp(x - max(logits)) for x in logits]
        a = [x / sum(e) for x in e]
        z = [sum(a[j] * v[j][c] for j in range(len(v))) for c in range(d)]
        for _ in range(iters):
            dist = [math.sqrt(sum((z[c] - vj[c]) ** 2 for c in range(d))) for vj in v]
            if penalty == "l1":
                w = [1 / (x + eps) for x in dist]
            elif penalty == "mcp":
                w = [max(1 / (x + eps) - 1 / gamma, eps) for x in dist]
            elif penalty == "huber":
                w = [min(delta / (x + eps), 1.0) for x in dist]
            else:
                w = [min(max(delta / (gamma - delta) * (gamma / (x + eps) - 1), eps), 1.0) for x in dist]
            aw = [ai * wi for ai, wi in zip(a, w)]
            z = [sum(aw[j] * v[j][c] for j in range(len(v))) / sum(aw) for c in range(d)]
        out.append(z)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("penalty,kw", [("l1", {}), ("mcp", dict(gamma=2.0)), ("huber", dict(delta=1.0)),
                                        ("huber_mcp", dict(gamma=3.0, delta=1.0))])
def test_robust_irls_equals_hand_computation_and_differs_from_sdpa(penalty, kw):
    q, k, v = qkv(N=1, heads=1, L=5, d=3, seed=3)
    v = v.clone()
    v[0, 0, 2] += 6.0  # an outlier value: robust aggregation must down-weight it
    got = robust_attention(q, k, v, penalty=penalty, iters=2, **kw)
    ref = robust_by_hand(q[0, 0].tolist(), k[0, 0].tolist(), v[0, 0].tolist(), penalty, 2, **kw)
    torch.testing.assert_close(got[0, 0].double(), ref, atol=1e-5, rtol=0)
    sd = F.scaled_dot_product_attention(q, k, v)
    assert torch.isfinite(got).all() and (got - sd).abs().max() > 1e-2


def test_robust_is_finite_on_big_values_and_chunking_is_exact():
    q, k, v = qkv(L=20, seed=4)
    v = v * 100
    full = robust_attention(q, k, v, penalty="mcp")
    assert torch.isfinite(full).all()
    torch.testing.assert_close(robust_attention(q, k, v, penalty="mcp", chunk_size=3), full, atol=1e-4, rtol=1e-5)
    half = robust_attention(q, k, v, penalty="l1", step=0.5, iters=1)
    one = robust_attention(q, k, v, penalty="l1", iters=1)
    torch.testing.assert_close(half, 0.5 * F.scaled_dot_product_attention(q, k, v) + 0.5 * one, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("penalty", ["l1", "mcp", "huber", "huber_mcp"])
def test_robust_gradient_is_finite_at_zero_distance(penalty):
    q, k, _ = qkv(N=1, heads=2, L=6, d=4, seed=5)
    v = torch.zeros(1, 2, 6, 4)  # all values equal (zero): z⁰ = A·V = v_j exactly, so every d_ij = 0
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    kw = dict(gamma=4.0, delta=1.0) if penalty == "huber_mcp" else {}
    out = robust_attention(q, k, v, penalty=penalty, **kw)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert v.grad.abs().sum() > 0


def test_robust_weights_and_errors():
    dist = torch.tensor([0.0, 1.0, 10.0])
    torch.testing.assert_close(irls_weight(dist, "l1"), 1 / (dist + 1e-2))
    torch.testing.assert_close(irls_weight(dist, "mcp"), torch.tensor([1 / 0.01 - 0.25, 1 / 1.01 - 0.25, 1e-2]))
    torch.testing.assert_close(irls_weight(dist, "huber", delta=4.0), torch.tensor([1.0, 1.0, 4 / 10.01]))
    q, k, v = qkv(L=4)
    for kw in (dict(penalty="l3"), dict(penalty="huber_mcp"), dict(iters=-1), dict(step=0.0)):
        with pytest.raises(ValueError):
            robust_attention(q, k, v, **kw)


# ---- proxy -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,p", [((4, 4), 2), ((4, 6), 2), ((6, 4), 3), ((5, 7), 2), ((4, 8), (2, 4))])
def test_proxy_two_stage_equals_dense_reference_with_explicit_pooling(grid, p):
    h, w = grid
    q, k, v = qkv(L=h * w, seed=6)
    got = proxy_attention(q, k, v, grid=grid, pool=p)
    assert got.shape == q.shape
    ph, pw = (p, p) if isinstance(p, int) else p
    if ph == pw:
        qp, kp = pool_by_hand(q, h, w, ph), pool_by_hand(k, h, w, ph)
    else:  # separable windows: pool rows by ph then columns by pw, written out once more
        g = lambda x: x.reshape(*x.shape[:2], h // ph, ph, w // pw, pw, x.shape[-1]).mean((3, 5)).flatten(2, 3)  # noqa
        qp, kp = g(q), g(k)
    proxies = dense(qp, k, v)            # P = softmax(Q_p Kᵀ/√d) V
    ref = dense(q, kp, proxies)          # softmax(Q K_pᵀ/√d) P
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    ref_q = dense(q, qp, proxies)        # broadcast_keys="q": agent attention
    torch.testing.assert_close(proxy_attention(q, k, v, grid=grid, pool=p, broadcast_keys="q").double(), ref_q,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(pool_tokens(q, grid, p).double(), qp.double(), atol=1e-6, rtol=0)


def test_proxy_identity_pooling_is_A_A_V_and_kv_mode_is_sdpa():
    q, k, v = qkv(L=12, seed=7)
    A = (q.double() @ k.double().transpose(-2, -1) / math.sqrt(8)).softmax(-1)
    got = proxy_attention(q, k, v, grid=(3, 4), pool=1)
    torch.testing.assert_close(got.double(), A @ (A @ v.double()), atol=1e-5, rtol=0)
    assert (got - F.scaled_dot_product_attention(q, k, v)).abs().max() > 1e-3  # not vanilla attention
    kv1 = proxy_attention(q, k, v, grid=(3, 4), pool=1, proxy_mode="kv")
    torch.testing.assert_close(kv1, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=0)
    q, k, v = qkv(L=24, seed=8)
    kv2 = proxy_attention(q, k, v, grid=(4, 6), pool=2, proxy_mode="kv")
    ref = dense(q, pool_by_hand(k, 4, 6, 2), pool_by_hand(v, 4, 6, 2))
    torch.testing.assert_close(kv2.double(), ref, atol=1e-5, rtol=0)


def test_proxy_square_grid_default_half_precision_and_errors():
    q, k, v = qkv(L=16, dtype=torch.bfloat16)
    out = proxy_attention(q, k, v)  # grid inferred as 4x4
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), proxy_attention(q.float(), k.float(), v.float(), grid=(4, 4)),
                               atol=2e-2, rtol=0)
    q, k, v = qkv(L=12)
    with pytest.raises(ValueError):
        proxy_attention(q, k, v)  # 12 tokens: grid needed
    with pytest.raises(ValueError):
        proxy_attention(q, k, v, grid=(3, 5))
    with pytest.raises(ValueError):
        proxy_attention(q, k, v, grid=(3, 4), attn_mask=torch.ones(12, 12, dtype=torch.bool))
    for kw in (dict(broadcast_keys="v"), dict(proxy_mode="dense"), dict(pool=0)):
        with pytest.raises(ValueError):
            proxy_attention(q, k, v, grid=(3, 4), **kw)


def test_backends_are_selectable_by_name_through_attention():
    attn = Attention(16, 2)
    x = torch.randn(2, 12, 16)
    ref = attn(x, grid=(3, 4))
    attn.set_backend("robust", penalty="l2")
    torch.testing.assert_close(attn(x, grid=(3, 4)), ref, atol=1e-5, rtol=0)
    attn.set_backend("proxy", pool=2)
    assert attn(x, grid=(3, 4)).shape == x.shape
    assert get_backend("proxy", pool=4).keywords == dict(pool=4)


# ---- switching a trained model ---------------------------------------------------------------------------
def randomized_dit(**kw):
    cfg = dict(input_size=(8, 12), patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2,
               num_classes=4)
    cfg.update(kw)
    m = DiT(**cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def test_sdpa_model_switches_to_proxy_and_robust_and_still_samples():
    m = randomized_dit()  # "trained" with sdpa; token grid 4x6
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    x, t, y = torch.randn(2, 2, 8, 12), torch.tensor([10, 500]), torch.tensor([0, 3])
    with torch.no_grad():
        base = m(x, t, y)
        outs = {}
        for name, kw in (("proxy", dict(pool=2)), ("robust", dict(penalty="mcp")), ("robust", dict(penalty="l2"))):
            m.set_attention_backend(name, **kw)
            assert m.state_dict().keys() == sd.keys()
            assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
            outs[name, kw.get("penalty")] = m(x, t, y)
    torch.testing.assert_close(outs["robust", "l2"], base, atol=1e-5, rtol=0)
    for key in (("proxy", None), ("robust", "mcp")):
        assert torch.isfinite(outs[key]).all() and (outs[key] - base).abs().max() > 1e-4
    # load an sdpa checkpoint into a model built with the proxy backend, and sample
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = randomized_dit(attn_backend="proxy")
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    fresh.set_attention_backend("proxy", pool=2)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, y), outs["proxy", None])
    for name in ("proxy", "robust"):
        fresh.set_attention_backend(name)
        out = sample(fresh, torch.tensor([1, 2]), create_diffusion("5"), method="ddim", progress=False,
                     generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 2, 8, 12) and torch.isfinite(out).all()


# ---- proxy attention in a PEFT run from an SDPA base: the attention weights adapt, and the delta file keeps them ----
@pytest.fixture(scope="module")
def sdpa_base(tmp_path_factory):
    from tiny import trained_digits_base
    return trained_digits_base(tmp_path_factory.mktemp("sdpa_base"), 160)


@pytest.mark.parametrize("adapt,kept", [("auto", ("lora_A.default.weight", "lora_B.default.weight")),
                                        ("full", ("weight",))])
def test_proxy_peft_delta_holds_the_adapted_attention_and_reloads(sdpa_base, tmp_path, adapt, kept):
    from efdit.config import build_config
    from efdit.engine.files import load_model
    from efdit.engine.train import train
    from efdit.models.checkpoint import load_safetensors
    cfg = build_config("digits-tiny", {"run_dir": str(tmp_path / "ft"), "total_images": 64, "peft": "finediffusion",
                                       "attn_backend": "proxy", "attn_kwargs": "pool=2", "attn_adapt": adapt,
                                       "init_from": str(sdpa_base), "threads": 1, "lr": 1e-2})
    train(cfg, progress=False)
    tensors, meta, _ = load_safetensors(tmp_path / "ft" / "model.safetensors")
    assert meta.get("base"), "a PEFT run from a base writes a delta"
    attn = sorted(k for k in tensors if ".attn." in k and not k.endswith(".bias"))
    assert attn == sorted(f"blocks.{i}.attn.{n}.{f}" for i in range(2) for n in ("qkv", "proj") for f in kept)
    assert "blocks.0.mlp.fc1.weight" not in tensors           # the rest of the rule's frozen weights stay out
    model, loaded_cfg, _, _ = load_model(tmp_path / "ft" / "model.safetensors")
    base, _, _, _ = load_model(sdpa_base)
    assert loaded_cfg.model.attn_adapt == adapt and model.attn_adapt == ("lora" if adapt == "auto" else "full")
    sd, base_sd = model.state_dict(), base.state_dict()
    for k in attn:
        assert torch.equal(sd[k], tensors[k].float()), k
    changed = [k for k in attn if k in base_sd and not torch.equal(sd[k], base_sd[k])]
    if adapt == "full":
        assert changed == attn                                 # the attention matrices trained
    else:
        assert all(tensors[k].abs().sum() > 0 for k in attn if "lora_B" in k)  # B left 0: trained
        assert torch.equal(sd["blocks.0.attn.qkv.base_layer.weight"], base_sd["blocks.0.attn.qkv.weight"])
    assert model.blocks[0].attn.backend_name == "proxy"
