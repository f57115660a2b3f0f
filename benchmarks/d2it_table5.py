"""Reproduce D²iT's Table 5 (grain-map source) at small scale, with Table 3's plain-DiT row and the Fig. 5 trend.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/d2it_table5.py            # trains what is missing, then measures
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/d2it_table5.py --run-dir runs/d2it-fmnist32 --n-per-class 20

Same as `efdit d2it train` (all stages; the DiT baseline gets the DCT's step count) followed by
`efdit d2it table5 RUN`. Numbers are FD-EffNetLite0 (not Inception FID): compare rows with each other and with the
real-vs-real floor printed in the first row.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    import torch
    torch.set_num_threads(1)
    from efdit.commands.d2it_table5 import main as table5
    from efdit.d2it.config import build_d2it_config
    from efdit.engine.d2it_train import load_stage, train_d2it
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="fmnist32")
    p.add_argument("--run-dir", default="runs/d2it-fmnist32")
    p.add_argument("--n-per-class", default="20")
    p.add_argument("--steps", default="25")
    p.add_argument("--cfg-scale", default="1.0")
    args = p.parse_args()
    cfg = build_d2it_config(args.preset, {"run_dir": args.run_dir})
    run = train_d2it(cfg, ["prepare", "dvae", "latents", "dgt", "dct"])
    _, meta = load_stage(run / "dct.safetensors")
    cfg.dit.steps = meta["progress"]["steps"]        # same number of training steps (and batch) as the DCT
    cfg.dit.batch_size = cfg.dct.batch_size
    train_d2it(cfg, ["dit"])
    return table5([str(run), "--n-per-class", args.n_per_class, "--steps", args.steps, "--cfg-scale", args.cfg_scale])


if __name__ == "__main__":
    sys.exit(main())
