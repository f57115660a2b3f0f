"""Fine-tuning from a base model, and PEFT runs saved as deltas over that base.

`init_from_base` loads a base model file (an efdit model file or the official `DiT-XL-2-256x256.pt`) into a
freshly built, possibly PEFT-modified model. A PEFT run trains a small part of the model (0.5-2 % of DiT-XL/2);
the rest stays equal to the base, so its model file and training state store only the tensors that can differ
(trainable parameters, what PEFT added, buffers) plus a record of the base (path + SHA-256). Loading such a
*delta* file rebuilds the model from the base first and refuses a base that is missing or has changed, naming
the file it expects. `efdit export` writes a standalone file (base + delta merged). `train.save_frozen` keeps
the old behaviour: everything in every file.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from .config import Config, apply_overrides
from .data.hierarchy import Hierarchy
from .errors import EfditError
from .models.checkpoint import file_sha256, load_safetensors, load_state_dict_checked

ASSETS = Path(__file__).parent / "assets"


def resolve_base(init_from: str) -> Path:
    """A path, or the name of a shipped base (`fmnist-base` -> efdit/assets/fmnist-base.safetensors)."""
    path = Path(init_from)
    shipped = ASSETS / f"{init_from}.safetensors"
    return shipped if not path.is_file() and shipped.is_file() else path


def saves_delta(cfg: Config) -> bool:
    """Whether a run's files store only what differs from its base (PEFT from a base, unless train.save_frozen)."""
    return cfg.model.peft != "full" and bool(cfg.train.init_from) and not cfg.train.save_frozen


def frozen_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of the parameters that do not train: equal to the base's after `init_from_base`."""
    return sorted(name for name, p in model.named_parameters() if not p.requires_grad)


