"""Training-free sampling acceleration: block caches that reuse or forecast DiT branch outputs across steps.

Each cache is a sampler hook (reset / on_step_begin) *and* the `block_cache(i, branch, fn, x, c)` callable that
every DiTBlock calls for its attention and MLP branch (see models/dit.py), so a new cache needs no model change. The
sampler passes the one cache among its hooks to the model, calls `bind(model)` (if the cache has it) and `reset()`
at the start of every sampling run, so nothing survives from one run (or one batch of `generate`) to the next.

What a cache holds is the *un-gated* branch output F (N, T, D): Attn(modulate(LN(x), shift_msa, scale_msa)) or
MLP(modulate(LN(x), shift_mlp, scale_mlp)). The block adds γ ⊙ gate ⊙ F with the adaLN-Zero gate of the *current*
step (and DiffFit's γ when present), so a reused or forecast branch still follows the step's timestep embedding;
only the shift / scale inside the branch are those of the step that computed F. Under guidance the cached
tensors are the concatenated (k·N, T, D) batch of all branches, so each branch keeps its own cache.

A step is *full* (every branch computed, caches refreshed) when `step < warmup` or `step % interval == 0`,
counting sampling steps from 0 (the noisiest). On the other steps:

  FORA        (Selvaraju et al. 2024)  per block, the attention and MLP outputs F of the last full step are
              reused: x + γ·gate_now·F_attn, then + γ·gate_now·F_mlp.
  Δ-DiT       (Chen et al. 2024)  Δ-Cache: a range of `blocks` consecutive blocks is skipped and its residual
              Δ = out − in stands in for it (out ≈ in_now + Δ), so the current input still flows through. In a
              DiT, Δ = Σ over the range's branches of γ·gate·F, so Δ is rebuilt from the F of the last full step
              with the current step's gates (with the full step's gates it is the stored out − in exactly).
              Stage-adaptive: while the timestep t ≥ `boundary` (early, outline stage) the *rear* blocks are
              cached, for t < boundary (late, detail stage) the *front* blocks.
  TaylorSeer  (Liu et al. 2025)  per block branch, finite differences over the full steps estimate derivatives
              Δ^j F up to `order` m; a skipped step k steps after the last full one uses the Taylor series
              F ≈ Σ_j Δ^j F · k^j / j!. Order 0 is FORA's reuse exactly.

All three do no work on full steps beyond fn(x, c), so `interval=1` gives bit-identical samples.
"""
from __future__ import annotations

import math

import torch

from ...errors import did_you_mean
from . import SamplerHook


class StepCache(SamplerHook):
    """Common step bookkeeping: which sampling step is running, whether it is a full step, counts of the
    branch evaluations computed and skipped during the last run (`computed`, `skipped`)."""

    granularity = "branch"  # called per attention / MLP branch with the un-gated output (models/dit.py)

    def __init__(self, interval: int = 3, warmup: int = 0):
        if int(interval) < 1:
            raise ValueError(f"cache interval must be ≥ 1, got {interval}")
        if int(warmup) < 0:
            raise ValueError(f"cache warmup must be ≥ 0, got {warmup}")
        self.interval, self.warmup = int(interval), int(warmup)
        self.reset()

    def reset(self) -> None:
        self.step, self.t = -1, None
        self.last_full = -1
        self.computed = self.skipped = 0
        self.store: dict = {}

    def on_step_begin(self, step_index: int, t: torch.Tensor) -> None:
        self.step = int(step_index)
        self.t = int(t.flatten()[0]) if torch.is_tensor(t) else int(t)
        if self.full:
            self.last_full = self.step

    @property
    def full(self) -> bool:
        return self.step < self.warmup or self.step % self.interval == 0

    def _fresh(self, key, x: torch.Tensor) -> bool:
        """Must `key` be computed now? Yes on full steps, and whenever nothing usable is stored for it (no entry, or
        one from a batch of another shape: a safety net, since reset() already clears every run)."""
        entry = self.store.get(key)
        return self.full or entry is None or entry[0] != x.shape

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.describe().items())
        return f"{type(self).__name__}({args})"

    def describe(self) -> dict:
        return {"interval": self.interval, "warmup": self.warmup}


