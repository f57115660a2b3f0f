"""Dynamic Content Transformer (DCT): D²iT's denoiser of multi-grained latents.

Shapes (fine latent grid H1 x W1 = 2h x 2w, grain map h x w, latent channels C, width D, R = h·w regions):
  1. Routing module (grain-aware patchify, one token per region):
       coarse region: its single code x[:, :, 2i, 2j] (any of its 4 equal copies) -> Linear(C -> D)
       fine region:   its 2x2xC cells flattened                                    -> Linear(4C -> D)
       + a grain-type embedding + a LEARNABLE position embedding (R, D)          -> tokens (N, R, D)
  2. Trunk: `trunk_depth` efdit DiTBlocks (adaLN-Zero on c = t_emb + y_emb) -> a coarse noise per region
     (FinalLayer, C_out = C or 2C with learned Σ): the whole prediction of coarse regions, broadcast 2x2.
  3. RefineNet: every region's trunk token expands to 4 sub-tokens (+ learnable 2x2 sub-position embedding
     + an embedding of its noisy cell); `refine_depth` DiTBlocks with an attention mask: queries attend to the
     fine sub-tokens and one token per coarse region ("global"), or to their own region only ("region").
     A FinalLayer gives Δ per cell; ε̂_fine = ε̂_coarse (broadcast) + Δ (residual correction) or Δ (direct).
  4. Combine: out = where(M_up == fine, ε̂_fine, nearest_up2(ε̂_coarse)) (N, C_out, H1, W1): coarse regions
     are constant over their cells by construction, so the sampler keeps the multi-grained structure.
By default (`sparse_refine`) the RefineNet runs only on the sub-tokens it needs, gathered per image and padded to
the batch's longest: "global" needs the fine sub-tokens and the first sub-token of every coarse region (the keys;
coarse regions' other 3 sub-tokens are never attended to and their outputs are discarded), "region" only the fine
sub-tokens. At a fine share r that is (4r + (1 - r)) / 4 resp. r of the dense 4R tokens; the result equals the
dense masked computation (`sparse_refine=False`, kept as the reference) up to float rounding.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models.dit import DiTBlock, FinalLayer, modulate, xavier_linears
from ..models.embedders import LabelEmbedder, TimestepEmbedder


class RefineBlock(DiTBlock):
    """An efdit DiTBlock whose self-attention takes a mask (same parameters and adaLN-Zero modulation)."""

    def forward(self, x, c, attn_mask=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), attn_mask=attn_mask)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DynamicContentTransformer(nn.Module):
    def __init__(self, input_size: int = 16, in_channels: int = 4, hidden_size: int = 128, trunk_depth: int = 4,
                 refine_depth: int = 2, num_heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 10,
                 class_dropout_prob: float = 0.1, learn_sigma: bool = True, refine_attention: str = "global",
                 residual: bool = True, sparse_refine: bool = True):
        super().__init__()
        if input_size % 2:
            raise ValueError("the fine latent grid must have an even size")
        if refine_attention not in ("global", "region"):
            raise ValueError(f"refine_attention must be global | region, not {refine_attention!r}")
        self.input_size = (input_size, input_size)
        self.grid = (input_size // 2, input_size // 2)
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma, self.refine_attention, self.residual = learn_sigma, refine_attention, residual
        self.sparse_refine = sparse_refine
        R = self.grid[0] * self.grid[1]
        C, D = in_channels, hidden_size
        # routing module
        self.coarse_embedder = nn.Linear(C, D)
        self.fine_embedder = nn.Linear(4 * C, D)
        self.grain_embed = nn.Parameter(torch.zeros(2, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, R, D))          # learnable
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(num_classes, D, class_dropout_prob)
        # trunk
        self.blocks = nn.ModuleList([DiTBlock(D, num_heads, mlp_ratio) for _ in range(trunk_depth)])
        self.final_layer = FinalLayer(D, 1, self.out_channels)        # coarse noise per region
        # RefineNet
        self.sub_pos_embed = nn.Parameter(torch.zeros(1, 1, 4, D))
        self.cell_embedder = nn.Linear(C, D)
        self.refine_blocks = nn.ModuleList([RefineBlock(D, num_heads, mlp_ratio) for _ in range(refine_depth)])
        self.refine_final = FinalLayer(D, 1, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        self.apply(xavier_linears)
        for p in (self.grain_embed, self.pos_embed, self.sub_pos_embed):
            nn.init.normal_(p, std=0.02)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for b in list(self.blocks) + list(self.refine_blocks):
            nn.init.zeros_(b.adaLN_modulation[-1].weight)
            nn.init.zeros_(b.adaLN_modulation[-1].bias)
        for f in (self.final_layer, self.refine_final):
            for layer in (f.adaLN_modulation[-1], f.linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    # ---- helpers ----------------------------------------------------------------------------------------
    def cells(self, x):
        """(N, C, 2h, 2w) -> (N, R, 4, C): each region's 2x2 cells in (row, col) order."""
        N, C = x.shape[:2]
        h, w = self.grid
        return x.view(N, C, h, 2, w, 2).permute(0, 2, 4, 3, 5, 1).reshape(N, h * w, 4, C)

    def uncells(self, y):
        """(N, R, 4, C) -> (N, C, 2h, 2w)."""
        N, _, _, C = y.shape
        h, w = self.grid
        return y.view(N, h, w, 2, 2, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, 2 * h, 2 * w)

    def refine_mask(self, fine):
        """fine (N, R) bool -> attention mask (N, 1, 4R, 4R) or (N, 1, 1, 4R), True = may attend."""
        N, R = fine.shape
        if self.refine_attention == "region":
            region = torch.arange(R, device=fine.device).repeat_interleave(4)          # (4R,)
            return (region[:, None] == region[None, :]).expand(N, 1, 4 * R, 4 * R)
        first = torch.zeros(4, dtype=torch.bool, device=fine.device)
        first[0] = True
        keys = fine[:, :, None] | first[None, None, :]        # fine sub-tokens + one token per coarse region
        return keys.reshape(N, 1, 1, 4 * R)

    def refine_sparse(self, sub, c, fine):
        """The RefineNet on the needed sub-tokens only. sub (N, 4R, D), c (N, D), fine (N, R) bool
        -> Δ (N, 4R, C_out), zero where not computed (coarse regions: discarded by the caller)."""
        N, R = fine.shape
        first = torch.zeros(4, dtype=torch.bool, device=fine.device)
        first[0] = True
        need = fine[:, :, None] | first if self.refine_attention == "global" else fine[:, :, None].expand(N, R, 4)
        need = need.reshape(N, 4 * R)                                         # (N, 4R)
        L = int(need.sum(1).max())
        out = sub.new_zeros(N, 4 * R, self.out_channels)
        if L == 0:                                                            # "region" and no fine region at all
            return out
        order = torch.argsort((~need).to(torch.int8), dim=1, stable=True)[:, :L]   # needed first, in order
        valid = torch.gather(need, 1, order)                                  # (N, L): False = padding
        x = torch.gather(sub, 1, order[..., None].expand(N, L, sub.shape[-1]))  # (N, L, D)
        if self.refine_attention == "global":   # every needed token is a key; padded queries see any (discarded)
            mask = valid[:, None, None, :] | ~valid[:, None, :, None]
        else:
            region = torch.where(valid, order // 4, -1)                       # (N, L)
            mask = (region[:, :, None] == region[:, None, :]) & valid[:, None, :]
            mask = (mask | torch.eye(L, dtype=torch.bool, device=mask.device))[:, None]  # padding sees itself
        for block in self.refine_blocks:
            x = block(x, c, mask)
        delta = self.refine_final(x, c)                                       # (N, L, C_out)
        return out.scatter(1, order[..., None].expand(N, L, self.out_channels), delta * valid[..., None])

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(self, x, t, y, grain):
        """x: (N, C, H1, W1) multi-grained noisy latent, t: (N,), y: (N,), grain: (N, h, w) 1 = fine
        -> (N, C_out, H1, W1)."""
        N, C = x.shape[:2]
        fine = grain.reshape(N, -1).bool()                                    # (N, R)
        cells = self.cells(x)                                                 # (N, R, 4, C)
        tok = torch.where(fine[..., None], self.fine_embedder(cells.reshape(N, -1, 4 * C)),
                          self.coarse_embedder(cells[:, :, 0]))              # (N, R, D)
        tok = tok + self.grain_embed[fine.long()] + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)            # (N, D)
        for block in self.blocks:
            tok = block(tok, c, self.grid)
        coarse = self.final_layer(tok, c)                                     # (N, R, C_out)
        sub = tok[:, :, None] + self.sub_pos_embed + self.cell_embedder(cells)   # (N, R, 4, D)
        sub = sub.reshape(N, -1, sub.shape[-1])                               # (N, 4R, D)
        if self.sparse_refine:
            delta = self.refine_sparse(sub, c, fine)
        else:
            mask = self.refine_mask(fine)
            for block in self.refine_blocks:
                sub = block(sub, c, mask)
            delta = self.refine_final(sub, c)
        delta = delta.view(N, -1, 4, self.out_channels)                       # (N, R, 4, C_out)
        fine_out = coarse[:, :, None] + delta if self.residual else delta
        out = torch.where(fine[:, :, None, None], fine_out, coarse[:, :, None].expand_as(fine_out))
        return self.uncells(out)


def build_dct(cfg, in_channels: int, num_classes: int) -> DynamicContentTransformer:
    d = cfg.dct
    return DynamicContentTransformer(input_size=cfg.data.image_size // cfg.dvae.f1, in_channels=in_channels,
                                     hidden_size=d.hidden_size, trunk_depth=d.trunk_depth,
                                     refine_depth=d.refine_depth, num_heads=d.num_heads, num_classes=num_classes,
                                     class_dropout_prob=d.class_dropout_prob, learn_sigma=d.learn_sigma,
                                     refine_attention=d.refine_attention, residual=d.residual,
                                     sparse_refine=d.sparse_refine)
