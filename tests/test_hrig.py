"""HRIG: FFT fusion against hand-computed values, the perceptual band in SNR terms, sampling invariants, and the
learned enhancer: its training pairs by hand, and on the shipped base that its fusion moves x̂0's high band
towards the real images' (further than the bicubic E)."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_model

from efdit.data.fmnist import fmnist_root
from efdit.diffusion import Guidance, create_diffusion, sample
from efdit.diffusion.hooks import SamplerState
from efdit.diffusion.hooks.hrig import (
    HRIG,
    DetailRefiner,
    LatentRefiner,
    PredictionPairs,
    band_steps,
    band_to_snr,
    degrade,
    enhance_bicubic,
    fft_fuse,
    fit_detail_refiner,
    load_refiner,
    mask_of_rho,
    parse_hrig_spec,
    prediction_pairs,
    radial_mask,
    reference_snr,
    ring_loss,
    ring_matrix,
    ring_power,
    snr_code,
    train_detail_refiner,
    train_refiner,
)
from efdit.metrics.spectrum import log_high_band_gap, radial_power_spectrum, spectral_distance


def state_for(x0, snr=0.5, step=0):
    t = torch.full((x0.shape[0],), 400)
    return SamplerState(step, 0, t, torch.randn_like(x0), torch.randn_like(x0), x0, x0, 0.3, 0.35, snr)


# ---- masks and fusion ------------------------------------------------------------------------------
def test_radial_mask_by_hand_even_and_odd():
    # fftfreq(4) = [0, .25, -.5, -.25]: ρ = 2·sqrt(fy² + fx²)
    hard = radial_mask(4, 4, "hard", cutoff=0.5)
    assert hard[0, 0] == 0 and hard[0, 1] == 0 and hard[1, 1] == 1 and hard[0, 2] == 1  # ρ = 0, .5, .707, 1
    g = radial_mask(4, 4, "gaussian", cutoff=0.25)
    assert g[0, 0] == 0 and g[0, 1].item() == pytest.approx(1 - math.exp(-0.5 ** 2 / (2 * 0.25 ** 2)), abs=1e-6)
    b = radial_mask(4, 4, "butterworth", cutoff=0.25, order=2)
    assert b[0, 0] == 0 and b[2, 2].item() == pytest.approx(1 / (1 + (0.25 / math.sqrt(2)) ** 4), abs=1e-6)
    # odd, non-square: fftfreq(5) = [0, .2, .4, -.4, -.2]; fftfreq(3) = [0, 1/3, -1/3]
    m = radial_mask(5, 3, "gaussian", cutoff=0.3)
    rho = 2 * math.sqrt(0.4 ** 2 + (1 / 3) ** 2)
    assert m.shape == (5, 3) and m[2, 1].item() == pytest.approx(1 - math.exp(-rho ** 2 / (2 * 0.09)), abs=1e-6)
    assert torch.equal(m[2], m[3]) and torch.equal(m[:, 1], m[:, 2])  # M(−f) = M(f)
    with pytest.raises(ValueError):
        radial_mask(4, 4, "triangle")


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 4, 7, 10), (2, 1, 5, 5), (1, 2, 9, 6)])
def test_fft_fuse_all_pass_all_stop_and_full_fft_reference(shape):
    g = torch.Generator().manual_seed(0)
    x0, y = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    H, W = shape[-2:]
    stop = fft_fuse(x0, y, radial_mask(H, W, "allstop"), 1.0)
    assert torch.equal(stop, x0)
    torch.testing.assert_close(fft_fuse(x0, y, radial_mask(H, W, "allpass"), 1.0), y, atol=1e-5, rtol=0)
    for kind in ("hard", "gaussian", "butterworth"):
        mask = radial_mask(H, W, kind, 0.3)
        ref = x0 + 0.7 * torch.fft.ifft2(mask * (torch.fft.fft2(y) - torch.fft.fft2(x0))).real
        torch.testing.assert_close(fft_fuse(x0, y, mask, 0.7), ref, atol=1e-5, rtol=0)


def test_fft_fuse_keeps_the_mean_and_moves_nyquist_by_hand():
    # y = constant: M_hp(0) = 0, so the DC comes from x0 (zero) -> nothing changes
    x0 = torch.zeros(1, 1, 6, 6)
    out = fft_fuse(x0, torch.full_like(x0, 3.0), radial_mask(6, 6, "gaussian", 0.25), 1.0)
    assert out.abs().max() < 1e-6
    # y = (−1)^col lies at the x-Nyquist (ρ = 1 > ρc): the hard mask passes it whole, λ scales it
    y = torch.tensor([1.0, -1.0] * 3).expand(1, 1, 6, 6)
    torch.testing.assert_close(fft_fuse(x0, y, radial_mask(6, 6, "hard", 0.5), -0.5), -0.5 * y, atol=1e-6, rtol=0)


def test_fft_fuse_half_precision_round_trip():
    x0 = torch.randn(1, 2, 6, 7).to(torch.bfloat16)
    out = fft_fuse(x0, x0.float().flip(-1).to(torch.bfloat16), radial_mask(6, 7, "allstop"), 1.0)
    assert out.dtype == torch.bfloat16 and torch.equal(out, x0)


# ---- E and D -----------------------------------------------------------------------------------------
def test_bicubic_up_then_down_is_a_low_pass_filter():
    """efdit.md §2.3: bicubic ×2, blur σ = 1, area ↓2 has gain ≈ .90 at ρ = .25, .64 at .5, .20 at Nyquist."""
    cols = torch.arange(64, dtype=torch.float32)
    gains = []
    for f in (0.125, 0.25, 0.5):  # cycles/sample, ρ = 2f
        x = torch.cos(2 * math.pi * f * cols).expand(1, 1, 16, 64).contiguous()
        y = degrade(enhance_bicubic(x, 2), (16, 64), sigma=1.0, down="area")
        xs, ys = x[0, 0, 8, 16:48], y[0, 0, 8, 16:48]  # interior, away from the padding
        gains.append(((xs * ys).sum() / (xs * xs).sum()).item())
    for got, want in zip(gains, (0.90, 0.64, 0.20)):
        assert got == pytest.approx(want, abs=0.05), gains
    assert enhance_bicubic(torch.zeros(2, 3, 5, 7), 2).shape == (2, 3, 10, 14)
    assert degrade(torch.zeros(2, 3, 10, 14), (5, 7), down="bicubic").shape == (2, 3, 5, 7)


def test_gain_sign_softens_or_sharpens_with_bicubic_enhancer():
    x0 = torch.randn(2, 3, 16, 12, generator=torch.Generator().manual_seed(2))
    hp = radial_mask(16, 12, "hard", 0.5)

    def high_energy(x):
        return (torch.fft.fft2(x).abs() ** 2 * hp).sum().item()

    soft = HRIG(gain=0.5, mask="hard", cutoff=0.25).fuse(x0)
    sharp = HRIG(gain=-0.5, mask="hard", cutoff=0.25).fuse(x0)
    assert high_energy(soft) < high_energy(x0) < high_energy(sharp)
    torch.testing.assert_close(soft.mean((-2, -1)), x0.mean((-2, -1)), atol=1e-5, rtol=0)


# ---- the hook -------------------------------------------------------------------------------------------
def test_hook_all_pass_returns_D_of_E_and_all_stop_returns_x0():
    x0 = torch.randn(2, 4, 7, 9)  # latent-like, odd and non-square
    st = state_for(x0)
    h = HRIG(gain=1.0, mask="allpass")
    new = h.on_step(st)
    assert new.x0 is not st.x0 and new.eps is st.eps and h.modified_steps == [0]
    torch.testing.assert_close(new.x0, degrade(enhance_bicubic(x0, 2), (7, 9), sigma=1.0), atol=1e-5, rtol=0)
    stop = HRIG(gain=1.0, mask="allstop").on_step(st)
    assert torch.equal(stop.x0, x0)


def test_hook_is_identity_at_zero_gain_and_outside_the_band():
    st = state_for(torch.randn(1, 1, 6, 6), snr=0.5)
    h = HRIG(gain=0.0)
    assert h.on_step(st) is st and h.modified_steps == []
    h = HRIG(gain=-0.3)
    for snr in (1.0, 1.2, 0.0099, 0.005):  # the band is 1e-2 ≤ SNR < 1
        out_of_band = state_for(st.x0, snr=snr)
        assert h.on_step(out_of_band) is out_of_band
    assert h.modified_steps == []
    assert h.on_step(st).x0 is not st.x0 and h.modified_steps == [0]
    h.reset()
    assert h.modified_steps == []


def test_band_in_snr_terms_is_t_259_to_673_on_the_linear_schedule():
    s = reference_snr()
    default = HRIG()
    assert default.snr_band == (1e-2, 1.0)
    assert [t for t in range(1000) if default.active(float(s[t]))] == list(range(259, 674))
    from_spec = HRIG.from_spec("band=259:673")
    assert [t for t in range(1000) if from_spec.active(float(s[t]))] == list(range(259, 674))
    lo, hi = band_to_snr(200, 700)
    assert [t for t in range(1000) if lo <= s[t] < hi] == list(range(200, 701))
    assert band_to_snr(0, 999) == (0.0, math.inf)
    # the same SNR range on the cosine schedule picks other timesteps, by SNR
    cos = reference_snr("cosine")
    picked = [t for t in range(1000) if default.active(float(cos[t]))]
    assert picked and all(1e-2 <= cos[t] < 1 for t in picked) and picked != list(range(259, 674))


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_zero_gain_is_bit_identical_with_cfg(method):
    m, d = tiny_model(), create_diffusion("20")
    y, guide = torch.arange(4), Guidance("cfg", 4.0)
    kw = dict(method=method, guidance=guide, progress=False)
    plain = sample(m, y, d, generator=torch.Generator().manual_seed(5), **kw)
    hook = HRIG(gain=0.0)
    same = sample(m, y, d, hooks=[hook], generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(plain, same) and hook.modified_steps == []
    active = HRIG(gain=-0.3)
    other = sample(m, y, d, hooks=[active], generator=torch.Generator().manual_seed(5), **kw)
    assert not torch.equal(plain, other) and torch.isfinite(other).all() and active.modified_steps


@pytest.mark.parametrize("respacing", ["50", "ddim50"])
def test_hook_modifies_exactly_the_in_band_steps_of_a_respaced_chain(respacing):
    m, d = tiny_model(), create_diffusion(respacing)
    kept = d.timestep_map.tolist()  # ascending original timesteps τ_i
    expect = [step for step, tau in enumerate(reversed(kept)) if 259 <= tau <= 673]
    assert 0 < len(expect) < 50
    h = HRIG(gain=-0.3)
    sample(m, torch.arange(2), d, method="ddim", hooks=[h], generator=torch.Generator().manual_seed(0),
           progress=False)
    assert h.modified_steps == expect
    assert all(259 <= t <= 673 for t in h.modified_t)


@pytest.mark.parametrize("size,channels", [((8, 12), 1), ((12, 8), 4)])
def test_sampling_non_square_pixel_and_latent(size, channels):
    m = tiny_model(input_size=size, in_channels=channels)
    d = create_diffusion("10")
    h = HRIG(gain=-0.5, mask="butterworth", clip=1.0 if channels == 1 else None)
    out = sample(m, torch.arange(2), d, method="ddpm", hooks=[h], generator=torch.Generator().manual_seed(1),
                 progress=False, guidance=Guidance("cfg", 2.0))
    assert out.shape == (2, channels, *size) and torch.isfinite(out).all() and h.modified_steps


def test_parse_spec_keys_and_errors():
    kw = parse_hrig_spec("band=259:673,r=2,cutoff=0.25,gain=-0.3,mask=gaussian")
    assert kw == dict(band=(259, 673), r=2.0, cutoff=0.25, gain=-0.3, mask="gaussian")
    kw = parse_hrig_spec("snr=0.01:1, sigma=0.8, down=bicubic, noise=0.01, seed=3, clip=none, order=3")
    assert kw == dict(snr_band=(0.01, 1.0), sigma=0.8, down="bicubic", noise=0.01, seed=3, clip=None, order=3)
    assert parse_hrig_spec("") == {}
    h = HRIG.from_spec("gain=0.5,mask=hard,cutoff=0.3")
    assert (h.gain, h.mask, h.cutoff, h.snr_band) == (0.5, "hard", 0.3, (1e-2, 1.0))
    assert HRIG.from_spec(h.to_spec()).to_spec() == h.to_spec()
    for bad in ("gian=1", "band=259", "mask=box", "r=two", "band=1:2,snr=0.1:1", "enhancer=refiner", "cutoff"):
        with pytest.raises(ValueError):
            HRIG.from_spec(bad)


# ---- the learned enhancer ----------------------------------------------------------------------------
def test_untrained_refiner_is_the_bicubic_enhancer():
    x0 = torch.randn(1, 4, 6, 6)
    st = state_for(x0)
    plain = HRIG(gain=1.0).on_step(st).x0
    refined = HRIG(gain=1.0, refiner=LatentRefiner(4, hidden=8)).on_step(st).x0
    assert torch.equal(plain, refined)
    assert HRIG(refiner=LatentRefiner(4)).gain == 1.0 and HRIG().gain == -0.3


def test_train_refiner_beats_bicubic_on_tiny_data(tmp_path):
    g = torch.Generator().manual_seed(0)
    # sharp-edged images: random axis-aligned rectangles on 16x16
    imgs = -torch.ones(48, 1, 16, 16)
    for n in range(48):
        r0, c0 = torch.randint(0, 10, (2,), generator=g).tolist()
        h, w = torch.randint(3, 7, (2,), generator=g).tolist()
        imgs[n, 0, r0:r0 + h, c0:c0 + w] = 1.0
    ref, losses = train_refiner(imgs, steps=120, batch_size=16, hidden=16, lr=3e-3)
    assert all(math.isfinite(v) for v in losses)
    # evaluate on the whole set: refiner vs the bicubic baseline on the same inputs
    with torch.no_grad():
        up = enhance_bicubic(degrade(imgs, (8, 8), sigma=1.0), size=(16, 16))
        base, learned = ((up - imgs) ** 2).mean().item(), ((ref(up) - imgs) ** 2).mean().item()
    assert learned < 0.8 * base, (base, learned)
    path = tmp_path / "refiner.safetensors"
    ref.save(path)
    h = HRIG.from_spec(f"enhancer=refiner,refiner={path},gain=1")
    st = state_for(imgs[:2])
    out = h.on_step(st).x0
    assert out.shape == imgs[:2].shape and torch.isfinite(out).all()
    assert not torch.equal(out, HRIG(gain=1.0).on_step(st).x0)


def test_refiner_file_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot load HRIG refiner"):
        LatentRefiner.load(bad)
    with pytest.raises(ValueError, match="not found"):
        LatentRefiner.load(tmp_path / "missing.safetensors")
    ref = LatentRefiner(3, hidden=8)
    ref.save(tmp_path / "r.safetensors")
    back = LatentRefiner.load(tmp_path / "r.safetensors")
    assert back.config == {"channels": 3, "hidden": 8, "depth": 3}
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), back.state_dict().values()))


def test_train_refiner_trains_on_the_hooks_degradation():
    """One image, no flips: the first loss is the untrained (bicubic) E's on D(z) with the hook's D, by hand."""
    z = torch.randn(1, 2, 12, 16, generator=torch.Generator().manual_seed(3))
    for kw, D in [({}, dict(sigma=1.0, down="area")), (dict(r=3.0), dict(sigma=1.5, down="area")),
                  (dict(sigma=0.7, down="bicubic"), dict(sigma=0.7, down="bicubic"))]:
        r = kw.get("r", 2.0)
        _, losses = train_refiner(z, steps=1, batch_size=1, flips=False, hidden=4, **kw)
        lo = (round(12 / r), round(16 / r))
        want = ((enhance_bicubic(degrade(z, lo, **D), size=(12, 16)) - z) ** 2).mean().item()
        assert losses[0] == pytest.approx(want, rel=1e-6), (kw, losses[0], want)


# ---- the learned enhancer on the model's own predictions --------------------------------------------------
class ZeroEps(torch.nn.Module):
    """A stand-in DiT predicting ε̂ = 0 (and Σ channels 0): x̂0 = x_t/sqrt(ᾱ) = x0 + ε/sqrt(SNR). Records its inputs."""

    def __init__(self, channels=1):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen_t, self.seen_y = [], []

    def forward(self, x, t, y):
        self.seen_t.append(t.clone())
        self.seen_y.append(y.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:]) + self.w


@pytest.mark.parametrize("respacing", [None, "50"])
def test_prediction_pairs_by_hand_with_a_zero_eps_model(respacing):
    d = create_diffusion(respacing)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(24, 1, 16, 16, generator=g), torch.arange(24) % 5
    model = ZeroEps().train()
    pairs = prediction_pairs(model, d, images, labels, num_pairs=40, batch_size=16, seed=3)
    assert model.training  # the mode is restored
    assert isinstance(pairs, PredictionPairs) and len(pairs) == 40 and pairs.x0_hat.shape == (40, 1, 16, 16)
    # SNRs inside the band, spread over it; the model saw the original timesteps of those chain steps
    assert ((pairs.snr >= 1e-2) & (pairs.snr < 1.0)).all() and pairs.snr.min() < 0.05 and pairs.snr.max() > 0.3
    seen_t = torch.cat(model.seen_t)
    assert torch.equal(seen_t, pairs.t) and ((seen_t >= 259) & (seen_t <= 673)).all()
    assert set(pairs.t.tolist()) <= set(d.timestep_map.tolist())
    # every image once before any repeats, each with its own label
    rows = [int(torch.nonzero((images == x).flatten(1).all(1)).item()) for x in pairs.x0]
    assert sorted(rows[:24]) == list(range(24)) and len(set(rows[24:])) == 16
    assert torch.equal(torch.cat(model.seen_y), labels[rows])
    # x̂0 − x0 = ε/sqrt(SNR): scaled by each pair's own sqrt(SNR) it is N(0, 1) noise, pair by pair
    z = (pairs.x0_hat - pairs.x0).flatten(1) * pairs.snr.float().sqrt()[:, None]
    assert z.mean().abs() < 0.05 and ((z.std(1) > 0.8) & (z.std(1) < 1.2)).all()
    assert z.std(1).mean() == pytest.approx(1.0, abs=0.03)  # 10,240 values: the SNR of the very step
    again = prediction_pairs(ZeroEps(), d, images, labels, num_pairs=40, batch_size=7, seed=3)
    assert torch.equal(again.x0_hat, pairs.x0_hat) and torch.equal(again.snr, pairs.snr)  # batch size is free
    narrow = prediction_pairs(ZeroEps(), d, images, labels, snr_band=(0.1, 0.2), seed=3)
    assert ((narrow.snr >= 0.1) & (narrow.snr < 0.2)).all()
    with pytest.raises(ValueError):
        band_steps(d, (1e6, 1e7))  # above every step's SNR (ᾱ_0 = 0.9999: SNR 1e4)


def test_prediction_pairs_guided_and_interval():
    class Embedder:
        null_labels = staticmethod(lambda y: torch.full_like(y, 9))

    class LabelEps(ZeroEps):  # ε̂ = 0.1·label in every pixel
        y_embedder = Embedder()

        def forward(self, x, t, y):
            super().forward(x, t, y)
            return 0.1 * y.float().view(-1, 1, 1, 1).expand(-1, 2 * x.shape[1], *x.shape[2:]).contiguous()

    d = create_diffusion(None)
    images, labels = torch.zeros(8, 1, 4, 4), torch.full((8,), 2)
    for guide, interval in [(Guidance("cfg", 3.0), None), (Guidance("cfg", 3.0, interval=(400, 999)), (400, 999))]:
        pairs = prediction_pairs(LabelEps(), d, images, labels, guidance=guide, seed=1)
        ab = (pairs.snr / (1 + pairs.snr)).float().view(-1, 1, 1, 1)
        eps = torch.full_like(pairs.x0, 0.9 + 3.0 * (0.2 - 0.9))  # ε_∅ + s·(ε_c − ε_∅)
        if interval is not None:  # conditional ε̂ = 0.2 outside the interval
            eps = torch.where((pairs.t >= 400).view(-1, 1, 1, 1), eps, torch.full_like(eps, 0.2))
            assert (pairs.t < 400).any() and (pairs.t >= 400).any()
        x_t = pairs.x0_hat * ab.sqrt() + (1 - ab).sqrt() * eps  # invert x̂0 = (x_t − sqrt(1 − ᾱ)·ε̂)/sqrt(ᾱ) ...
        noise = (x_t - ab.sqrt() * pairs.x0) / (1 - ab).sqrt()  # ... and read the forward noise back
        assert noise.std() == pytest.approx(1.0, abs=0.15) and noise.mean().abs() < 0.15


def test_ring_power_and_loss_by_hand():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 10, 14, generator=g)
    A, radii = ring_matrix(10, 14)
    rp = ring_power(x, A)  # (N, C, B)
    ref_radii, ref = radial_power_spectrum(x[:, :1], per_image=True)
    np.testing.assert_allclose(radii.numpy(), ref_radii, rtol=1e-6)
    np.testing.assert_allclose(rp[:, 0].numpy(), ref, rtol=1e-4)
    w = mask_of_rho(radii.double(), "gaussian", 0.25).float()
    # y = 2x: every ring's amplitude doubles, so the loss is Σ_b w_b·P̄_x(b)/Σ_b w_b averaged over (n, c)
    want = ((rp * w).sum(-1) / w.sum()).mean()
    torch.testing.assert_close(ring_loss(2 * x, x, A, w), want, rtol=1e-4, atol=0)
    assert ring_loss(x, x.flip(-1), A, w).item() < 1e-9  # phase- and orientation-free: a mirror costs nothing
    assert mask_of_rho(torch.tensor([0.0, 0.5]), "hard", 0.25).tolist() == [0.0, 1.0]


def test_fit_detail_refiner_first_loss_is_that_of_x0_hat():
    g = torch.Generator().manual_seed(5)
    x0, x0_hat = torch.randn(1, 1, 8, 8, generator=g), torch.randn(1, 1, 8, 8, generator=g)
    pairs = PredictionPairs(x0_hat, x0, torch.tensor([0.3], dtype=torch.float64), torch.tensor([400]))
    for weight, mask, cutoff in [(16.0, "gaussian", 0.25), (2.0, "hard", 0.5)]:
        E, losses = fit_detail_refiner(pairs, steps=2, hidden=4, flips=False, spectral_weight=weight, mask=mask,
                                       cutoff=cutoff)
        A, radii = ring_matrix(8, 8)
        w = mask_of_rho(radii.double(), mask, cutoff).float()
        want = ((x0_hat - x0) ** 2).mean() + weight * ring_loss(x0_hat, x0, A, w)
        assert losses[0] == pytest.approx(want.item(), rel=1e-5)
        assert isinstance(E, DetailRefiner) and not E.training
    with pytest.raises(ValueError):
        fit_detail_refiner(pairs, steps=1, mask="allstop")
    # flips turn both images of a pair: with x̂0 = x0 the untrained E's first loss is 0 whatever the draw
    same = PredictionPairs(x0, x0.clone(), pairs.snr, pairs.t)
    assert all(fit_detail_refiner(same, steps=1, hidden=4, seed=s)[1][0] == 0.0 for s in range(6))
    asym = torch.arange(64.0).view(1, 1, 8, 8)
    flipped = [fit_detail_refiner(PredictionPairs(asym, asym.flip(-1), pairs.snr, pairs.t), steps=1, hidden=4,
                                  seed=s)[1][0] for s in range(6)]
    assert len(set(flipped)) == 1 and flipped[0] > 0  # ... and a mirrored pair stays mirrored


def test_fit_detail_refiner_gives_e_each_pairs_own_snr(monkeypatch):
    g = torch.Generator().manual_seed(6)
    pairs = PredictionPairs(torch.randn(5, 1, 6, 6, generator=g), torch.randn(5, 1, 6, 6, generator=g),
                            torch.tensor([0.9, 0.5, 0.2, 0.05, 0.011], dtype=torch.float64), torch.arange(5))
    seen = []
    forward = DetailRefiner.forward

    def recording(self, x0, snr):
        seen.append((x0.detach().clone(), torch.as_tensor(snr).clone()))
        return forward(self, x0, snr)

    monkeypatch.setattr(DetailRefiner, "forward", recording)
    fit_detail_refiner(pairs, steps=3, batch_size=4, hidden=4, flips=False)
    for x, snr in seen:
        assert snr.shape == (4,)
        for row, s in zip(x, snr):  # the row is the x̂0 of the pair whose SNR came with it
            assert torch.equal(row, pairs.x0_hat[int(torch.nonzero(pairs.snr == s).item())])


def test_train_detail_refiner_is_pairs_then_fit():
    m, d = tiny_model(), create_diffusion(None)
    g = torch.Generator().manual_seed(7)
    images, labels = torch.randn(12, 1, 8, 8, generator=g), torch.arange(12) % 4
    kw = dict(snr_band=(0.05, 0.5), guidance=Guidance("cfg", 2.0), seed=2)
    fit = dict(steps=4, hidden=4, depth=2, batch_size=6, spectral_weight=3.0, mask="hard", cutoff=0.4)
    E, losses = train_detail_refiner(m, d, images, labels, num_pairs=20, pair_batch_size=5, **kw, **fit)
    pairs = prediction_pairs(m, d, images, labels, num_pairs=20, batch_size=5, **kw)
    E2, losses2 = fit_detail_refiner(pairs, seed=2, **fit)
    assert losses == losses2 and E.config == {"channels": 1, "hidden": 4, "depth": 2}
    assert all(torch.equal(a, b) for a, b in zip(E.state_dict().values(), E2.state_dict().values()))


def test_detail_refiner_in_the_hook():
    x0 = torch.randn(2, 4, 7, 9)  # latent-like, odd and non-square
    st = state_for(x0, snr=0.2)
    untrained = DetailRefiner(4, hidden=8)
    h = HRIG(refiner=untrained)
    assert h.gain == 1.0 and h.detail and not HRIG().detail and not HRIG(refiner=LatentRefiner(4)).detail
    assert torch.equal(h.on_step(st).x0, x0)  # zero-initialised last conv: E = identity, nothing is added
    assert h.correction_fraction(x0, 0.2) == 0.0

    class Recording(DetailRefiner):
        def forward(self, x, snr):
            self.seen = snr
            return x + 0.5 * torch.cos(x)

    rec = Recording(4, hidden=8)
    allpass = HRIG(refiner=rec, gain=1.0, mask="allpass")
    out = allpass.on_step(st)
    assert rec.seen == 0.2  # the step's SNR reaches E
    torch.testing.assert_close(out.x0, x0 + 0.5 * torch.cos(x0), atol=1e-5, rtol=0)  # all-pass, λ = 1: E(x̂0)
    half = HRIG(refiner=rec, gain=0.5, mask="hard", cutoff=0.5)
    hp = half.highpass(0.5 * torch.cos(x0))
    torch.testing.assert_close(half.fuse(x0, 0.2), x0 + 0.5 * hp, atol=1e-5, rtol=0)
    assert half.correction_fraction(x0, 0.2) == pytest.approx((hp.norm() / half.highpass(x0).norm()).item(), rel=1e-5)
    with pytest.raises(ValueError, match="SNR"):
        half.fuse(x0)
    zero = HRIG(refiner=rec, gain=0.0)
    assert zero.on_step(st) is st


def test_detail_refiner_is_conditioned_on_each_images_snr():
    assert snr_code(1.0, 2).flatten().tolist() == [0.0, 0.0]
    torch.testing.assert_close(snr_code(torch.tensor([math.exp(-4.0), math.exp(2.0)]), 2).flatten(),
                               torch.tensor([-1.0, 0.5]))
    with pytest.raises(ValueError):
        snr_code(torch.tensor([0.1, 0.2, 0.3]), 2)
    torch.manual_seed(0)
    E = DetailRefiner(2, hidden=8)
    torch.nn.init.normal_(E.rest[-1].weight, std=0.3)
    x = torch.randn(2, 2, 6, 5)
    with torch.no_grad():
        hi, lo, both = E(x, 0.8), E(x, 0.02), E(x, torch.tensor([0.8, 0.02]))
    assert (hi - lo).abs().max() > 1e-3  # the SNR changes E
    torch.testing.assert_close(both, torch.stack([hi[0], lo[1]]))  # per image, in batch order


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_zero_gain_with_a_detail_refiner_is_bit_identical(method):
    m, d = tiny_model(), create_diffusion("20")
    E = DetailRefiner(1, hidden=4)
    torch.nn.init.normal_(E.rest[-1].weight, std=0.1)  # a non-trivial E
    kw = dict(method=method, guidance=Guidance("cfg", 3.0), progress=False)
    plain = sample(m, torch.arange(4), d, generator=torch.Generator().manual_seed(2), **kw)
    same = sample(m, torch.arange(4), d, hooks=[HRIG(refiner=E, gain=0.0)], generator=torch.Generator().manual_seed(2),
                  **kw)
    active = HRIG(refiner=E)
    other = sample(m, torch.arange(4), d, hooks=[active], generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(plain, same) and not torch.equal(plain, other) and torch.isfinite(other).all()
    assert active.modified_steps


def test_refiner_files_keep_their_kind(tmp_path):
    det = DetailRefiner(3, hidden=8, depth=4)
    torch.nn.init.normal_(det.rest[-1].weight)
    det.save(tmp_path / "d.safetensors")
    back = load_refiner(tmp_path / "d.safetensors")
    assert type(back) is DetailRefiner and back.config == {"channels": 3, "hidden": 8, "depth": 4}
    assert all(torch.equal(a, b) for a, b in zip(det.state_dict().values(), back.state_dict().values()))
    assert type(LatentRefiner.load(tmp_path / "d.safetensors")) is DetailRefiner  # the file decides
    h = HRIG.from_spec(f"enhancer=refiner,refiner={tmp_path / 'd.safetensors'}")
    assert h.detail and h.gain == 1.0
    # a file written before kinds existed (no "kind" key) holds a LatentRefiner
    from safetensors.torch import save_file
    old = LatentRefiner(2, hidden=4)
    save_file(old.state_dict(), str(tmp_path / "old.safetensors"),
              metadata={"format": "efdit-hrig-refiner", "config": '{"channels": 2, "hidden": 4, "depth": 3}'})
    assert type(load_refiner(tmp_path / "old.safetensors")) is LatentRefiner


# ---- the property: on the shipped base, the learned E adds the detail x̂0 lacks -------------------------------
BASE = Path(__file__).resolve().parents[1] / "efdit" / "assets" / "fmnist-base.safetensors"
FMNIST = (fmnist_root() / "t10k-images-idx3-ubyte.gz").is_file() and \
    (fmnist_root() / "train-images-idx3-ubyte.gz").is_file()


def _load_model(path):
    try:
        from efdit import load_model
    except ImportError:  # the model-file loader before it moved to the package's top level
        from efdit.runs import load_model
    return load_model(path)


@pytest.fixture(scope="module")
def base_pairs():
    """Shipped fmnist base (7.4 M params): E trained on 256 train images, 128 held-out test images' pairs."""
    if not (FMNIST and BASE.is_file()):
        pytest.skip("needs Fashion-MNIST and efdit/assets/fmnist-base.safetensors")
    from efdit.data import build_dataset
    model, cfg, hierarchy, _ = _load_model(BASE)
    d = create_diffusion(None, noise_schedule=cfg.diffusion.schedule, diffusion_steps=cfg.diffusion.steps,
                         learn_sigma=cfg.model.learn_sigma)

    def part(split, n, seed):
        ds = build_dataset("fmnist", split=split)
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
        sub = ds.sub_labels[idx]
        labels = sub if cfg.model.condition_on == "sub" else hierarchy.parent[sub]
        return ds.images[idx].float() / 127.5 - 1.0, labels

    train_pairs = prediction_pairs(model, d, *part("train", 256, 0), seed=0)
    E, losses = fit_detail_refiner(train_pairs, steps=150, hidden=16, seed=0)
    held_out = prediction_pairs(model, d, *part("test", 128, 1), seed=1)
    return E, held_out, train_pairs


