"""FLOP formulas (efdit.models.flops, efdit.d2it.flops) against torch's FlopCounterMode on real forwards, and
against hand counts and DiT's published DiT-XL/2 figure."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from efdit.d2it.config import build_d2it_config
from efdit.d2it.dct import DynamicContentTransformer
from efdit.d2it.dgt import DynamicGrainTransformer
from efdit.d2it.dvae import DVAE
from efdit.d2it.flops import (
    compute_table,
    dct_model_flops,
    dgt_model_flops,
    dvae_flops,
    refine_tokens,
    refine_tokens_of,
    sampling_flops,
)
from efdit.models.dit import DiT
from efdit.models.flops import block_flops, dit_flops, dit_model_flops


def counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def math_attention(model):
    """FlopCounterMode does not see the CPU SDPA kernel: count the explicit softmax(QKᵀ)V instead."""
    for m in model.modules():
        if hasattr(m, "set_backend"):
            m.set_backend("math")
    return model.eval()


def test_block_by_hand():
    # T = 3 tokens, D = 2, MLP 8: qkv 2·3·2·6 = 72, proj 24, fc1 96, fc2 96, attention 4·9·2 = 72, adaLN 2·2·12 = 48
    b = block_flops(3, 2, 4.0)
    assert b == {"linear": 72 + 24 + 96 + 96, "attention": 72, "adaln": 48}


def test_dit_xl2_matches_the_papers_gflops():
    # DiT-XL/2 at 256 px (32x32x4 latent): 118.6 Gflops in the paper, which counts multiply-adds
    assert dit_flops(32, 2, 4, 1152, 28)["total"] / 2e9 == pytest.approx(118.6, abs=0.05)


@pytest.mark.parametrize("patch,learn_sigma", [(1, True), (2, True), (4, False)])
def test_dit_against_flop_counter(patch, learn_sigma):
    m = math_attention(DiT(input_size=(8, 16), patch_size=patch, in_channels=3, hidden_size=32, depth=2,
                           num_heads=4, num_classes=5, learn_sigma=learn_sigma))
    x = torch.randn(2, 3, 8, 16)
    got = counted(lambda: m(x, torch.tensor([1, 7]), torch.tensor([0, 4])))
    assert got == pytest.approx(2 * dit_model_flops(m)["total"], rel=1e-9)
    assert dit_model_flops(m)["tokens"] == (8 // patch) * (16 // patch)


@pytest.mark.parametrize("attention", ["global", "region"])
@pytest.mark.parametrize("sparse", [True, False])
def test_dct_against_flop_counter_with_padding(attention, sparse):
    m = math_attention(DynamicContentTransformer(input_size=8, in_channels=4, hidden_size=32, trunk_depth=2,
                                                 refine_depth=2, num_heads=4, num_classes=3,
                                                 refine_attention=attention, sparse_refine=sparse))
    grain = torch.zeros(3, 4, 4, dtype=torch.long)
    grain[0, :2] = 1                      # 8 fine regions
    grain[1, 0, 0] = 1                    # 1
    x = torch.randn(3, 4, 8, 8)           # image 2: none
    got = counted(lambda: m(x, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]), grain))
    L = refine_tokens_of(grain, attention, sparse)
    assert L == (4 * 16 if not sparse else 4 * 8 + 8 if attention == "global" else 4 * 8)
    assert got == pytest.approx(3 * dct_model_flops(m, grain=grain)["total"], rel=1e-9)   # padded to the batch's L


def test_dct_region_mode_without_fine_regions_skips_the_refinenet():
    m = math_attention(DynamicContentTransformer(input_size=8, in_channels=4, hidden_size=32, trunk_depth=1,
                                                 refine_depth=2, num_heads=4, num_classes=3, refine_attention="region"))
    grain = torch.zeros(2, 4, 4, dtype=torch.long)
    got = counted(lambda: m(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]), grain))
    f = dct_model_flops(m, grain=grain)
    assert f["refine_tokens"] == 0 and got == pytest.approx(2 * f["total"], rel=1e-9)


def test_refine_tokens_at_a_mean_share():
    assert refine_tokens(64, 0.5) == 160 and refine_tokens(64, 0.5, "region") == 128
    assert refine_tokens(64, 0.5, sparse=False) == 256 and refine_tokens(64, 0.0) == 64


def test_dgt_against_flop_counter():
    m = math_attention(DynamicGrainTransformer(grid_size=4, hidden_size=32, depth=2, num_heads=4, num_classes=3))
    got = counted(lambda: m(torch.randn(2, 1, 4, 4), torch.tensor([1, 2]), torch.tensor([0, 1])))
    assert got == pytest.approx(2 * dgt_model_flops(m)["total"], rel=1e-9)


@pytest.mark.parametrize("f1,ch_mult,res,full", [(2, (1, 2), 1, 0), (4, (1, 2, 2), 2, 1), (1, (1,), 1, 1)])
def test_dvae_against_flop_counter(f1, ch_mult, res, full):
    m = DVAE(in_channels=3, image_size=16, f1=f1, z_channels=4, ch=8, ch_mult=ch_mult, num_res_blocks=res,
             groups=4, full_res_blocks=full).eval()
    x = torch.randn(2, 3, 16, 16)
    grain = torch.randint(0, 2, (2, 16 // (2 * f1), 16 // (2 * f1)))
    z, _ = m.encode(x, grain)
    f = dvae_flops(3, 16, f1, 4, 8, ch_mult, res, full)
    assert counted(lambda: m.encode(x, grain)) == pytest.approx(2 * f["encoder"], rel=1e-9)
    assert counted(lambda: m.decode(z, grain)) == pytest.approx(2 * f["decoder"], rel=1e-9)


def test_budgets_and_the_table():
    assert sampling_flops(10.0, 25) == 250 and sampling_flops(10.0, 25, cfg_scale=1.5) == 500
    cfg = build_d2it_config("fmnist32", {})
    rows = {r["name"]: r for r in compute_table(cfg, 1, 0.5, dct_steps=25, dgt_steps=50)}
    dct = rows["DCT (r = 0.500)"]
    assert dct["trunk_tokens"] == 64 and dct["refine_tokens"] == 160 and dct["tokens"] == 160
    assert rows["DiT-6x64/2"]["tokens"] == 64 and rows["DiT-6x64/1"]["tokens"] == 256
    total = rows["D²iT sample (DGT + DCT + decoder)"]["gflop_sample"]
    assert total == pytest.approx(rows["DVAE decoder"]["gflop_sample"] + rows["DGT"]["gflop_sample"]
                                  + dct["gflop_sample"])
