"""Parameter-efficient fine-tuning presets: which parameters train, and the modules they add.

A preset is a rule on parameter names plus the modules it adds to the model (affine LayerNorms, DiffFit's γ,
LoRA adapters). Base keys stay unchanged; what a preset adds starts as an identity (LN γ=1, β=0; DiffFit γ=1;
LoRA B=0), so loading a base checkpoint into a PEFT model is an exact start. Label tables (`y_embedder.*`,
flat or tiered) always train: a new label set has no pretrained rows.

  full           everything (the frozen sin-cos pos_embed stays frozen)
  bitfit         biases + label tables
  difffit        biases + per-block γ on the attention and MLP branches + LN affine + label tables
  finediffusion  biases + LN affine + label tables (FineDiffusion's rule: names containing bias / norm / the table)
  efdit          the finediffusion rule with the Tiered Embedder's tables (the embedder is chosen by model.embedder)
  lora           LoRA (rank r) on qkv / proj / fc1 / fc2 through the `peft` library + label tables

Attention adaptation (`attn_adapt`). The rules above freeze the attention weights qkv / proj, which is right while
the attention is the one the base was trained with (SDPA), and wrong when ProAttention's proxy (or robust) backend
replaces it: nothing trainable can then absorb the change of the attention core. `attn_adapt` says what the
attention weights get on top of the rule:
  frozen  nothing (the rule alone)
  lora    a rank-r update on every block's qkv and proj (`add_attention_lora`: the same `peft` LoRA as the lora
          preset, on those two layers only; B = 0 at the start)
  full    qkv.weight and proj.weight train as well
  auto    lora when a backend other than exact softmax attention (sdpa | math) runs under a rule that freezes
          qkv / proj (bitfit, difffit, finediffusion, efdit); frozen otherwise (SDPA, and the full / lora presets,
          whose attention weights already adapt). A base assumed trained with SDPA, as the shipped bases and the
          official DiT checkpoint are; a base trained with the same backend wants `frozen`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import EfditError, did_you_mean

PEFT_PRESETS = ("full", "bitfit", "difffit", "finediffusion", "efdit", "lora")
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")
ATTN_ADAPT = ("auto", "frozen", "lora", "full")
EXACT_ATTENTION = ("sdpa", "math")    # the softmax attention a pretrained DiT was trained with
FREEZING_RULES = ("bitfit", "difffit", "finediffusion", "efdit")   # rules under which qkv / proj do not train


def make_layernorms_affine(model: nn.Module) -> list[str]:
    """Switch every non-affine LayerNorm to an affine one with γ = 1, β = 0 (an identity change)."""
    added = []
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.LayerNorm) and not child.elementwise_affine:
                new = nn.LayerNorm(child.normalized_shape, eps=child.eps, elementwise_affine=True)
                new.to(next(model.parameters()).device)
                setattr(mod, child_name, new)
                prefix = f"{name}.{child_name}" if name else child_name
                added += [f"{prefix}.weight", f"{prefix}.bias"]
    return added


def add_difffit_scales(model: nn.Module, blocks: str = "all") -> list[str]:
    """Per-block scalars γ (init 1) on the attention and MLP branches. blocks: "all" | "first_half"."""
    n = len(model.blocks)
    chosen = range(n) if blocks == "all" else range(n // 2)
    added = []
    for i in chosen:
        b = model.blocks[i]
        b.gamma_attn = nn.Parameter(torch.ones(1, device=b.adaLN_modulation[-1].weight.device))
        b.gamma_mlp = nn.Parameter(torch.ones(1, device=b.adaLN_modulation[-1].weight.device))
        added += [f"blocks.{i}.gamma_attn", f"blocks.{i}.gamma_mlp"]
    return added


def add_lora(model: nn.Module, rank: int = 8, alpha: float | None = None,
             targets: tuple[str, ...] = LORA_TARGETS, modules: tuple[str, ...] = ("attn", "mlp")) -> list[str]:
    """LoRA (rank r, α = r unless given) through the `peft` library on the blocks' `modules`.`targets` layers.

    peft keeps each wrapped Linear as `<layer>.base_layer` (keys `blocks.0.attn.qkv.base_layer.weight`) and adds
    `<layer>.lora_A.default.weight` (Kaiming-uniform) and `<layer>.lora_B.default.weight` (zeros), so the model
    starts as the wrapped one; a plain base checkpoint loads into it through `load_state_dict_checked`, which maps
    `qkv.weight` to `qkv.base_layer.weight`. Returns the added keys."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise EfditError("LoRA needs the `peft` library: pip install 'efdit[lora]'") from None
    before = set(model.state_dict())
    # a regex on full module names, so that `proj` means the attention output and not x_embedder.proj
    pattern = r".*blocks\.\d+\.(" + "|".join(modules) + r")\.(" + "|".join(targets) + ")"
    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=pattern, lora_dropout=0.0, bias="none")
    inject_adapter_in_model(cfg, model)
    return sorted(k for k in model.state_dict() if k not in before and "lora_" in k)


