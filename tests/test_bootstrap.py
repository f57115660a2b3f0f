"""Bootstrap intervals, the exact low-rank FD, paired comparisons, seeds combined, and per-level scores."""
import math

import numpy as np
import pytest
import torch

from efdit.data.hierarchy import Hierarchy
from efdit.errors import EfditError

pytest.importorskip("torch_fidelity", reason="torch-fidelity not installed (pip install torch-fidelity==0.4.0)")

from efdit.metrics.bootstrap import (  # noqa: E402
    BootstrapResult,
    FrechetReference,
    bootstrap_metrics,
    combine_seeds,
    counts_of,
    difference_result,
    draw_indices,
    frechet_distance_exact,
    kid_full,
    kid_replicates,
    paired_difference,
    percentile_interval,
    plan_id,
    unpaired_difference,
)
from efdit.metrics.fd import frechet_distance_from_features  # noqa: E402
from efdit.metrics.per_class import fine_acc_given_super, intra_class_fd, per_superclass_fd  # noqa: E402

H = Hierarchy(["a0", "a1", "b0", "b1"], ["A", "B"], torch.tensor([0, 0, 1, 1]))


def fd_sqrtm(a, b):
    from scipy.linalg import sqrtm
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real))


# ---- index draws and intervals --------------------------------------------------------------------------------------

def test_counts_of_hand_example():
    np.testing.assert_array_equal(counts_of(np.array([[0, 0, 2], [1, 1, 1]]), 3), [[2, 0, 1], [0, 3, 0]])


def test_stratified_draws_stay_in_their_stratum_and_keep_its_size():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    idx = draw_indices(len(y), 50, seed=3, strata=y)
    assert idx.shape == (50, 10)
    np.testing.assert_array_equal(y[idx], np.broadcast_to(y, idx.shape))  # every position draws from its own class
    assert len(np.unique(idx[:, 5:])) > 1  # and really resamples
    np.testing.assert_array_equal(idx, draw_indices(len(y), 50, seed=3, strata=y))
    assert plan_id(10, 50, 3, y) == plan_id(10, 50, 3, y.copy()) != plan_id(10, 50, 4, y) != plan_id(10, 50, 3)


def test_percentile_interval_hand_values():
    r = [1.0, 2.0, 3.0, 4.0, 5.0]  # quartiles 2 and 4, mean 3
    plain = percentile_interval(2.0, r, level=0.5, method="percentile")
    assert (plain.low, plain.high, plain.bias) == (2.0, 4.0, 1.0)
    centred = percentile_interval(2.0, r, level=0.5)  # shifted by the bias 3 - 2 = 1
    assert (centred.low, centred.high, centred.method) == (1.0, 3.0, "recentred-percentile")
    with pytest.raises(EfditError, match="NaN"):
        percentile_interval(0.0, [1.0, float("nan")])


def test_interval_contains_the_point_estimate_in_a_symmetric_case():
    rng = np.random.default_rng(0)
    half = rng.normal(size=500)
    r = np.concatenate([half, -half]) + 7.0  # symmetric around 7
    for method in ("percentile", "recentred-percentile"):
        iv = percentile_interval(7.0, r, method=method)
        assert iv.contains(7.0) and iv.low < 6.0 and iv.high > 8.0
        assert iv.low - 7.0 == pytest.approx(7.0 - iv.high, abs=1e-9)


# ---- the exact low-rank FD -------------------------------------------------------------------------------------------

