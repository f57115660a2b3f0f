"""The latent cache: a dataset encoded once into sharded safetensors files (EDM2 style), and its training reader.

Layout of a cache folder:

    meta.json                      what was encoded: autoencoder, image / latent shapes, hierarchy, shards
    shard-00000.safetensors        items [0, S):  mean, std (n, c, h, w); [mean_flip, std_flip]; sub, index (n,)
    shard-00001.safetensors        items [S, 2S) …

Each shard holds the posterior **mean and std** of every image (not one frozen sample as in fast-DiT), so training
draws a fresh latent `mean + std·ε` at every step; with `hflip` the moments of the mirrored image are stored too
and training picks one of the two at random. Shards are written atomically (temp file + rename), so a killed
run leaves only complete shards, and rerunning the command skips them (resumable). Under torchrun the shards are
split across ranks (shard i on rank i mod world).

`LatentDataset` memory-maps the shards (numpy memmap over the safetensors byte layout): a 500k-image cache is
not read into memory, the OS page cache is shared between the processes of a node, and a batch copies only its
own rows.
"""
from __future__ import annotations

import json
import os
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.base import LabelSummary
from ..data.hierarchy import Hierarchy
from ..errors import EfditError, EfditWarning, atomic_write
from .autoencoder import Autoencoder

FORMAT = "efdit-latent-cache"
VERSION = 1
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
_NP = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32, "U8": np.uint8}
# fields that must agree for a rerun to resume an existing cache
_IDENTITY = ("format", "version", "num_items", "shard_size", "hflip", "dtype", "autoencoder", "image_shape",
             "latent_shape", "hierarchy", "source")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def _describe_source(dataset) -> dict:
    return {"name": getattr(dataset, "name", type(dataset).__name__), "split": getattr(dataset, "split", ""),
            "root": str(getattr(dataset, "root", "") or "")}


def cache_latents(dataset, autoencoder: Autoencoder, out_dir: str | os.PathLike, shard_size: int = 4096,
                  batch_size: int = 32, hflip: bool = False, dtype: str = "fp16", progress: bool = True,
                  rank: int = 0, world_size: int = 1, num_workers: int = 4) -> Path:
    """Encode `dataset` (items `dataset[i]` -> (image float (C, H, W) in [-1, 1], sub, super)) into `out_dir`.

    Finished shards are skipped (resume). With `world_size` > 1 this rank encodes shards i ≡ rank (mod world).
    Unreadable images (a file dataset with on_bad_image="skip") are left out and listed in the shard's metadata.
    Returns out_dir."""
    from ..models.checkpoint import save_safetensors
    if dtype not in DTYPES:
        raise EfditError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise EfditError("shard_size and batch_size must be positive")
    out = Path(out_dir)
    n = len(dataset)
    image_shape = (dataset.num_channels, *dataset.image_size)
    meta = {"format": FORMAT, "version": VERSION, "num_items": n, "shard_size": shard_size,
            "num_shards": (n + shard_size - 1) // shard_size, "hflip": bool(hflip), "dtype": dtype,
            "autoencoder": autoencoder.describe(), "image_shape": list(image_shape),
            "latent_shape": list(autoencoder.latent_shape(image_shape)),
            "hierarchy": dataset.hierarchy.to_dict(), "source": _describe_source(dataset)}
    meta_path = out / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        diff = [k for k in _IDENTITY if old.get(k) != json.loads(json.dumps(meta[k]))]
        if diff:
            raise EfditError(f"{out} holds a latent cache of something else (differs in {', '.join(diff)}): "
                             f"use another folder, or delete it to start over")
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(meta_path, json.dumps(meta, indent=1))
    else:
        out.mkdir(parents=True, exist_ok=True)

    mine = [i for i in range(meta["num_shards"]) if i % world_size == rank]
    todo = [i for i in mine if not (out / shard_name(i)).is_file()]
    if progress and len(todo) < len(mine):
        print(f"{out}: {len(mine) - len(todo)} of {len(mine)} shards already written, skipping them")
    total = sum(min(n, (i + 1) * shard_size) - i * shard_size for i in todo)
    bar = tqdm(total=total, unit="img", desc=f"cache-latents {out.name}", disable=not progress, smoothing=0.05)
    store = DTYPES[dtype]
    pool = ThreadPoolExecutor(max(1, num_workers)) if num_workers > 1 else None
    try:
        for i in todo:
            start, stop = i * shard_size, min(n, (i + 1) * shard_size)
            parts: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "sub": [], "index": []}
            if hflip:
                parts.update(mean_flip=[], std_flip=[])
            skipped: list[str] = []
            for b in range(start, stop, batch_size):
                idx = list(range(b, min(stop, b + batch_size)))
                items = list(pool.map(_try_item, [(dataset, j) for j in idx]) if pool else
                             map(_try_item, [(dataset, j) for j in idx]))
                ok = [(j, it) for j, it in zip(idx, items) if not isinstance(it, str)]
                skipped += [f"{j}: {it}" for j, it in zip(idx, items) if isinstance(it, str)]
                bar.update(len(idx))
                if not ok:
                    continue
                x = torch.stack([it[0] for _, it in ok])                                  # (B, C, H, W)
                mean, std = autoencoder.encode_moments(x)                                 # (B, c, h, w) each
                parts["mean"].append(mean.to(store).cpu())
                parts["std"].append(std.to(store).cpu())
                if hflip:
                    mean_f, std_f = autoencoder.encode_moments(x.flip(-1))
                    parts["mean_flip"].append(mean_f.to(store).cpu())
                    parts["std_flip"].append(std_f.to(store).cpu())
                parts["sub"].append(torch.tensor([int(it[1]) for _, it in ok], dtype=torch.long))
                parts["index"].append(torch.tensor([j for j, _ in ok], dtype=torch.long))
            if not parts["sub"]:
                raise EfditError(f"shard {i} of {out} (items {start}..{stop - 1}) has no readable image")
            if skipped:
                warnings.warn(f"shard {i}: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]} (all of them: "
                              f"the shard's 'skipped' metadata)", EfditWarning)
            tensors = {k: torch.cat(v) for k, v in parts.items()}
            save_safetensors(out / shard_name(i), tensors,
                             extra_metadata={"shard": str(i), "start": str(start), "stop": str(stop),
                                             "skipped": json.dumps(skipped)})
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    return out