def add_attention_lora(model: nn.Module, rank: int = 8) -> list[str]:
    """LoRA on every block's attention qkv and proj (the `lora` attention adaptation). Returns the added keys."""
    return add_lora(model, rank, targets=("qkv", "proj"), modules=("attn",))


def attention_backends(model: nn.Module) -> set[str]:
    return {block.attn.backend_name for block in getattr(model, "blocks", ())}


def resolve_attn_adapt(attn_adapt: str, preset: str, backends) -> str:
    """What the attention weights get beyond the PEFT rule: frozen | lora | full (see the module docstring)."""
    if attn_adapt not in ATTN_ADAPT:
        raise EfditError(f"model.attn_adapt must be one of {' | '.join(ATTN_ADAPT)}, not {attn_adapt!r}"
                         + did_you_mean(attn_adapt, ATTN_ADAPT))
    if preset not in FREEZING_RULES:
        return "frozen"        # full: they train already; lora: the preset's adapters already cover qkv / proj
    if attn_adapt == "auto":
        return "lora" if set(backends) - set(EXACT_ATTENTION) else "frozen"
    return attn_adapt


def apply_peft(model: nn.Module, preset: str, lora_rank: int = 8, difffit_blocks: str = "all",
               attn_adapt: str = "auto") -> list[str]:
    """Add the preset's modules and set requires_grad by its rule, with the attention adaptation `attn_adapt`
    resolved against the model's attention backends (set it before). Returns the names of the added tensors
    (a base checkpoint lacks them; they start as identities); `model.attn_adapt` holds the resolved mode."""
    if preset not in PEFT_PRESETS:
        raise EfditError(f"unknown PEFT preset {preset!r}{did_you_mean(preset, PEFT_PRESETS, n=2)} "
                         f"(known: {', '.join(PEFT_PRESETS)})")
    adapt = resolve_attn_adapt(attn_adapt, preset, attention_backends(model))
    added: list[str] = []
    if preset in ("difffit", "finediffusion", "efdit"):
        added += make_layernorms_affine(model)
    if preset == "difffit":
        added += add_difffit_scales(model, difffit_blocks)
    if preset == "lora":
        added += add_lora(model, lora_rank)
    adapters = set(add_attention_lora(model, lora_rank)) if adapt == "lora" else set()
    added += sorted(adapters)
    for name, p in model.named_parameters():
        train = is_trainable(name, preset) or name in adapters or (adapt == "full" and is_attention_weight(name))
        p.requires_grad_(train and not (name == "pos_embed" and not p.requires_grad))
    model.attn_adapt = adapt
    return added


def is_attention_weight(name: str) -> bool:
    """A block's attention matrix or its LoRA factor: blocks.<i>.attn.{qkv,proj}.weight, .base_layer.weight or
    .lora_{A,B}.<adapter>.weight."""
    parts = name.split(".")
    return len(parts) >= 5 and parts[0] == "blocks" and parts[2] == "attn" and parts[3] in ("qkv", "proj") \
        and parts[-1] == "weight" and (len(parts) == 5 or parts[4] in ("base_layer", "lora_A", "lora_B"))


def is_trainable(name: str, preset: str) -> bool:
    if name == "pos_embed":
        return preset == "full"
    if name.startswith("y_embedder."):
        return True
    if preset == "full":
        return True
    if preset == "lora":
        return "lora_" in name
    is_bias = name.endswith(".bias") and "lora_" not in name
    if preset == "bitfit":
        return is_bias
    is_norm = ".norm" in name or name.startswith("norm")
    if preset in ("finediffusion", "efdit"):
        return is_bias or is_norm
    if preset == "difffit":
        return is_bias or is_norm or "gamma_" in name
    return False


def parameter_report(model: nn.Module) -> str:
    """Trainable and total parameter counts, with what the attention adaptation adds when it is on."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = f"trainable {trainable:,} / {total:,} parameters ({100 * trainable / max(total, 1):.4f}%)"
    adapt = getattr(model, "attn_adapt", "frozen")
    if adapt != "frozen":
        n_attn = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and is_attention_weight(n))
        out += f", of which attention ({adapt} on qkv / proj) {n_attn:,}"
    return out
