"""Training-time timestep sampling and Min-SNR-γ weighting, against hand-computed values."""
import math

import pytest
import torch

from efdit.diffusion import create_diffusion
from efdit.diffusion.timesteps import sample_timesteps, snr_weight
from efdit.models.dit import DiT


def test_uniform_is_exactly_randint():
    ab = create_diffusion().alphas_cumprod
    a = sample_timesteps(64, ab, "uniform", generator=torch.Generator().manual_seed(3))
    b = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_lognormal_picks_the_nearest_sigma():
    ab = create_diffusion().alphas_cumprod
    log_sigma = 0.5 * torch.log((1 - ab) / ab)
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(2000, ab, "lognormal", mean=-1.2, std=1.2, generator=g)
    z = -1.2 + 1.2 * torch.randn(2000, generator=torch.Generator().manual_seed(0)).double()
    brute = (z[:, None] - log_sigma[None, :]).abs().argmin(1)   # nearest σ by exhaustive search
    assert torch.equal(t, brute)
    # EDM's distribution puts the median σ at e^-1.2 ≈ 0.30: on DiT's linear schedule that is t ≈ 90, not 500
    med = float(torch.exp(log_sigma[t.median()]))
    assert abs(math.log(med) + 1.2) < 0.1


def test_lognormal_moves_with_its_mean():
    ab = create_diffusion().alphas_cumprod
    lo = sample_timesteps(4000, ab, "lognormal", mean=-2.0, generator=torch.Generator().manual_seed(1))
    hi = sample_timesteps(4000, ab, "lognormal", mean=1.0, generator=torch.Generator().manual_seed(1))
    assert (hi >= lo).all() and hi.float().mean() > lo.float().mean() + 100


def test_min_snr_weights_by_prediction():
    snr = torch.tensor([0.5, 5.0, 20.0])
    assert torch.allclose(snr_weight(snr, "eps", "min_snr", 5.0), torch.tensor([1.0, 1.0, 0.25]))
    assert torch.allclose(snr_weight(snr, "v", "min_snr", 5.0), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))
    assert torch.allclose(snr_weight(snr, "x0", "min_snr", 5.0), torch.tensor([0.5, 5.0, 5.0]))
    assert torch.equal(snr_weight(snr, "eps", "none"), torch.ones(3))


def test_training_loss_applies_the_weight_to_the_mse_term_only():
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3).eval()
    x0, noise, t = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8), torch.tensor([3, 200, 900])
    plain = create_diffusion().training_losses(m, x0, t, dict(y=torch.arange(3)), noise=noise)
    d = create_diffusion(weighting="min_snr", min_snr_gamma=5.0)
    w = d.training_losses(m, x0, t, dict(y=torch.arange(3)), noise=noise)
    ab = d.alphas_cumprod[t]
    snr = (ab / (1 - ab)).float()
    expect_w = snr.clamp(max=5.0) / snr
    assert torch.equal(w["mse"], plain["mse"]) and torch.equal(w["vb"], plain["vb"])   # logged unweighted
    torch.testing.assert_close(w["loss"], expect_w * plain["mse"] + plain["vb"])
    assert expect_w[0] < 0.01 and expect_w[2] == 1.0   # low noise is down-weighted, high noise kept


@pytest.mark.parametrize("bad", [dict(weighting="snr"), dict(weighting="min_snr", min_snr_gamma=0.0)])
def test_bad_weighting_is_refused(bad):
    with pytest.raises(ValueError):
        create_diffusion(**bad)
