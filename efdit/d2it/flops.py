"""Forward FLOPs of D²iT's networks (DCT with its RefineNet, DGT, DVAE encoder / decoder) and of a sampling or
training budget, for comparisons with a plain DiT at equal compute.

Convention as `efdit.models.flops` (and `FlopCounterMode`): 2 FLOPs per multiply-add, matrix products and
convolutions only. Counted as the code runs, not as an ideal: the routing module applies both grain embedders
to every region (then selects), the cell embedder runs on all 4R cells, the RefineNet's mask skips no work.

DCT on R regions (trunk width D, C latent channels, C_out = 2C with learned Σ), fine share r:
    routing        2·R·(4C + C)·D + t embedder
    trunk          trunk_depth blocks on R tokens, final layer R·D·C_out
    RefineNet      2·4R·C·D (cell embedder) + refine_depth blocks on L sub-tokens + final layer L·D·C_out
    L              sparse "global": 4·rR + (1 − r)·R = R·(1 + 3r) (fine sub-tokens + one per coarse region);
                   sparse "region": 4·rR; dense: 4R. In a batch, L is the batch's largest (padding).
The number of latent codes per image is also R·(1 + 3r): a coarse region is one code, a fine one four.
"""
from __future__ import annotations

import torch

from ..models.flops import (
    block_flops,
    dit_flops,
    dit_model_flops,
    final_layer_flops,
    linear_flops,
    timestep_embedder_flops,
)


# ---- tokens -----------------------------------------------------------------------------------------------------
def refine_tokens(regions: int, fine_share: float, attention: str = "global", sparse: bool = True) -> float:
    """Sub-tokens per image the RefineNet runs on, at a mean fine share r (module docstring)."""
    if not sparse:
        return 4.0 * regions
    if attention == "global":
        return regions * (1 + 3 * fine_share)
    return 4.0 * regions * fine_share


def refine_tokens_of(grain: torch.Tensor, attention: str = "global", sparse: bool = True) -> int:
    """Sub-tokens L of one batch of grain maps (N, h, w): the largest per-image count (the others are padded)."""
    fine = grain.reshape(len(grain), -1).long().sum(1)                   # (N,) fine regions per image
    R = grain[0].numel()
    if not sparse:
        return 4 * R
    per_image = 4 * fine + (R - fine) if attention == "global" else 4 * fine
    return int(per_image.max())