class FORACache(StepCache):
    """FORA-style static caching: reuse each block's un-gated attention and MLP outputs for interval − 1 steps."""

    def __call__(self, i: int, branch: str, fn, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        key = (i, branch)
        if self._fresh(key, x):
            out = fn(x, c)
            self.store[key] = (x.shape, out)
            self.computed += 1
            return out
        self.skipped += 1
        return self.store[key][1]


class TaylorSeerCache(StepCache):
    """TaylorSeer: forecast each block branch with an order-m Taylor series from finite differences."""

    def __init__(self, interval: int = 3, order: int = 1, warmup: int = 0):
        if int(order) < 0:
            raise ValueError(f"TaylorSeer order must be ≥ 0, got {order}")
        self.order = int(order)
        super().__init__(interval, warmup)

    def describe(self) -> dict:
        return {"interval": self.interval, "order": self.order, "warmup": self.warmup}

    def __call__(self, i: int, branch: str, fn, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        key = (i, branch)
        if self._fresh(key, x):
            out = fn(x, c)
            self.computed += 1
            self.store[key] = (x.shape, self._differences(self.store.get(key), x.shape, out), self.step)
            return out
        self.skipped += 1
        _, factors, step = self.store[key]
        k = self.step - step  # steps since the last computation of this branch
        pred = factors[0]
        for j in range(1, len(factors)):
            pred = pred + factors[j] * (k ** j / math.factorial(j))
        return pred

    def _differences(self, entry, shape, out: torch.Tensor) -> list[torch.Tensor]:
        """[F, ΔF, Δ²F, …] at the current step: Δ^{j+1}F = (Δ^jF_now − Δ^jF_before) / (steps between them)."""
        factors = [out]
        if entry is None or entry[0] != shape or self.order == 0:
            return factors
        _, old, old_step = entry
        d = self.step - old_step
        for j in range(min(self.order, len(old))):
            factors.append((factors[j] - old[j]) / d)
        return factors


class DeltaDiTCache(StepCache):
    """Δ-DiT: Δ-Cache of a block range, rear blocks cached for t ≥ boundary, front blocks for t < boundary.

    blocks: how many consecutive blocks form the cached range (None: half the model, rounded down);
    boundary: an original timestep (0..num_train_timesteps), so the stage switch does not depend on the number
    of sampling steps; boundary=0 caches the rear blocks throughout, boundary above every t the front blocks.
    Full steps store the branch outputs F of both ranges; a cached step returns them for the blocks of its
    stage's range (the blocks add them with the current gates: in_now + Δ) and computes every other block.
    """

    def __init__(self, interval: int = 2, blocks: int | None = None, boundary: int = 500, warmup: int = 0):
        if blocks is not None and int(blocks) < 1:
            raise ValueError(f"Δ-DiT needs blocks ≥ 1, got {blocks}")
        self.blocks = None if blocks is None else int(blocks)
        self.boundary = int(boundary)
        self.depth: int | None = None
        super().__init__(interval, warmup)

    def describe(self) -> dict:
        return {"interval": self.interval, "blocks": self.blocks, "boundary": self.boundary, "warmup": self.warmup}

    def ranges(self, depth: int) -> dict[str, tuple[int, int]]:
        n = max(1, depth // 2) if self.blocks is None else min(self.blocks, depth)
        return {"front": (0, n), "rear": (depth - n, depth)}

    def stage(self) -> str:
        """Which range is cached at the current step: rear in the early (noisy) stage, front in the late one."""
        return "rear" if self.t is not None and self.t >= self.boundary else "front"

    def bind(self, model) -> None:
        """The sampler calls this with the model before each run: the depth locates the rear range."""
        self.depth = len(model.blocks)

    def __call__(self, i: int, branch: str, fn, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.depth is None:
            raise RuntimeError("DeltaDiTCache needs the model depth: call .bind(model) first (sample() does)")
        ranges = self.ranges(self.depth)
        key = (i, branch)
        if not self.full:
            a, b = ranges[self.stage()]
            entry = self.store.get(key)
            if a <= i < b and entry is not None and entry[0] == x.shape:
                self.skipped += 1
                return entry[1]
        out = fn(x, c)
        self.computed += 1
        if self.full and any(a <= i < b for a, b in ranges.values()):
            self.store[key] = (x.shape, out)
        return out


ACCEL = {"fora": FORACache, "delta": DeltaDiTCache, "taylorseer": TaylorSeerCache}
ACCEL_KEYS = {"fora": ("interval", "warmup"), "delta": ("interval", "blocks", "boundary", "warmup"),
              "taylorseer": ("interval", "order", "warmup")}


def build_accel(name: str, kwargs: dict | None = None) -> StepCache | None:
    """"none" | "fora" | "delta" | "taylorseer" with keyword options -> a cache hook (None for "none").

    Unknown names or options raise ValueError naming the close matches.
    """
    name = (name or "none").strip().lower()
    if name in ("", "none", "off"):
        if kwargs:
            raise ValueError(f"accel options {sorted(kwargs)} given without an accel method")
        return None
    if name not in ACCEL:
        raise ValueError(f"unknown accel {name!r}{did_you_mean(name, ACCEL, n=1)} (known: none, {', '.join(ACCEL)})")
    kwargs = dict(kwargs or {})
    for key in kwargs:
        if key not in ACCEL_KEYS[name]:
            raise ValueError(f"{name} has no option {key!r}{did_you_mean(key, ACCEL_KEYS[name], n=1)} "
                             f"(options: {', '.join(ACCEL_KEYS[name])})")
        if not isinstance(kwargs[key], int) or isinstance(kwargs[key], bool):
            raise ValueError(f"{name} option {key} takes an integer, got {kwargs[key]!r}")
    return ACCEL[name](**kwargs)
