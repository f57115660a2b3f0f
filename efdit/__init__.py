"""efdit: efficient, fine-grained, hierarchy-aware image generation with diffusion transformers."""
__version__ = "0.1.0"

from .errors import EfditError  # noqa: E402
from .models import DiT, build_dit, load_official_dit  # noqa: E402
from .diffusion import Guidance, create_diffusion, sample  # noqa: E402
from .data.hierarchy import Hierarchy  # noqa: E402

__all__ = ["EfditError", "DiT", "build_dit", "load_official_dit", "Guidance", "create_diffusion", "sample",
           "Hierarchy", "__version__"]
