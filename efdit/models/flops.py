"""Forward FLOPs of a DiT, counted from its shapes (no forward pass).

Convention: one multiply-add = 2 FLOPs, and only matrix products are counted (linear layers, convolutions, the
two attention matmuls), as `torch.utils.flop_counter.FlopCounterMode` does; norms, activations, softmax and
additions are left out (O(T·D) against O(T·D²)). The DiT paper's "Gflops" count multiply-adds (fvcore):
DiT-XL/2 at 256 px is 118.6 G multiply-adds = 237 GFLOP here.

Per sample, for T tokens of width D, MLP width r·D, L blocks:
    patch embed    2·T·(p²·C_in)·D
    t embedder     2·(256·D + D²)                                      (per sample, not per token)
    block          qkv 2·T·D·3D + proj 2·T·D² + attention 4·T²·D (QKᵀ and A·V) + MLP 4·r·T·D² + adaLN 2·D·6D
    final layer    adaLN 2·D·2D + 2·T·D·(p²·C_out)
Training costs ≈ 3× the forward (backward ≈ 2× forward); sampling costs steps × (2 with CFG) forwards.
"""
from __future__ import annotations

FREQ_DIM = 256   # TimestepEmbedder's sinusoidal features


def linear_flops(tokens: float, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def attention_flops(queries: float, keys: float, dim: int) -> float:
    """QKᵀ and A·V over all heads: 2·2·L_q·L_k·D (a mask does not skip any of it)."""
    return 4.0 * queries * keys * dim


def timestep_embedder_flops(dim: int, freq_dim: int = FREQ_DIM) -> float:
    return linear_flops(1, freq_dim, dim) + linear_flops(1, dim, dim)


def block_flops(tokens: float, dim: int, mlp_ratio: float = 4.0) -> dict:
    """One adaLN-Zero DiT block on T tokens: {"linear", "attention", "adaln"} FLOPs."""
    hidden = int(dim * mlp_ratio)
    lin = linear_flops(tokens, dim, 3 * dim) + linear_flops(tokens, dim, dim) \
        + linear_flops(tokens, dim, hidden) + linear_flops(tokens, hidden, dim)
    return {"linear": lin, "attention": attention_flops(tokens, tokens, dim), "adaln": linear_flops(1, dim, 6 * dim)}


def final_layer_flops(tokens: float, dim: int, out_per_token: int) -> float:
    return linear_flops(1, dim, 2 * dim) + linear_flops(tokens, dim, out_per_token)


def dit_flops(input_size: int | tuple[int, int], patch_size: int, in_channels: int, hidden_size: int, depth: int,
              learn_sigma: bool = True, mlp_ratio: float = 4.0, out_channels: int | None = None) -> dict:
    """Forward FLOPs per sample of efdit's DiT: {"tokens", "embed", "blocks", "attention", "final", "total"}.
    ("blocks" includes "attention".) out_channels overrides the per-pixel output (2·C_in with learned Σ)."""
    H, W = (input_size, input_size) if isinstance(input_size, int) else input_size
    p, D = patch_size, hidden_size
    T = (H // p) * (W // p)
    c_out = out_channels if out_channels is not None else (2 * in_channels if learn_sigma else in_channels)
    embed = linear_flops(T, p * p * in_channels, D) + timestep_embedder_flops(D)
    b = block_flops(T, D, mlp_ratio)
    blocks = depth * sum(b.values())
    final = final_layer_flops(T, D, p * p * c_out)
    return {"tokens": T, "embed": embed, "blocks": blocks, "attention": depth * b["attention"], "final": final,
            "total": embed + blocks + final}


def dit_model_flops(model) -> dict:
    """dit_flops of a built efdit DiT (its own shapes)."""
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / model.hidden_size if len(model.blocks) else 4.0
    return dit_flops(model.input_size, model.patch_size, model.in_channels, model.hidden_size, len(model.blocks),
                     mlp_ratio=mlp_ratio, out_channels=model.out_channels)
