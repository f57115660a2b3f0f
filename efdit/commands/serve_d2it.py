"""The D²iT backend of `efdit serve`: a D²iT run folder (dvae / dgt / dct .safetensors) behind the page.

Per request: DGT grain maps -> DCT multi-grained latents -> DVAE decode (`efdit.d2it.pipeline.D2iTPipeline`), so
the page shows each image beside the grain map it was generated under. `D2iTServed` offers the same interface as
`efdit.web.ServedModel` (hierarchy, guidance modes, samplers, defaults, describe), so `validate` / `generate_for`
and the page treat both alike.

The hierarchy comes from the stage files' metadata (`efdit d2it train` saves it in dvae / dgt), or, for runs
trained before that, from the dataset named in the run's config (as `efdit d2it sample` does). D²iT samples on
the CPU: the pipeline draws its noise from CPU generators.
"""
from __future__ import annotations

import copy
import threading
from pathlib import Path

import torch

from ..data import Hierarchy, build_dataset
from ..diffusion import create_diffusion
from ..diffusion.samplers import SAMPLERS
from ..engine.d2it_pipeline import D2iTPipeline
from ..engine.files import read_metadata
from ..engine.generate import StepProgress
from ..errors import EfditError

D2IT_STAGES = ("dvae", "dgt", "dct")


def run_hierarchy(run_dir: Path, cfg) -> tuple:
    """-> (Hierarchy, where it came from) of a D²iT run: the first stage file that stores one, else its dataset."""
    for stage in ("dgt", "dvae", "dct"):
        path = run_dir / f"{stage}.safetensors"
        if path.is_file() and read_metadata(path).get("hierarchy"):
            return Hierarchy.from_dict(read_metadata(path)["hierarchy"]), path.name
    d = cfg.data
    try:  # older runs: the names live only in the dataset (its small test split)
        ds = build_dataset(d.dataset, split="test", channels=d.channels or None, root=d.root or None)
    except Exception as e:  # noqa: BLE001 -- a missing dataset becomes one line
        raise EfditError(f"{run_dir}: its stage files hold no class hierarchy and the dataset {d.dataset!r} of "
                         f"its config could not be read for it ({str(e).splitlines()[0] if str(e) else e!r})")
    return ds.hierarchy, f"the {d.dataset} dataset"


class D2iTServed:
    """A D²iT run folder loaded for the page."""
    d2it = True
    label_space = "sub"   # the DGT and DCT are conditioned on subclass ids

    def __init__(self, run_dir: str | Path, device: str = "cpu"):
        self.path = Path(run_dir)
        self.pipe = D2iTPipeline(self.path)
        self.cfg = self.pipe.cfg                                      # D2itConfig; its .sample holds the defaults
        self.hierarchy, self.hierarchy_source = run_hierarchy(self.path, self.cfg)
        n_classes = self.pipe.dct.y_embedder.num_classes
        if n_classes != self.hierarchy.num_sub:
            raise EfditError(f"{self.path}: the DCT has {n_classes} classes but the hierarchy "
                             f"({self.hierarchy_source}) has {self.hierarchy.num_sub} subclasses")
        self.max_steps = create_diffusion(None).num_timesteps         # the pipeline's chain: 1000 steps
        self.device, self.asked_device = "cpu", str(device)
        self.backend = self
        self.lock = threading.Lock()                                  # one sampling run at a time

    # ---- what the page offers ----------------------------------------------------------------------------
    def guidance_modes(self) -> list[str]:
        return (["cfg"] if self.pipe.dct.y_embedder.has_null else []) + ["none"]

    def samplers(self) -> list[str]:
        return list(SAMPLERS)   # the DCT samples through efdit's `sample`: every sampler it has

    def defaults(self) -> dict:
        s = self.cfg.sample
        modes = self.guidance_modes()
        return {"guidance": "cfg" if "cfg" in modes and s.cfg_scale != 1.0 else "none", "scale": s.cfg_scale,
                "scale_super": s.grain_cfg_scale, "steps": int(s.steps) if str(s.steps).isdigit() else 50,
                "sampler": s.sampler}

    def subclasses_of(self, superclass: str) -> list[str]:
        sup = self.hierarchy.super_id(superclass)
        return [self.hierarchy.sub_names[i] for i in self.hierarchy.children(sup)]

    def describe(self) -> str:
        c, h = self.cfg, self.hierarchy
        g = c.data.image_size // c.f2
        cpu = "" if self.asked_device == "cpu" else f"; sampled on the CPU (not {self.asked_device})"
        return (f"**{self.path.name}** — D²iT run (DGT grain map → DCT → DVAE decode), {c.data.image_size} px, "
                f"{g}×{g} grain map of {c.f2} px regions, {h.num_sub} subclasses under {h.num_super} superclasses "
                f"(hierarchy from {self.hierarchy_source}){cpu}. Each image is followed by its grain map "
                f"(red fine, blue coarse).")

    # ---- one request ---------------------------------------------------------------------------------------
    def configure(self, req):
        """A validated request (efdit.web.Request) -> the D²iT sample config of this request."""
        if req.extras:
            raise EfditError(f"option {next(iter(req.extras))!r} does not apply to D²iT runs")
        s = copy.deepcopy(self.cfg.sample)
        guided = req.guidance == "cfg"
        s.cfg_scale = float(req.scale) if guided else 1.0
        s.grain_cfg_scale = float(req.scale_super) if guided else 1.0
        s.steps, s.sampler, s.seed = str(int(req.steps)), req.sampler, int(req.seed)
        return s

    def generate(self, labels: torch.Tensor, s, progress=None):
        """-> (uint8 images (N, C, H, W), grain maps (N, h, w)) for a config from `configure`."""
        total = create_diffusion(s.steps).num_timesteps
        hooks = [StepProgress(total, progress)] if progress is not None else []
        try:
            return self.pipe(labels, steps=s.steps, sampler=s.sampler, cfg_scale=s.cfg_scale, seed=s.seed,
                             grain_cfg_scale=s.grain_cfg_scale, progress=False, hooks=hooks)
        except ValueError as e:   # bad sampler options surface as ValueError from the library
            raise EfditError(str(e)) from None

    def status(self, s, grains: torch.Tensor) -> str:
        how = "no guidance" if s.cfg_scale == 1.0 and s.grain_cfg_scale == 1.0 else \
            f"cfg ×{s.cfg_scale:g} (grain maps ×{s.grain_cfg_scale:g})"
        return (f"{s.sampler}, {s.steps} steps, {how}, seed {s.seed} · grain maps {self.cfg.dgt.sample_steps} "
                f"DGT steps, fine share {grains.float().mean():.2f}")
