"""D²iT's RefineNet: sparse (only the sub-tokens it needs) vs dense-with-mask, same weights, interleaved timing.

    .venv/bin/python benchmarks/d2it_refine.py [--threads 2] [--batch 8]

Two DCT sizes: the `fmnist32` preset (width 64, 4 trunk + 2 RefineNet blocks, 8x8 regions -> 256 sub-tokens) and
the `imagenet256` preset (width 768, 10 + 2 blocks, 16x16 regions -> 1024 sub-tokens), random weights, random
grain maps at fine shares r = 0.25 and 0.5. Prints the forward time of each, the ratio, and the sub-token count
the sparse RefineNet runs on ("global" attention: 4 per fine region + 1 per coarse region, padded to the batch's
longest), and checks both give the same output.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from efdit.d2it.config import build_d2it_config  # noqa: E402
from efdit.d2it.dct import build_dct  # noqa: E402
from efdit.d2it.dvae import project_multigrain  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{'preset':12s} {'r':>5s} {'sub-tokens dense/sparse':>24s} {'dense s':>8s} {'sparse s':>9s} {'speed-up':>9s}")
    for preset in ("fmnist32", "imagenet256"):
        cfg = build_d2it_config(preset, {})
        torch.manual_seed(0)
        dense = build_dct(cfg, in_channels=4, num_classes=10).eval()
        dense.sparse_refine = False
        sparse = build_dct(cfg, in_channels=4, num_classes=10).eval()
        sparse.load_state_dict(dense.state_dict())
        with torch.no_grad():
            for prm in list(dense.parameters()):  # adaLN-Zero starts as identity: give every weight a value
                prm.add_(torch.randn(prm.shape) * 0.02)
        sparse.load_state_dict(dense.state_dict())
        h, w = dense.grid
        for r in (0.25, 0.5):
            g = torch.Generator().manual_seed(1)
            grain = (torch.rand(args.batch, h, w, generator=g) < r).long()
            x = project_multigrain(torch.randn(args.batch, 4, 2 * h, 2 * w, generator=g), grain)
            t = torch.randint(0, 1000, (args.batch,), generator=g)
            y = torch.randint(0, 10, (args.batch,), generator=g)
            with torch.inference_mode():
                a, b = dense(x, t, y, grain=grain), sparse(x, t, y, grain=grain)
                err = float((a - b).abs().max())
                times = {"dense": [], "sparse": []}
                for _ in range(args.rounds):
                    for name, m in (("dense", dense), ("sparse", sparse)):
                        t0 = time.perf_counter()
                        m(x, t, y, grain=grain)
                        times[name].append(time.perf_counter() - t0)
            fine = grain.reshape(args.batch, -1).sum(1)
            n_sparse = int((4 * fine + (h * w - fine)).max())
            td, ts = min(times["dense"]), min(times["sparse"])
            print(f"{preset:12s} {r:5.2f} {f'{4 * h * w} / {n_sparse}':>24s} {td:8.3f} {ts:9.3f} {td / ts:8.2f}x"
                  f"   (max |dense - sparse| {err:.1e})")


if __name__ == "__main__":
    main()