# ---- DCT --------------------------------------------------------------------------------------------------------
def dct_flops(input_size: int, in_channels: int, hidden_size: int, trunk_depth: int, refine_depth: int,
              refine_len: float, learn_sigma: bool = True, mlp_ratio: float = 4.0) -> dict:
    """Forward FLOPs per sample of the DCT with the RefineNet on `refine_len` sub-tokens:
    {"regions", "refine_tokens", "routing", "trunk", "refine", "total"} (trunk includes its final layer)."""
    R = (input_size // 2) ** 2
    C, D = in_channels, hidden_size
    c_out = 2 * C if learn_sigma else C
    routing = linear_flops(R, 4 * C, D) + linear_flops(R, C, D) + timestep_embedder_flops(D)
    trunk = trunk_depth * sum(block_flops(R, D, mlp_ratio).values()) + final_layer_flops(R, D, c_out)
    refine = linear_flops(4 * R, C, D)
    if refine_len > 0:
        refine += refine_depth * sum(block_flops(refine_len, D, mlp_ratio).values()) \
            + final_layer_flops(refine_len, D, c_out)
    return {"regions": R, "refine_tokens": refine_len, "routing": routing, "trunk": trunk, "refine": refine,
            "total": routing + trunk + refine}


def dct_model_flops(model, fine_share: float | None = None, grain: torch.Tensor | None = None) -> dict:
    """dct_flops of a built DynamicContentTransformer, at a mean fine share or for a batch of grain maps."""
    if (fine_share is None) == (grain is None):
        raise ValueError("give exactly one of fine_share and grain")
    R = model.grid[0] * model.grid[1]
    if grain is not None:
        L = refine_tokens_of(grain, model.refine_attention, model.sparse_refine)
    else:
        L = refine_tokens(R, fine_share, model.refine_attention, model.sparse_refine)
    D = model.pos_embed.shape[-1]
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / D if len(model.blocks) else 4.0
    return dct_flops(model.input_size[0], model.in_channels, D, len(model.blocks), len(model.refine_blocks), L,
                     model.learn_sigma, mlp_ratio)


# ---- DGT --------------------------------------------------------------------------------------------------------
def dgt_flops(grid_size: int, hidden_size: int, depth: int, mlp_ratio: float = 4.0) -> dict:
    """The DGT: a DiT with patch 1 on the 1-channel grain grid, 2 logits per region."""
    return dit_flops(grid_size, 1, 1, hidden_size, depth, mlp_ratio=mlp_ratio, out_channels=2)


def dgt_model_flops(model) -> dict:
    return dit_model_flops(model.dit)


# ---- DVAE -------------------------------------------------------------------------------------------------------
def conv_flops(c_in: int, c_out: int, kernel: int, h_out: int, w_out: int, groups: int = 1) -> float:
    return 2.0 * (c_in // groups) * kernel * kernel * c_out * h_out * w_out


def _res_block(c_in: int, c_out: int, size: int) -> float:
    skip = conv_flops(c_in, c_out, 1, size, size) if c_in != c_out else 0.0
    return conv_flops(c_in, c_out, 3, size, size) + conv_flops(c_out, c_out, 3, size, size) + skip


def _stage(c_in: int, c_out: int, n_res: int, size: int, down: bool) -> tuple[float, int]:
    """FLOPs and output size of dvae._stage (optional stride-2 conv, then n_res res blocks)."""
    flops = 0.0
    if down:
        size //= 2
        flops += conv_flops(c_in, c_in, 3, size, size)
    for i in range(n_res):
        flops += _res_block(c_in if i == 0 else c_out, c_out, size)
    if n_res == 0 and c_in != c_out:
        flops += conv_flops(c_in, c_out, 1, size, size)
    return flops, size


def dvae_flops(in_channels: int, image_size: int, f1: int, z_channels: int, ch: int, ch_mult: tuple[int, ...],
               num_res_blocks: int, full_res_blocks: int = 0) -> dict:
    """Forward FLOPs per image of the DVAE: {"encoder", "decoder"} (the encoder runs both grain heads)."""
    chans = [ch * m for m in ch_mult]
    S, z = image_size, z_channels
    enc = conv_flops(in_channels, ch, 3, S, S)
    c, size = ch, S
    for i, co in enumerate(chans):
        f, size = _stage(c, co, num_res_blocks if i else full_res_blocks, size, down=i > 0)
        enc += f
        c = co
    h1 = size
    f, h2 = _stage(c, 2 * c, num_res_blocks, size, down=True)
    enc += f
    enc += _res_block(c, c, h1) + conv_flops(c, 2 * z, 3, h1, h1)                    # fine head
    enc += _res_block(2 * c, 2 * c, h2) + conv_flops(2 * c, 2 * z, 3, h2, h2)        # coarse head
    rev = chans[::-1]
    c, size = rev[0], h1
    dec = conv_flops(z, c, 3, size, size) + (num_res_blocks + 1) * _res_block(c, c, size)
    for j, co in enumerate(rev[1:]):
        size *= 2
        n = full_res_blocks if j == len(rev) - 2 else num_res_blocks
        dec += conv_flops(c, co, 3, size, size) + n * _res_block(co, co, size)
        c = co
    dec += conv_flops(c, in_channels, 3, size, size)
    return {"encoder": enc, "decoder": dec, "total": enc + dec}


def dvae_flops_of(cfg, in_channels: int) -> dict:
    d = cfg.dvae
    return dvae_flops(in_channels, cfg.data.image_size, d.f1, d.z_channels, d.ch,
                      tuple(int(v) for v in d.ch_mult.split(",")), d.num_res_blocks, d.full_res_blocks)


# ---- budgets ------------------------------------------------------------------------------------------------------
def sampling_flops(forward: float, steps: int, cfg_scale: float = 1.0) -> float:
    """steps forwards per sample, two (conditional + null) when classifier-free guidance is on."""
    return steps * forward * (2 if cfg_scale != 1.0 else 1)


def training_flops(forward: float, images: float) -> float:
    """≈ 3 forwards per training image (the backward costs about twice the forward)."""
    return 3.0 * forward * images


def compute_table(cfg, in_channels: int, fine_share: float, dct_steps: int | None = None,
                  dgt_steps: int | None = None) -> list[dict]:
    """Rows {name, tokens, gflop_forward, gflop_sample} for D²iT's networks at a mean fine share and for plain
    DiTs on the all-fine latent at every patch size that divides it (same width and depth as `cfg.dit`).
    The DCT's tokens are its latent codes R·(1 + 3r); its row also gives trunk_tokens (R) and refine_tokens.
    gflop_sample: a full sample (steps × forwards with CFG as in cfg.sample, and one decode)."""
    steps = dct_steps if dct_steps is not None else int(cfg.sample.steps)
    gsteps = dgt_steps if dgt_steps is not None else cfg.dgt.sample_steps
    lat = cfg.data.image_size // cfg.dvae.f1
    d = cfg.dct
    dct = dct_flops(lat, cfg.dvae.z_channels, d.hidden_size, d.trunk_depth, d.refine_depth,
                    refine_tokens((lat // 2) ** 2, fine_share, d.refine_attention, d.sparse_refine), d.learn_sigma)
    dgt = dgt_flops(cfg.data.image_size // cfg.f2, cfg.dgt.hidden_size, cfg.dgt.depth)
    vae = dvae_flops_of(cfg, in_channels)
    G = 1e9
    rows = [
        {"name": "DVAE encoder", "tokens": None, "gflop_forward": vae["encoder"] / G, "gflop_sample": None},
        {"name": "DVAE decoder", "tokens": None, "gflop_forward": vae["decoder"] / G, "gflop_sample": vae["decoder"] / G},
        {"name": "DGT", "tokens": dgt["tokens"], "gflop_forward": dgt["total"] / G,
         "gflop_sample": sampling_flops(dgt["total"], gsteps, cfg.sample.grain_cfg_scale) / G},
        {"name": f"DCT (r = {fine_share:.3f})", "tokens": dct["regions"] * (1 + 3 * fine_share),   # latent codes
         "trunk_tokens": dct["regions"], "refine_tokens": dct["refine_tokens"],
         "gflop_forward": dct["total"] / G, "gflop_sample": sampling_flops(dct["total"], steps, cfg.sample.cfg_scale) / G},
    ]
    rows.append({"name": "D²iT sample (DGT + DCT + decoder)", "tokens": None, "gflop_forward": None,
                 "gflop_sample": rows[1]["gflop_sample"] + rows[2]["gflop_sample"] + rows[3]["gflop_sample"]})
    for p in (1, 2, 4, 8):
        if lat % p or lat // p < 1:
            continue
        dit = dit_flops(lat, p, cfg.dvae.z_channels, cfg.dit.hidden_size, cfg.dit.depth, cfg.dct.learn_sigma)
        rows.append({"name": f"DiT-{cfg.dit.depth}x{cfg.dit.hidden_size}/{p}", "tokens": dit["tokens"],
                     "gflop_forward": dit["total"] / G,
                     "gflop_sample": (sampling_flops(dit["total"], steps, cfg.sample.cfg_scale) + vae["decoder"]) / G})
    return rows
