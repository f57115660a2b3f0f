"""D²iT mechanisms checked against values written out by hand on tiny inputs: the DCT's multi-grained training
(noise, loss, L_vlb), its routing module, RefineNet and residual combine, the DGT's loss and sampler, and the DVAE's
coding and KL."""
import math

import pytest
import torch
import torch.nn as nn
from tiny import randomize

from efdit.d2it.dct import DynamicContentTransformer
from efdit.d2it.dgt import DynamicGrainTransformer, grain_loss, sample_grains
from efdit.d2it.dvae import DVAE, project_multigrain
from efdit.d2it.multigrain import sample_dct, training_losses
from efdit.diffusion import create_diffusion
from efdit.models.embedders import LabelEmbedder

# 2 images, a 2x2 grain map each (1 = fine) -> a 4x4 fine latent grid, C = 2 latent channels
GRAIN = torch.tensor([[[1, 0], [0, 0]],
                      [[0, 1], [1, 1]]])
C = 2


def cells_of(i, j):
    """The 4 fine-grid cells of region (i, j), in (row, col) order."""
    return [(2 * i, 2 * j), (2 * i, 2 * j + 1), (2 * i + 1, 2 * j), (2 * i + 1, 2 * j + 1)]


def regions(grain):
    N, h, w = grain.shape
    return [(n, i, j, bool(grain[n, i, j])) for n in range(N) for i in range(h) for j in range(w)]


def is_coarse_constant(x, grain):
    return all(torch.equal(x[n, :, a, b], x[n, :, 2 * i, 2 * j])
               for n, i, j, fine in regions(grain) if not fine for a, b in cells_of(i, j))


def per_grain_by_hand(values, grain, w_c=1.0, w_f=1.0):
    """w_c · (mean over coarse regions, one copy each) + w_f · (mean over fine cells); values (N, H, W) are
    already averaged over the channels."""
    coarse = [values[n, 2 * i, 2 * j] for n, i, j, fine in regions(grain) if not fine]
    fine = [values[n, a, b] for n, i, j, f in regions(grain) if f for a, b in cells_of(i, j)]
    return w_c * sum(coarse) / max(1, len(coarse)) + w_f * sum(fine) / max(1, len(fine))


def per_code_by_hand(values, grain):
    codes = [values[n, 2 * i, 2 * j] for n, i, j, fine in regions(grain) if not fine]
    codes += [values[n, a, b] for n, i, j, f in regions(grain) if f for a, b in cells_of(i, j)]
    return sum(codes) / len(codes)


# ---- DCT training: noise, loss, L_vlb --------------------------------------------------------------------------
class FixedDCT(nn.Module):
    """Stands in for the DCT: returns a fixed multi-grained output and records what it was given."""

    def __init__(self, out):
        super().__init__()
        self.out = nn.Parameter(out)
        self.seen = []

    def forward(self, x, t, y, grain):
        self.seen.append(dict(x=x.detach().clone(), t=t.clone(), y=y.clone(), grain=grain.clone()))
        return self.out * 1.0