def delta_state(model: torch.nn.Module, frozen: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The state dict without the frozen parameters."""
    drop = set(frozen_keys(model) if frozen is None else frozen)
    return {k: v for k, v in model.state_dict().items() if k not in drop}


def base_record(cfg: Config) -> dict:
    """What a delta file says of its base: the path as resolved now and the file's SHA-256 (first 16 hex)."""
    path = resolve_base(cfg.train.init_from)
    if not path.is_file():
        raise EfditError(f"base checkpoint not found: {path}")
    shipped = path.resolve().parent == ASSETS.resolve()
    return {"init_from": cfg.train.init_from, "path": path.name if shipped else str(path.resolve()),
            "shipped": shipped, "sha256": file_sha256(path)}


def check_base(record: dict, source: str) -> Path:
    """The base file a delta file was trained from, after checking it is there and unchanged."""
    path = ASSETS / record["path"] if record.get("shipped") else Path(record["path"])
    if not path.is_file():
        raise EfditError(f"{source} stores only the tensors a PEFT run trained; it needs its base model "
                         f"{path} (sha256 {record['sha256']}), which is not there: put the base back at that "
                         f"path (or export a standalone file where it is: efdit export RUN)")
    same_base(record, {"path": str(path), "sha256": file_sha256(path)}, source)
    return path


def same_base(record: dict, now: dict | None, source: str) -> None:
    """Refuse a delta whose base (`record`, from its file) is not the base at hand (`now`: path and sha256)."""
    if now is None or now["sha256"] != record["sha256"]:
        where = f"{now['path']} now has sha256 {now['sha256']}" if now else "this run has no base (train.init_from)"
        raise EfditError(f"{source} was fine-tuned from a base with sha256 {record['sha256']}, but {where}: "
                         f"the frozen weights would not be the ones it was trained with")


def load_delta(model: torch.nn.Module, cfg: Config, hierarchy: Hierarchy, tensors: dict[str, torch.Tensor],
               record: dict, source: str) -> None:
    """Fill `model` (built from `cfg`) from its base and then from a delta state dict."""
    base = check_base(record, source)
    init_from_base(model, apply_overrides(copy.deepcopy(cfg), {"train.init_from": str(base)}), hierarchy,
                   verbose=False)
    load_state_dict_checked(model, tensors, allow_missing=tuple(frozen_keys(model)), source=source, verbose=False)


def init_from_base(model, cfg: Config, hierarchy: Hierarchy, verbose: bool = True) -> list[str]:
    """Load a base model file into `model` (fine-tuning). What PEFT added starts at its identity. A changed label
    set gets new label tables: with `init_labels=parent` and a superclass-conditioned base, each new row starts at
    its superclass's base row (tiered `sum`: E_sup = base rows, E_sub = 0), so the fine-tuned model starts as the
    base; with `random` they keep their fresh N(0, 0.02) initialisation."""
    path = resolve_base(cfg.train.init_from)
    if path.suffix == ".pt":  # an official DiT checkpoint (DiT-XL-2-256x256.pt): new label tables, strict otherwise
        from .models.checkpoint import read_torch_state_dict
        sd = {k: v.float() for k, v in read_torch_state_dict(path).items()}
        added = tuple(getattr(model, "peft_added", ()))
        reinit = load_state_dict_checked(model, sd, replace_label_table=True, allow_missing=added,
                                         source=path.name, verbose=False)
        if verbose:
            print(f"fine-tuning {path.name}: new label tables ({', '.join(k for k in reinit if 'y_embedder' in k)}), "
                  f"{len(added)} PEFT tensors at their identity")
        return reinit
    if not path.is_file():
        raise EfditError(f"base checkpoint not found: {path} (train one with `efdit train --preset fmnist-base` "
                         f"and export it, or pass --init-from PATH)")
    tensors, meta, _ = load_safetensors(path)
    if "config" not in meta or "hierarchy" not in meta:
        raise EfditError(f"{path} is not an efdit model file")
    sd = {k: v.float() for k, v in tensors.items()}
    base_cfg = Config.from_dict(meta["config"])
    base_h = Hierarchy.from_dict(meta["hierarchy"])
    own = model.state_dict()
    same_labels = base_h == hierarchy and all(k in own and own[k].shape == v.shape
                                              for k, v in sd.items() if k.startswith("y_embedder."))
    same_labels = same_labels and (base_cfg.model.condition_on, base_cfg.model.embedder) == \
        (cfg.model.condition_on, cfg.model.embedder)
    added = tuple(getattr(model, "peft_added", ()))
    reinit = load_state_dict_checked(model, sd, replace_label_table=not same_labels, allow_missing=added,
                                     source=path.name, verbose=False)
    if added and verbose:
        print(f"{len(added)} PEFT tensors start at their identity ({cfg.model.peft}): {', '.join(added[:4])}"
              + (", …" if len(added) > 4 else ""))
    if same_labels:
        return reinit
    if cfg.train.init_labels == "parent":
        if (base_cfg.model.condition_on, base_cfg.model.embedder) != ("super", "flat") or \
                base_h.super_names != hierarchy.super_names:
            raise EfditError("init_labels=parent needs a flat base conditioned on the same superclasses "
                             "(use --init-labels random)")
        _labels_from_superclass_rows(model.y_embedder, sd["y_embedder.embedding_table.weight"], hierarchy)
        if verbose:
            print(f"label tables ({cfg.model.embedder}) initialised from the superclass rows of {path.name}")
    elif verbose:
        print(f"re-initialised (not in {path.name}): {', '.join(k for k in reinit if k.startswith('y_embedder'))}")
    return reinit


@torch.no_grad()
def _labels_from_superclass_rows(emb, base_table: torch.Tensor, h: Hierarchy) -> None:
    """base_table: (P [+1 null], D) of a flat superclass-conditioned base."""
    sup, null = base_table[:h.num_super], (base_table[h.num_super] if base_table.shape[0] > h.num_super else None)
    if hasattr(emb, "sub_table"):                      # tiered, sum: y = E_sub[y] + E_sup[π(y)]
        emb.super_table.weight.copy_(sup)
        emb.sub_table.weight.zero_()
        if emb.null_embedding is not None and null is not None:
            emb.null_embedding.copy_(null)
    elif hasattr(emb, "parent"):                       # tiered, finediffusion: [sub rows | super rows]
        emb.embedding_table.weight[:h.num_sub].copy_(sup[h.parent])
        emb.embedding_table.weight[h.num_sub:].copy_(sup)
    else:                                              # flat
        n = emb.num_classes
        rows = h.parent if n == h.num_sub else torch.arange(h.num_super)
        emb.embedding_table.weight[:n].copy_(sup[rows])
        if emb.has_null and null is not None:
            emb.embedding_table.weight[n].copy_(null)
