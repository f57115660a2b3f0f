"""D²iT configs: one dataclass tree (data / grains / dvae / dgt / dct / dit / sample), named presets.

Overrides use efdit's `--key value` syntax (`--dct.hidden_size 192`, or `--r_fine 0.3` when unambiguous).
The presets differ only in numbers: `fmnist32` (2 CPU cores, minutes per stage) and `imagenet256` (the paper's
scale: f1 = 8, f2 = 16, 16 px regions, 256 bins, DiT-B-wide DCT) run the same code.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from ..config import _flatten, apply_overrides
from ..errors import EfditError


@dataclass
class D2DataConfig:
    dataset: str = "fmnist"
    image_size: int = 32            # fmnist (28 px) is zero-padded to this size
    channels: int = 0               # 0 = the dataset's own
    root: str = ""
    hflip: bool = False
    super_level: str = ""           # emoji only: the hierarchy's levels (group | subgroup | emoji; "" = its default)
    sub_level: str = ""
    categories: str = ""            # emoji only: "all" or comma-separated groups ("" = its default)
    test_share: float = 0.2         # a dataset without a test split (emoji): this share of every class held out


@dataclass
class GrainsConfig:
    bins: int = 64                  # P (the paper: S² = 256 at 16 px regions; at 4 px regions 16 bins are too coarse)
    sigma: float = 0.01
    lo: float = 0.0
    hi: float = 1.0
    r_fine: float = 0.5             # fine ratio the thresholds are read at (τ = percentile 100·(1 − r))
    threshold_images: int = 0       # images of the train split used for the percentiles (0 = all)


@dataclass
class DVAEConfig:
    f1: int = 2                     # fine downsampling factor; coarse f2 = 2·f1 = region size S
    z_channels: int = 4
    ch: int = 16
    ch_mult: str = "1,2"            # channel multiplier per resolution of the encoder (len = log2(f1) + 1)
    num_res_blocks: int = 1         # per downsampled resolution
    full_res_blocks: int = 0        # res blocks at the image resolution (encoder stem, decoder's last stage)
    groups: int = 8                 # GroupNorm groups
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0  # LPIPS-style EfficientNet-Lite0 distance in L_rec (0 = off; losses.py)
    perceptual_blocks: str = "0,2,4,10,15"   # tapped MBConv blocks (the last of each resolution, 1/2 .. 1/32)
    perceptual_resolution: int = 64  # images are resized to this before the network
    disc_weight: float = 0.0        # adversarial term: factor on the adaptive weight λ (0 = no discriminator)
    disc_start: int = 0             # DVAE steps before the adversarial term and the discriminator start
    disc_lr: float = 0.0            # discriminator learning rate (Adam, β = (0.5, 0.9)); 0 = dvae.lr
    disc_layers: int = 2            # stride-2 layers of the PatchGAN (receptive field 16 / 34 / 70 px for 1 / 2 / 3)
    disc_channels: int = 32         # width of its first layer
    disc_weight_max: float = 1e4    # λ is clamped to [0, disc_weight_max] (VQGAN / LDM: 1e4)
    train_ratios: str = "0,0.25,0.5,0.75,1"   # r_fine drawn per image while training: one DVAE for every ratio
    lr: float = 1e-3
    batch_size: int = 64
    steps: int = 100_000
    minutes: float = 10.0


@dataclass
class DGTConfig:
    hidden_size: int = 64
    depth: int = 4
    num_heads: int = 4
    class_dropout_prob: float = 0.1
    schedule: str = "cosine"
    lr: float = 1e-3
    batch_size: int = 64
    steps: int = 100_000
    minutes: float = 10.0
    ema_decay: float = 0.999
    cfg_scale: float = 1.5
    sample_steps: int = 50


@dataclass
class DCTConfig:
    hidden_size: int = 64
    trunk_depth: int = 4
    refine_depth: int = 2
    num_heads: int = 4
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    refine_attention: str = "global"   # global (fine sub-tokens + coarse tokens) | region (within each region)
    residual: bool = True               # ε̂_fine = ε̂_coarse + Δ (False: direct prediction)
    sparse_refine: bool = True          # RefineNet on the needed sub-tokens only (False: dense + mask, same result)
    weighting: str = "per_grain"        # per_grain (w_c·mean_coarse + w_f·mean_fine) | per_code (pooled)
    w_coarse: float = 1.0
    w_fine: float = 1.0
    lr: float = 1e-3
    batch_size: int = 32
    steps: int = 100_000
    minutes: float = 12.0
    ema_decay: float = 0.995
    schedule: str = "linear"


@dataclass
class DiTBaselineConfig:
    """A plain efdit DiT on the all-fine (f1) latent: same width, depth = trunk + refine, patch 2."""
    hidden_size: int = 64
    depth: int = 6
    patch_size: int = 2             # 2: as many tokens as the DCT's trunk (one per region); 1: one per fine code
    num_heads: int = 4
    lr: float = 1e-3
    batch_size: int = 32
    steps: int = 100_000            # the Table 3 row: set to the DCT's step count (same images seen)
    minutes: float = 0.0
    ema_decay: float = 0.995


@dataclass
class D2SampleConfig:
    steps: str = "50"               # respacing of the DCT chain
    sampler: str = "ddpm"
    cfg_scale: float = 1.5
    grain_cfg_scale: float = 1.5
    per_class: int = 8
    seed: int = 0


@dataclass
class D2itConfig:
    preset: str = ""
    run_dir: str = ""
    device: str = "cpu"
    seed: int = 0
    data: D2DataConfig = field(default_factory=D2DataConfig)
    grains: GrainsConfig = field(default_factory=GrainsConfig)
    dvae: DVAEConfig = field(default_factory=DVAEConfig)
    dgt: DGTConfig = field(default_factory=DGTConfig)
    dct: DCTConfig = field(default_factory=DCTConfig)
    dit: DiTBaselineConfig = field(default_factory=DiTBaselineConfig)
    sample: D2SampleConfig = field(default_factory=D2SampleConfig)

    @property
    def f2(self) -> int:
        return 2 * self.dvae.f1

    def entropy_spec(self):
        from .grains import EntropySpec
        g = self.grains
        return EntropySpec(region=self.f2, bins=g.bins, sigma=g.sigma, lo=g.lo, hi=g.hi)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "D2itConfig":
        cfg = cls()
        apply_overrides(cfg, _flatten(d), strict=False)
        return cfg


D2IT_PRESETS: dict[str, dict] = {
    # 32x32 Fashion-MNIST (zero-padded), 8x8 grain map of 4 px regions, 16x16 fine latent: minutes per stage on CPU.
    "fmnist32": {},
    # 32x32 RGB emoji, same scale: the whole set (3,812 images, both drawing styles), 98 subgroups under 9 groups;
    # a fifth of every subgroup held out as the test split (the set has none).
    "emoji32": {"data.dataset": "emoji", "data.hflip": True, "data.super_level": "group",
                "data.sub_level": "subgroup", "data.categories": "all"},
    # The paper's scale (for a GPU): 256 px, f1 = 8 / f2 = 16, 16x16 grain map of 16 px regions, P = S² = 256 bins,
    # a DiT-B-wide DCT with 10 trunk + 2 RefineNet blocks (Table 4's best split), a DiT-S-sized DGT.
    "imagenet256": {"data.dataset": "folder", "data.image_size": 256, "grains.bins": 256, "dvae.f1": 8,
                    "dvae.ch": 128, "dvae.ch_mult": "1,1,2,2", "dvae.num_res_blocks": 2, "dvae.full_res_blocks": 2, "dvae.groups": 32,
                    "dvae.batch_size": 16, "dvae.steps": 200_000, "dvae.minutes": 0,
                    "dgt.hidden_size": 384, "dgt.depth": 12, "dgt.num_heads": 6, "dgt.steps": 200_000, "dgt.minutes": 0,
                    "dct.hidden_size": 768, "dct.trunk_depth": 10, "dct.refine_depth": 2, "dct.num_heads": 12,
                    "dct.lr": 1e-4, "dct.batch_size": 256, "dct.steps": 400_000, "dct.minutes": 0,
                    "dct.ema_decay": 0.9999, "dit.hidden_size": 768, "dit.depth": 12, "dit.num_heads": 12,
                    "dit.lr": 1e-4, "dit.batch_size": 256, "dit.steps": 400_000, "dit.minutes": 0,
                    "sample.steps": "250"},
}


def build_d2it_config(preset: str | None, overrides: dict) -> D2itConfig:
    preset = preset or "fmnist32"
    if preset not in D2IT_PRESETS:
        raise EfditError(f"unknown D²iT preset {preset!r} (known: {', '.join(D2IT_PRESETS)})")
    cfg = D2itConfig(preset=preset)
    apply_overrides(cfg, D2IT_PRESETS[preset])
    apply_overrides(cfg, overrides)
    if cfg.dvae.f1 < 1 or cfg.dvae.f1 & (cfg.dvae.f1 - 1):
        raise EfditError(f"dvae.f1 must be a power of two, got {cfg.dvae.f1}")
    if cfg.data.image_size % cfg.f2:
        raise EfditError(f"image size {cfg.data.image_size} is not divisible by f2 = {cfg.f2}")
    check_dvae_losses(cfg.dvae)
    if not 0.0 < cfg.data.test_share < 1.0:
        raise EfditError(f"--data.test_share must lie in (0, 1), got {cfg.data.test_share}")
    lat = cfg.data.image_size // cfg.dvae.f1
    if cfg.dit.patch_size < 1 or lat % cfg.dit.patch_size:
        raise EfditError(f"--dit.patch_size {cfg.dit.patch_size} must divide the fine latent's size {lat}")
    for name in ("dgt", "dct", "dit"):
        part = getattr(cfg, name)
        if part.hidden_size % part.num_heads:
            raise EfditError(f"--{name}.num_heads {part.num_heads} must divide --{name}.hidden_size {part.hidden_size}")
    return cfg


def check_dvae_losses(d: DVAEConfig) -> None:
    """The DVAE's loss options, one EfditError line for the first that is out of range."""
    for name in ("perceptual_weight", "disc_weight", "disc_lr", "disc_start"):
        if getattr(d, name) < 0:
            raise EfditError(f"dvae.{name} must be >= 0, got {getattr(d, name)}")
    if d.disc_weight_max <= 0:
        raise EfditError(f"dvae.disc_weight_max must be > 0, got {d.disc_weight_max}")
    if d.disc_layers < 1 or d.disc_channels < 1:
        raise EfditError(f"dvae.disc_layers and dvae.disc_channels must be >= 1, got {d.disc_layers}, {d.disc_channels}")
    if d.perceptual_resolution < 32:
        raise EfditError(f"dvae.perceptual_resolution must be >= 32 (the network downsamples 32x), "
                         f"got {d.perceptual_resolution}")
    try:
        blocks = [int(v) for v in d.perceptual_blocks.split(",")]
    except ValueError:
        blocks = []
    if not blocks or blocks != sorted(set(blocks)) or blocks[0] < 0 or blocks[-1] > 15:
        raise EfditError(f"dvae.perceptual_blocks must be increasing block indices in 0..15, "
                         f"got {d.perceptual_blocks!r}")


def run_dir_of(cfg: D2itConfig):
    from pathlib import Path
    return Path(cfg.run_dir or f"runs/d2it-{cfg.preset or 'run'}")
