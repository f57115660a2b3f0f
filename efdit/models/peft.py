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
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import EfditError, did_you_mean

PEFT_PRESETS = ("full", "bitfit", "difffit", "finediffusion", "efdit", "lora")
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


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
             targets: tuple[str, ...] = LORA_TARGETS) -> list[str]:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise EfditError("the lora preset needs the `peft` library: pip install 'efdit[lora]'") from None
    before = set(model.state_dict())
    # a regex on full module names, so that `proj` means the attention output and not x_embedder.proj
    pattern = r".*blocks\.\d+\.(attn|mlp)\.(" + "|".join(targets) + ")"
    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=pattern, lora_dropout=0.0, bias="none")
    inject_adapter_in_model(cfg, model)
    return sorted(k for k in model.state_dict() if k not in before and "lora_" in k)


def apply_peft(model: nn.Module, preset: str, lora_rank: int = 8, difffit_blocks: str = "all") -> list[str]:
    """Add the preset's modules and set requires_grad by its rule. Returns the names of the added tensors
    (a base checkpoint lacks them; they start as identities)."""
    if preset not in PEFT_PRESETS:
        raise EfditError(f"unknown PEFT preset {preset!r}{did_you_mean(preset, PEFT_PRESETS, n=2)} "
                         f"(known: {', '.join(PEFT_PRESETS)})")
    added: list[str] = []
    if preset in ("difffit", "finediffusion", "efdit"):
        added += make_layernorms_affine(model)
    if preset == "difffit":
        added += add_difffit_scales(model, difffit_blocks)
    if preset == "lora":
        added += add_lora(model, lora_rank)
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name, preset) and not (name == "pos_embed" and not p.requires_grad))
    return added


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
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable {trainable:,} / {total:,} parameters ({100 * trainable / max(total, 1):.4f}%)"
