"""Checkpoints: the official DiT `.pt` files, and efdit's own safetensors files.

Official (`DiT-XL-2-256x256.pt`, `DiT-XL-2-512x512.pt`): plain state dicts whose keys are the module names of
`DiT`. They are read with `torch.load(weights_only=True)` only (no arbitrary unpickling), loaded strictly
with shape checks, and optionally with a new label table (fine-tuning on another label set).

efdit's own: one `.safetensors` file whose metadata holds the JSON config (enough to rebuild the model) and
a format version. Writes are atomic (temp file + rename).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
from pathlib import Path

import torch

from ..errors import EfditError, atomic_write

FORMAT_VERSION = 1
OFFICIAL_URLS = {
    "DiT-XL-2-256x256.pt": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt",
    "DiT-XL-2-512x512.pt": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt",
}
LABEL_TABLE_PREFIX = "y_embedder."


def _missing_file_error(path: Path) -> EfditError:
    url = OFFICIAL_URLS.get(path.name)
    where = (f"; the official file is published by facebookresearch/DiT at {url} (CC-BY-NC): download it "
             f"yourself and pass its local path" if url else "")
    return EfditError(f"checkpoint not found: expected {path.name} at {path}{where}. efdit never downloads weights")


# What a weights-only load may build besides tensors and containers: the `args` of facebookresearch/DiT's
# train.py checkpoints ({"model", "ema", "opt", "args"}) is an argparse.Namespace. Nothing else is allowed, so
# no code in a checkpoint ever runs.
SAFE_GLOBALS = (argparse.Namespace,)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _refusal_reason(e: BaseException) -> str:
    """One line saying why torch.load refused a file (no terminal escape codes, no advice to unpickle)."""
    text = _ANSI.sub("", str(e))
    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text:
        for line in text.splitlines():
            line = line.strip()
            if line.startswith(("Trying to load unsupported", "Unsupported global", "Unsupported operand")) or \
                    "WeightsUnpickler error" in line:
                return "it holds Python objects other than tensors (" + line.rstrip(".") + \
                       "); efdit never runs code from a checkpoint"
        return "it holds Python objects other than tensors; efdit never runs code from a checkpoint"
    if "central directory" in text or "zip archive" in text:
        return "it is truncated or not a torch file (" + text.splitlines()[0].split(".")[0] + ")"
    first = text.splitlines()[0].strip() if text.strip() else ""
    return f"{type(e).__name__}{': ' + first if first else ''} (not a torch checkpoint?)"


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A `.pt` state dict read safely (weights_only=True, to CPU). Unwraps facebookresearch/DiT train.py
    checkpoints ({"model", "ema", "opt", "args"}: the EMA weights are taken, as its sample.py does)."""
    path = Path(path)
    if not path.is_file():
        raise _missing_file_error(path)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a pickle with code objects, a truncated file, not a torch file …
        raise EfditError(f"cannot read {path} as a weights-only torch checkpoint: {_refusal_reason(e)}") from None
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        obj = obj["ema"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EfditError(f"{path} does not hold a state dict of tensors")
    return obj


def infer_dit_config(sd: dict[str, torch.Tensor]) -> dict:
    """DiT constructor arguments from an official-layout state dict (hidden size, depth, patch, …)."""
    try:
        w = sd["x_embedder.proj.weight"]  # (D, C_in, p, p)
        hidden, in_ch, p = w.shape[0], w.shape[1], w.shape[2]
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        out_dim = sd["final_layer.linear.weight"].shape[0]  # p*p*C_out
        rows = sd["y_embedder.embedding_table.weight"].shape[0]
        tokens = sd["pos_embed"].shape[1]
        mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise EfditError(f"not a DiT state dict (missing {e})") from None
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise EfditError(f"cannot infer a square input size from {tokens} position embeddings")
    # the official sizes; otherwise 64-wide heads (override with num_heads=…)
    heads = {1152: 16, 1024: 16, 768: 12, 384: 6}.get(hidden, max(1, hidden // 64))
    return dict(input_size=side * p, patch_size=p, in_channels=in_ch, hidden_size=hidden, depth=depth,
                num_heads=heads, mlp_ratio=mlp_hidden / hidden, num_classes=rows - 1, class_dropout_prob=0.1,
                learn_sigma=out_dim == 2 * p * p * in_ch)


def wrapped_keys(sd: dict[str, torch.Tensor], own) -> dict[str, torch.Tensor]:
    """`sd` with `<layer>.weight` / `.bias` renamed `<layer>.base_layer.weight` / `.bias` where the model (its keys
    `own`) has only the latter: peft's LoRA keeps each wrapped Linear as `base_layer` (models/peft.py)."""
    out = {}
    for k, v in sd.items():
        head, _, leaf = k.rpartition(".")
        wrapped = f"{head}.base_layer.{leaf}"
        out[wrapped if k not in own and wrapped in own else k] = v
    return out


def load_state_dict_checked(model: torch.nn.Module, sd: dict[str, torch.Tensor], *, replace_label_table: bool = False,
                            allow_missing: tuple[str, ...] = (), source: str = "checkpoint", verbose: bool = True
                            ) -> list[str]:
    """Strict, shape-checked load. Returns the keys left at their fresh initialisation.

    replace_label_table: every `y_embedder.*` key of the model keeps its new initialisation (new label set:
    new num_classes, or a tiered embedder) and the checkpoint's label tables are ignored; what was
    re-initialised is printed. `allow_missing`: key prefixes the checkpoint may lack (zero-initialised extras).
    A plain checkpoint loads into a model whose layers LoRA wrapped (`wrapped_keys`).
    """
    own = model.state_dict()
    sd = wrapped_keys(sd, own)
    reinit = []
    if replace_label_table:
        reinit = sorted(k for k in own if k.startswith(LABEL_TABLE_PREFIX))
        sd = {k: v for k, v in sd.items() if not k.startswith(LABEL_TABLE_PREFIX)}
    missing = sorted(k for k in own if k not in sd and k not in reinit and not k.startswith(allow_missing))
    unexpected = sorted(k for k in sd if k not in own)
    mismatched = sorted(f"{k}: {tuple(sd[k].shape)} in {source}, {tuple(own[k].shape)} in model"
                        for k in sd if k in own and sd[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", … ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"{what}: {shown}")
        hint = ""
        if any(k.startswith(LABEL_TABLE_PREFIX) for k in (missing + unexpected + [m.split(":")[0] for m in mismatched])):
            hint = " (a different label set? load with replace_label_table=True / --new-labels)"
        raise EfditError(f"{source} does not fit the model: " + "; ".join(parts) + hint)
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v.to(own[k].dtype))
    reinit += sorted(k for k in own if k not in sd and k not in reinit)
    if verbose and reinit:
        print(f"re-initialised (not in {source}): {', '.join(reinit)}")
    return reinit


def load_official_dit(path: str | os.PathLike, num_classes: int | None = None, y_embedder=None,
                      class_dropout_prob: float = 0.1, verbose: bool = True, **model_kwargs):
    """Build a DiT matching an official checkpoint and load it.

    With `num_classes` different from the checkpoint's (or a custom `y_embedder`), the label table is replaced
    by a freshly initialised one (N(0, 0.02), null row included) and everything else is loaded strictly.
    """
    from .dit import DiT
    sd = read_torch_state_dict(path)
    cfg = infer_dit_config(sd)
    replace = y_embedder is not None or (num_classes is not None and num_classes != cfg["num_classes"])
    if num_classes is not None:
        cfg["num_classes"] = num_classes
    cfg["class_dropout_prob"] = class_dropout_prob
    cfg.update(model_kwargs)
    model = DiT(**cfg, y_embedder=y_embedder)
    load_state_dict_checked(model, sd, replace_label_table=replace, source=Path(path).name, verbose=verbose)
    return model


# ---- efdit's own format ---------------------------------------------------------------------------------

def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict | None = None,
                     extra_metadata: dict[str, str] | None = None) -> Path:
    """Write tensors + JSON config atomically; the config travels in the file's metadata."""
    from safetensors.torch import save_file
    path = Path(path)
    meta = {"format": "efdit", "format_version": str(FORMAT_VERSION)}
    if config is not None:
        meta["config"] = json.dumps(config, sort_keys=True)
    meta.update(extra_metadata or {})
    with atomic_write(path) as tmp:   # safetensors recreates its output 0600: atomic_write sets the umask's mode
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return path


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """-> (tensors, config, metadata). Refuses files from a newer format; upgrades older ones."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise EfditError(f"checkpoint not found: {path}")
    try:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise EfditError(f"cannot read {path} as safetensors: {e}") from None
    version = int(meta.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise EfditError(f"{path} has format version {version}, newer than this efdit understands "
                         f"({FORMAT_VERSION}): upgrade efdit")
    if version < 1:
        raise EfditError(f"{path} has no efdit format version: not an efdit checkpoint "
                         f"(official DiT .pt files load with load_official_dit)")
    config = json.loads(meta["config"]) if "config" in meta else {}
    return tensors, config, meta


def file_sha256(path: str | os.PathLike, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]
