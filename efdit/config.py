"""Configs: one dataclass tree, named presets, typed `--key value` overrides, JSON in every run.

Overrides name a field by its dotted path (`model.depth`) or, when unambiguous, by its last part (`depth`).
Values are parsed to the field's type; an unknown key or preset is a one-line error naming close matches.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field

from .errors import EfditError, did_you_mean


@dataclass
class ModelConfig:
    arch: str = ""                 # "DiT-S/2" … "DiT-XL/8" sets depth / hidden / heads / patch; "" = the fields below
    patch_size: int = 4
    hidden_size: int = 256
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    pos_embed: str = "sincos"      # sincos | learned
    attn_backend: str = "sdpa"     # sdpa | math | proxy (EFDiT ProAttention, pooled proxy) | robust (ProTransformer IRLS)
    attn_kwargs: str = ""          # backend options, e.g. "pool=4" or "penalty=mcp,iters=3,gamma=4"
    condition_on: str = "sub"      # which label the model is conditioned on: sub | super
    embedder: str = "flat"         # flat (DiT's label table) | tiered (EFDiT's Tiered Embedder; sub only)
    tiered_mode: str = "sum"       # sum (E_sub[y] + E_sup[π(y)]) | finediffusion (one table, FineDiffusion)
    null_prob: float = 0.0         # tiered sum: rarer second drop to a fully null label (enables null CFG)
    peft: str = "full"             # full | bitfit | difffit | finediffusion | efdit | lora (what trains)
    lora_rank: int = 8
    attn_adapt: str = "auto"       # attention weights beyond the PEFT rule: auto | frozen | lora | full (auto: LoRA
    #                                on qkv / proj when a non-SDPA backend runs under a rule that freezes them)
    difffit_blocks: str = "all"    # all | first_half
    guidance_embed: bool = False   # the guidance scale w as an input (a student of `efdit distill-guidance`)


@dataclass
class DataConfig:
    dataset: str = "fmnist"        # fmnist | digits | emoji | folder
    root: str = ""                 # folder datasets (and overrides of the default data location)
    image_size: int = 0            # 0 = the dataset's own size
    channels: int = 0              # 0 = the dataset's own
    hflip: bool = False            # random horizontal flips
    on_bad_image: str = "skip"     # skip | fail (folder format)
    super_level: str = ""          # emoji: group | subgroup | emoji
    sub_level: str = ""
    categories: str = ""           # emoji: "all" groups, or comma-separated group names; "" = the dataset's default
    split: str = ""                # the training split; "" = the dataset's own (iNat 2021: train_mini | train | val)
    holdout_per_class: int = 0     # held out of the training split per subclass (split "holdout": choose settings)
    train_per_class: int = 0       # train on only this many images per subclass (a few-shot regime); 0 = all
    latent_cache: str = ""         # a folder written by `efdit cache-latents`: train on its latents instead
    vae: str = ""                  # a LOCAL diffusers AutoencoderKL folder (e.g. sd-vae-ft-mse): encode / decode


@dataclass
class DiffusionConfig:
    schedule: str = "linear"       # linear | cosine
    steps: int = 1000
    prediction: str = "eps"        # eps | v | x0
    loss: str = "hybrid"           # hybrid (MSE + VLB, learned Σ) | mse
    timesteps: str = "uniform"     # training timestep sampling: uniform | lognormal (EDM's log σ ~ N(mean, std²))
    lognormal_mean: float = -1.2
    lognormal_std: float = 1.2
    weighting: str = "none"        # weighting of the MSE term: none | min_snr (Min-SNR-γ)
    min_snr_gamma: float = 5.0


@dataclass
class TrainConfig:
    batch_size: int = 64
    lr: float = 1e-4
    label_lr_scale: float = 1.0     # the label tables' lr = lr × this (new rows of a fine-tune have far to travel)
    warmup_images: int = 0
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True         # decay_t = min(ema_decay, (1 + step) / (10 + step)): early EMA tracks the model
    grad_clip: float = 1.0          # 0 = off
    grad_accum: int = 1
    precision: str = "fp32"        # fp32 | bf16
    grad_checkpointing: bool = False  # recompute each block in the backward: far less activation memory, ~1/3 more compute
    compile: bool = False           # torch.compile the training forward (falls back to eager with a warning)
    total_images: int = 10_000      # budget in images seen …
    minutes: float = 0.0            # … or in wall-clock minutes (0 = no time limit)
    log_every: int = 1_000          # images
    ckpt_every: int = 10_000        # images
    sample_every: int = 0           # images; 0 = only at the end
    init_from: str = ""            # a base model file to fine-tune from (a path, or a shipped name: fmnist-base)
    init_labels: str = "parent"    # new label rows when the label set changes: parent | random
    save_frozen: bool = False      # PEFT from a base: also store the frozen weights (default: a delta over the base)
    seed: int = 0
    threads: int = 0                # torch intra-op threads; 0 = torch's default


@dataclass
class SampleConfig:
    sampler: str = "ddim"          # ddpm | ddim | dpmpp2m (DPM-Solver++(2M)) | unipc (UniPC bh2): 10-20 steps
    steps: str = "50"              # respacing: "250", "ddim50", "50"
    eta: float = 0.0
    guidance: str = "auto"         # auto (cfg for flat, super for tiered embedders) | none | cfg | super | two_term
    cfg_scale: float = 2.0
    cfg_scale_super: float = 1.0
    cfg_channels: str = "all"      # all | first3
    guidance_interval: str = ""    # "T_LO,T_HI": guide only for t in [T_LO, T_HI] (original timesteps); "" = always
    clip_x0: bool = True           # clip predicted x0 to [-1, 1] (pixel space)
    per_class: int = 8
    seed: int = 0
    hrig: str = ""                 # HRIG hook spec, e.g. "band=259:673,r=2,cutoff=0.25,gain=-0.3" ("" = off)
    compile: bool = False          # torch.compile the sampling forward (falls back to eager with a warning)
    accel: str = "none"            # training-free block cache: none | fora | delta (Δ-DiT) | taylorseer
    accel_kwargs: str = ""         # its options, e.g. "interval=3", "interval=3,order=2", "interval=2,blocks=3,boundary=500"


@dataclass
class Config:
    preset: str = ""
    run_dir: str = ""
    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        cfg = cls()
        apply_overrides(cfg, _flatten(d), strict=False)
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---- presets ----------------------------------------------------------------------------------------------
def _preset(name: str, **overrides) -> Config:
    cfg = Config(preset=name)
    apply_overrides(cfg, overrides)
    return cfg


# The small DiT of the shipped bases (7.4 M parameters at 28 or 32 px) and of everything fine-tuned from them.
_SMALL_DIT = {"model.patch_size": 4, "model.hidden_size": 256, "model.depth": 6, "model.num_heads": 4}
# Min-SNR-5 loss weighting: the recipe that won at equal CPU time (benchmarks/recipes.py, benchmarks/RESULTS.md).
_MIN_SNR = {"diffusion.weighting": "min_snr", "diffusion.min_snr_gamma": 5.0}
# A long base run on one thread: the winning recipe, an EMA whose half-life (~1,400 steps) suits it, a budget far
# beyond one sitting (stop any time; rerunning the same command resumes).
_LONG_BASE = {**_MIN_SNR, "train.batch_size": 64, "train.lr": 6e-4, "train.warmup_images": 10_000,
              "train.ema_decay": 0.9995, "train.total_images": 4_000_000, "train.minutes": 0.0,
              "train.ckpt_every": 16_384, "train.log_every": 8_192}

PRESETS: dict[str, dict] = {
    # Base model for the demo: Fashion-MNIST conditioned on the 4 superclasses only, so that the demo's step to
    # the 10 subclasses is a real fine-grained step (the EFDiT recipe in miniature).
    "fmnist-base": {"data.dataset": "fmnist", "model.condition_on": "super", **_SMALL_DIT,
                    "train.batch_size": 64, "train.lr": 6e-4, "train.warmup_images": 10_000,
                    "train.ema_decay": 0.998, "train.total_images": 2_000_000, "train.minutes": 100.0,
                    "train.ckpt_every": 10_000, "train.log_every": 2_000, "train.sample_every": 20_000,
                    "sample.per_class": 8},
    # The stronger base (efdit/assets/fmnist-base-v2.safetensors): the same model, the recipe that won at equal CPU
    # time in benchmarks/recipes.py (Min-SNR-5 weighting; benchmarks/RESULTS.md), an EMA whose half-life (~1,400
    # steps) suits a long run, trained long on one thread by rerunning the same command.
    "fmnist-base-v2": {"data.dataset": "fmnist", "model.condition_on": "super", **_SMALL_DIT, **_LONG_BASE,
                       "train.sample_every": 262_144, "train.threads": 1, "sample.per_class": 8},
    # The RGB base for one's own images (efdit/assets/emoji-base.safetensors): the whole emoji set, both drawing styles
    # (3,812 images, 98 subgroups under 9 groups) at 32 px RGB, the fmnist-base-v2 recipe; fine-tune a folder with
    # `efdit train --preset folder-finetune --root DIR`.
    "emoji-base": {"data.dataset": "emoji", "data.super_level": "group", "data.sub_level": "subgroup",
                   "data.categories": "all", "data.image_size": 32, **_SMALL_DIT, **_LONG_BASE,
                   "train.sample_every": 131_072, "train.threads": 1, "sample.per_class": 2},
    # One's own folder fine-tuned from the RGB base: `efdit train --preset folder-finetune --root DIR`. The base's
    # architecture and recipe, new label rows, full fine-tuning at half the base's lr with a short warm-up and an EMA
    # that fits a 40k-image run; `--init-from ''` trains the same recipe from scratch (the comparison in the README).
    "folder-finetune": {"data.dataset": "folder", "data.image_size": 32, **_SMALL_DIT, **_MIN_SNR,
                        "train.init_from": "emoji-base", "train.init_labels": "random", "train.batch_size": 64,
                        "train.lr": 3e-4, "train.warmup_images": 2_048, "train.ema_decay": 0.998,
                        "train.total_images": 40_960, "train.minutes": 0.0, "train.log_every": 2_048,
                        "train.ckpt_every": 8_192, "train.sample_every": 0, "sample.sampler": "dpmpp2m",
                        "sample.steps": "10", "sample.per_class": 8},
    # The demo's fine-tuning step: the base onto the 10 subclasses, about 5 CPU minutes on 2 cores, a fixed number of
    # images (deterministic), with the FineDiffusion PEFT rule (biases + LN affine + label table, 0.46 %) at 10x the
    # full fine-tuning lr; 50 train images per subclass are held out to choose the guidance scale on. Sampling:
    # DPM-Solver++(2M), 10 steps (DDIM-50's quality, benchmarks/RESULTS.md); `--peft full --lr 3e-4` for full
    # fine-tuning.
    "fmnist-finetune": {"data.dataset": "fmnist", "data.holdout_per_class": 50, "model.condition_on": "sub",
                        **_SMALL_DIT, "model.peft": "finediffusion", "train.batch_size": 64, "train.lr": 3e-3, "train.ema_decay": 0.995,
                        "train.total_images": 24_576, "train.minutes": 0.0, "train.ckpt_every": 20_000,
                        "train.log_every": 512, "train.init_from": "fmnist-base-v2",
                        "sample.sampler": "dpmpp2m", "sample.steps": "10", "sample.per_class": 8},
    # From scratch on Fashion-MNIST subclasses (small; for those who reproduce everything).
    "fmnist-tiny": {"data.dataset": "fmnist", **_SMALL_DIT, "train.batch_size": 128, "train.lr": 1e-3,
                    "train.warmup_images": 50_000, "train.ema_decay": 0.999, "train.total_images": 600_000,
                    "train.ckpt_every": 20_000, "train.log_every": 5_000},
    # Seconds-scale runs for tests and smoke checks.
    "digits-tiny": {"data.dataset": "digits", "model.patch_size": 2, "model.hidden_size": 64, "model.depth": 2,
                    "model.num_heads": 4, "train.batch_size": 32, "train.lr": 1e-3, "train.ema_decay": 0.99,
                    "train.total_images": 3_200, "train.ckpt_every": 1_600, "train.log_every": 320,
                    "sample.steps": "20", "sample.per_class": 4},
    "emoji-tiny": {"data.dataset": "emoji", "data.hflip": True, **_SMALL_DIT, "train.batch_size": 64, "train.lr": 5e-4,
                   "train.ema_decay": 0.999, "train.total_images": 100_000, "train.ckpt_every": 20_000,
                   "sample.per_class": 4},
}


# The paper's runs (efdit.md §4.2 / §4.4): DiT-XL/2 fine-tuned from the ImageNet-256 checkpoint in SD-VAE latent
# space, AdamW 1e-4 constant (1e-3 for the bias-only sets, as DiffFit advises), wd 0, EMA 0.9999 without warm-up
# (it starts at the pretrained weights), no clipping, global batch 256 (split over torchrun ranks), bf16 +
# gradient checkpointing, equal step budgets (iNat 100k steps, VegFru 40k), checkpoints every 5k steps;
# sampling: 250 DDPM steps, guidance scale 4.0 (superclass-guided for the tiered embedders). Give the data:
# `efdit cache-latents --preset NAME --data.root DIR --vae SD_VAE_DIR --out CACHE`, then
# `torchrun … -m efdit.cli train --preset NAME --latent-cache CACHE --vae SD_VAE_DIR`.
_PAPER_COMMON = {"model.arch": "DiT-XL/2", "data.image_size": 256, "data.hflip": True, "model.class_dropout_prob": 0.1,
                 "data.vae": "pretrained/sd-vae-ft-mse",
                 "train.batch_size": 256, "train.lr": 1e-4, "train.weight_decay": 0.0, "train.ema_decay": 0.9999,
                 "train.ema_warmup": False, "train.grad_clip": 0.0, "train.precision": "bf16",
                 "train.grad_checkpointing": True, "train.init_from": "pretrained/DiT-XL-2-256x256.pt",
                 "train.log_every": 100 * 256, "train.ckpt_every": 5_000 * 256,
                 "sample.sampler": "ddpm", "sample.steps": "250", "sample.cfg_scale": 4.0, "sample.clip_x0": False}
_PAPER_DATA = {"inat21": {"data.dataset": "inat21", "data.split": "train_mini", "train.total_images": 100_000 * 256},
               "vegfru": {"data.dataset": "vegfru", "data.split": "train", "train.total_images": 40_000 * 256}}
_PAPER_METHODS = {
    # EFDiT: Tiered Embedder (sum) + FineDiffusion's PEFT rule, ProAttention H2 (pooled proxy), HRIG when sampling
    "efdit": {"model.embedder": "tiered", "model.tiered_mode": "sum", "model.peft": "efdit",
              "model.attn_backend": "proxy", "model.attn_kwargs": "pool=2", "model.attn_adapt": "lora",
              "sample.guidance": "super", "sample.hrig": "band=259:673,r=2,cutoff=0.25,gain=-0.3"},
    "finediffusion": {"model.embedder": "tiered", "model.tiered_mode": "finediffusion", "model.peft": "finediffusion",
                      "sample.guidance": "super"},
    "full": {"model.peft": "full", "sample.guidance": "cfg"},
    "bitfit": {"model.peft": "bitfit", "train.lr": 1e-3, "sample.guidance": "cfg"},
    "difffit": {"model.peft": "difffit", "train.lr": 1e-3, "sample.guidance": "cfg"},
}
for _data, _dkw in _PAPER_DATA.items():
    for _method, _mkw in _PAPER_METHODS.items():
        PRESETS[f"{_data}-dit-xl2-256-{_method}"] = {**_PAPER_COMMON, **_dkw, **_mkw}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise EfditError(f"unknown preset {name!r}" + _close(name, PRESETS) + f" (known: {', '.join(PRESETS)})")
    return _preset(name, **PRESETS[name])


def _close(name: str, options) -> str:
    return did_you_mean(name, options)


# ---- overrides --------------------------------------------------------------------------------------------
def field_paths(cfg) -> dict[str, tuple[object, dataclasses.Field]]:
    """dotted path -> (owning dataclass instance, field)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            for k, pair in field_paths(v).items():
                out[f"{f.name}.{k}"] = pair
        else:
            out[f.name] = (cfg, f)
    return out


