"""The training log: `log.jsonl` in the run folder, one JSON line per `train.log_every` images (mean loss terms of
the window, learning rate, img/s, seconds), truncated on resume to what the checkpoint had seen."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import atomic_write


class TrainLog:
    def __init__(self, path: Path, log_every: int, images: int, enabled: bool = True):
        self.path, self.log_every, self.last = path, log_every, images
        self.file = open(path, "a") if enabled else None
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.images, self.t0 = 0, 0, time.time()

    def add(self, terms: dict[str, float], images: int) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.images += images

    def due(self, images: int) -> bool:
        return images - self.last >= self.log_every

    def write(self, step: int, images: int, lr: float, seconds: float) -> dict:
        """The window's record (written to log.jsonl on the main process); starts a new window."""
        dt = time.time() - self.t0
        rec = {"step": step, "images": images, "lr": lr, "seconds": round(seconds, 1),
               "img_per_s": round(self.images / dt, 2)}
        rec.update({k: v / self.steps for k, v in self.sums.items()})
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        self.last = images
        self._reset()
        return rec

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def read_log(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(path: Path, step: int) -> None:
    """Drop the records written after `step` (a resumed run logs those steps again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    with atomic_write(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))
