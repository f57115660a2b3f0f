"""D²iT training: the stages, each a small readable loop, all writing into one run directory.

    prepare  thresholds.json (dataset percentiles, computed once per dataset + entropy spec and cached under
             $EFDIT_CACHE/grains/), entropy.safetensors (region entropies of the train and test splits)
    dvae     dvae.safetensors: the DVAE (r_fine drawn per image from dvae.train_ratios, so one model serves every
             ratio), then its latent scale factor (1 / std of Z_d at r_fine over 2,048 train images)
    latents  latents.safetensors: scaled Z_d at r_fine (for the DCT) and at r = 1 (for the DiT baseline) of the
             stage-2 training images, with their grain maps and labels
    dgt      dgt.safetensors   (grain maps at r_fine, cross-entropy)
    dct      dct.safetensors   (multi-grained noise and loss on ground-truth maps)
    dit      dit.safetensors   (the plain efdit DiT baseline on the all-fine latent, same width, same budget)

Every model file holds EMA weights + the D²iT config in its metadata. A stage whose file exists is skipped
(`--force` retrains it); there is no mid-stage resumption (stages last minutes at this scale).
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..d2it.config import D2itConfig, run_dir_of
from ..d2it.data import load_d2it_dataset, split_by_share, to_signed
from ..d2it.grains import (
    compute_thresholds,
    grain_map,
    load_thresholds,
    region_entropy,
    save_json,
    threshold_for,
    thresholds_path,
)
from ..diffusion import create_diffusion
from ..errors import EfditError
from ..models.checkpoint import load_safetensors, save_safetensors
from ..models.dit import DiT, count_params
from .paths import cache_dir

STAGES = ("prepare", "dvae", "latents", "dgt", "dct", "dit")
LATENT_IMAGES = 20_000   # stage-2 training images (encoded once); the DGT uses every train image


# ---- the generic loop -------------------------------------------------------------------------------------
def fit(name: str, model: torch.nn.Module, loss_fn, lr: float, steps: int, minutes: float, ema_decay: float,
        run_dir: Path, batch_size: int, progress: bool = True, log_every: int = 20, grad_clip: float = 1.0,
        after_step=None, seed: int = 0):
    """AdamW + EMA until `steps` or `minutes` (0 = no limit). loss_fn(gen) -> dict with "loss" (scalar); gen, seeded
    with `seed`, draws the batches, timesteps and noise.
    after_step(step) (optional), called after each optimizer step (step counted from 0): a second model's step
    (the DVAE's discriminator), returning a dict of terms to log (or None)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if ema_decay else None
    gen = torch.Generator().manual_seed(seed)
    log = open(run_dir / f"log-{name}.jsonl", "w")
    budget = minutes * 60 if minutes else math.inf
    start, step, window = time.time(), 0, {}
    bar = tqdm(total=steps, desc=f"train {name}", disable=not progress, smoothing=0.1)
    model.train()
    while step < steps and time.time() - start < budget:
        terms = loss_fn(gen)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise EfditError(f"{name}: loss became {loss.item()} at step {step + 1} (try a lower lr)")
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            terms = {**terms, **(after_step(step) or {})}
        if ema is not None:
            decay = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - decay)
                for be, bm in zip(ema.buffers(), model.buffers()):
                    be.copy_(bm)
        step += 1
        for k, v in terms.items():
            window[k] = window.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        if step % log_every == 0:
            rec = {"step": step, "images": step * batch_size, "seconds": round(time.time() - start, 1),
                   **{k: round(v / log_every, 5) for k, v in window.items()}}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            window = {}
        bar.update(1)
    bar.close()
    log.close()
    out = ema if ema is not None else model.eval()
    return out, {"steps": step, "images": step * batch_size, "seconds": round(time.time() - start, 1)}