def test_fd_hand_values():
    # 1-d: gen mean 1, var 2; ref mean 1.5, var 3: FD = 0.25 + (√2 - √3)²
    gen, ref = np.array([[0.0], [2.0]]), np.array([[0.0], [0.0], [3.0], [3.0]])
    assert frechet_distance_exact(gen, ref) == pytest.approx(0.25 + (math.sqrt(2) - math.sqrt(3)) ** 2, abs=1e-12)
    # 2-d, N <= d on both sides: Σ_g = diag(2, 0), Σ_r = diag(0, 2), Σ_g Σ_r = 0: FD = |(1, -1)|² + 2 + 2
    assert frechet_distance_exact([[0.0, 0.0], [2.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]) == pytest.approx(6.0, abs=1e-12)
    # a resample with counts (2, 1, 0) of [0, 2, 4] = rows [0, 0, 2]: mean 2/3, var 4/3; √(4/3 · 3) = 2
    reps = FrechetReference(ref).replicates(np.array([[0.0], [2.0], [4.0]]), np.array([[2.0, 1.0, 0.0]]))
    assert reps[0] == pytest.approx((2 / 3 - 1.5) ** 2 + 4 / 3 + 3 - 2 * 2, abs=1e-12)


@pytest.mark.parametrize("n,n_ref,d", [(16, 30, 24), (12, 40, 24), (40, 30, 24), (60, 80, 24), (16, 12, 24),
                                       (40, 20, 24)])
def test_low_rank_replicates_equal_sqrtm_fd_of_the_resampled_sets(n, n_ref, d):
    """Both routes (k x k Gram when few distinct samples, q x q covariance otherwise) and both reference factors
    (the centred reference when n_ref <= d, V Λ^½ otherwise)."""
    rng = np.random.default_rng(n + n_ref)
    gen = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.5
    ref = rng.normal(size=(n_ref, d)) * 1.2 + 0.2
    idx = draw_indices(n, 12, seed=1)
    reps = FrechetReference(ref).replicates(gen, counts_of(idx, n))
    direct = np.array([fd_sqrtm(gen[i], ref) for i in idx])
    np.testing.assert_allclose(reps, direct, rtol=1e-6)
    assert FrechetReference(ref).fd(gen) == pytest.approx(fd_sqrtm(gen, ref), rel=1e-6)
    assert frechet_distance_exact(gen, ref) == pytest.approx(frechet_distance_from_features(gen, ref), rel=1e-6)


def test_low_rank_point_is_the_all_ones_replicate():
    rng = np.random.default_rng(5)
    gen, ref = rng.normal(size=(30, 50)), rng.normal(size=(20, 50)) + 0.1
    r = FrechetReference(ref)
    assert r.replicates(gen, np.ones((1, 30)))[0] == pytest.approx(r.fd(gen), rel=1e-9)


# ---- KID and precision / recall replicates ---------------------------------------------------------------------------

def test_kid_replicate_hand_value():
    # d = 1, k(x, y) = (xy + 1)³; gen [0, 1, 2] drawn (2, 1, 0) times, ref [1, 2]:
    # same-set: pairs of distinct origins only -> k(0, 1) = 1; ref: k(1, 2) = 27; cross: (2/3)·1 + (1/3)·17.5 = 6.5
    gen, ref = np.array([[0.0], [1.0], [2.0]]), np.array([[1.0], [2.0]])
    assert kid_replicates(gen, ref, np.array([[2.0, 1.0, 0.0]]))[0] == pytest.approx(1 + 27 - 2 * 6.5, abs=1e-12)
    # every pair once: (1 + 1 + 27) / 3 + 27 - 2 (1 + 17.5 + 76) / 3
    assert kid_full(gen, ref) == pytest.approx(29 / 3 + 27 - 2 * 94.5 / 3, abs=1e-12)


def test_kid_point_equals_torch_fidelity_kid_when_subsets_are_whole_sets():
    from efdit.metrics.kid import kernel_distance
    rng = np.random.default_rng(6)
    gen, ref = rng.normal(size=(40, 8)) + 0.3, rng.normal(size=(40, 8))
    assert kid_full(gen, ref) == pytest.approx(kernel_distance(ref, gen, subset_size=40, subsets=3).mean, rel=1e-9)


def test_precision_recall_replicates_equal_torch_fidelity_on_the_resample():
    from torch_fidelity.metric_prc import calculate_precision_recall_part
    rng = np.random.default_rng(7)
    gen, ref = rng.normal(size=(30, 6)) * 1.3, rng.normal(size=(25, 6))
    res = bootstrap_metrics(gen, ref, replicates=4, seed=2, kid=False)
    g32, r32 = torch.from_numpy(gen).float(), torch.from_numpy(ref).float()
    p, r = calculate_precision_recall_part(g32, r32, neighborhood=3)
    assert (res.point["precision"], res.point["recall"]) == pytest.approx((p, r), abs=1e-6)  # theirs: float32 means
    for b, rows in enumerate(draw_indices(30, 4, seed=2)):
        p_b, _ = calculate_precision_recall_part(g32[rows], r32, neighborhood=3)  # duplicates count twice
        _, r_b = calculate_precision_recall_part(g32[np.unique(rows)], r32, neighborhood=3)  # distinct ones' manifold
        assert res.replicates["precision"][b] == pytest.approx(p_b, abs=1e-6)
        assert res.replicates["recall"][b] == pytest.approx(r_b, abs=1e-6)


# ---- accuracies ------------------------------------------------------------------------------------------------------

def test_accuracies_and_fine_given_super_hand_values():
    y = np.array([0, 1, 2, 3, 0, 2])
    fine = np.array([0, 0, 2, 2, 2, 2])  # right: 0, 2, 2 (positions 0, 2, 5); superclass of fine right: 0, 1, 2, 3, 5
    coarse = np.array([0, 1, 1, 0, 0, 0])  # right (superclasses 0 0 1 1 0 1): positions 0, 2, 4
    res = bootstrap_metrics(sub_labels=y, fine_pred=fine, coarse_pred=coarse, hierarchy=H, replicates=3, seed=0)
    assert res.point["fine_acc"] == pytest.approx(3 / 6)
    assert res.point["super_consistency"] == pytest.approx(5 / 6)
    assert res.point["coarse_acc"] == pytest.approx(3 / 6)
    assert res.point["fine_acc_given_super"] == pytest.approx(2 / 3)  # fine right among coarse right: 0, 2 of 3
    assert fine_acc_given_super(fine, coarse, y, H) == {"value": pytest.approx(2 / 3), "n_super_right": 3, "n": 6}
    # superclass judged by the fine prediction: fine right among 5 -> 3 / 5 (= fine_acc / super_consistency)
    assert fine_acc_given_super(fine, None, y, H, super_from="fine")["value"] == pytest.approx(3 / 5)
    c = counts_of(draw_indices(6, 3, 0, y), 6)
    np.testing.assert_allclose(res.replicates["fine_acc"], c @ (fine == y) / 6)
    right = coarse == H.parent.numpy()[y]
    np.testing.assert_allclose(res.replicates["fine_acc_given_super"], (c @ ((fine == y) & right)) / (c @ right))


def test_stratified_resampling_keeps_a_per_class_constant_fixed():
    y = np.repeat(np.arange(4), 25)
    fine = np.where(y < 2, y, (y + 1) % 4)  # right exactly on classes 0, 1
    strat = bootstrap_metrics(sub_labels=y, fine_pred=fine, hierarchy=H, replicates=50)
    np.testing.assert_allclose(strat.replicates["fine_acc"], 0.5)
    free = bootstrap_metrics(sub_labels=y, fine_pred=fine, hierarchy=H, replicates=50, stratify=False)
    assert free.replicates["fine_acc"].std() > 0.01


# ---- paired comparisons, seeds ---------------------------------------------------------------------------------------

def _set(seed, n=60, d=12, shift=0.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) + shift


def test_identical_sets_give_a_zero_difference_interval():
    ref, gen = _set(0), _set(1)
    y = np.repeat(np.arange(4), 15)
    fine = np.random.default_rng(2).integers(0, 4, 60)
    a = bootstrap_metrics(gen, ref, sub_labels=y, fine_pred=fine, coarse_pred=fine // 2, hierarchy=H, replicates=40)
    b = bootstrap_metrics(gen.copy(), ref, sub_labels=y, fine_pred=fine, coarse_pred=fine // 2, hierarchy=H,
                          replicates=40)
    diffs = paired_difference(a, b)
    assert set(diffs) == set(a.point) and len(diffs) == 8
    for d in diffs.values():
        assert (d.interval.low, d.interval.high) == (0.0, 0.0) and not d.differs
        assert d.verdict == "no difference beyond the interval"


def test_paired_difference_finds_a_real_shift_and_not_a_null_one():
    ref = _set(0, n=200)
    base = _set(1, n=200)
    worse = base + 0.5  # the same samples, shifted: paired
    a, b = bootstrap_metrics(base, ref, replicates=100), bootstrap_metrics(worse, ref, replicates=100)
    d = paired_difference(b, a)["fd_effnetlite0"]
    assert d.differs and d.interval.low > 0 and d.interval.contains(d.a - d.b)
    e = paired_difference(a, b)["fd_effnetlite0"]  # the other way round: an interval below 0 differs too
    assert e.differs and e.interval.high < 0 and e.verdict == "differs"
    # an independent draw of the same distribution: no verdict of difference
    c = bootstrap_metrics(_set(2, n=200), ref, replicates=100, seed=1)
    assert not unpaired_difference(c, a)["fd_effnetlite0"].differs


def test_paired_difference_resamples_the_same_indices():
    ref, gen = _set(0), _set(1)
    a = bootstrap_metrics(gen, ref, replicates=30, seed=0, prc=False, kid=False)
    b = bootstrap_metrics(gen + 0.1, ref, replicates=30, seed=0, prc=False, kid=False)
    c = FrechetReference(ref)
    counts = counts_of(draw_indices(60, 30, 0), 60)
    np.testing.assert_allclose(paired_difference(b, a)["fd_effnetlite0"].interval.bias + (b.point["fd_effnetlite0"]
                               - a.point["fd_effnetlite0"]),
                               (c.replicates(gen + 0.1, counts) - c.replicates(gen, counts)).mean(), rtol=1e-9)
    with pytest.raises(EfditError, match="same index draws"):
        paired_difference(a, bootstrap_metrics(gen, ref, replicates=30, seed=1, prc=False, kid=False))


def test_combine_seeds_means_points_and_resamples_seeds():
    def result(point, reps):
        return BootstrapResult({"m": point}, {"m": np.asarray(reps, dtype=float)}, "p", 10)
    one = combine_seeds([result(2.0, [2.0] * 8)])["m"]
    assert one["mean"] == 2.0 and (one["interval"].low, one["interval"].high) == (2.0, 2.0)
    out = combine_seeds([result(1.0, [1.0] * 50), result(3.0, [3.0] * 50), result(5.0, [5.0] * 50)], seed=0)["m"]
    assert out["mean"] == 3.0 and out["per_seed"] == [1.0, 3.0, 5.0] and out["seed_std"] == pytest.approx(2.0)
    assert 1.0 <= out["interval"].low < 3.0 < out["interval"].high <= 5.0
    # a seed's replicates are re-centred on its point: a shifted bootstrap distribution moves nothing
    shifted = combine_seeds([result(1.0, [11.0] * 50), result(3.0, [13.0] * 50), result(5.0, [15.0] * 50)], seed=0)
    assert shifted["m"]["interval"][:3] == out["interval"][:3]


def test_seed_combined_paired_differences():
    ref = _set(0, n=120)
    arms = [(bootstrap_metrics(_set(s, n=120), ref, replicates=60, prc=False, kid=False),
             bootstrap_metrics(_set(s, n=120) + 0.4, ref, replicates=60, prc=False, kid=False)) for s in (1, 2, 3)]
    diffs = [difference_result(b, a) for a, b in arms]
    out = combine_seeds(diffs)["fd_effnetlite0"]
    expected = np.mean([b.point["fd_effnetlite0"] - a.point["fd_effnetlite0"] for a, b in arms])
    assert out["mean"] == pytest.approx(expected) and out["interval"].low > 0  # shifted arm is worse on every seed
    same = combine_seeds([difference_result(a, a) for a, _ in arms])["fd_effnetlite0"]["interval"]
    assert (same.low, same.high) == (0.0, 0.0)
    with pytest.raises(EfditError, match="same index draws"):
        difference_result(arms[0][0], bootstrap_metrics(_set(1, n=120), ref, replicates=60, seed=5, prc=False))


def test_result_round_trips_through_a_plain_dict():
    res = bootstrap_metrics(_set(1), _set(0), replicates=10, prc=False)
    back = BootstrapResult.from_dict(res.to_dict(replicates=True))
    assert back.plan == res.plan and back.point == res.point
    assert back.intervals() == res.intervals()
    with pytest.raises(EfditError, match="no bootstrap replicates"):
        BootstrapResult.from_dict(res.to_dict())


# ---- per-level scores ------------------------------------------------------------------------------------------------

def test_intra_class_and_per_superclass_fd():
    # subclass 0: gen [0, 2] vs ref [0, 0, 3, 3] -> 0.25 + (√2 - √3)²; subclass 1: gen = ref -> 0;
    # subclass 2: one generated sample -> skipped (FD needs 2)
    gen = np.array([[0.0], [2.0], [5.0], [7.0], [1.0]])
    yg = np.array([0, 0, 1, 1, 2])
    ref = np.array([[0.0], [0.0], [3.0], [3.0], [5.0], [7.0], [1.0], [2.0]])
    yr = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    fd0 = 0.25 + (math.sqrt(2) - math.sqrt(3)) ** 2
    intra = intra_class_fd(gen, yg, ref, yr, H)
    assert intra["per_class"]["a0"] == {"fd": pytest.approx(fd0, abs=1e-12), "n_gen": 2, "n_ref": 4}
    assert intra["per_class"]["a1"]["fd"] == pytest.approx(0.0, abs=1e-12)
    assert intra["per_class"]["b0"] == {"fd": None, "n_gen": 1, "n_ref": 2} and intra["skipped"] == ["b0"]
    assert intra["mean"] == pytest.approx(fd0 / 2, abs=1e-12) and intra["classes"] == 2
    assert (intra["n_gen_min"], intra["n_ref_min"]) == (2, 2)
    sup = per_superclass_fd(gen, yg, ref, yr, H)
    assert sup["per_class"]["A"]["fd"] == pytest.approx(fd_sqrtm(gen[:4], ref[:6]), abs=1e-9)
    assert sup["per_class"]["A"]["n_gen"] == 4 and sup["per_class"]["B"]["fd"] is None


def test_per_class_scores_reject_bad_labels():
    with pytest.raises(EfditError, match="labels"):
        intra_class_fd(np.zeros((3, 2)), [0, 1, 9], np.zeros((3, 2)), [0, 1, 1], H)
    with pytest.raises(EfditError, match="3 samples but 2 labels"):
        per_superclass_fd(np.zeros((3, 2)), [0, 1], np.zeros((3, 2)), [0, 1, 1], H)


def test_proportion_intervals_stay_in_the_unit_range():
    # replicates skewed below a point estimate of 1: re-centring alone would put the upper bound above 100 %
    r = np.array([0.9] * 50 + [1.0] * 150)
    assert percentile_interval(1.0, r).high > 1.0
    assert percentile_interval(1.0, r, bounds=(0.0, 1.0)).high == 1.0
    res = BootstrapResult({"fine_acc": 1.0, "fd": 1.0}, {"fine_acc": r, "fd": r}, "test", 200)
    assert res.interval("fine_acc").high == 1.0 and res.interval("fd").high > 1.0
