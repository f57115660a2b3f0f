"""Spectral measures against hand-computed values: one cosine puts its power at one radius, white noise is flat."""
import math

import numpy as np
import pytest
import torch

from efdit.metrics.spectrum import (
    high_band_energy,
    high_band_energy_ratio,
    log_high_band_gap,
    power,
    radial_bins,
    radial_frequency,
    radial_power_spectrum,
    spectral_distance,
)


def cosine(H, W, k, axis="x", amp=1.0, phase=0.0):
    """amp·cos(2π·k·col/W + phase) (axis x) or along the rows (axis y), (1, 1, H, W) float64."""
    rows, cols = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                                indexing="ij")
    arg = 2 * math.pi * k * (cols / W if axis == "x" else rows / H) + phase
    return (amp * torch.cos(arg))[None, None]


def test_radial_frequency_and_bins_by_hand():
    rho = radial_frequency(4, 4)  # fftfreq(4) = [0, .25, −.5, −.25]
    assert rho[0, 0] == 0 and rho[0, 1] == 0.5 and rho[0, 2] == 1.0 and rho[2, 2] == pytest.approx(math.sqrt(2))
    b, radii = radial_bins(4, 4)
    np.testing.assert_allclose(radii, [0.0, 0.5, 1.0])
    assert b[0, 0] == 0 and b[0, 1] == 1 and b[1, 1] == 1 and b[0, 2] == 2  # ρ·n/2 = 0, 1, 1.41 -> 1, 2
    assert b[2, 2] == -1  # corner ρ = √2: radius 2.83 rounds to 3 > n/2, left out
    b, radii = radial_bins(5, 8)  # non-square, odd: n = 5, bins 0, 1, 2 at ρ = 0, .4, .8
    np.testing.assert_allclose(radii, [0.0, 0.4, 0.8])
    assert all((b == k).any() for k in range(3))


def test_parseval_and_the_power_of_a_constant():
    x = torch.randn(3, 2, 6, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(power(x).sum((-2, -1)), (x ** 2).sum((-2, -1)))
    c = torch.full((1, 1, 8, 8), 2.0)
    radii, p = radial_power_spectrum(c)
    assert p[0] == pytest.approx(4.0 * 64) and np.all(p[1:] < 1e-20)  # all in DC: |FFT|² = (64·2)², / 64


@pytest.mark.parametrize("H,W,k,axis", [(16, 16, 3, "x"), (16, 16, 5, "y"), (12, 20, 2, "y"), (15, 15, 4, "x")])
def test_a_cosine_puts_its_power_at_one_radius(H, W, k, axis):
    x = cosine(H, W, k, axis, amp=2.0, phase=0.4)
    radii, p = radial_power_spectrum(x)
    n = min(H, W)
    # the cosine's two peaks f = ±k/(W or H) have ρ = 2k/(W or H), i.e. radius k·n/(W or H) in bin units
    want = round(k * n / (W if axis == "x" else H))
    assert int(np.argmax(p)) == want
    assert np.all(np.delete(p, want) < 1e-18 * p[want])
    # by hand: 2 peaks of |FFT|² = (H·W·amp/2)², divided by H·W, averaged over the bin's frequency count
    b, _ = radial_bins(H, W)
    count = int((b == want).sum())
    assert p[want] == pytest.approx(2 * H * W * (2.0 / 2) ** 2 / count, rel=1e-9)


def test_white_noise_is_flat_at_its_variance():
    g = torch.Generator().manual_seed(1)
    x = 0.5 * torch.randn(400, 1, 16, 16, generator=g)  # σ² = 0.25
    radii, p = radial_power_spectrum(x)
    np.testing.assert_allclose(p[1:], 0.25, rtol=0.06)  # E P(f) = σ² at every f
    assert p[0] == pytest.approx(0.25, rel=0.25)  # DC: one (real) frequency per image, P ~ σ²·χ²₁, 7 % s.e.
    # (N, B) per image, channels averaged; the set's profile is the mean of the per-image ones
    _, per = radial_power_spectrum(x, per_image=True)
    assert per.shape == (400, 9)
    np.testing.assert_allclose(per.mean(0), p)


def test_spectral_distance_by_hand():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(8, 3, 10, 10, generator=g, dtype=torch.float64)
    assert spectral_distance(a, a) == 0.0
    assert spectral_distance(a, 3.0 * a) == pytest.approx(math.log(9.0), rel=1e-9)  # power ×9 in every bin
    assert spectral_distance(a.numpy(), (3.0 * a).numpy()) == pytest.approx(math.log(9.0), rel=1e-9)
    # two cosines at different radii: in each of those two bins one set has the power, the other ~0
    c3, c5 = cosine(16, 16, 3), cosine(16, 16, 5)
    both = torch.cat([c3, c5])
    d_full = spectral_distance(c3 + c5, c3)  # differ only in bin 5 (c3 + c5: power in bins 3 and 5)
    assert d_full == pytest.approx(abs(math.log(radial_power_spectrum(c5)[1][5] + 1e-12) - math.log(1e-12)) / 8,
                                   rel=1e-6)
    assert spectral_distance(both, both.flip(0)) == 0.0  # a set, not a sequence: order does not matter
    # min_radius keeps only the high bins: c3 vs 2·c3 differ in bin 3 only (ρ = .375), invisible above ρ = 0.5
    assert spectral_distance(c3 + c5, 2 * c3 + c5, min_radius=0.5) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        spectral_distance(a, torch.randn(2, 3, 10, 12))
    with pytest.raises(ValueError):
        spectral_distance(a, a, min_radius=2.0)


def test_high_band_energy_and_ratio_by_hand():
    lo, hi = cosine(16, 16, 2), cosine(16, 16, 6, amp=0.5)  # ρ = .25 and .75
    x = torch.cat([lo + hi, lo])
    e = high_band_energy(x, cutoff=0.5)
    np.testing.assert_allclose(e, [16 * 16 * 0.5 ** 2 / 2, 0.0], atol=1e-9)  # Σ P = Σ x² = H·W·amp²/2
    real = torch.cat([lo + 2 * hi, lo + 2 * hi])
    assert high_band_energy_ratio(x, real) == pytest.approx((0.5 * 32) / 128)  # mean 16 over mean 128 (×4 power)
    assert high_band_energy_ratio(real, real) == pytest.approx(1.0)
    assert log_high_band_gap(real * 2, real) == pytest.approx(math.log(4.0))
    assert log_high_band_gap(real / 2, real) == pytest.approx(math.log(4.0))
    assert high_band_energy(x[:, 0], 0.5) == pytest.approx(e)  # (N, H, W) input is one channel
    assert high_band_energy(hi, cutoff=0.75)[0] < 1e-20  # strictly above the cutoff: ρ = 0.75 is out
    two = torch.cat([lo + hi, 3 * (lo + hi)], dim=1)  # channels are averaged: (1 + 9)/2 × the energy
    assert high_band_energy(two, 0.5)[0] == pytest.approx(5 * e[0])
    with pytest.raises(ValueError):
        high_band_energy_ratio(x, torch.zeros(2, 1, 16, 16))  # a reference without high band
    with pytest.raises(ValueError):
        radial_power_spectrum(torch.zeros(4, 4))
