"""Proxy attention behind a PEFT rule: what the swap costs and what `model.attn_adapt` gets back.

The shipped Fashion-MNIST base was trained with SDPA. A PEFT fine-tune that switches to pooled proxy attention
(EFDiT's ProAttention) must absorb the change of the attention core; the FineDiffusion / efdit rules freeze
qkv / proj, so only biases, LayerNorm affines and the label table can. This benchmark fine-tunes the base on its
own labels (the 4 superclasses: no label change, so the only thing to learn is the attention swap) with the
`fmnist-finetune` recipe (FineDiffusion PEFT, lr 3e-3) for the same number of images under each arm, and
measures the ε-MSE of the EMA model on held-fixed test images, noise and timesteps:

  sdpa base              the shipped base, no training (the target)
  proxy swapped          the base with proxy attention, no training (the damage)
  sdpa + peft            control: the same fine-tune with SDPA (what the fine-tune alone changes)
  proxy + peft frozen    attn_adapt frozen: qkv / proj frozen (the old behaviour of the paper presets)
  proxy + peft lora      attn_adapt lora (the default `auto` under a freezing rule): LoRA r = 8 on qkv / proj
  proxy + peft full      attn_adapt full: qkv / proj trainable

ε-MSE is the mean over N test images × the timesteps, each image with one fixed noise per timestep; the interval
is a bootstrap 95 % over images (paired: the same images and noise in every arm).

    .venv/bin/python benchmarks/proxy_remedy.py --images 4096 --n 512 --threads 2
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from efdit.config import build_config  # noqa: E402
from efdit.engine.build import apply_attention, build_diffusion  # noqa: E402
from efdit.engine.datasets import load_data  # noqa: E402
from efdit.engine.files import load_model  # noqa: E402
from efdit.engine.paths import shipped  # noqa: E402
from efdit.engine.train import train  # noqa: E402
from efdit.metrics.bootstrap import draw_indices, percentile_interval  # noqa: E402

TIMESTEPS = (200, 500, 800)
ARMS = {"sdpa + peft": {"attn_backend": "sdpa"},
        "proxy + peft frozen": {"attn_backend": "proxy", "attn_kwargs": "pool=2", "attn_adapt": "frozen"},
        "proxy + peft lora": {"attn_backend": "proxy", "attn_kwargs": "pool=2", "attn_adapt": "lora"},
        "proxy + peft full": {"attn_backend": "proxy", "attn_kwargs": "pool=2", "attn_adapt": "full"}}


@torch.no_grad()
def eps_mse(model, diffusion, x0, y, noise) -> np.ndarray:
    """Per-image ε-MSE at each of TIMESTEPS: array (N, len(TIMESTEPS))."""
    out = np.zeros((len(x0), len(TIMESTEPS)))
    for j, t in enumerate(TIMESTEPS):
        for i in range(0, len(x0), 128):
            xb, nb = x0[i:i + 128], noise[j, i:i + 128]
            tt = torch.full((len(xb),), t, dtype=torch.long)
            pred = model(diffusion.q_sample(xb, tt, nb), tt, y[i:i + 128])[:, :xb.shape[1]]
            out[i:i + 128, j] = ((pred - nb) ** 2).mean(dim=(1, 2, 3)).numpy()
    return out


def interval(values: np.ndarray, reps: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of the mean over images (efdit's index draws; the same draws for every arm)."""
    means = values[draw_indices(len(values), reps, seed)].mean(axis=1)
    iv = percentile_interval(float(values.mean()), means, method="percentile")
    return iv.low, iv.high


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="fmnist-base")
    p.add_argument("--images", type=int, default=4096, help="fine-tuning images per arm")
    p.add_argument("--n", type=int, default=512, help="test images scored")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "proxy_remedy.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = shipped(args.base)
    t0 = time.time()
    model, cfg, h, _ = load_model(base)
    test = load_data(cfg, "test")
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(test.images), generator=g)[:args.n]
    x0, _, y = test.batch(idx)  # x0 in [-1, 1]; y: superclass labels (the base is superclass-conditioned)
    noise = torch.randn((len(TIMESTEPS), *x0.shape), generator=g)
    diffusion = build_diffusion(cfg)
    scores = {"sdpa base": eps_mse(model.eval(), diffusion, x0, y, noise)}
    cfg.model.attn_backend, cfg.model.attn_kwargs = "proxy", "pool=2"
    scores["proxy swapped"] = eps_mse(apply_attention(model, cfg).eval(), diffusion, x0, y, noise)
    with tempfile.TemporaryDirectory() as tmp:
        for name, over in ARMS.items():
            run = Path(tmp) / name.replace(" ", "-")
            tcfg = build_config("fmnist-finetune", {"run_dir": str(run), "init_from": str(base), "condition_on": "super",
                                                    "holdout_per_class": 0, "total_images": args.images,
                                                    "threads": args.threads, **over})
            t1 = time.time()
            train(tcfg, progress=False)
            m, mcfg, _, _ = load_model(run / "model.safetensors")
            apply_attention(m, mcfg)
            scores[name] = eps_mse(m.eval(), diffusion, x0, y, noise)
            print(f"{name}: trained {args.images} images in {time.time() - t1:.0f} s", flush=True)
    ref = scores["sdpa base"].mean(axis=1)
    rows = {}
    print(f"\nε-MSE on {args.n} Fashion-MNIST test images (superclass labels), t in {TIMESTEPS}; "
          f"fine-tunes: {args.images} images each, fmnist-finetune recipe (finediffusion PEFT, lr 3e-3)")
    print("| arm | " + " | ".join(f"t={t}" for t in TIMESTEPS) + " | mean [95 %] | Δ vs sdpa base [95 %] |")
    print("|---|" + "---:|" * (len(TIMESTEPS) + 2))
    for name, s in scores.items():
        per = s.mean(axis=1)
        lo, hi = interval(per)
        dlo, dhi = interval(per - ref)
        rows[name] = {"per_t": s.mean(axis=0).tolist(), "mean": float(per.mean()), "interval": [lo, hi],
                      "delta": float((per - ref).mean()), "delta_interval": [dlo, dhi]}
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in s.mean(axis=0)) +
              f" | {per.mean():.4f} [{lo:.4f}, {hi:.4f}] | {(per - ref).mean():+.4f} [{dlo:+.4f}, {dhi:+.4f}] |")
    Path(args.out).write_text(json.dumps({"images": args.images, "n": args.n, "timesteps": TIMESTEPS,
                                          "base": str(base), "rows": rows, "seconds": time.time() - t0}, indent=1))
    print(f"\n{time.time() - t0:.0f} s in all -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
