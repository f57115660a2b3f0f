"""ProAttention: two attention backends behind the `Attention` interface (efdit.md §3.3).

Both are plug-ins: they reuse the pretrained `qkv` / `proj` weights and add no parameters, so a model
trained with SDPA can switch to them (`DiT.set_attention_backend("proxy", pool=2)`) and keep its state dict.
All tensors are (N, heads, L, head_dim) with N the batch size; softmax and IRLS run in float32 and the
result is cast back to the input dtype.

robust  (H1, the name-matching alternative) ProTransformer's robust aggregation (Hou et al., NeurIPS 2024).
        Vanilla attention z_i = Σ_j a_ij v_j is the weighted least-squares estimate argmin_z Σ_j a_ij ||v_j − z||²;
        ProAttention swaps the square for a robust penalty ρ and solves it with K IRLS steps:
            z⁰ = A·V,   w_ij = ρ'(d_ij)/d_ij with d_ij = ||v_j − z_i||,
            z^{k+1} = (1 − s)·z^k + s · Σ_j (a_ij w_ij / Σ_j' a_ij' w_ij') v_j.
        Penalties: l2 (w ≡ 1: vanilla attention), l1, huber, mcp, huber_mcp. Cost ≈ (1 + K)× the attention core;
        queries are processed in row chunks (rows are independent, so chunking is exact) to bound memory.

proxy   (H2, the EFDiT default) pooled proxy / agent attention, O(N·M·d) instead of O(N²·d).
        The h×w token grid is average-pooled into M = ⌈h/p⌉·⌈w/p⌉ proxy tokens (adaptive pooling when p does
        not divide the grid). proxy_mode="two_stage" (default):
            P   = softmax(Q_p Kᵀ/√d) V          (M, d)   proxies attend to every key / value
            Out = softmax(Q B_pᵀ/√d) P          (L, d)   every query attends to the proxies
        with B_p = K_p (broadcast_keys="k", keeps the pretrained q·k logit scale) or Q_p ("q", Han et al.'s agent
        attention). With p = 1 this is A·(A·V), not vanilla attention (no two-softmax design can be).
        proxy_mode="kv" is the single-softmax spatial-reduction variant softmax(Q K_pᵀ/√d) V_p, which equals SDPA
        under identity pooling. Each stage is one fused SDPA call.
        The optional depthwise-conv locality path of agent attention (`attn.dwc.*`) is not implemented.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import register_backend

PENALTIES = ("l2", "l1", "huber", "mcp", "huber_mcp")


# ---------------------------------------------------------------------------------------------------
# robust: ProTransformer IRLS
# ---------------------------------------------------------------------------------------------------
def irls_weight(dist: torch.Tensor, penalty: str, eps: float = 1e-2, gamma: float = 4.0,
                delta: float = 4.0) -> torch.Tensor:
    """IRLS weight w = ρ'(d)/d for distances d ≥ 0 (strictly positive and bounded for every penalty but l2)."""
    if penalty == "l2":
        return torch.ones_like(dist)
    if penalty == "l1":          # ρ(d) = d
        return 1.0 / (dist + eps)
    if penalty == "mcp":         # minimax concave: L1 near 0, flat beyond γ
        return (1.0 / (dist + eps) - 1.0 / gamma).clamp(min=eps)
    if penalty == "huber":       # quadratic below δ, linear above
        return (delta / (dist + eps)).clamp(max=1.0)
    if penalty == "huber_mcp":   # quadratic below δ, L1-like between δ and γ, flat beyond γ
        return (delta / (gamma - delta) * (gamma / (dist + eps) - 1.0)).clamp(min=eps, max=1.0)
    raise ValueError(f"penalty must be one of {', '.join(PENALTIES)}, not {penalty!r}")


