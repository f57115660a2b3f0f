"""torch.distributed helpers: one code path for 1 and N processes (launched by `torchrun`), CPU (gloo) or GPU (nccl).

    torchrun --nproc_per_node 8 -m efdit.cli train --preset inat21-dit-xl2-256-efdit --latent-cache …

`setup()` reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR …) and joins the process
group; without them it is a single process and every helper below is a cheap no-op (no process group at all).
`unwrap(model)` undoes DDP / torch.compile wrapping, so checkpoint code never touches `model.module` directly.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import EfditError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (idempotent), pick this rank's device.

    device: "auto" -> cuda:LOCAL_RANK when CUDA is available, else CPU; "cpu" forces CPU (gloo). The backend is
    nccl on GPU, gloo on CPU."""
    from ..models.dit import resolve_device
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1 and not dist.is_initialized():
        return DistInfo(device=resolve_device(device))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise EfditError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) on this node: "
                             f"use --nproc_per_node {torch.cuda.device_count()}")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise EfditError(f"distributed training runs on cuda (nccl) or cpu (gloo), not {dev.type}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def rank_seed(seed: int, rank_: int, world: int) -> int:
    """Per-rank seed (DiT's rule, seed·world + rank): rank 0 of a single process keeps `seed`."""
    return seed * world + rank_


# ---- models -----------------------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / FSDP-style `.module` and torch.compile's `_orig_mod` wrappers (any depth)."""
    while True:
        inner = getattr(model, "module", None)
        if inner is not None and not isinstance(model, nn.Module):
            model = inner                  # a plain-object wrapper: efdit's CompiledModel
        elif isinstance(inner, nn.Module) and (isinstance(model, nn.parallel.DistributedDataParallel) or
                                               type(model).__name__ in _WRAPPERS):
            model = inner                  # DDP, DataParallel, FSDP
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod        # torch.compile's OptimizedModule
        else:
            return model


_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP over the trainable parameters when there are several processes; the model itself otherwise.

    DDP broadcasts rank 0's parameters and buffers at construction, so all ranks start identical."""
    if not info.distributed:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def no_sync(model: nn.Module, skip: bool):
    """DDP's no_sync() (no gradient all-reduce) for the micro-steps of gradient accumulation that are not last."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


# ---- collectives (no-ops on one process) -------------------------------------------------------------------
def all_reduce_mean(values: list[float], device: torch.device | None = None) -> list[float]:
    """The mean over ranks of a list of floats (one collective). One process: the values themselves."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device or _collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def parameter_fingerprint(model: nn.Module) -> torch.Tensor:
    """float64 (2·P,): sum and sum of squares of every parameter, in order (a cheap identity check)."""
    vals = []
    for p in unwrap(model).parameters():
        x = p.detach().double()
        vals += [x.sum(), (x * x).sum()]
    return torch.stack(vals).cpu() if vals else torch.zeros(0, dtype=torch.float64)


def check_in_sync(model: nn.Module) -> None:
    """Raise an EfditError if the ranks' parameters differ (they must be bit-identical under DDP)."""
    if not is_distributed():
        return
    prints = gather_objects(parameter_fingerprint(model))
    for r, fp in enumerate(prints[1:], 1):
        if not torch.equal(fp, prints[0]):
            raise EfditError(f"rank {r}'s parameters differ from rank 0's: the ranks are out of sync")
