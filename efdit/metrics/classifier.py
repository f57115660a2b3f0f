"""A small CNN classifier with a subclass (fine) and a superclass (coarse) head, for class-conditional metrics.

Trained once on a dataset's real train split and cached (safetensors weights + JSON sidecar), then
applied to generated samples: fine accuracy (is a sample of the requested subclass?), coarse accuracy
(of the requested superclass?) and super-consistency (does its predicted subclass lie under the
requested superclass?).

Why two heads rather than a coarse prediction derived from the fine one: the coarse head is trained on
all images of a superclass, which matters when subclasses have only a handful of images (emoji: 3-6 per
subclass, 25-240 per superclass); the fine-derived view is still reported, as super-consistency, which
on real data equals the coarse accuracy obtained by mapping fine predictions through the hierarchy.
The shared trunk is trained on the sum of both cross-entropies.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from efdit.data.hierarchy import Hierarchy
from efdit.errors import EfditError
from efdit.metrics.features import resize, to_float_images

FORMAT = "efdit-classifier"
FORMAT_VERSION = 1


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class HierarchicalClassifier(nn.Module):
    """Three conv stages (width, 2 width, 4 width; max-pool between) -> 2x2 average pool -> MLP -> two heads.

    Input: float images in [0, 1], (N, in_channels, image_size, image_size); any size >= 4 works.
    forward returns (fine_logits (N, num_sub), coarse_logits (N, num_super)).
    """

    def __init__(self, in_channels: int, num_sub: int, num_super: int, image_size: int, width: int = 24,
                 hidden: int = 128, dropout: float = 0.2):
        super().__init__()
        self.config = dict(in_channels=in_channels, num_sub=num_sub, num_super=num_super, image_size=image_size,
                           width=width, hidden=hidden, dropout=dropout)
        w = width
        self.trunk = nn.Sequential(
            _conv_bn_relu(in_channels, w), nn.MaxPool2d(2),
            _conv_bn_relu(w, 2 * w), nn.MaxPool2d(2),
            _conv_bn_relu(2 * w, 4 * w), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(16 * w, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.fine_head = nn.Linear(hidden, num_sub)
        self.coarse_head = nn.Linear(hidden, num_super)
        self.hierarchy: Hierarchy | None = None

    @property
    def in_channels(self) -> int:
        return self.config["in_channels"]

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate activations (N, hidden) that both heads read."""
        return self.trunk(x * 2.0 - 1.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.fine_head(h), self.coarse_head(h)


# ---- input handling --------------------------------------------------------------------------------

def _prepare(model: HierarchicalClassifier, images) -> torch.Tensor:
    """uint8 / [0, 1] float images -> float tensor with the model's channels and size."""
    x = to_float_images(images)
    if x.shape[1] != model.in_channels:
        x = x.expand(-1, 3, -1, -1) if model.in_channels == 3 else x.mean(dim=1, keepdim=True)
    return resize(x, model.image_size)


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift]² (edges replicated)."""
    b, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), mode="replicate").permute(0, 2, 3, 1)  # (B, H+2p, W+2p, C)
    rows = torch.randint(0, 2 * p + 1, (b, 1), generator=gen) + torch.arange(h)
    cols = torch.randint(0, 2 * p + 1, (b, 1), generator=gen) + torch.arange(w)
    out = padded[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _check_labels(sub_labels, n: int, hierarchy: Hierarchy) -> torch.Tensor:
    y = (sub_labels.long() if torch.is_tensor(sub_labels) else torch.as_tensor(np.asarray(sub_labels, dtype=np.int64))).reshape(-1)
    if len(y) != n:
        raise EfditError(f"{n} images but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= hierarchy.num_sub):
        raise EfditError(f"subclass labels must lie in [0, {hierarchy.num_sub}), got [{int(y.min())}, {int(y.max())}]")
    return y


# ---- training --------------------------------------------------------------------------------------

def train_classifier(images, sub_labels, hierarchy: Hierarchy, epochs: int = 4, seed: int = 0, progress: bool = True,
                     *, batch_size: int = 128, lr: float = 3e-3, width: int = 24, augment: bool = True,
                     max_shift: int = 2, hflip: bool = False, coarse_weight: float = 1.0) -> HierarchicalClassifier:
    """Train a HierarchicalClassifier on real images: uint8 (N, C, H, W) and subclass ids (N,).

    Loss = CE(fine) + coarse_weight * CE(coarse); AdamW with a one-cycle learning-rate schedule.
    augment: random translations of up to `max_shift` pixels; hflip: also random horizontal flips
    (off by default: wrong for digits and text). Deterministic for a given seed (global RNG untouched).
    Fashion-MNIST (60k, 4 epochs, augment off, width 24): 90.8 % fine / 98.0 % coarse test accuracy in
    306 CPU-seconds on one thread. Small sets (digits, emoji) need augmentation and more epochs.
    """
    from tqdm.auto import tqdm

    n = len(images)
    y_sub = _check_labels(sub_labels, n, hierarchy)
    y_super = hierarchy.super_of(y_sub)
    x_all = to_float_images(images[:1])  # validates shape and dtype early
    c, h = x_all.shape[1], x_all.shape[2]
    if n < batch_size:
        batch_size = max(1, n)
    steps_per_epoch = n // batch_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = HierarchicalClassifier(c, hierarchy.num_sub, hierarchy.num_super, image_size=h, width=width)
        model.hierarchy = hierarchy
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch))
        start = time.time()
        model.train()
        with tqdm(total=epochs * steps_per_epoch, disable=not progress, desc="classifier", unit="step") as bar:
            for epoch in range(epochs):
                order = torch.randperm(n, generator=gen)
                for i in range(steps_per_epoch):
                    idx = order[i * batch_size:(i + 1) * batch_size]
                    x = to_float_images(images[idx.numpy()] if isinstance(images, np.ndarray) else images[idx])
                    if augment and max_shift > 0:
                        x = _random_shift(x, max_shift, gen)
                    if hflip:
                        flip = torch.rand(len(x), generator=gen) < 0.5
                        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                    fine_logits, coarse_logits = model(x)
                    loss = F.cross_entropy(fine_logits, y_sub[idx]) + coarse_weight * F.cross_entropy(coarse_logits, y_super[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    bar.update(1)
                    if i % 50 == 0:
                        bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        model.eval()
    model.train_info = dict(epochs=epochs, seed=seed, n_train=n, batch_size=batch_size, lr=lr, augment=augment,
                            max_shift=max_shift, hflip=hflip, train_seconds=round(time.time() - start, 1))
    return model


# ---- prediction and scores ---------------------------------------------------------------------------

@torch.no_grad()
def classify(model: HierarchicalClassifier, images, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Predicted (fine subclass ids, coarse superclass ids), int64 numpy (N,) each, from the two heads."""
    model.eval()
    fine, coarse = [], []
    for start in range(0, len(images), batch_size):
        f, c = model(_prepare(model, images[start:start + batch_size]))
        fine.append(f.argmax(1))
        coarse.append(c.argmax(1))
    if not fine:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return torch.cat(fine).numpy(), torch.cat(coarse).numpy()