def _apply_mask(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return logits
    return logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask


def _robust_rows(q, k, v, v_sq, mask, penalty, iters, eps, gamma, delta, step):
    """IRLS for one chunk of query rows. q: (N, h, Lc, d); k, v: (N, h, Lk, d); v_sq: (N, h, 1, Lk) = ||v_j||².

    Written to touch each (Lc × Lk) matrix as few times as possible: the chunk is sized to stay in cache.
    """
    N, H, Lc, d = q.shape
    a = _apply_mask((q * d ** -0.5) @ k.transpose(-2, -1), mask).softmax(-1)  # A: (N, h, Lc, Lk)
    z = a @ v                                                               # z⁰ = A·V: (N, h, Lc, d)
    v_t = v.reshape(N * H, -1, d).transpose(1, 2)                           # Vᵀ: (N·h, d, Lk), a view
    for _ in range(min(iters, 1) if penalty == "l2" else iters):  # l2: w ≡ 1, every step gives A·V again
        if penalty == "l2":
            aw = a
        else:
            # d_ij² = ||z_i||² + ||v_j||² − 2 z_i·v_j, floored at 1e-12 so the root's gradient stays finite at d = 0
            base = ((z * z).sum(-1, keepdim=True) + v_sq).reshape(N * H, Lc, -1)
            d2 = torch.baddbmm(base, z.reshape(N * H, Lc, d), v_t, alpha=-2.0).view_as(a)
            aw = a * irls_weight(d2.clamp(min=1e-12).sqrt(), penalty, eps, gamma, delta)
        # Σ_j a_ij w_ij v_j / Σ_j a_ij w_ij: the row normalisation is applied to the (Lc, d) product
        new = (aw @ v) / aw.sum(-1, keepdim=True)
        z = new if step == 1.0 else (1.0 - step) * z + step * new
    return z


@register_backend("robust")
def robust_attention(q, k, v, *, grid=None, attn_mask=None, penalty: str = "mcp", iters: int = 3,
                     eps: float = 1e-2, gamma: float = 4.0, delta: float = 4.0, step: float = 1.0,
                     chunk_size: int | None = None) -> torch.Tensor:
    """ProTransformer ProAttention: K = `iters` IRLS steps on softmax(QKᵀ/√d) with a robust `penalty`.

    q: (N, h, L, d), k, v: (N, h, L_k, d) -> (N, h, L, d). `attn_mask` (bool: True = attend, or additive)
    broadcasts to (N, h, L, L_k). `chunk_size` query rows per chunk (None: about 2²⁰ attention entries
    per chunk, which keeps the IRLS temporaries in cache); the result does not depend on it (up to round-off).
    """
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {', '.join(PENALTIES)}, not {penalty!r}")
    if iters < 0 or not 0.0 < step <= 1.0 or eps <= 0:
        raise ValueError(f"robust attention needs iters ≥ 0, 0 < step ≤ 1, eps > 0 (got {iters}, {step}, {eps})")
    if penalty == "huber_mcp" and not gamma > delta:
        raise ValueError(f"huber_mcp needs gamma > delta, got gamma={gamma}, delta={delta}")
    dtype = q.dtype
    q, k, v = (x.float().contiguous() for x in (q, k, v))  # the qkv split hands over strided views
    N, H, L, _ = q.shape
    Lk = k.shape[-2]
    v_sq = (v * v).sum(-1).unsqueeze(-2)  # (N, h, 1, L_k)
    mask = attn_mask
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mask = mask.to(q.device) if mask.dtype == torch.bool else mask.to(q.device, torch.float32)
    rows = chunk_size or max(1, (1 << 20) // max(1, N * H * Lk))
    outs = []
    for start in range(0, L, rows):
        sl = slice(start, min(L, start + rows))
        m = None if mask is None else (mask[..., sl, :] if mask.shape[-2] != 1 else mask)
        outs.append(_robust_rows(q[..., sl, :], k, v, v_sq, m, penalty, iters, eps, gamma, delta, step))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
    return out.to(dtype)


# ---------------------------------------------------------------------------------------------------
# proxy: pooled proxy (agent) attention
# ---------------------------------------------------------------------------------------------------
def token_grid(L: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """The h×w token grid of a length-L sequence (row-major, as DiT's patch embedding flattens it)."""
    if grid is None:
        s = math.isqrt(L)
        if s * s != L:
            raise ValueError(f"proxy attention needs grid=(h, w) for a non-square sequence of {L} tokens")
        return s, s
    h, w = int(grid[0]), int(grid[1])
    if h * w != L:
        raise ValueError(f"grid {h}x{w} does not hold {L} tokens")
    return h, w


def _pair(p) -> tuple[int, int]:
    ph, pw = (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))
    if ph < 1 or pw < 1:
        raise ValueError(f"pool must be ≥ 1, got {p}")
    return ph, pw


def pool_tokens(x: torch.Tensor, grid: tuple[int, int], pool) -> torch.Tensor:
    """Average-pool tokens on their grid: (N, h_, L, d) -> (N, h_, M, d), M = ⌈h/p⌉·⌈w/p⌉ (row-major).

    Non-overlapping p×p windows when p divides the grid; adaptive average pooling otherwise.
    """
    ph, pw = _pair(pool)
    if ph == 1 and pw == 1:
        return x
    N, heads, L, d = x.shape
    h, w = grid
    img = x.transpose(-2, -1).reshape(N * heads, d, h, w)
    pooled = F.adaptive_avg_pool2d(img, (math.ceil(h / ph), math.ceil(w / pw)))  # (N·heads, d, h', w')
    return pooled.reshape(N, heads, d, -1).transpose(-2, -1)


@register_backend("proxy")
def proxy_attention(q, k, v, *, grid=None, attn_mask=None, pool=2, broadcast_keys: str = "k",
                    proxy_mode: str = "two_stage") -> torch.Tensor:
    """Pooled proxy attention, O(N·M·d). q, k, v: (N, h, L, d) on an h×w token grid -> (N, h, L, d).

    pool: p or (p_h, p_w); broadcast_keys: "k" (K_p) | "q" (Q_p, agent attention); proxy_mode:
    "two_stage" | "kv" (softmax(Q K_pᵀ/√d) V_p, equal to SDPA at p = 1).
    """
    if attn_mask is not None:
        raise ValueError("proxy attention does not support attn_mask (pooling mixes masked and unmasked tokens); "
                         "use the sdpa or robust backend")
    if broadcast_keys not in ("k", "q"):
        raise ValueError(f"broadcast_keys must be 'k' or 'q', not {broadcast_keys!r}")
    if proxy_mode not in ("two_stage", "kv"):
        raise ValueError(f"proxy_mode must be 'two_stage' or 'kv', not {proxy_mode!r}")
    if q.shape[-2] != k.shape[-2]:
        raise ValueError("proxy attention is self-attention: queries and keys must share one token grid")
    dtype = q.dtype
    # contiguous float32 copies: the qkv split hands over strided views, which slow both SDPA stages ~2× on CPU
    q, k, v = (x.float().contiguous() for x in (q, k, v))
    grid = token_grid(q.shape[-2], grid)
    if proxy_mode == "kv":
        # spatial-reduction attention: every query attends to the M pooled keys / values
        return F.scaled_dot_product_attention(q, pool_tokens(k, grid, pool), pool_tokens(v, grid, pool)).to(dtype)
    q_p = pool_tokens(q, grid, pool)                               # Q_p: (N, h, M, d) proxy tokens
    proxies = F.scaled_dot_product_attention(q_p, k, v)            # P = softmax(Q_p Kᵀ/√d) V: (N, h, M, d)
    b_p = pool_tokens(k, grid, pool) if broadcast_keys == "k" else q_p
    return F.scaled_dot_product_attention(q, b_p, proxies).to(dtype)  # softmax(Q B_pᵀ/√d) P: (N, h, L, d)