def test_learned_enhancer_moves_the_high_band_towards_the_real_one(base_pairs):
    E, pairs, *_ = base_pairs
    real, x0_hat = pairs.x0, pairs.x0_hat
    bicubic = HRIG().fuse(x0_hat)  # default gain −0.3: unsharp masking
    learned = HRIG(refiner=E).fuse(x0_hat, pairs.snr)  # default gain 1

    def gaps(x):  # radially averaged power above ρ = 0.5, and the energy there, against the real x0 (log)
        return spectral_distance(x, real, min_radius=0.5), log_high_band_gap(x, real, cutoff=0.5)

    g_hat, g_bic, g_learn = gaps(x0_hat), gaps(bicubic), gaps(learned)
    assert g_learn[0] < g_bic[0] < g_hat[0], (g_hat, g_bic, g_learn)
    assert g_learn[1] < g_bic[1] < g_hat[1], (g_hat, g_bic, g_learn)
    assert g_learn[0] < 0.5 * g_bic[0]  # by a margin, not by a hair
    # the correction is larger than the bicubic E's (a self-cancelling E would make it smaller)
    assert HRIG(refiner=E).correction_fraction(x0_hat, pairs.snr) > HRIG().correction_fraction(x0_hat)
    torch.testing.assert_close(learned.mean((-2, -1)), x0_hat.mean((-2, -1)), atol=1e-4, rtol=0)  # M_hp(0) = 0


def test_pixel_loss_alone_adds_no_detail(base_pairs):
    """Without the spectral term E drifts to E[x0 | x̂0] ≈ x̂0 (the posterior mean): no closer to the real high band."""
    _, pairs, train_pairs = base_pairs
    E, _ = fit_detail_refiner(train_pairs, steps=150, hidden=16, seed=0, spectral_weight=0.0)
    fused = HRIG(refiner=E).fuse(pairs.x0_hat, pairs.snr)
    assert spectral_distance(fused, pairs.x0, min_radius=0.5) > \
        spectral_distance(pairs.x0_hat, pairs.x0, min_radius=0.5)
