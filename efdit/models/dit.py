"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, 2023), written for efdit.

Names follow the paper and the official checkpoints (`x_embedder`, `t_embedder`, `y_embedder`,
`blocks.{i}.adaLN_modulation`, `final_layer`), so `DiT-XL-2-256x256.pt` loads key for key.
Departures from the reference code, all backwards compatible with its checkpoints:
  * any H x W grid divisible by the patch size (square or not), any in_channels;
  * attention through a swappable backend (SDPA by default), see attention.py;
  * an optional `block_cache` so sampling caches (FORA, Δ-DiT, TaylorSeer) can reuse or forecast the
    un-gated attention / MLP outputs (the block applies the current step's gate), and `forward_blocks` to
    run a range of blocks;
  * optional gradient checkpointing and a learnable position embedding;
  * an optional guidance embedding (`guidance_embed`): the guidance scale w as an input, embedded like t and added
    to c, for a student distilled from a guided teacher (Meng et al. 2023, "On Distillation of Guided Diffusion
    Models"): one forward per sampling step instead of one per guidance branch.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.utils.checkpoint

from ..errors import EfditError, did_you_mean
from .attention import Attention, Mlp
from .embedders import LabelEmbedder, TimestepEmbedder


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x: (N, T, D); shift, scale: (N, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with a p x p stride-p convolution; T = (H/p)(W/p)."""

    def __init__(self, input_size: tuple[int, int], patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        H, W = input_size
        if H % patch_size or W % patch_size:
            raise EfditError(f"input size {H}x{W} is not divisible by patch size {patch_size} "
                             f"(efdit does not pad silently: resize or crop the data, or pick another patch)")
        self.grid_size = (H // patch_size, W // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, T, D)


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, attn_backend: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, backend=attn_backend)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        # DiffFit's learnable branch scales (added by models.peft; None = absent, no state-dict keys)
        self.gamma_attn: nn.Parameter | None = None
        self.gamma_mlp: nn.Parameter | None = None

    def attn_out(self, x, shift, scale, grid=None):
        # the un-gated attention branch Attn(modulate(LN(x), shift_msa, scale_msa)): (N, T, D)
        return self.attn(modulate(self.norm1(x), shift, scale), grid=grid)

    def mlp_out(self, x, shift, scale):
        # the un-gated MLP branch MLP(modulate(LN(x), shift_mlp, scale_mlp)): (N, T, D)
        return self.mlp(modulate(self.norm2(x), shift, scale))

    @staticmethod
    def gated(out, gate, gamma):
        # out: (N, T, D) branch output; gate: (N, D) adaLN-Zero gate; gamma: DiffFit's scale (1,) or None
        out = gate.unsqueeze(1) * out
        return out if gamma is None else out * gamma

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid=None, block_cache=None, index: int = 0):
        # x: (N, T, D), c: (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        if block_cache is None:
            x = x + self.gated(self.attn_out(x, shift_msa, scale_msa, grid), gate_msa, self.gamma_attn)
            return x + self.gated(self.mlp_out(x, shift_mlp, scale_mlp), gate_mlp, self.gamma_mlp)
        # per-branch cache entry points: the cache returns the un-gated branch output, computed by fn or reused /
        # forecast; the gate and γ of *this* step are applied here, so a cached branch follows the current c
        attn = block_cache(index, "attn", lambda x_, c_: self.attn_out(x_, shift_msa, scale_msa, grid), x, c)
        x = x + self.gated(attn, gate_msa, self.gamma_attn)
        mlp = block_cache(index, "mlp", lambda x_, c_: self.mlp_out(x_, shift_mlp, scale_mlp), x, c)
        return x + self.gated(mlp, gate_mlp, self.gamma_mlp)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


def xavier_linears(module: nn.Module) -> None:
    """DiT's basic init, for `model.apply`: Xavier-uniform Linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone.

    forward(x, t, y) -> (N, C_out, H, W), C_out = 2*in_channels with learn_sigma (ε then the Σ interpolation v).
    With `guidance_embed`, forward(x, t, y, w=w): w the guidance scale, a number or (N,); c = t_emb + y_emb + w_emb,
    where `w_embedder` (a TimestepEmbedder of w) starts with a zero output layer, so the model starts as the
    conditional model it is initialised from. Without it the model has no `w_embedder` keys and takes no w.
    """

    def __init__(self, input_size: int | tuple[int, int] = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 class_dropout_prob: float = 0.1, num_classes: int = 1000, learn_sigma: bool = True,
                 pos_embed: str = "sincos", attn_backend: str = "sdpa", y_embedder: nn.Module | None = None,
                 guidance_embed: bool = False):
        super().__init__()
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.input_size = tuple(input_size)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(self.input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = y_embedder if y_embedder is not None else \
            LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.guidance_embed = guidance_embed
        self.w_embedder = TimestepEmbedder(hidden_size) if guidance_embed else None
        self.grid_size = self.x_embedder.grid_size
        num_patches = self.x_embedder.num_patches
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', not {pos_embed!r}")
        # Fixed sin-cos by default (frozen, still stored in the state dict like the official checkpoints).
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=pos_embed == "learned")
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, attn_backend) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        if self.pos_embed.device.type == "meta":
            return
        self.apply(xavier_linears)

        pe = get_2d_sincos_pos_embed(self.hidden_size, self.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))

        # patch embedding initialised like a Linear
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        for name, p in self.y_embedder.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.w_embedder is not None:  # zero output: w_emb = 0, the model starts as its conditional branch
            nn.init.normal_(self.w_embedder.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.w_embedder.mlp[2].weight)
            nn.init.zeros_(self.w_embedder.mlp[2].bias)

        # adaLN-Zero: every block starts as the identity and the output is zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W) for an h x w token grid (square or not)."""
        c, p = self.out_channels, self.patch_size
        h, w = self.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w=None):
        """Tokens and conditioning: x (N, C, H, W) -> (N, T, D); c = t_emb + y_emb (+ w_emb) (N, D)."""
        if x.shape[-2:] != self.input_size:
            raise EfditError(f"model expects {self.input_size[0]}x{self.input_size[1]} inputs, "
                             f"got {x.shape[-2]}x{x.shape[-1]}")
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        if self.w_embedder is not None:
            c = c + self.w_embedder(self.guidance_scales(w, x))
        return tokens, c

    def guidance_scales(self, w, x: torch.Tensor) -> torch.Tensor:
        """w (a number, a 0-d or (N,) tensor) -> (N,) float32 on x's device."""
        if w is None:
            raise EfditError("this model is guidance-distilled (model.guidance_embed): it takes the guidance scale as "
                             "an input, model(x, t, y, w=scale); `efdit distill-guidance` trains one")
        w = torch.as_tensor(w, dtype=torch.float32, device=x.device)
        if w.dim() == 0:
            w = w.expand(x.shape[0])
        if w.shape != (x.shape[0],):
            raise ValueError(f"w must be a number or ({x.shape[0]},), got shape {tuple(w.shape)}")
        return w

    def forward_blocks(self, x: torch.Tensor, c: torch.Tensor, start: int = 0, stop: int | None = None,
                       block_cache=None) -> torch.Tensor:
        """Run blocks[start:stop] on tokens x (N, T, D) with conditioning c (N, D).

        With `block_cache`, each block calls `block_cache(i, branch, fn, x, c)`: branch "attn" / "mlp"
        (granularity "branch": fn returns the un-gated branch output F (N, T, D); the block adds γ·gate·F with the
        current step's adaLN gate), or "block" (granularity "block": the whole block, fn returns its output).
        """
        stop = len(self.blocks) if stop is None else stop
        for i in range(start, stop):
            block = self.blocks[i]
            if block_cache is not None:
                if getattr(block_cache, "granularity", "branch") == "block":
                    x = block_cache(i, "block", lambda x_, c_, b=block: b(x_, c_, self.grid_size), x, c)
                else:
                    x = block(x, c, self.grid_size, block_cache, i)
            elif self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, c, self.grid_size, use_reentrant=False)
            else:
                x = block(x, c, self.grid_size)
        return x

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, block_cache=None, **cond) -> torch.Tensor:
        """x: (N, C, H, W) noisy input, t: (N,) timesteps, y: (N,) label ids -> (N, C_out, H, W); with
        `guidance_embed`, w=: the guidance scale (a number or (N,))."""
        w = cond.pop("w", None) if self.w_embedder is not None else None
        if cond:
            raise TypeError(f"DiT takes no extra conditioning, got {sorted(cond)}"
                            + (" (w needs a guidance-distilled model, guidance_embed=True)" if "w" in cond else ""))
        tokens, c = self.embed(x, t, y, w)
        tokens = self.forward_blocks(tokens, c, block_cache=block_cache)
        return self.unpatchify(self.final_layer(tokens, c))

    def set_attention_backend(self, name: str, **kwargs) -> None:
        for block in self.blocks:
            block.attn.set_backend(name, **kwargs)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int]) -> np.ndarray:
    """Fixed 2-D sin-cos embedding of an h x w grid -> (h*w, D): half of D encodes rows, half columns."""
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if embed_dim % 4:
        raise ValueError("the 2-D sin-cos embedding needs a hidden size divisible by 4")
    gw, gh = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))  # (h, w) each
    # The reference (MAE) code encodes the column coordinate in the first half, the row in the second.
    emb_w = _sincos_1d(embed_dim // 2, gw.reshape(-1))
    emb_h = _sincos_1d(embed_dim // 2, gh.reshape(-1))
    return np.concatenate([emb_w, emb_h], axis=1)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos, omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

# name -> (depth, hidden_size, num_heads, patch_size)
_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
DiT_models: dict[str, dict] = {
    f"DiT-{s}/{p}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=p)
    for s, (d, h, n) in _SIZES.items() for p in (2, 4, 8)
}


def build_dit(name: str | None = None, **kwargs) -> DiT:
    """Build a DiT by name (`"DiT-XL/2"`, …) with overrides, or from explicit sizes when name is None."""
    if name is not None:
        if name not in DiT_models:
            raise EfditError(f"unknown model {name!r}{did_you_mean(name, DiT_models)} "
                             f"(known: {', '.join(DiT_models)})")
        kwargs = {**DiT_models[name], **kwargs}
    return DiT(**kwargs)


def count_params(model: nn.Module, trainable_only: bool = False, exclude: tuple[str, ...] = ()) -> int:
    return sum(p.numel() for n, p in model.named_parameters()
               if (p.requires_grad or not trainable_only) and not any(n.startswith(e) for e in exclude))


def resolve_device(device: str = "auto") -> torch.device:
    """`auto | cpu | cuda | cuda:N | mps` -> a torch.device, with a clear error when it is unavailable."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EfditError("device 'cuda' requested but no CUDA GPU is available (use --device cpu or auto)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EfditError("device 'mps' requested but MPS is not available (use --device cpu or auto)")
    return dev
