"""The learning-rate schedule: linear warm-up over `train.warmup_images`, then constant (DiT trains at a constant
rate); and the warning when a warm-up would eat a large part of a run's budget."""
from __future__ import annotations

import math

WARMUP_SHARE = 0.1   # a warm-up longer than this share of the budget gets a warning


def learning_rate(tc, images_after_step: int) -> float:
    """lr for the step that brings the images seen to `images_after_step` (tc: the config's TrainConfig)."""
    if not tc.warmup_images:
        return tc.lr
    return tc.lr * min(1.0, images_after_step / tc.warmup_images)


def warmup_warning(tc, img_per_s: float | None = None) -> str | None:
    """One line when the warm-up exceeds WARMUP_SHARE of the budget: `total_images`, or, with `train.minutes`,
    the images that time allows at the measured `img_per_s` (whichever is smaller). None when it is fine.

    A warning only: capping the warm-up by a measured throughput would make the schedule depend on the machine's
    speed, and a rerun (resume) would no longer continue the same run."""
    if not tc.warmup_images:
        return None
    budget, how = tc.total_images, f"train.total_images {tc.total_images:,}"
    if tc.minutes and img_per_s:
        by_time = int(img_per_s * tc.minutes * 60)
        if by_time < budget:
            budget, how = by_time, f"~{by_time:,} images in {tc.minutes:g} min at the measured {img_per_s:.0f} img/s"
    if tc.warmup_images <= WARMUP_SHARE * budget:
        return None
    step = tc.batch_size * tc.grad_accum
    suggest = max(step, int(math.floor(WARMUP_SHARE * budget / step)) * step)
    return (f"warning: the learning-rate warm-up ({tc.warmup_images:,} images) is {tc.warmup_images / budget:.0%} "
            f"of this run's budget ({how}); consider --warmup-images {suggest}")
