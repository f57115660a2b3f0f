"""Training throughput of each PEFT preset against full fine-tuning, measured in one run.

    python benchmarks/peft_speed.py [--arch DiT-S/2 --input 32 --channels 4 --batch 16 --steps 8 --threads 2]

Same model, data and batch for every preset, steps interleaved across presets; prints img/s (median step),
the ratio to `full`, and the trainable share.
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


def build(preset: str, args):
    """-> (one training step as a closure, trainable share), or None when the preset cannot be built here."""
    torch.manual_seed(0)
    sizes = DiT_models[args.arch] if args.arch else dict(patch_size=4, hidden_size=256, depth=6, num_heads=4)
    parent = torch.arange(args.classes) % 4
    te = TieredEmbedder(args.classes, 4, parent, sizes["hidden_size"], mode="sum") if preset == "efdit" else None
    m = DiT(input_size=args.input, in_channels=args.channels, num_classes=args.classes, y_embedder=te, **sizes)
    try:
        apply_peft(m, preset, lora_rank=8)
    except Exception as e:  # lora without the peft library
        print(f"{preset}: skipped ({e})")
        return None
    share = sum(p.numel() for p in m.parameters() if p.requires_grad) / sum(p.numel() for p in m.parameters())
    d = create_diffusion()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.input, args.input, generator=g)
    y = torch.randint(0, args.classes, (args.batch,), generator=g)
    m.train()

    def step():
        loss = d.training_losses(m, x, torch.randint(0, 1000, (args.batch,), generator=g), dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, share


def measure_all(args) -> dict:
    """Every preset's step, interleaved (full, bitfit, …, full, bitfit, …) after two warm-up steps each, so a
    load change on a shared machine hits all presets alike -> {preset: (img/s of the median step, share)}."""
    steps = {p: b for p in PEFT_PRESETS if (b := build(p, args)) is not None}
    times = {p: [] for p in steps}
    for i in range(args.steps + 2):
        for p, (step, _) in steps.items():
            t0 = time.perf_counter()
            step()
            if i >= 2:
                times[p].append(time.perf_counter() - t0)
    return {p: (args.batch / sorted(t)[len(t) // 2], steps[p][1]) for p, t in times.items()}


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
    res = measure_all(args)
    base = res["full"][0]
    print(f"{'preset':14s} {'img/s':>8s} {'vs full':>8s} {'trainable':>10s}")
    for preset, (ips, share) in res.items():
        print(f"{preset:14s} {ips:8.2f} {ips / base:7.2f}x {100 * share:9.3f}%")


if __name__ == "__main__":
    main()
