"""`efdit cache-latents`: encode a dataset once with a local VAE into sharded latent files (resumable; torchrun
splits the shards)."""
from __future__ import annotations

from ..config import build_config, validate_config
from ..engine import distributed
from ..engine.datasets import default_split, load_data
from ..latent import cache_latents, load_autoencoder
from .options import overrides, parser, positive_int, writable


def main(argv: list[str]) -> int:
    p = parser("cache-latents", "Encode a dataset with a local VAE into sharded safetensors (posterior mean + std, "
                                "optional mirrored pair). Rerun to resume; under torchrun the shards are split.")
    p.add_argument("--preset", default="", help="a preset naming the dataset, size and VAE (e.g. "
                                                 "inat21-dit-xl2-256-efdit)")
    p.add_argument("--out", required=True, help="the cache folder (train with --latent-cache OUT)")
    p.add_argument("--split", default="", help="the split to encode (default: the dataset's training split)")
    p.add_argument("--shard-size", type=positive_int, default=4096, help="items per shard file (default 4096)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per VAE call (default 32)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"], help="storage of mean / std")
    p.add_argument("--workers", type=positive_int, default=4, help="image decoding threads")
    p.add_argument("--no-progress", action="store_true")
    args, rest = p.parse_known_args(argv)
    cfg = validate_config(build_config(args.preset or None, overrides(rest)))
    cfg.data.latent_cache = ""
    writable(args.out, "latent cache")
    info = distributed.setup(cfg.device)
    try:
        ds = load_data(cfg, args.split or cfg.data.split or default_split(cfg.data.dataset), lazy=True)
        vae = load_autoencoder(cfg.data.vae, device=info.device, channels=ds.num_channels)
        out = cache_latents(ds, vae, args.out, shard_size=args.shard_size, batch_size=args.batch_size,
                            hflip=cfg.data.hflip, dtype=args.dtype, progress=not args.no_progress and info.is_main,
                            rank=info.rank, world_size=info.world_size, num_workers=args.workers)
        distributed.barrier()
    finally:
        distributed.cleanup()
    if info.is_main:
        print(f"{len(ds):,} images of {ds.name} -> {out} ({vae.describe()['kind']}, flips: {cfg.data.hflip})")
    return 0
