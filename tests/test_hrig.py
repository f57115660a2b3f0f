"""HRIG: FFT fusion against hand-computed values, the perceptual band in SNR terms, and sampling invariants."""
import math

import pytest
import torch

from efdit.diffusion import Guidance, create_diffusion, sample
from efdit.diffusion.hooks import SamplerState
from efdit.diffusion.hooks.hrig import (HRIG, LatentRefiner, band_to_snr, degrade, enhance_bicubic, fft_fuse,
                                        parse_hrig_spec, radial_mask, reference_snr, train_refiner)
from tiny import tiny_model




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
