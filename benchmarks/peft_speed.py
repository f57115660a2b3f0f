"""Training throughput of each PEFT preset against full fine-tuning, measured in one run.

    python benchmarks/peft_speed.py [--arch DiT-S/2 --input 32 --channels 4 --batch 16 --steps 8 --threads 2]

Same model, data and batch for every preset; prints img/s, the ratio to `full`, and the trainable share.
FineDiffusion reports 1.56x for its rule on DiT-XL/2 (GPU); on CPU the frozen weights save their weight
gradients and optimizer updates, not the activation gradients, so expect less.
"""
from __future__ import annotations

import argparse
import time

import torch

from efdit.diffusion import create_diffusion
from efdit.models.dit import DiT, DiT_models
from efdit.models.embedders import TieredEmbedder
from efdit.models.peft import PEFT_PRESETS, apply_peft


def measure(preset: str, args) -> tuple[float, float]:
    torch.manual_seed(0)
    sizes = DiT_models[args.arch] if args.arch else dict(patch_size=4, hidden_size=256, depth=6, num_heads=4)
    parent = torch.arange(args.classes) % 4
    te = TieredEmbedder(args.classes, 4, parent, sizes["hidden_size"], mode="sum") if preset == "efdit" else None
    m = DiT(input_size=args.input, in_channels=args.channels, num_classes=args.classes, y_embedder=te, **sizes)
    try:
        apply_peft(m, preset, lora_rank=8)
    except Exception as e:  # lora without the peft library
        print(f"{preset}: skipped ({e})")
        return float("nan"), float("nan")
    share = sum(p.numel() for p in m.parameters() if p.requires_grad) / sum(p.numel() for p in m.parameters())
    d = create_diffusion()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(args.batch, args.channels, args.input, args.input)
    y = torch.randint(0, args.classes, (args.batch,))
    m.train()
    times = []
    for i in range(args.steps + 2):
        t0 = time.perf_counter()
        loss = d.training_losses(m, x, torch.randint(0, 1000, (args.batch,)), dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    times.sort()
    return args.batch / times[len(times) // 2], share


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="", help="a DiT name (default: the fmnist demo model, 256 wide, 6 deep)")
    p.add_argument("--input", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"model {args.arch or 'fmnist demo DiT'}, input {args.channels}x{args.input}x{args.input}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")
    base = None
    print(f"{'preset':14s} {'img/s':>8s} {'vs full':>8s} {'trainable':>10s}")
    for preset in PEFT_PRESETS:
        ips, share = measure(preset, args)
        base = base or ips
        print(f"{preset:14s} {ips:8.1f} {ips / base:7.2f}x {100 * share:9.3f}%")


if __name__ == "__main__":
    main()
