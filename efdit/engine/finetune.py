"""Fine-tuning from a base model: loading the base into a freshly built (PEFT) model, new label rows.

`init_from_base` loads a base model file (an efdit model file or the official `DiT-XL-2-256x256.pt`) into a
freshly built, possibly PEFT-modified model. A PEFT run trains a small part of the model (0.5-2 % of DiT-XL/2);
the rest stays equal to the base, so its model file and training state store only the tensors that can differ
(trainable parameters, what PEFT added, buffers) plus a record of the base (path + SHA-256). Loading such a
*delta* file rebuilds the model from the base first and refuses a base that is missing or has changed, naming
the file it expects. `efdit export` writes a standalone file (base + delta merged). `train.save_frozen` keeps
the old behaviour: everything in every file. The delta files themselves are written and read in `files.py`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..data.hierarchy import Hierarchy
from ..errors import EfditError
from ..models.checkpoint import load_safetensors, load_state_dict_checked, read_torch_state_dict
from .paths import model_file, shipped, shipped_names


def resolve_base(init_from: str) -> Path:
    """A model file, a run folder, or the name of a shipped base (`fmnist-base` -> efdit/assets/fmnist-base…)."""
    path = Path(init_from)
    if path.is_dir():
        return model_file(path)
    return path if path.is_file() else (shipped(init_from) or path)


def init_from_base(model, cfg: Config, hierarchy: Hierarchy, verbose: bool = True) -> list[str]:
    """Load a base model file into `model` (fine-tuning). What PEFT added starts at its identity. A changed label
    set gets new label tables: with `init_labels=parent` and a superclass-conditioned base, each new row starts at
    its superclass's base row (tiered `sum`: E_sup = base rows, E_sub = 0), so the fine-tuned model starts as the
    base; with `random` they keep their fresh N(0, 0.02) initialisation."""
    path = resolve_base(cfg.train.init_from)
    if path.suffix == ".pt":  # an official DiT checkpoint (DiT-XL-2-256x256.pt): new label tables, strict otherwise
        sd = {k: v.float() for k, v in read_torch_state_dict(path).items()}
        added = tuple(getattr(model, "peft_added", ()))
        reinit = load_state_dict_checked(model, sd, replace_label_table=True, allow_missing=added,
                                         source=path.name, verbose=False)
        if verbose:
            print(f"fine-tuning {path.name}: new label tables ({', '.join(k for k in reinit if 'y_embedder' in k)}), "
                  f"{len(added)} PEFT tensors at their identity")
        return reinit
    if not path.is_file():
        raise EfditError(f"base checkpoint not found: {path} (a model file, its run folder, or a shipped base: "
                         f"{', '.join(shipped_names())})")
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