def _parse(value, typ, key: str):
    if isinstance(typ, str):
        typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, str)
    if typ is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise EfditError(f"--{key} must be true or false, got {value!r}")
    try:
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            s = str(value).replace("_", "")
            for suffix, mult in (("Ki", 1 << 10), ("Mi", 1 << 20), ("k", 1000), ("M", 1_000_000)):
                if s.endswith(suffix):
                    return int(float(s[: -len(suffix)]) * mult)
            return int(float(s)) if "e" in s.lower() and float(s).is_integer() else int(s)
        if typ is float:
            return float(value)
    except (TypeError, ValueError):
        raise EfditError(f"--{key} must be {'an integer' if typ is int else 'a number'}, got {value!r}") from None
    return str(value)


def apply_overrides(cfg: Config, overrides: dict, strict: bool = True) -> Config:
    paths = field_paths(cfg)
    short: dict[str, list[str]] = {}
    for p in paths:
        short.setdefault(p.split(".")[-1], []).append(p)
    for key, value in overrides.items():
        k = key.replace("-", "_")
        if k not in paths:
            if k in short and len(short[k]) == 1:
                k = short[k][0]
            elif k in short:
                raise EfditError(f"--{key} is ambiguous: say {' or '.join('--' + p for p in short[k])}")
            elif strict:
                raise EfditError(f"unknown option --{key}" + _close(k, list(paths) + list(short)))
            else:
                continue
        obj, f = paths[k]
        parsed = _parse(value, f.type, key)
        if strict:
            check_field(k, parsed, key, value)
        setattr(obj, f.name, parsed)
    return cfg