def random_hflip(gen: torch.Generator, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The same random horizontal flip (p = 0.5 per item, one draw per batch item) applied to every tensor."""
    flip = torch.rand(len(tensors[0]), generator=gen) < 0.5
    return [torch.where(flip.view(-1, *[1] * (t.dim() - 1)), t.flip(-1), t) for t in tensors]


def save_stage(path: Path, model: torch.nn.Module, cfg: D2itConfig, **meta) -> Path:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return save_safetensors(path, sd, {"kind": "d2it", "config": cfg.to_dict(), **meta})


def load_stage(path: Path):
    if not Path(path).is_file():
        raise EfditError(f"{path} not found: train that stage first (`efdit d2it train --stage ...`)")
    tensors, meta, _ = load_safetensors(path)
    return tensors, meta


def load_stage_model(run_dir: Path, name: str, build):
    """A trained stage's model (`name`.safetensors), rebuilt by build(its saved D2itConfig, its metadata)."""
    tensors, meta = load_stage(run_dir / f"{name}.safetensors")
    model = build(D2itConfig.from_dict(meta["config"]), meta)
    model.load_state_dict(tensors)
    return model.eval()


def fit_and_save(name: str, model, loss_fn, stage, cfg: D2itConfig, run_dir: Path, progress: bool, unit: str,
                 **meta) -> None:
    """Train a stage with its own config section `stage` (lr, steps, minutes, ema_decay, batch_size), save its EMA
    to `name`.safetensors and print a one-line summary."""
    ema, info = fit(name, model, loss_fn, stage.lr, stage.steps, stage.minutes, stage.ema_decay, run_dir,
                    stage.batch_size, progress, seed=cfg.seed)
    save_stage(run_dir / f"{name}.safetensors", ema, cfg, progress=info, **meta)
    print(f"{name.upper() if name != 'dit' else 'DiT'}: {info['steps']} steps ({info['images']:,} {unit}, "
          f"{info['seconds']:.0f} s)")


# ---- stage: prepare -------------------------------------------------------------------------------------
NO_TEST_SPLIT = ("emoji",)   # datasets whose "train" is the whole set: a test split is held out by share


def datasets(cfg: D2itConfig):
    """(train, test) of the run's dataset; for one without a test split, `data.test_share` of every class is held
    out (seeded, so every stage and every evaluation sees the same split)."""
    d = cfg.data
    kw = dict(channels=d.channels, root=d.root, super_level=d.super_level, sub_level=d.sub_level,
              categories=d.categories)
    if d.dataset in NO_TEST_SPLIT:
        return split_by_share(load_d2it_dataset(d.dataset, "train", d.image_size, **kw), d.test_share)
    return (load_d2it_dataset(d.dataset, "train", d.image_size, **kw),
            load_d2it_dataset(d.dataset, "test", d.image_size, **kw))


def data_tag(cfg: D2itConfig) -> str:
    """The name the cached thresholds are stored under: the dataset and whatever changes its train images."""
    d = cfg.data
    tag = d.dataset + (f"-c{d.channels}" if d.channels else "")
    if d.dataset in NO_TEST_SPLIT:
        levels = "-".join(v.replace(" ", "_").replace(",", "+") or "default"
                          for v in (d.categories, d.super_level, d.sub_level))
        tag += f"-{levels}-train{1 - d.test_share:g}"
    return tag


def get_thresholds(cfg: D2itConfig, train_images: torch.Tensor, progress: bool = True):
    """Dataset thresholds: read from the cache, or computed once on the train split and cached.
    Returns (thresholds dict, train entropies or None when read from the cache)."""
    spec = cfg.entropy_spec()
    path = thresholds_path(cache_dir(), data_tag(cfg), cfg.data.image_size, spec)
    if path.is_file():
        return load_thresholds(path, spec), None
    images = train_images
    n = cfg.grains.threshold_images
    if n and n < len(images):
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]
        images = images[idx]
    th, ent = compute_thresholds(images, spec, {"dataset": cfg.data.dataset, "split": "train",
                                                "image_size": cfg.data.image_size}, progress)
    save_json(path, th)
    return th, (ent if len(images) == len(train_images) else None)


def stage_prepare(cfg: D2itConfig, run_dir: Path, progress: bool = True):
    train_ds, test_ds = datasets(cfg)
    th, ent_train = get_thresholds(cfg, train_ds.images, progress)
    save_json(run_dir / "thresholds.json", th)
    spec = cfg.entropy_spec()
    if ent_train is None:
        ent_train = torch.cat([region_entropy(train_ds.images[i:i + 4096], spec)
                               for i in range(0, len(train_ds), 4096)])
    ent_test = region_entropy(test_ds.images, spec)
    save_safetensors(run_dir / "entropy.safetensors", {"train": ent_train, "test": ent_test},
                     {"kind": "d2it-entropy", "spec": th["spec"]})
    tau = threshold_for(th, cfg.grains.r_fine)
    print(f"thresholds: {len(th['percentiles'])} percentiles over {th['n_regions']:,} regions; τ(r={cfg.grains.r_fine})"
          f" = {tau:.4f}; fine share train {(ent_train > tau).float().mean():.3f}, test {(ent_test > tau).float().mean():.3f}")


def load_prepared(cfg: D2itConfig, run_dir: Path):
    th = load_thresholds(run_dir / "thresholds.json", cfg.entropy_spec())
    ent, _ = load_stage(run_dir / "entropy.safetensors")
    return th, ent["train"], ent["test"]


