"""FID and Inception Score with torch-fidelity's Inception-v3, from a local weights file read safely.

The network, the resize (TF1-compatible bilinear to 299 × 299, inside the network), the FID statistics
(`fid_featuresdict_to_statistics`, `fid_statistics_to_metric`: unbiased covariance of the 2048-d pool features,
Tr (Σ1 Σ2)^½ by eigenvalues) and the IS (`isc_featuresdict_to_metric`: on the 1008 unbiased logits, 10 splits of a
permutation seeded 2020) are torch-fidelity's own:

    FID = |μ_g - μ_r|² + tr(Σ_g + Σ_r - 2 (Σ_g Σ_r)^½)
    IS  = mean over splits of exp( E_x KL(p(y|x) ‖ p(y)) ),  p(y|x) = softmax(logits_unbiased), p(y) = split mean

Weights: torch-fidelity's file (weights-inception-2015-12-05-6726825d.pth, a torch.save'd state dict) is read here
with torch.load(weights_only=True), which refuses anything but tensors and plain containers; torch-fidelity's own
loader unpickles fully, so it is never handed the path: the extractor is built from the tensors already read
(re-serialised in memory). efdit never downloads the file. `write_random_inception_weights` writes a file of the
same format with random values, for testing the whole path without the real weights; FIDs from it mean nothing.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from efdit.errors import EfditError
from efdit.metrics.fd import torch_fidelity_module

EXTRACTOR_NAME = "inception-v3-compat"
POOL, LOGITS = "2048", "logits_unbiased"
REAL_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


def _extractor_class():
    return torch_fidelity_module("feature_extractor_inceptionv3").FeatureExtractorInceptionV3


def _from_state_dict(state: dict | None, features=(POOL, LOGITS)):
    """torch-fidelity's extractor holding `state` (None: its random initialisation), float32, eval mode, CPU."""
    cls = _extractor_class()
    if state is None:
        class _RandomInception(cls):  # the constructor's one load_state_dict(None) call is skipped
            def load_state_dict(self, state_dict, *args, **kwargs):
                return None if state_dict is None else super().load_state_dict(state_dict, *args, **kwargs)
        cls = _RandomInception
    buf = io.BytesIO()
    torch.save(state, buf)  # only tensors we hold: unpickling this stream is safe
    buf.seek(0)
    try:
        return cls(EXTRACTOR_NAME, list(features), feature_extractor_weights_path=buf)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise EfditError(f"not a torch-fidelity Inception-v3 state dict: {first}") from None


