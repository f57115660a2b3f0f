"""`efdit train --dry-run`: the resolved config, the parameter counts and the model-file size, with the model
built on the meta device (no memory, no weights, no data needed: iNat / VegFru shapes come from their published
description when the data are absent)."""
from __future__ import annotations

import torch

from ..config import Config
from ..errors import EfditError
from ..models.dit import count_params
from .build import build_model
from .datasets import load_data, reference_shape
from .files import frozen_keys, saves_delta
from .paths import run_dir_of


class _SkipMetaInit(torch.overrides.TorchFunctionMode):
    """Initialisers on meta tensors do nothing: skip them (torch's meta `normal_` imports its decompositions,
    seconds of start-up for a dry run)."""
    INIT = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "xavier_uniform_", "zeros_", "ones_",
            "constant_", "zero_", "fill_")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = args[0] if args else kwargs.get("tensor")
        if getattr(func, "__name__", "") in self.INIT and isinstance(t, torch.Tensor) and t.device.type == "meta":
            return t
        return func(*args, **kwargs)


def dry_run_report(cfg: Config, dataset=None) -> None:
    """Print the resolved config, the dataset, the parameter counts, the model-file size and the run folder."""
    note = ""
    try:
        ds = dataset if dataset is not None else load_data(cfg, "train")
        name, n, hierarchy, input_size, channels = ds.name, f"{len(ds):,}", ds.hierarchy, ds.image_size, ds.num_channels
    except EfditError as e:
        ref = reference_shape(cfg)
        if ref is None:
            raise
        (hierarchy, input_size, channels), name, n = ref, cfg.data.dataset, "?"
        note = f"  (data not loaded: {e}; shapes from the dataset's published description)"
    with torch.device("meta"), _SkipMetaInit():
        model = build_model(cfg, hierarchy, input_size, channels)
    n_params = count_params(model)
    n_train = count_params(model, trainable_only=True)
    print(cfg.to_json())
    print(f"dataset: {name} ({n} images, {hierarchy}), input {channels}x{input_size[0]}x{input_size[1]}{note}")
    print(f"model: {n_params:,} parameters ({n_train:,} trainable, {100 * n_train / n_params:.4f}%, "
          f"peft={cfg.model.peft}, embedder={cfg.model.embedder}), {len(model.blocks)} blocks, "
          f"{model.x_embedder.num_patches} tokens")
    frozen = set(frozen_keys(model)) if saves_delta(cfg) else set()
    stored = sum(v.numel() for k, v in model.state_dict().items() if k not in frozen)
    print(f"model file: {stored * 4 / 2**20:,.1f} MiB fp32" +
          (f", a PEFT delta over {cfg.train.init_from} (--save-frozen true: the whole model)" if saves_delta(cfg)
           else ""))
    print(f"run directory: {run_dir_of(cfg)}")