# ---- stage: DVAE ----------------------------------------------------------------------------------------
def stage_dvae(cfg: D2itConfig, run_dir: Path, progress: bool = True):
    from ..d2it.dvae import build_dvae
    train_ds, _ = datasets(cfg)
    th, ent_train, _ = load_prepared(cfg, run_dir)
    ratios = [float(r) for r in cfg.dvae.train_ratios.split(",")]
    taus = torch.tensor([threshold_for(th, r) for r in ratios], dtype=torch.float64)
    torch.manual_seed(cfg.seed)
    model = build_dvae(cfg, train_ds.num_channels)
    d = cfg.dvae
    print(f"DVAE: {count_params(model):,} parameters, f1={d.f1}, f2={cfg.f2}, z={d.z_channels}, ratios {ratios}")

    def batch(gen):
        idx = torch.randint(0, len(train_ds), (d.batch_size,), generator=gen)
        x = to_signed(train_ds.images[idx])
        e = ent_train[idx]
        if cfg.data.hflip:   # entropy is flip-invariant per region: flip the map with the image
            x, e = random_hflip(gen, x, e)
        tau = taus[torch.randint(0, len(ratios), (len(idx),), generator=gen)]
        return x, (e > tau[:, None, None]).long()

    def loss_fn(gen):
        x, grain = batch(gen)
        return model.loss(x, grain, d.kl_weight, generator=gen)

    after_step = None
    if d.perceptual_weight or d.disc_weight:
        loss_fn, after_step, _ = dvae_objective(cfg, model, batch, train_ds.num_channels)
    ema, info = fit("dvae", model, loss_fn, d.lr, d.steps, d.minutes, 0.999, run_dir, d.batch_size, progress,
                    after_step=after_step, seed=cfg.seed)
    # latent scale factor: 1 / std of Z_d at r_fine over a data sample
    tau = threshold_for(th, cfg.grains.r_fine)
    idx = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(1))[:2048]
    with torch.no_grad():
        z, _ = ema.encode(to_signed(train_ds.images[idx]), grain_map(ent_train[idx], tau), sample=True)
    ema.scale_factor.fill_(1.0 / z.float().std().item())
    save_stage(run_dir / "dvae.safetensors", ema, cfg, in_channels=train_ds.num_channels, progress=info,
               hierarchy=train_ds.hierarchy.to_dict())   # for `efdit serve` (class names, superclasses)
    print(f"DVAE: {info['steps']} steps ({info['images']:,} images, {info['seconds']:.0f} s); "
          f"scale factor {ema.scale_factor.item():.4f}")


def dvae_objective(cfg: D2itConfig, model, batch, in_channels: int):
    """(loss_fn, after_step, the DVAELoss) for `fit` with the perceptual and / or adversarial terms (d2it/losses.py).

    At DVAE step s (from 0): the DVAE steps on L_rec + β·KL (+ λ·L_G from `disc_start` on); then, from
    `disc_start` on, the discriminator steps on the hinge loss of the same batch: x against the detached x̂ of
    that DVAE step (one forward of the DVAE per step). The discriminator has its own Adam (β = (0.5, 0.9), as
    VQGAN / LDM); it is not saved."""
    from ..d2it.losses import DVAELoss, PerceptualLoss
    d = cfg.dvae
    perceptual = None
    if d.perceptual_weight:
        perceptual = PerceptualLoss(tuple(int(v) for v in d.perceptual_blocks.split(",")), d.perceptual_resolution)
    objective = DVAELoss(in_channels, d.kl_weight, d.perceptual_weight, d.disc_weight, d.disc_start,
                         d.disc_channels, d.disc_layers, d.disc_weight_max, perceptual)
    disc = objective.discriminator
    opt_d = torch.optim.Adam(disc.parameters(), lr=d.disc_lr or d.lr, betas=(0.5, 0.9)) if disc is not None else None
    state = {"step": 0, "x": None, "rec": None}
    if disc is not None:
        disc.train()
        print(f"DVAE discriminator: {count_params(disc):,} parameters, {d.disc_layers} stride-2 layers, "
              f"from step {d.disc_start}")

    def loss_fn(gen):
        x, grain = batch(gen)
        rec, kl = model(x, grain, gen)
        state["x"], state["rec"] = x, rec.detach()
        return objective.generator_terms(x, rec, kl, state["step"], model.last_layer())

    def after_step(step):
        state["step"] = step + 1
        terms = objective.discriminator_terms(state["x"], state["rec"], step)
        if terms is None:
            return None
        opt_d.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt_d.step()
        return {"d_loss": terms["loss"].detach(), "logits_real": terms["logits_real"],
                "logits_fake": terms["logits_fake"]}

    return loss_fn, after_step, objective


