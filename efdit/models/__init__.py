"""Models: DiT backbone, embedders, attention backends, checkpoints."""
from .attention import Attention, register_backend
from .checkpoint import (
                         load_official_dit,
                         load_safetensors,
                         load_state_dict_checked,
                         read_torch_state_dict,
                         save_safetensors,
)
from .dit import DiT, DiT_models, build_dit, count_params, resolve_device
from .embedders import LabelEmbedder, TimestepEmbedder

__all__ = ["Attention", "register_backend", "DiT", "DiT_models", "build_dit", "count_params", "resolve_device",
           "LabelEmbedder", "TimestepEmbedder", "load_official_dit", "load_safetensors", "load_state_dict_checked",
           "read_torch_state_dict", "save_safetensors"]