@torch.no_grad()
def embed(model: HierarchicalClassifier, images, batch_size: int = 1024) -> np.ndarray:
    """The classifier's penultimate features of uint8 / [0, 1] images, float64 numpy (N, hidden): a feature space
    for FD that no generator or autoencoder trained on."""
    model.eval()
    out = [model.features(_prepare(model, images[start:start + batch_size]))
           for start in range(0, len(images), batch_size)]
    return torch.cat(out).double().numpy() if out else np.zeros((0, model.config["hidden"]))


def hierarchy_scores(fine_pred, coarse_pred, sub_labels, hierarchy: Hierarchy) -> dict:
    """fine_acc, coarse_acc and super_consistency of predictions for requested subclass labels.

    fine_acc: fine_pred == requested subclass; coarse_acc: coarse_pred == its superclass;
    super_consistency: the superclass of fine_pred == the requested superclass (the sample is of the
    right kind even when the subclass is wrong).
    """
    y = _check_labels(sub_labels, len(np.asarray(sub_labels).reshape(-1)), hierarchy)
    fine_pred = torch.as_tensor(np.asarray(fine_pred, dtype=np.int64)).reshape(-1)
    coarse_pred = torch.as_tensor(np.asarray(coarse_pred, dtype=np.int64)).reshape(-1)
    if not len(fine_pred) == len(coarse_pred) == len(y):
        raise EfditError(f"lengths differ: {len(fine_pred)} fine, {len(coarse_pred)} coarse, {len(y)} labels")
    if len(y) == 0:
        raise EfditError("no samples to score")
    y_super = hierarchy.super_of(y)
    return dict(fine_acc=float((fine_pred == y).double().mean()),
                coarse_acc=float((coarse_pred == y_super).double().mean()),
                super_consistency=float((hierarchy.super_of(fine_pred) == y_super).double().mean()),
                n=int(len(y)))