def load_dvae(cfg: D2itConfig, run_dir: Path):
    from ..d2it.dvae import build_dvae
    tensors, meta = load_stage(run_dir / "dvae.safetensors")
    cfg = D2itConfig.from_dict(meta["config"])   # the architecture the file was trained with
    model = build_dvae(cfg, meta["in_channels"])
    model.load_state_dict(tensors)
    return model.eval()


# ---- stage: latents ---------------------------------------------------------------------------------------
@torch.no_grad()
def stage_latents(cfg: D2itConfig, run_dir: Path, progress: bool = True):
    train_ds, _ = datasets(cfg)
    th, ent_train, _ = load_prepared(cfg, run_dir)
    dvae = load_dvae(cfg, run_dir)
    n = min(LATENT_IMAGES, len(train_ds))
    idx = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(2))[:n]
    grain = grain_map(ent_train[idx], threshold_for(th, cfg.grains.r_fine))
    all_fine = torch.ones_like(grain)
    zs, zf = [], []
    for i in tqdm(range(0, n, 256), desc="encoding latents", disable=not progress, leave=False):
        x = to_signed(train_ds.images[idx[i:i + 256]])
        zs.append(dvae.encode(x, grain[i:i + 256], sample=False)[0] * dvae.scale_factor)
        zf.append(dvae.encode(x, all_fine[i:i + 256], sample=False)[0] * dvae.scale_factor)
    save_safetensors(run_dir / "latents.safetensors",
                     {"z": torch.cat(zs), "z_fine": torch.cat(zf), "grain": grain, "labels": train_ds.sub_labels[idx],
                      "index": idx}, {"kind": "d2it-latents", "r_fine": cfg.grains.r_fine})
    print(f"latents: {n:,} images, {tuple(zs[0].shape[1:])}, fine share {grain.float().mean():.3f}")


def load_latents(run_dir: Path):
    t, _ = load_stage(run_dir / "latents.safetensors")
    return t


# ---- stage: DGT -----------------------------------------------------------------------------------------
def stage_dgt(cfg: D2itConfig, run_dir: Path, progress: bool = True):
    from ..d2it.dgt import build_dgt, grain_loss
    train_ds, _ = datasets(cfg)
    th, ent_train, _ = load_prepared(cfg, run_dir)
    grain = grain_map(ent_train, threshold_for(th, cfg.grains.r_fine))
    labels = train_ds.sub_labels
    d = cfg.dgt
    torch.manual_seed(cfg.seed)
    model = build_dgt(cfg, train_ds.hierarchy.num_sub)
    diffusion = create_diffusion(None, noise_schedule=d.schedule, learn_sigma=False, loss="mse")
    print(f"DGT: {count_params(model):,} parameters, {grain.shape[1]}x{grain.shape[2]} grain tokens")

    def loss_fn(gen):
        idx = torch.randint(0, len(grain), (d.batch_size,), generator=gen)
        g = grain[idx]
        if cfg.data.hflip:
            g, = random_hflip(gen, g)
        t = torch.randint(0, diffusion.num_timesteps, (len(idx),), generator=gen)
        return {"loss": grain_loss(model, diffusion, g, labels[idx], t, gen)}

    fit_and_save("dgt", model, loss_fn, d, cfg, run_dir, progress, "maps", num_classes=train_ds.hierarchy.num_sub,
                 hierarchy=train_ds.hierarchy.to_dict())


def load_dgt(cfg: D2itConfig, run_dir: Path):
    from ..d2it.dgt import build_dgt
    return load_stage_model(run_dir, "dgt", lambda c, m: build_dgt(c, m["num_classes"]))