def _try_item(args):
    dataset, j = args
    if getattr(dataset, "on_bad_image", "fail") != "skip":
        x, sub, _ = dataset[j]
        return x, sub
    try:
        x, sub, _ = dataset[j]
        return x, sub
    except EfditError as e:
        return str(e)


# ---- reading -----------------------------------------------------------------------------------------------
def mmap_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Memory-mapped arrays of a safetensors file (read-only views, nothing read yet) and its metadata."""
    path = Path(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    (n,) = struct.unpack("<Q", bytes(raw[:8]))
    header = json.loads(bytes(raw[8:8 + n]).decode("utf-8"))
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    arrays = {}
    for name, info in header.items():
        if info["dtype"] not in _NP:
            raise EfditError(f"{path}: tensor {name} has dtype {info['dtype']}, which the latent reader cannot map")
        b, e = info["data_offsets"]
        arrays[name] = raw[base + b: base + e].view(_NP[info["dtype"]]).reshape(info["shape"])
    return arrays, meta


class LatentDataset(LabelSummary):
    """A latent cache read for training: `batch(idx, generator)` -> (x = mean + std·ε, sub, super).

    Attributes like a HierarchicalDataset: hierarchy, sub_labels, super_labels, image_size (latent h, w),
    num_channels (latent c), name, split, class_counts(). `has_flips`: mirrored moments are stored.
    """

    latent = True

    def __init__(self, cache_dir: str | os.PathLike):
        self.root = Path(cache_dir)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise EfditError(f"no latent cache at {self.root} (expected {meta_path}; make one with "
                             f"`efdit cache-latents`)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT or int(self.meta.get("version", 0)) > VERSION:
            raise EfditError(f"{meta_path} is not a latent cache this efdit can read")
        missing = [i for i in range(self.meta["num_shards"]) if not (self.root / shard_name(i)).is_file()]
        if missing:
            shown = ", ".join(shard_name(i) for i in missing[:3]) + (" …" if len(missing) > 3 else "")
            raise EfditError(f"latent cache {self.root} is incomplete: {len(missing)} of {self.meta['num_shards']} "
                             f"shards missing ({shown}); rerun `efdit cache-latents` with the same options to finish it")
        self.shards = [mmap_safetensors(self.root / shard_name(i))[0] for i in range(self.meta["num_shards"])]
        sizes = [len(s["sub"]) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)       # (num_shards + 1,)
        self.hierarchy = Hierarchy.from_dict(self.meta["hierarchy"])
        self.sub_labels = torch.from_numpy(np.concatenate([np.asarray(s["sub"]) for s in self.shards]))
        self._super_labels = self.hierarchy.parent[self.sub_labels]
        self.has_flips = bool(self.meta["hflip"])
        c, h, w = self.meta["latent_shape"]
        self.num_channels, self.image_size = c, (h, w)
        src = self.meta.get("source", {})
        self.name = f"latent:{src.get('name', '?')}"
        self.split = src.get("split", "")
        self.autoencoder = self.meta["autoencoder"]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def moments(self, idx: torch.Tensor, flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 mean, std (B, c, h, w) of items idx (B,); rows with flip[b] come from the mirrored image."""
        idx = np.asarray(torch.as_tensor(idx).cpu(), dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"latent cache index out of range [0, {len(self)})")
        flip = np.zeros(len(idx), bool) if flip is None else np.asarray(torch.as_tensor(flip).cpu(), bool)
        if flip.any() and not self.has_flips:
            raise EfditError(f"latent cache {self.root} holds no flipped moments: re-encode with --hflip, or "
                             f"train with --hflip false")
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        mean = np.empty((len(idx), *self.meta["latent_shape"]), np.float32)
        std = np.empty_like(mean)
        for s in np.unique(shard):
            for use_flip in (False, True):
                sel = np.nonzero((shard == s) & (flip == use_flip))[0]
                if not len(sel):
                    continue
                local = idx[sel] - self.offsets[s]
                order = np.argsort(local)                       # sorted reads touch the file sequentially
                rows = local[order]
                m, d = ("mean_flip", "std_flip") if use_flip else ("mean", "std")
                mean[sel[order]] = self.shards[s][m][rows]
                std[sel[order]] = self.shards[s][d][rows]
        return torch.from_numpy(mean), torch.from_numpy(std)

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None, hflip: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x = mean + std·ε (a fresh posterior sample), sub (B,), super (B,); with hflip, a random half mirrored."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        flip = torch.rand(len(idx), generator=generator) < 0.5 if hflip else None
        mean, std = self.moments(idx, flip)
        x = mean + std * torch.randn(mean.shape, generator=generator)
        return x, self.sub_labels[idx], self._super_labels[idx]

    def __getitem__(self, i: int):
        x, sub, sup = self.batch(torch.tensor([i]))
        return x[0], int(sub[0]), int(sup[0])

    def __repr__(self) -> str:
        c, (h, w) = self.num_channels, self.image_size
        return (f"LatentDataset({str(self.root)!r}, {len(self)} items {c}x{h}x{w}, flips={self.has_flips}, "
                f"{self.num_sub} subclasses under {self.num_super} superclasses)")
