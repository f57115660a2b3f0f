"""efdit: efficient, fine-grained, hierarchy-aware image generation with diffusion transformers.

The layers, bottom up: `efdit.errors` and `efdit.config` (the config schema); the core packages `models`,
`diffusion`, `data`, `latent`, `metrics`, `d2it`; the engine (`efdit.engine`: build, train, generate, evaluate,
model files); the commands (`efdit.commands`, dispatched by `efdit.cli`). The public API is re-exported here.
"""
__version__ = "0.1.0"

from .config import Config, build_config  # noqa: E402
from .data.hierarchy import Hierarchy  # noqa: E402
from .diffusion import Guidance, create_diffusion, sample  # noqa: E402
from .engine.files import export_model, load_model, save_model  # noqa: E402
from .engine.generate import generate  # noqa: E402
from .engine.train import train  # noqa: E402
from .errors import EfditError  # noqa: E402
from .models import DiT, build_dit, load_official_dit  # noqa: E402

__all__ = ["EfditError", "DiT", "build_dit", "load_official_dit", "Guidance", "create_diffusion", "sample",
           "Hierarchy", "Config", "build_config", "load_model", "save_model", "export_model", "generate", "train",
           "__version__"]