def accuracy_report(model: HierarchicalClassifier, images, sub_labels, hierarchy: Hierarchy | None = None) -> dict:
    """Classify images and score them against the requested subclass labels (see hierarchy_scores)."""
    if hierarchy is None:
        hierarchy = model.hierarchy
    elif model.hierarchy is not None and hierarchy != model.hierarchy:
        raise EfditError("the classifier was trained on a different hierarchy than the one given")
    fine, coarse = classify(model, images)
    return hierarchy_scores(fine, coarse, sub_labels, hierarchy)


# ---- persistence -------------------------------------------------------------------------------------

def _sidecar(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def save_classifier(path: str | os.PathLike, model: HierarchicalClassifier, meta: dict | None = None) -> Path:
    """Write weights to `path` (safetensors) and the config / hierarchy / meta to `path` with suffix .json."""
    from safetensors.torch import save_file

    if model.hierarchy is None:
        raise EfditError("the classifier has no hierarchy attached; set model.hierarchy before saving")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": FORMAT})
    side = dict(format=FORMAT, version=FORMAT_VERSION, config=model.config, hierarchy=model.hierarchy.to_dict(),
                image_size=model.image_size, in_channels=model.in_channels,
                train=getattr(model, "train_info", None), **(meta or {}))
    _sidecar(path).write_text(json.dumps(side, indent=2) + "\n")
    return path


def load_classifier(path: str | os.PathLike) -> tuple[HierarchicalClassifier, dict]:
    """(model in eval mode with .hierarchy set, sidecar meta dict) from save_classifier's files."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file() or not _sidecar(path).is_file():
        raise EfditError(f"classifier files not found: {path} and {_sidecar(path)} (train one with "
                         "scripts/train_fmnist_classifier.py or train_classifier)")
    meta = json.loads(_sidecar(path).read_text())
    if meta.get("format") != FORMAT:
        raise EfditError(f"{_sidecar(path)} is not an {FORMAT} sidecar")
    model = HierarchicalClassifier(**meta["config"])
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise EfditError(f"{path} does not match its sidecar config: {str(e).splitlines()[0]}") from None
    model.hierarchy = Hierarchy.from_dict(meta["hierarchy"])
    model.train_info = meta.get("train")
    return model.eval(), meta


def data_fingerprint(images, sub_labels) -> str:
    """A short hash of the training images and labels (to invalidate a cached classifier)."""
    h = hashlib.sha256()
    for a in (images, sub_labels):
        a = a.numpy() if torch.is_tensor(a) else np.asarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def load_or_train_classifier(path: str | os.PathLike, images, sub_labels, hierarchy: Hierarchy,
                             progress: bool = True, **train_kwargs) -> tuple[HierarchicalClassifier, dict]:
    """Load the cached classifier at `path` if it was trained on these images / labels / hierarchy, else train and save."""
    fp = data_fingerprint(images, sub_labels)
    if Path(path).is_file() and _sidecar(path).is_file():
        model, meta = load_classifier(path)
        if meta.get("data_fingerprint") == fp and model.hierarchy == hierarchy:
            return model, meta
    model = train_classifier(images, sub_labels, hierarchy, progress=progress, **train_kwargs)
    save_classifier(path, model, {"data_fingerprint": fp})
    return load_classifier(path)