def read_inception_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a torch-fidelity Inception-v3 weights file, read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise EfditError(f"Inception weights not found: {path} (torch-fidelity's {REAL_WEIGHTS}; "
                         "efdit never downloads it)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for anything but tensors / containers, or a corrupt file
        raise EfditError(f"{path} is not a plain weights file (read with weights_only=True): "
                         f"{str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise EfditError(f"{path} does not hold a state dict of tensors")
    return state


def load_inception(path: str | os.PathLike, device: str | torch.device = "cpu", features=(POOL, LOGITS)):
    """torch-fidelity's Inception-v3 feature extractor with the weights at `path` (read safely), on `device`."""
    return _from_state_dict(read_inception_weights(path), features).to(device)


def write_random_inception_weights(path: str | os.PathLike, seed: int = 0, logit_scale: float = 4.0,
                                   calibration_images: int = 4) -> Path:
    """A torch-fidelity-format Inception-v3 weights file with random values (for tests only).

    Convolutions He-normal (std √(2 / fan_in)), batch norms with identity statistics and affine terms near (1, 0):
    a homogeneous ReLU stack whose activations keep their scale for any input (statistics fitted to a few images
    instead would amplify every other image's deviation layer after layer). Such a network maps all images close to
    one common pool direction, so the fc rows are made orthogonal to the mean pool vector of `calibration_images`
    seeded noise images (grain 1-8 pixels, random brightness and contrast) and scaled to give their logits standard
    deviation `logit_scale`: logits then differ between images rather than share one offset, and IS > 1.
    """
    from efdit.errors import atomic_write

    model = _from_state_dict(None, (POOL,))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("conv.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * math.sqrt(2.0 / p[0].numel()))
            elif name.endswith("bn.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bn.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        x = torch.empty(calibration_images, 3, 32, 32)
        for i in range(calibration_images):  # noise of grain 1, 2, 4, 8 pixels, random brightness and contrast
            side = 32 >> (i % 4)
            noise = torch.rand(1, 3, side, side, generator=gen)
            lo, hi = sorted(torch.rand(2, generator=gen).tolist())
            x[i] = F.interpolate(noise, size=(32, 32), mode="nearest")[0] * (hi - lo) + lo
        x = (x * 255).round().to(torch.uint8)
        pool = model(x)[0].double()  # (n, 2048)
        mean = pool.mean(0)
        w = torch.randn(model.fc.weight.shape, generator=gen, dtype=torch.float64)  # (1008, 2048)
        w -= torch.outer(w @ mean, mean) / (mean @ mean).clamp_min(1e-12)  # blind to the mean pool vector
        logits = (pool - mean) @ w.T
        w *= logit_scale / max(float(logits.std()), 1e-12)
        model.fc.weight.copy_(w.float())
        model.fc.bias.copy_(0.1 * torch.randn(model.fc.bias.shape, generator=gen))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    with atomic_write(path, "Inception weights") as tmp:
        torch.save(state, tmp)
    return path


def to_uint8_rgb(images) -> torch.Tensor:
    """uint8 (N, 3, H, W) from uint8 / [0, 1] float images (N, C, H, W) or (N, H, W); gray is repeated to RGB."""
    from efdit.metrics.features import to_float_images

    x = images if torch.is_tensor(images) else torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8:
        x = (to_float_images(x) * 255.0).round().to(torch.uint8)
    x = x.unsqueeze(1) if x.dim() == 3 else x
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise EfditError(f"expected images of shape (N, C, H, W) with C in {{1, 3}}, got {tuple(x.shape)}")
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x.contiguous()


class _Images(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def inception_features(extractor, images, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """torch-fidelity's feature dict of images: {"2048": (N, 2048), "logits_unbiased": (N, 1008)}, float32 CPU."""
    utils = torch_fidelity_module("utils")
    x = to_uint8_rgb(images)
    if len(x) == 0:
        raise EfditError("no images")
    cuda = next(extractor.parameters()).is_cuda
    return utils.get_featuresdict_from_dataset(_Images(x), extractor, batch_size, cuda, True, False)


def inception_metrics(generated, reference, weights_path: str | os.PathLike, *, fid: bool = True, isc: bool = True,
                      batch_size: int = 32, device: str | torch.device = "cpu", isc_splits: int = 10,
                      return_features: bool = False) -> dict:
    """FID (generated vs reference) and IS (generated) through torch-fidelity, from a local weights file.

    generated / reference: uint8 (N, C, H, W) or [0, 1] floats, C = 1 or 3 (the network resizes to 299 itself).
    Returns {"fid_inception", "is_inception", "is_inception_std", "n_generated", "n_reference",
    "weights_sha256"} (the metrics asked for), plus "features": {"generated": {...}, "reference": {...}} float64
    numpy pool features / logits when return_features (for bootstrap intervals on the same features).
    """
    from efdit.metrics.features import weights_sha256

    metric_fid, metric_isc = torch_fidelity_module("metric_fid"), torch_fidelity_module("metric_isc")
    extractor = load_inception(weights_path, device)
    out = {"weights_sha256": weights_sha256(weights_path), "n_generated": int(len(generated))}
    feats_g = inception_features(extractor, generated, batch_size)
    feats = {"generated": feats_g}
    if fid:
        if reference is None:
            raise EfditError("FID needs reference images")
        feats_r = inception_features(extractor, reference, batch_size)
        feats["reference"] = feats_r
        if min(len(feats_g[POOL]), len(feats_r[POOL])) < 2:
            raise EfditError("FID needs at least 2 images on each side")
        stats_g = metric_fid.fid_featuresdict_to_statistics(feats_g, POOL)
        stats_r = metric_fid.fid_featuresdict_to_statistics(feats_r, POOL)
        out["fid_inception"] = float(metric_fid.fid_statistics_to_metric(stats_g, stats_r, False)[
            metric_fid.KEY_METRIC_FID])
        out["n_reference"] = int(len(reference))
    if isc:
        if len(feats_g[LOGITS]) < isc_splits:
            raise EfditError(f"IS with {isc_splits} splits needs at least {isc_splits} images")
        r = metric_isc.isc_featuresdict_to_metric(feats_g, LOGITS, isc_splits=isc_splits, samples_shuffle=True,
                                                  rng_seed=2020, verbose=False)
        out["is_inception"] = float(r[metric_isc.KEY_METRIC_ISC_MEAN])
        out["is_inception_std"] = float(r[metric_isc.KEY_METRIC_ISC_STD])
    if return_features:
        out["features"] = {side: {k: v.double().numpy() for k, v in d.items()} for side, d in feats.items()}
    return out
