"""Inception FID / IS through torch-fidelity with random weights read safely, FD-DINOv2, the comparability card."""
import pickle

import numpy as np
import pytest
import torch

from efdit.errors import EfditError

pytest.importorskip("torch_fidelity", reason="torch-fidelity not installed (pip install torch-fidelity==0.4.0)")

from efdit.metrics.bootstrap import frechet_distance_exact  # noqa: E402
from efdit.metrics.card import card_differences, comparability_card, describe_differences  # noqa: E402
from efdit.metrics.inception import (  # noqa: E402
    inception_metrics,
    load_inception,
    read_inception_weights,
    to_uint8_rgb,
    write_random_inception_weights,
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth", seed=0,
                                          calibration_images=3)


def _images(seed, n, channels):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, channels, 8, 8), generator=g, dtype=torch.uint8)
    return torch.nn.functional.interpolate(base.float(), size=(24, 24), mode="nearest").to(torch.uint8)


def _inception_score(logits, splits):
    """exp(E_x KL(p(y|x) ‖ p(y))) per split of torch-fidelity's seeded permutation, mean and std over splits."""
    from scipy.special import log_softmax
    x = logits[np.random.RandomState(2020).permutation(len(logits))].astype(np.float64)
    log_p = log_softmax(x, axis=1)
    scores = []
    for i in range(splits):
        part = log_p[i * len(x) // splits:(i + 1) * len(x) // splits]
        log_py = np.log(np.exp(part).mean(0, keepdims=True))
        scores.append(np.exp((np.exp(part) * (part - log_py)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def test_fid_and_is_equal_independent_computations_on_the_same_network(weights):
    gen, ref = _images(1, 4, 1), _images(2, 3, 3)  # gray samples are repeated to RGB
    out = inception_metrics(gen, ref, weights, isc_splits=2, return_features=True)
    assert (out["n_generated"], out["n_reference"]) == (4, 3) and len(out["weights_sha256"]) == 16
    net = load_inception(weights)
    with torch.no_grad():
        pool_g, logits_g = (t.double().numpy() for t in net(to_uint8_rgb(gen)))
        pool_r, _ = (t.double().numpy() for t in net(to_uint8_rgb(ref)))
    np.testing.assert_allclose(out["features"]["generated"]["2048"], pool_g, rtol=1e-5, atol=1e-6)
    assert pool_g.std(0).mean() > 1e-3  # the random network tells images apart
    fd = frechet_distance_exact(pool_g, pool_r)
    assert fd > 1.0 and out["fid_inception"] == pytest.approx(fd, rel=1e-6)
    is_mean, is_std = _inception_score(logits_g, 2)
    assert is_mean > 1.1
    assert out["is_inception"] == pytest.approx(is_mean, rel=1e-6)
    assert out["is_inception_std"] == pytest.approx(is_std, rel=1e-5, abs=1e-9)


def test_torch_fidelity_never_unpickles_the_weights_path(weights, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(f, *args, **kwargs):
        calls.append((f, kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_inception(weights)
    on_path = [wo for f, wo in calls if not hasattr(f, "read")]
    assert on_path == [True]  # the file itself: read once, weights_only; the rest is our in-memory stream


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_weights_files_that_are_not_plain_state_dicts_are_refused(tmp_path, weights):
    bad = tmp_path / "evil.pth"
    bad.write_bytes(pickle.dumps({"x": _Evil()}))
    with pytest.raises(EfditError, match="weights_only"):
        read_inception_weights(bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(EfditError, match="not a torch-fidelity Inception-v3 state dict"):
        load_inception(wrong)
    with pytest.raises(EfditError, match="never downloads"):
        inception_metrics(_images(0, 2, 1), _images(1, 2, 1), tmp_path / "missing.pth")
    state = read_inception_weights(weights)
    assert state["fc.weight"].shape == (1008, 2048) and "Mixed_7c.branch_pool.conv.weight" in state


def test_to_uint8_rgb():
    x = to_uint8_rgb(torch.tensor([[[0.0, 0.999]]]))  # (1, 1, 2) float -> (1, 3, 1, 2) uint8, rounded
    assert x.dtype == torch.uint8 and x.shape == (1, 3, 1, 2) and x[0, :, 0, 1].tolist() == [255] * 3


# ---- DINOv2 --------------------------------------------------------------------------------------------------------

def test_fd_dinov2_from_a_local_folder_with_random_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    from efdit.metrics.dinov2 import DinoV2Extractor, dinov2_weights_sha256, preprocess, write_random_dinov2
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, patch_size=14, image_size=224)
    model = transformers.Dinov2Model(config).eval()
    model.save_pretrained(str(tmp_path / "dinov2"))
    ex = DinoV2Extractor(tmp_path / "dinov2")
    gen, ref = _images(3, 4, 1), _images(4, 5, 3)
    fg, fr = ex.extract(gen, batch_size=3), ex.extract(ref)
    assert fg.shape == (4, 32) and fr.shape == (5, 32) and fg.std(0).mean() > 1e-3
    with torch.no_grad():  # the weights survived the folder; the feature is the CLS token after the final norm
        cls = model(pixel_values=preprocess(gen)).last_hidden_state[:, 0]
    np.testing.assert_allclose(fg, cls.double().numpy(), rtol=1e-5, atol=1e-6)
    assert frechet_distance_exact(fg, fr) > 0 and len(dinov2_weights_sha256(tmp_path / "dinov2")) == 16
    other = DinoV2Extractor(write_random_dinov2(tmp_path / "random", seed=1))
    assert other.extract(gen).shape == (4, 32)


def test_dinov2_preprocessing_and_refusals(tmp_path):
    pytest.importorskip("transformers")
    from efdit.metrics.dinov2 import IMAGENET_MEAN, IMAGENET_STD, DinoV2Extractor, preprocess
    x = preprocess(torch.full((1, 1, 10, 10), 51, dtype=torch.uint8))  # 0.2 everywhere
    assert x.shape == (1, 3, 224, 224)
    expected = (0.2 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x[0, :, 100, 100].numpy(), expected, rtol=1e-5)
    # the resize is PIL's bicubic on float images (dgm-eval's clean resize), to float round-off
    from PIL import Image
    img = np.random.default_rng(0).integers(0, 256, (16, 16)).astype(np.uint8)
    pil = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((224, 224), Image.BICUBIC))
    ours = preprocess(torch.from_numpy(img)[None, None])[0, 0].numpy() * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    np.testing.assert_allclose(ours, pil.clip(0, 255) / 255, atol=1e-5)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    torch.save({}, tmp_path / "pickled" / "pytorch_model.bin")  # a pickle: never read
    with pytest.raises(EfditError, match="model.safetensors"):
        DinoV2Extractor(tmp_path / "pickled")


# ---- the comparability card ----------------------------------------------------------------------------------------

def _card(**over):
    kw = dict(extractor="effnet-lite0", extractor_weights_sha256="57934424abcd", resize="bilinear-antialias",
              resolution=64, n_generated=1000, n_reference=1000, dataset="fmnist", reference_split="test",
              sampler="ddim", steps=50, guidance="cfg", guidance_scales={"sub": 2.0}, seeds=[0, 1, 2])
    kw.update(over)
    return comparability_card(**kw)


def test_card_holds_every_field_and_names_the_differences():
    a = _card()
    assert set(a) == {"extractor", "extractor_weights_sha256", "resize", "resolution", "n_generated", "n_reference",
                      "dataset", "reference_split", "sampler", "steps", "guidance", "guidance_scales", "seeds"}
    assert card_differences(a, _card(seeds=(2, 0, 1))) == []  # seed order does not matter
    assert card_differences(a, a | {}) == [] and describe_differences([]) == "comparable"
    b = _card(steps=10, n_generated=500, guidance_scales={"sub": 2.0, "super": 1.5})
    assert [k for k, _, _ in card_differences(a, b)] == ["n_generated", "steps", "guidance_scales"]
    assert card_differences(a, b, ignore=("steps", "n_generated", "guidance_scales")) == []
    assert describe_differences(card_differences(a, _card(steps=10))) == "not comparable: steps 50 vs 10"
    extra = _card(reference_seed=0)
    assert card_differences(a, extra) == [("reference_seed", None, 0)]
    with pytest.raises(EfditError, match="non-negative int"):
        _card(steps=-1)