def dct_batch(learn_sigma=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = project_multigrain(torch.randn(2, C, 4, 4, generator=g), GRAIN)
    out = project_multigrain(torch.randn(2, 2 * C if learn_sigma else C, 4, 4, generator=g) * 0.5, GRAIN)
    out[:, C:] = out[:, C:].clamp(-1, 1)                      # Σ interpolation values v in [-1, 1]
    return x0, FixedDCT(out)


def recovered_noise(diffusion, x0, x_t, t):
    ab = diffusion.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


def test_dct_training_noise_is_multigrained_and_drives_x_t():
    diffusion = create_diffusion(None, learn_sigma=True)
    x0, model = dct_batch()
    t = torch.tensor([300, 800])
    training_losses(model, diffusion, x0, GRAIN, torch.tensor([0, 1]), t, generator=torch.Generator().manual_seed(5))
    seen = model.seen[-1]
    assert torch.equal(seen["grain"], GRAIN) and seen["y"].tolist() == [0, 1] and seen["t"].tolist() == [300, 800]
    assert is_coarse_constant(seen["x"], GRAIN)                 # x_t of a multi-grained x0 stays multi-grained
    eps = recovered_noise(diffusion, x0, seen["x"], t)
    # fine cells get their own draws: no fine region is constant over its 4 cells
    for n, i, j, fine in regions(GRAIN):
        vals = torch.stack([eps[n, :, a, b] for a, b in cells_of(i, j)])
        assert (vals.std(0).min() > 1e-3) == fine, (n, i, j)


@pytest.mark.parametrize("w_c,w_f", [(1.0, 1.0), (2.0, 0.5)])
def test_dct_mse_is_the_per_grain_loss_on_its_noise(w_c, w_f):
    diffusion = create_diffusion(None, learn_sigma=True)
    x0, model = dct_batch()
    t = torch.tensor([300, 800])
    terms = training_losses(model, diffusion, x0, GRAIN, torch.tensor([0, 1]), t,
                            generator=torch.Generator().manual_seed(5), w_coarse=w_c, w_fine=w_f)
    eps = recovered_noise(diffusion, x0, model.seen[-1]["x"], t)
    sq = ((eps - model.out[:, :C].detach()) ** 2).mean(1)        # (N, H, W), mean over the C channels
    assert terms["mse"].item() == pytest.approx(per_grain_by_hand(sq, GRAIN, w_c, w_f).item(), rel=1e-4)
    dense = sq.mean().item()                                     # a plain MSE is a different number here
    assert abs(terms["mse"].item() - dense) > 1e-2 * dense
    per_code = training_losses(model, diffusion, x0, GRAIN, torch.tensor([0, 1]), t,
                               generator=torch.Generator().manual_seed(5), weighting="per_code")["mse"]
    assert per_code.item() == pytest.approx(per_code_by_hand(sq, GRAIN).item(), rel=1e-4)


def test_dct_vb_term_is_reduced_per_grain_and_uses_the_nll_at_t0():
    diffusion = create_diffusion(None, learn_sigma=True)
    x0, model = dct_batch()
    t = torch.tensor([0, 600])
    terms = training_losses(model, diffusion, x0, GRAIN, torch.tensor([0, 1]), t,
                            generator=torch.Generator().manual_seed(2))
    x_t = model.seen[-1]["x"]
    out = model.out.detach()
    # per-cell L_vlb (bits, channel mean) from the Gaussian diffusion's own bound on 1x1 crops
    vb = torch.zeros(2, 4, 4)
    for a in range(4):
        for b in range(4):
            crop = (slice(None), slice(None), slice(a, a + 1), slice(b, b + 1))
            vb[:, a, b] = diffusion.vb_terms_bpd(out[crop], x0[crop], x_t[crop], t)
    assert terms["vb"].item() == pytest.approx(per_grain_by_hand(vb, GRAIN).item(), rel=1e-4)
    assert terms["loss"].item() == pytest.approx(terms["mse"].item() + terms["vb"].item(), rel=1e-6)


def test_dct_vb_term_trains_only_the_variance_channels():
    diffusion = create_diffusion(None, learn_sigma=True)
    x0, model = dct_batch()
    terms = training_losses(model, diffusion, x0, GRAIN, torch.tensor([0, 1]), torch.tensor([100, 600]))
    (g_vb,) = torch.autograd.grad(terms["vb"], model.out, retain_graph=True)
    (g_mse,) = torch.autograd.grad(terms["mse"], model.out)
    assert g_vb[:, :C].abs().max() == 0 and g_vb[:, C:].abs().max() > 0
    assert g_mse[:, C:].abs().max() == 0 and g_mse[:, :C].abs().max() > 0


def test_dct_training_loss_is_deterministic_given_the_generator():
    diffusion = create_diffusion(None, learn_sigma=False, loss="mse")
    x0, model = dct_batch(learn_sigma=False)

    def run(seed):
        return training_losses(model, diffusion, x0, GRAIN, torch.tensor([0, 1]), torch.tensor([5, 500]),
                               generator=torch.Generator().manual_seed(seed))["loss"]

    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


# ---- DCT model: routing module, RefineNet, residual combine --------------------------------------------------
def tiny_dct(**kw):
    m = DynamicContentTransformer(input_size=4, in_channels=C, hidden_size=16, trunk_depth=1, refine_depth=1,
                                  num_heads=2, num_classes=3, **kw)
    return randomize(m, seed=6, scale=0.2)


def dct_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = project_multigrain(torch.randn(2, C, 4, 4, generator=g), GRAIN)
    return x, torch.tensor([20, 700]), torch.tensor([2, 0])


def capture(module, store, key, output=False):
    if output:
        return module.register_forward_hook(lambda mod, args, out: store.__setitem__(key, out.detach().clone()))
    return module.register_forward_pre_hook(lambda mod, args: store.__setitem__(key, args[0].detach().clone()))


def test_routing_module_embeds_coarse_codes_and_fine_cells_with_grain_and_position():
    m = tiny_dct()
    x, t, y = dct_inputs()
    seen = {}
    capture(m.blocks[0], seen, "tok")
    with torch.no_grad():
        m(x, t, y, grain=GRAIN)
        for n, i, j, fine in regions(GRAIN):
            k = 2 * i + j
            if fine:   # its 2x2xC cells, flattened cell by cell in (row, col) order
                vec = torch.cat([x[n, :, a, b] for a, b in cells_of(i, j)])
                expect = m.fine_embedder(vec) + m.grain_embed[1]
            else:      # its one code
                expect = m.coarse_embedder(x[n, :, 2 * i, 2 * j]) + m.grain_embed[0]
            torch.testing.assert_close(seen["tok"][n, k], expect + m.pos_embed[0, k], rtol=1e-5, atol=1e-6)


def test_refinenet_sub_tokens_are_trunk_token_plus_sub_position_plus_noisy_cell():
    m = tiny_dct(sparse_refine=False)
    x, t, y = dct_inputs()
    seen = {}
    capture(m.final_layer, seen, "trunk")
    capture(m.refine_blocks[0], seen, "sub")
    with torch.no_grad():
        m(x, t, y, grain=GRAIN)
        for n, i, j, _ in regions(GRAIN):
            k = 2 * i + j
            for q, (a, b) in enumerate(cells_of(i, j)):
                expect = seen["trunk"][n, k] + m.sub_pos_embed[0, 0, q] + m.cell_embedder(x[n, :, a, b])
                torch.testing.assert_close(seen["sub"][n, 4 * k + q], expect, rtol=1e-5, atol=1e-6)


def broadcast_regions(per_region, grain):
    """(N, R, C_out) -> (N, C_out, 2h, 2w): each region's vector on its 4 cells."""
    N, h, w = grain.shape
    out = torch.zeros(N, per_region.shape[-1], 2 * h, 2 * w)
    for n, i, j, _ in regions(grain):
        for a, b in cells_of(i, j):
            out[n, :, a, b] = per_region[n, i * w + j]
    return out


@pytest.mark.parametrize("sparse", [True, False])
def test_fine_output_is_the_coarse_prediction_plus_the_refinenet_residual(sparse):
    res, direct = tiny_dct(sparse_refine=sparse), tiny_dct(sparse_refine=sparse, residual=False)
    direct.load_state_dict(res.state_dict())
    x, t, y = dct_inputs()
    seen = {}
    capture(res.final_layer, seen, "coarse", output=True)
    with torch.no_grad():
        out_res, out_direct = res(x, t, y, grain=GRAIN), direct(x, t, y, grain=GRAIN)
    coarse = broadcast_regions(seen["coarse"], GRAIN)
    assert coarse.abs().min() > 1e-4
    fine = GRAIN.repeat_interleave(2, 1).repeat_interleave(2, 2).bool()[:, None]
    # coarse regions: the trunk's prediction, broadcast, in both modes
    torch.testing.assert_close(torch.where(fine, 0.0, out_res), torch.where(fine, 0.0, coarse), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.where(fine, 0.0, out_direct), torch.where(fine, 0.0, coarse), rtol=1e-5, atol=1e-6)
    # fine cells: residual = coarse (broadcast) + Δ, direct = Δ
    torch.testing.assert_close(torch.where(fine, out_res - out_direct, 0.0), torch.where(fine, coarse, 0.0),
                               rtol=1e-5, atol=1e-5)
    # with a zero RefineNet head (Δ = 0), the residual model is the coarse prediction everywhere
    with torch.no_grad():
        for p in res.refine_final.parameters():
            p.zero_()
        torch.testing.assert_close(res(x, t, y, grain=GRAIN), coarse, rtol=1e-5, atol=1e-6)


def test_dct_prediction_depends_on_the_label():
    m = tiny_dct()
    x, t, _ = dct_inputs()
    with torch.no_grad():
        a, b = m(x, t, torch.tensor([0, 0]), grain=GRAIN), m(x, t, torch.tensor([1, 1]), grain=GRAIN)
    assert (a - b).abs().max() > 1e-4


def test_sample_dct_cfg_runs_both_branches_under_the_same_grain_map():
    m = tiny_dct()
    seen = []
    m.register_forward_pre_hook(lambda mod, args, kwargs: seen.append((args[2].clone(), kwargs["grain"].clone())),
                                with_kwargs=True)
    diffusion = create_diffusion("ddim2", learn_sigma=True)
    y = torch.tensor([2, 0])
    sample_dct(m, y, GRAIN, diffusion, method="ddim", cfg_scale=3.0, generator=torch.Generator().manual_seed(0),
               progress=False)
    assert len(seen) == 2
    for labels, grain in seen:
        assert labels.tolist() == [2, 0, 3, 3]                 # conditional, then the null id (num_classes)
        assert torch.equal(grain, torch.cat([GRAIN, GRAIN]))
    seen.clear()
    sample_dct(m, y, GRAIN, diffusion, method="ddim", cfg_scale=1.0, progress=False)
    assert [lab.tolist() for lab, _ in seen] == [[2, 0], [2, 0]]   # scale 1: the conditional branch only


# ---- DGT: loss and sampler -----------------------------------------------------------------------------------
class FixedLogits(nn.Module):
    """Stands in for the DGT: per-label logits (ℓ_coarse, ℓ_fine) per region; records its inputs."""

    def __init__(self, table, grid_size=2, num_classes=2):
        super().__init__()
        self.table = table                                     # (num_classes + 1, 2, g, g), last row = null
        self.grid_size = grid_size
        self.y_embedder = LabelEmbedder(num_classes, 4, dropout_prob=0.1)
        self.seen = []

    def forward(self, x_t, t, y):
        self.seen.append(dict(x=x_t.clone(), t=t.clone(), y=y.clone()))
        return self.table[y].clone()


def test_grain_loss_is_cross_entropy_against_the_grain_map_on_the_pm1_map():
    diffusion = create_diffusion(None, noise_schedule="cosine", learn_sigma=False, loss="mse")
    g = torch.Generator().manual_seed(0)
    table = torch.randn(3, 2, 2, 2, generator=g)
    model = FixedLogits(table)
    y, t = torch.tensor([0, 1]), torch.tensor([100, 900])
    loss = grain_loss(model, diffusion, GRAIN, y, t, generator=torch.Generator().manual_seed(4))
    # cross-entropy written out: −log softmax(ℓ)[M] averaged over every region
    terms = []
    for n, i, j, fine in regions(GRAIN):
        lc, lf = float(table[y[n], 0, i, j]), float(table[y[n], 1, i, j])
        terms.append(-((lf if fine else lc) - math.log(math.exp(lc) + math.exp(lf))))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # the noisy input is sqrt(ᾱ)·(2M − 1) + sqrt(1 − ᾱ)·ε with ε ~ N(0, 1)
    seen = model.seen[-1]
    assert seen["t"].tolist() == [100, 900] and seen["y"].tolist() == [0, 1]
    ab = diffusion.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x0 = torch.where(GRAIN[:, None].bool(), 1.0, -1.0)
    noise = torch.randn((2, 1, 2, 2), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(seen["x"], ab.sqrt() * x0 + (1 - ab).sqrt() * noise, rtol=1e-5, atol=1e-6)


def test_grain_loss_decreases_when_the_logits_favour_the_true_grain():
    diffusion = create_diffusion(None, noise_schedule="cosine", learn_sigma=False, loss="mse")
    right = torch.stack([1 - GRAIN, GRAIN], 1).float() * 4 - 2    # ℓ_true = +2, ℓ_other = −2
    table = torch.stack([right[0], right[1], torch.zeros(2, 2, 2)])
    good = grain_loss(FixedLogits(table), diffusion, GRAIN, torch.tensor([0, 1]), torch.tensor([10, 10]))
    bad = grain_loss(FixedLogits(-table), diffusion, GRAIN, torch.tensor([0, 1]), torch.tensor([10, 10]))
    assert good.item() == pytest.approx(math.log(1 + math.exp(-4)), rel=1e-5)
    assert bad.item() == pytest.approx(math.log(1 + math.exp(4)), rel=1e-5)


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_grain_sampler_follows_ddim_with_the_x0_head(cfg):
    """x̂0 = tanh((ℓ_fine − ℓ_coarse)/2) on the CFG-combined logits, ε̂ from x̂0, DDIM (η = 0), and the map
    is the argmax of the last step's logits."""
    steps = 4
    g = torch.Generator().manual_seed(1)
    table = torch.randn(3, 2, 2, 2, generator=g) * 1.5
    table[2, 1] += 2.0                                         # the null branch leans to fine
    model = FixedLogits(table)
    labels = torch.tensor([0, 1])
    maps = sample_grains(model, labels, steps=steps, cfg_scale=cfg, generator=torch.Generator().manual_seed(9))
    diffusion = create_diffusion(f"ddim{steps}", noise_schedule="cosine", learn_sigma=False, loss="mse")
    ab_all, ab_prev_all = diffusion.alphas_cumprod, diffusion.alphas_cumprod_prev
    logits = table[labels] if cfg == 1.0 else table[2] + cfg * (table[labels] - table[2])
    x0 = torch.tanh((logits[:, 1:2] - logits[:, 0:1]) / 2).double()
    x = torch.randn((2, 1, 2, 2), generator=torch.Generator().manual_seed(9)).double()
    assert len(model.seen) == steps
    for step, i in enumerate(reversed(range(steps))):
        seen = model.seen[step]
        k = 2 if cfg != 1.0 else 1                             # branches in the batch
        assert seen["t"].tolist() == [int(diffusion.timestep_map[i])] * (2 * k)   # respaced model timesteps
        assert seen["y"].tolist() == ([0, 1, 2, 2] if cfg != 1.0 else [0, 1])
        torch.testing.assert_close(seen["x"][:2].double(), x, rtol=1e-5, atol=1e-5)
        ab, ab_prev = float(ab_all[i]), float(ab_prev_all[i])
        eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
    assert torch.equal(maps, logits.argmax(1))


def test_grain_sampler_guidance_moves_the_map_away_from_the_null_branch():
    # conditional logits say "fine" mildly (+1), the null branch strongly (+3): at s = 4, 3 + 4·(1 − 3) < 0 -> coarse
    table = torch.zeros(3, 2, 2, 2)
    table[0, 1] = 1.0
    table[2, 1] = 3.0
    labels = torch.tensor([0])
    plain = sample_grains(FixedLogits(table), labels, steps=2, generator=torch.Generator().manual_seed(0))
    guided = sample_grains(FixedLogits(table), labels, steps=2, cfg_scale=4.0,
                           generator=torch.Generator().manual_seed(0))
    assert plain.tolist() == [[[1, 1], [1, 1]]] and guided.tolist() == [[[0, 0], [0, 0]]]


def test_dgt_is_a_patch1_dit_with_a_learned_position_embedding_and_two_logits():
    m = randomize(DynamicGrainTransformer(grid_size=4, hidden_size=16, depth=1, num_heads=2, num_classes=3), seed=2)
    assert m.dit.pos_embed.requires_grad and m.dit.patch_size == 1
    out = m(torch.randn(2, 1, 4, 4), torch.tensor([3, 600]), torch.tensor([0, 2]))
    assert out.shape == (2, 2, 4, 4)
    assert m.y_embedder.null_id == 3


# ---- DVAE: dynamic grained coding and its KL ------------------------------------------------------------------
def tiny_dvae():
    torch.manual_seed(0)
    return DVAE(in_channels=1, image_size=8, f1=2, z_channels=2, ch=8, ch_mult=(1, 2), num_res_blocks=1, groups=4)


def gaussian_kl(mean, logvar):
    return 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar)


def test_dvae_codes_and_kl_count_each_used_code_once():
    m = tiny_dvae()
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z, kl = m.encode(x, GRAIN, sample=False)
        fine_m, coarse_m = m.encoder(x)
        mu1, lv1 = fine_m.chunk(2, 1)
        mu2, lv2 = coarse_m.chunk(2, 1)
    expect_kl = torch.zeros(2)
    for n, i, j, fine in regions(GRAIN):
        if fine:
            for a, b in cells_of(i, j):
                torch.testing.assert_close(z[n, :, a, b], mu1[n, :, a, b], rtol=0, atol=0)
                expect_kl[n] += gaussian_kl(mu1[n, :, a, b], lv1[n, :, a, b].clamp(-30, 20)).sum()
        else:
            for a, b in cells_of(i, j):
                torch.testing.assert_close(z[n, :, a, b], mu2[n, :, i, j], rtol=0, atol=0)
            expect_kl[n] += gaussian_kl(mu2[n, :, i, j], lv2[n, :, i, j].clamp(-30, 20)).sum()
    torch.testing.assert_close(kl, expect_kl, rtol=1e-5, atol=1e-6)


def test_dvae_posterior_samples_have_the_encoder_std():
    m = tiny_dvae()
    with torch.no_grad():                                      # log σ² = −2 on the fine head: σ = e^{−1}
        m.encoder.fine_head.out.weight[2:].zero_()
        m.encoder.fine_head.out.bias[2:].fill_(-2.0)
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    all_fine = torch.ones(64, 2, 2, dtype=torch.long)
    with torch.no_grad():
        z, _ = m.encode(x, all_fine, sample=True, generator=torch.Generator().manual_seed(3))
        mu = m.encoder(x)[0][:, :2]
    ratio = ((z - mu) / math.exp(-1.0)).var().item()            # 64·2·4·4 = 2048 unit-variance draws
    assert ratio == pytest.approx(1.0, abs=0.12)


def test_dvae_loss_is_l1_plus_weighted_kl_per_pixel():
    m = tiny_dvae()
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        terms = m.loss(x, GRAIN, kl_weight=0.25, generator=torch.Generator().manual_seed(7))
        rec, kl = m(x, GRAIN, generator=torch.Generator().manual_seed(7))
    assert terms["l1"].item() == pytest.approx((rec - x).abs().mean().item(), rel=1e-6)
    assert terms["kl"].item() == pytest.approx(kl.mean().item() / 64, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(terms["l1"].item() + 0.25 * terms["kl"].item(), rel=1e-6)


def test_dvae_decoder_sees_the_grain_map():
    m = tiny_dvae()
    z = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = m.decode(z, GRAIN), m.decode(z, 1 - GRAIN)
    assert (a - b).abs().max() > 1e-4


def test_project_multigrain_averages_each_coarse_region():
    x = torch.arange(32, dtype=torch.float32).view(2, 1, 4, 4) ** 1.5
    p = project_multigrain(x, GRAIN)
    for n, i, j, fine in regions(GRAIN):
        mean = sum(float(x[n, 0, a, b]) for a, b in cells_of(i, j)) / 4
        for a, b in cells_of(i, j):
            assert p[n, 0, a, b].item() == pytest.approx(float(x[n, 0, a, b]) if fine else mean, rel=1e-6)
    assert torch.equal(project_multigrain(p, GRAIN), p)
