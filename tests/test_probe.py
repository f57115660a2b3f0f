"""The linear probe judge on features, and the near-chance test of a judge."""
import math

import numpy as np
import pytest
import torch

from efdit.data.hierarchy import Hierarchy
from efdit.errors import EfditError
from efdit.metrics.probe import (
    FeatureProbe,
    judge_reliability,
    load_probe,
    probe_report,
    save_probe,
    train_probe,
    wilson_interval,
)

H = Hierarchy(["a0", "a1", "b0", "b1"], ["A", "B"], torch.tensor([0, 0, 1, 1]))


def _clusters(n_per_class=30, d=6, seed=0, spread=0.6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, d)) * 2.0
    y = np.repeat(np.arange(4), n_per_class)
    f = centres[y] + spread * rng.normal(size=(len(y), d))
    return f * rng.uniform(0.5, 20.0, size=d) + rng.normal(size=d) * 5.0, y  # unequal feature scales / offsets


def test_probe_separates_clusters_and_maps_superclasses():
    f, y = _clusters()
    probe = train_probe(f, y, H, max_iter=100)
    rep = probe_report(probe, *_clusters(seed=0))
    assert rep["fine_acc"] > 0.95 and rep["coarse_acc"] > 0.95 and rep["n"] == 120
    assert not rep["fine_judge"]["near_chance"]
    assert probe.train_info["l2"] in (1e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    assert set(probe.train_info["val_fine_acc"]) == {"0.001", "0.01", "0.03", "0.1", "0.3"}
    again = train_probe(f, y, H, max_iter=100)  # deterministic
    for a, b in zip(probe.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_ridge_strength_is_chosen_on_held_out_data_largest_among_the_best():
    """Weak signal in 60 noisy dimensions: on its own train part every λ is near-perfect and the smallest wins;
    on the held-out 10 % larger λ are better (here 0.03, 0.1 and 0.3 tie), and the largest of those is taken."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 100)
    f = (rng.normal(size=(4, 60)) * 0.25)[y] + rng.normal(size=(400, 60))
    probe = train_probe(f, y, H, max_iter=100)
    val = probe.train_info["val_fine_acc"]
    assert val["0.001"] < val["0.3"] == max(val.values()) and probe.train_info["l2"] == 0.3


def test_linear_probe_reaches_the_ridge_logistic_optimum():
    """Against scikit-learn's multinomial logistic regression on the same standardised features:
    sklearn minimises C Σ CE + ½‖W‖², i.e. mean CE + ‖W‖² / (2 C N): λ = 1 / (C N)."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    f, y = _clusters(n_per_class=40, spread=1.5, seed=3)
    lam = 0.05
    probe = train_probe(f, y, H, l2=lam)
    z = ((f - f.mean(0)) / f.std(0)).astype(np.float32)
    np.testing.assert_allclose(probe.mean.numpy(), f.mean(0), rtol=1e-12)
    ref = sklearn.LogisticRegression(C=1.0 / (lam * len(y)), tol=1e-10, max_iter=10_000).fit(z, y)
    with torch.no_grad():
        ours = torch.softmax(probe(probe.standardise(f))[0], 1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(z), atol=2e-4)
    np.testing.assert_allclose(probe.fine_head.weight.detach().numpy(), ref.coef_, atol=2e-3)


def test_probe_round_trips_through_its_files(tmp_path):
    f, y = _clusters()
    probe = train_probe(f, y, H, l2=0.01)
    path = save_probe(tmp_path / "probe.safetensors", probe, {"extractor_sha256": "abc", "resolution": 64})
    back, meta = load_probe(path)
    assert meta["extractor_sha256"] == "abc" and meta["train"]["l2"] == 0.01 and back.hierarchy == H
    np.testing.assert_array_equal(back.predict(f)[0], probe.predict(f)[0])
    (tmp_path / "probe.json").write_text('{"format": "other"}')
    with pytest.raises(EfditError, match="not an efdit-probe sidecar"):
        load_probe(path)


def test_probe_input_errors():
    f, y = _clusters()
    with pytest.raises(EfditError, match="labels"):
        train_probe(f, y[:-1], H)
    with pytest.raises(EfditError, match="lie in"):
        train_probe(f, np.full(len(y), 7), H)
    probe = FeatureProbe(6, 4, 2)
    with pytest.raises(EfditError, match=r"\(6,\)-d features"):
        probe.predict(np.zeros((2, 5)))


def test_small_mlp_probe_trains():
    f, y = _clusters(n_per_class=20)
    probe = train_probe(f, y, H, l2=1e-2, hidden=16, epochs=300)
    assert (probe.predict(f)[0] == y).mean() > 0.9


# ---- is a judge near chance? -----------------------------------------------------------------------------------------

def test_wilson_interval_hand_value():
    # 50 / 100, z = 1.95996: centre 0.5, half-width z √(0.0025 + z² / 40000) / (1 + z² / 100)
    z = 1.959963984540054
    half = z * math.sqrt(0.0025 + z * z / 40000) / (1 + z * z / 100)
    assert wilson_interval(50, 100) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_judge_reliability_kappa_and_the_near_chance_rule():
    # the folder case: 18.8 % of 320 real test images over 8 subclasses (chance 12.5 %)
    weak = judge_reliability(60 / 320, 320, 8)
    assert weak["near_chance"] and weak["kappa"] == pytest.approx((0.1875 - 0.125) / 0.875)
    # the Fashion-MNIST CNN: 90.78 % of 10,000 over 10
    strong = judge_reliability(0.9078, 10_000, 10)
    assert not strong["near_chance"] and strong["kappa"] == pytest.approx((0.9078 - 0.1) / 0.9)
    low = wilson_interval(9078, 10_000)[0]
    assert strong["kappa_low"] == pytest.approx((low - 0.1) / 0.9) and strong["low"] == pytest.approx(low)
    # the threshold: κ_low = 1/4 is a real accuracy of 32.5 % for 10 classes
    assert judge_reliability(0.40, 10_000, 10)["near_chance"] is False
    assert judge_reliability(0.32, 10_000, 10)["near_chance"] is True
    # the rule reads the lower bound: 35 % of 100 over 10 classes has κ = 0.28 but κ_low = 0.18
    few = judge_reliability(0.35, 100, 10)
    assert few["kappa"] > 0.25 > few["kappa_low"] and few["near_chance"]
    # two classes: 60 % is near chance (κ = 0.2), whatever "twice chance" would say
    assert judge_reliability(0.60, 10_000, 2)["near_chance"] is True
    with pytest.raises(EfditError, match="at least 2 classes"):
        judge_reliability(0.5, 10, 1)


def test_kappa_is_the_attenuation_of_sample_accuracy_under_symmetric_confusion():
    """m(t) = t a + (1 - t)(1 - a)/(C - 1): the slope dm/dt equals κ."""
    a, c = 0.7, 5
    m = lambda t: t * a + (1 - t) * (1 - a) / (c - 1)  # noqa: E731
    assert m(0.9) - m(0.4) == pytest.approx(0.5 * judge_reliability(a, 10**6, c)["kappa"], rel=1e-9)