# ---- stage: DCT -----------------------------------------------------------------------------------------
def stage_dct(cfg: D2itConfig, run_dir: Path, progress: bool = True):
    from ..d2it.dct import build_dct
    from ..d2it.multigrain import training_losses
    lat = load_latents(run_dir)
    z, grain, labels = lat["z"], lat["grain"], lat["labels"]
    d = cfg.dct
    torch.manual_seed(cfg.seed)
    num_classes = int(labels.max()) + 1
    model = build_dct(cfg, z.shape[1], num_classes)
    diffusion = create_diffusion(None, noise_schedule=d.schedule, learn_sigma=d.learn_sigma,
                                 loss="hybrid" if d.learn_sigma else "mse")
    print(f"DCT: {count_params(model):,} parameters ({d.trunk_depth} trunk + {d.refine_depth} RefineNet blocks)")

    def loss_fn(gen):
        idx = torch.randint(0, len(z), (d.batch_size,), generator=gen)
        x0, g = z[idx], grain[idx]
        if cfg.data.hflip:
            x0, g = random_hflip(gen, x0, g)
        t = torch.randint(0, diffusion.num_timesteps, (len(idx),), generator=gen)
        return training_losses(model, diffusion, x0, g, labels[idx], t, gen, d.w_coarse, d.w_fine, d.weighting)

    fit_and_save("dct", model, loss_fn, d, cfg, run_dir, progress, "latents", in_channels=z.shape[1],
                 num_classes=num_classes)


def load_dct(cfg: D2itConfig, run_dir: Path):
    from ..d2it.dct import build_dct
    return load_stage_model(run_dir, "dct", lambda c, m: build_dct(c, m["in_channels"], m["num_classes"]))


# ---- stage: plain DiT baseline ---------------------------------------------------------------------------
def build_baseline_dit(cfg: D2itConfig, in_channels: int, num_classes: int) -> DiT:
    d = cfg.dit
    return DiT(input_size=cfg.data.image_size // cfg.dvae.f1, patch_size=d.patch_size, in_channels=in_channels,
               hidden_size=d.hidden_size, depth=d.depth, num_heads=d.num_heads, num_classes=num_classes,
               class_dropout_prob=cfg.dct.class_dropout_prob, learn_sigma=cfg.dct.learn_sigma)


def stage_dit(cfg: D2itConfig, run_dir: Path, progress: bool = True):
    lat = load_latents(run_dir)
    z, labels = lat["z_fine"], lat["labels"]
    d = cfg.dit
    torch.manual_seed(cfg.seed)
    num_classes = int(labels.max()) + 1
    model = build_baseline_dit(cfg, z.shape[1], num_classes)
    diffusion = create_diffusion(None, noise_schedule=cfg.dct.schedule, learn_sigma=cfg.dct.learn_sigma,
                                 loss="hybrid" if cfg.dct.learn_sigma else "mse")
    print(f"DiT baseline: {count_params(model):,} parameters, depth {d.depth}, all-fine latent")

    def loss_fn(gen):
        idx = torch.randint(0, len(z), (d.batch_size,), generator=gen)
        x0 = z[idx]
        if cfg.data.hflip:
            x0, = random_hflip(gen, x0)
        t = torch.randint(0, diffusion.num_timesteps, (len(idx),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        terms = diffusion.training_losses(model, x0, t, {"y": labels[idx]}, noise=noise)
        return {k: v.mean() for k, v in terms.items()}

    fit_and_save("dit", model, loss_fn, d, cfg, run_dir, progress, "latents", in_channels=z.shape[1],
                 num_classes=num_classes)


def load_dit(cfg: D2itConfig, run_dir: Path):
    return load_stage_model(run_dir, "dit", lambda c, m: build_baseline_dit(c, m["in_channels"], m["num_classes"]))


# ---- driver ---------------------------------------------------------------------------------------------
STAGE_FILES = {"prepare": "entropy.safetensors", "dvae": "dvae.safetensors", "latents": "latents.safetensors",
               "dgt": "dgt.safetensors", "dct": "dct.safetensors", "dit": "dit.safetensors"}
STAGE_FNS = {"prepare": stage_prepare, "dvae": stage_dvae, "latents": stage_latents, "dgt": stage_dgt,
             "dct": stage_dct, "dit": stage_dit}


def train_d2it(cfg: D2itConfig, stages=STAGES, force: bool = False, progress: bool = True) -> Path:
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.json"
    if saved.is_file():
        old = D2itConfig.from_dict(json.loads(saved.read_text()))
        for section in ("data", "grains"):
            if getattr(old, section) != getattr(cfg, section) or old.dvae.f1 != cfg.dvae.f1:
                raise EfditError(f"{run_dir} holds a run with other {section} / f1 settings: use another --run-dir")
    saved.write_text(cfg.to_json())
    for s in stages:
        if s not in STAGE_FNS:
            raise EfditError(f"unknown stage {s!r} (stages: {', '.join(STAGES)})")
        if (run_dir / STAGE_FILES[s]).is_file() and not force:
            print(f"{s}: {run_dir / STAGE_FILES[s]} exists, skipped (--force retrains)")
            continue
        STAGE_FNS[s](cfg, run_dir, progress)
    return run_dir