def parse_override_args(args: list[str]) -> dict:
    """["--lr", "1e-3", "--model.depth=4"] -> {"lr": "1e-3", "model.depth": "4"}."""
    out, i = {}, 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise EfditError(f"unexpected argument {a!r} (options look like --key value)")
        if "=" in a:
            k, v = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and not _is_number(args[i + 1])):
                raise EfditError(f"option {a} needs a value")
            k, v = a[2:], args[i + 1]
            i += 2
        out[k] = v
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def build_config(preset: str | None, overrides: dict) -> Config:
    cfg = get_preset(preset) if preset else Config()
    return apply_overrides(cfg, overrides)


def parse_kv(spec: str) -> dict:
    """"pool=4,mode=kv" -> {"pool": 4, "mode": "kv"} (ints, floats, true/false, else strings)."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in part:
            raise EfditError(f"expected key=value in {spec!r}, got {part!r}")
        k, v = (x.strip() for x in part.split("=", 1))
        for cast in (int, float):
            try:
                out[k] = cast(v)
                break
            except ValueError:
                continue
        else:
            out[k] = {"true": True, "false": False}.get(v.lower(), v)
    return out


# ---- what each field may hold ---------------------------------------------------------------------------------
# The config is the schema: every field has a kind (range) or a set of choices. `apply_overrides` checks each
# option as it is given (the message names the option as the user typed it), `validate_config` checks a whole
# config (fields and combinations) before any work starts. The choice sets name what the core packages implement;
# tests/test_validation.py checks they agree with those registries.
PEFT = ("full", "bitfit", "difffit", "finediffusion", "efdit", "lora")
SAMPLERS = ("ddpm", "ddim", "dpmpp2m", "unipc")
DETERMINISTIC = ("dpmpp2m", "unipc")   # ODE solvers: η must be 0
GUIDANCE = ("auto", "none", "cfg", "super", "two_term")
ACCEL = ("none", "fora", "delta", "taylorseer")
MAX_SCALE = 100.0   # guidance scales above this are a typo, not a setting

KINDS = {  # kind -> (test, words)
    "pos_int": (lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
    "nonneg_int": (lambda v: isinstance(v, int) and v >= 0, "an integer ≥ 0"),
    "pos": (lambda v: math.isfinite(v) and v > 0, "a positive number"),
    "nonneg": (lambda v: math.isfinite(v) and v >= 0, "a number ≥ 0"),
    "finite": (lambda v: math.isfinite(v), "a finite number"),
    "fraction": (lambda v: math.isfinite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "unit": (lambda v: math.isfinite(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "scale": (lambda v: math.isfinite(v) and 0 <= v <= MAX_SCALE, f"a guidance scale from 0 to {MAX_SCALE:g}"),
}
RULES: dict[str, object] = {
    "model.patch_size": "pos_int", "model.hidden_size": "pos_int", "model.depth": "pos_int",
    "model.num_heads": "pos_int", "model.mlp_ratio": "pos", "model.class_dropout_prob": "fraction",
    "model.pos_embed": ("sincos", "learned"), "model.condition_on": ("sub", "super"),
    "model.embedder": ("flat", "tiered"), "model.tiered_mode": ("sum", "finediffusion"),
    "model.null_prob": "fraction", "model.peft": PEFT, "model.lora_rank": "pos_int",
    "model.attn_adapt": ("auto", "frozen", "lora", "full"),
    "model.difffit_blocks": ("all", "first_half"), "model.guidance_embed": (False, True),
    "data.image_size": "nonneg_int", "data.holdout_per_class": "nonneg_int", "data.train_per_class": "nonneg_int", "data.channels": (0, 1, 3), "data.on_bad_image": ("skip", "fail"),
    "diffusion.schedule": ("linear", "cosine"), "diffusion.steps": "pos_int",
    "diffusion.prediction": ("eps", "v", "x0"), "diffusion.loss": ("hybrid", "mse"),
    "diffusion.timesteps": ("uniform", "lognormal"), "diffusion.lognormal_mean": "finite",
    "diffusion.lognormal_std": "pos", "diffusion.weighting": ("none", "min_snr"), "diffusion.min_snr_gamma": "pos",
    "train.batch_size": "pos_int", "train.lr": "pos", "train.warmup_images": "nonneg_int",
    "train.weight_decay": "nonneg", "train.ema_decay": "fraction", "train.grad_clip": "nonneg",
    "train.grad_accum": "pos_int", "train.precision": ("fp32", "bf16"), "train.total_images": "pos_int",
    "train.minutes": "nonneg", "train.log_every": "pos_int", "train.ckpt_every": "pos_int",
    "train.sample_every": "nonneg_int", "train.init_labels": ("parent", "random"), "train.seed": "nonneg_int",
    "train.threads": "nonneg_int",
    "sample.sampler": SAMPLERS, "sample.steps": "respacing", "sample.eta": "unit", "sample.guidance": GUIDANCE,
    "sample.cfg_scale": "scale", "sample.cfg_scale_super": "scale", "sample.cfg_channels": ("all", "first3"),
    "sample.per_class": "pos_int", "sample.seed": "nonneg_int", "sample.accel": ACCEL,
    "sample.accel_kwargs": "kv", "model.attn_kwargs": "kv", "sample.guidance_interval": "interval",
}
# fields of other config trees (D²iT's) are checked by their name where they mean the same thing
NAME_RULES = {"lr": "pos", "label_lr_scale": "pos", "batch_size": "pos_int", "minutes": "nonneg", "hidden_size": "pos_int",
              "num_heads": "pos_int", "ema_decay": "fraction", "class_dropout_prob": "fraction", "seed": "nonneg_int",
              "image_size": "nonneg_int", "cfg_scale": "scale", "grain_cfg_scale": "scale", "per_class": "pos_int",
              "steps": "pos_int", "sample_steps": "pos_int", "depth": "pos_int", "trunk_depth": "pos_int"}
RESPACING = re.compile(r"^(ddim)?[1-9][0-9]*$|^[1-9][0-9]*(,[1-9][0-9]*)+$")


def field_error(path: str, value, shown: str | None = None, raw=None) -> str | None:
    """The complaint about `value` for field `path` (None if it is allowed); `shown` is the option as typed."""
    rule = RULES.get(path, NAME_RULES.get(path.split(".")[-1]))
    name = f"--{shown or path}"
    raw = value if raw is None else raw
    if rule is None:
        return None
    if isinstance(rule, tuple):
        if value in rule:
            return None
        return f"{name} must be one of {' | '.join(map(str, rule))}, got {raw!r}" + did_you_mean(str(value), rule)
    if rule == "respacing":
        if RESPACING.match(str(value)):
            return None
        return f'{name} must be a positive integer or a respacing such as "ddim50", got {raw!r}'
    if rule == "interval":
        if str(value).strip() == "" or re.fullmatch(r"\s*\d+\s*,\s*\d+\s*", str(value)) and \
                int(str(value).split(",")[0]) <= int(str(value).split(",")[1]):
            return None
        return f'{name} must be "T_LO,T_HI" with 0 ≤ T_LO ≤ T_HI (original timesteps), or "" for every step, got {raw!r}'
    if rule == "kv":
        try:
            parse_kv(str(value))
        except EfditError as e:
            return f"{name}: {e}"
        return None
    test, words = KINDS[rule]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not test(value):
        return f"{name} must be {words}, got {raw!r}"
    return None


def check_field(path: str, value, shown: str | None = None, raw=None) -> None:
    err = field_error(path, value, shown, raw)
    if err:
        raise EfditError(err)


def validate_config(cfg: Config) -> Config:
    """Every field within its kind or choices, and the combinations: heads dividing the hidden size, the sampler's
    steps within the chain, a tiered embedder on subclasses. One EfditError naming the first problem."""
    for path, (obj, f) in field_paths(cfg).items():
        check_field(path, getattr(obj, f.name))
    m, s, d = cfg.model, cfg.sample, cfg.diffusion
    if not m.arch and m.hidden_size % m.num_heads:
        raise EfditError(f"--model.num_heads {m.num_heads} must divide --model.hidden_size {m.hidden_size}")
    if not m.arch and m.pos_embed == "sincos" and m.hidden_size % 4:
        raise EfditError(f"--model.hidden_size {m.hidden_size} must be a multiple of 4 for the 2-D sin-cos position "
                         f"embedding (or --model.pos_embed learned)")
    if m.embedder == "tiered" and m.condition_on != "sub":
        raise EfditError("--model.embedder tiered conditions on subclasses: use --model.condition_on sub")
    if s.guidance_interval.strip() and int(s.guidance_interval.split(",")[1]) >= d.steps:
        raise EfditError(f"--sample.guidance_interval {s.guidance_interval!r} reaches past the {d.steps}-step chain")
    steps = [int(x) for x in str(s.steps).removeprefix("ddim").split(",")]
    if sum(steps) > d.steps:
        raise EfditError(f"--sample.steps {s.steps!r} asks for more steps than the {d.steps}-step chain has")
    if s.sampler in DETERMINISTIC and s.eta != 0:
        raise EfditError(f"--sample.sampler {s.sampler} is deterministic: --sample.eta must be 0, not {s.eta}")
    return cfg
