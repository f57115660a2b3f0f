"""Train the fine/coarse classifier for class-conditional metrics on Fashion-MNIST and save it.

    python scripts/train_fmnist_classifier.py OUT.safetensors [--epochs 4] [--seed 0] [--threads 1]

Reads the Debian package dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`), trains on the
60k train split, reports fine / coarse accuracy and super-consistency on the 10k test split, and writes
OUT.safetensors plus OUT.json (config, hierarchy, test figures, training time).
"""
from __future__ import annotations

import argparse
import gzip
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from efdit.data.hierarchy import Hierarchy
from efdit.metrics.classifier import accuracy_report, data_fingerprint, save_classifier, train_classifier

ROOT = "/usr/share/datasets/fashion-mnist"
NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SUPER = {"tops": [0, 2, 4, 6], "bottoms+dresses": [1, 3], "footwear": [5, 7, 9], "bag": [8]}


def fmnist_hierarchy() -> Hierarchy:
    parent = [next(s for s, members in enumerate(SUPER.values()) if i in members) for i in range(len(NAMES))]
    return Hierarchy(NAMES, list(SUPER), torch.tensor(parent))


def read_idx(root: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, 1, 28, 28), uint8 labels (N,)) of split `kind` in {"train", "t10k"}."""
    with gzip.open(f"{root}/{kind}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    with gzip.open(f"{root}/{kind}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    return x, y


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output weights path (.safetensors); a .json sidecar is written beside it")
    p.add_argument("--root", default=ROOT, help="folder with the Fashion-MNIST idx .gz files")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=24)
    p.add_argument("--augment", action="store_true", help="random 2-px shifts and horizontal flips "
                   "(not needed for 60k images and a few epochs: it cost accuracy in our runs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    if not os.path.isfile(f"{args.root}/train-images-idx3-ubyte.gz"):
        print(f"error: Fashion-MNIST not found under {args.root}; install it with "
              "`apt-get update && apt-get install -y dataset-fashion-mnist`", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    hierarchy = fmnist_hierarchy()
    x_train, y_train = read_idx(args.root, "train")
    x_test, y_test = read_idx(args.root, "t10k")

    t0, c0 = time.time(), time.process_time()
    model = train_classifier(x_train, y_train, hierarchy, epochs=args.epochs, seed=args.seed,
                             progress=not args.no_progress, width=args.width, augment=args.augment, hflip=args.augment)
    wall, cpu = time.time() - t0, time.process_time() - c0
    test = accuracy_report(model, x_test, y_test, hierarchy)
    meta = dict(dataset="fashion-mnist", split_trained="train", split_tested="t10k", test=test,
                test_acc=test["fine_acc"], test_coarse_acc=test["coarse_acc"],  # the keys `efdit evaluate` reads
                train_wall_seconds=round(wall, 1), train_cpu_seconds=round(cpu, 1), threads=torch.get_num_threads(),
                data_fingerprint=data_fingerprint(x_train, y_train))
    save_classifier(args.out, model, meta)
    print(f"trained {args.epochs} epochs on {len(x_train)} images in {wall:.0f} s wall ({cpu:.0f} s CPU, "
          f"{torch.get_num_threads()} threads)")
    print(f"test ({test['n']}): fine acc {test['fine_acc']:.4f}  coarse acc {test['coarse_acc']:.4f}  "
          f"super-consistency {test['super_consistency']:.4f}")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
