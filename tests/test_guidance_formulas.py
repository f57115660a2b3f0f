"""Guidance formulas checked against hand-computed values, with branches and scales that cannot stand in for each other.

Every test uses three distinct ε tensors (conditional, superclass, null) and two distinct scales, so that a formula
with its scales swapped, a branch read in the wrong place or a term left out gives a different number.
"""
import pytest
import torch
from tiny import randomize

from efdit.diffusion import Guidance, guided_forward
from efdit.models.dit import DiT
from efdit.models.embedders import TieredEmbedder

PARENT = torch.tensor([0, 0, 1, 1, 1, 2])  # 6 subclasses under 3 superclasses

# ε_c, ε_sup, ε_∅ with unequal gaps (ε_c − ε_sup ≠ ε_sup − ε_∅ everywhere), and two scales s ≠ s_sup
EPS_C = torch.tensor([[3.0, -2.0], [0.5, 4.0]])
EPS_SUP = torch.tensor([[1.0, 1.0], [-1.5, 2.5]])
EPS_NULL = torch.tensor([[-0.5, 0.25], [2.0, -3.0]])
S, S_SUP = 3.0, 1.5


def test_two_term_combine_matches_the_formula_elementwise():
    # ε_∅ + s_sup·(ε_sup − ε_∅) + s·(ε_c − ε_sup), written out per element
    expect = torch.tensor([[-0.5 + 1.5 * (1.0 + 0.5) + 3.0 * (3.0 - 1.0),
                            0.25 + 1.5 * (1.0 - 0.25) + 3.0 * (-2.0 - 1.0)],
                           [2.0 + 1.5 * (-1.5 - 2.0) + 3.0 * (0.5 + 1.5),
                            -3.0 + 1.5 * (2.5 + 3.0) + 3.0 * (4.0 - 2.5)]])
    got = Guidance("two_term", S, scale_super=S_SUP).combine([EPS_C, EPS_SUP, EPS_NULL])
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-6)


def test_two_term_scales_are_not_interchangeable():
    a = Guidance("two_term", S, scale_super=S_SUP).combine([EPS_C, EPS_SUP, EPS_NULL])
    b = Guidance("two_term", S_SUP, scale_super=S).combine([EPS_C, EPS_SUP, EPS_NULL])
    # a − b = (s − s_sup)·((ε_c − ε_sup) − (ε_sup − ε_∅))
    torch.testing.assert_close(a - b, (S - S_SUP) * ((EPS_C - EPS_SUP) - (EPS_SUP - EPS_NULL)), rtol=0, atol=1e-6)
    assert (a - b).abs().min() > 0.5


def test_two_term_special_cases_reduce_to_the_one_term_guidances():
    eps = [EPS_C, EPS_SUP, EPS_NULL]
    # s_sup = 1: superclass-guided CFG with s
    torch.testing.assert_close(Guidance("two_term", S, scale_super=1.0).combine(eps),
                               EPS_SUP + S * (EPS_C - EPS_SUP), rtol=0, atol=1e-6)
    # s_sup = s: null CFG with s
    torch.testing.assert_close(Guidance("two_term", S, scale_super=S).combine(eps),
                               EPS_NULL + S * (EPS_C - EPS_NULL), rtol=0, atol=1e-6)
    # s = 1: null CFG toward the superclass prediction only, ε_∅ + s_sup·(ε_sup − ε_∅) + (ε_c − ε_sup)
    torch.testing.assert_close(Guidance("two_term", 1.0, scale_super=S_SUP).combine(eps),
                               EPS_NULL + S_SUP * (EPS_SUP - EPS_NULL) + (EPS_C - EPS_SUP), rtol=0, atol=1e-6)
    torch.testing.assert_close(Guidance("two_term", 1.0, scale_super=1.0).combine(eps), EPS_C, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode,other", [("cfg", EPS_NULL), ("super", EPS_SUP)])
def test_one_term_combine_matches_the_formula(mode, other):
    got = Guidance(mode, S).combine([EPS_C, other])
    torch.testing.assert_close(got, other + S * (EPS_C - other), rtol=0, atol=1e-6)
    assert not torch.allclose(got, EPS_C + S * (EPS_C - other))
    # the unused scale plays no part
    torch.testing.assert_close(Guidance(mode, S, scale_super=7.0).combine([EPS_C, other]), got, rtol=0, atol=0)


def test_no_guidance_returns_the_conditional_prediction():
    assert Guidance("none", S, scale_super=S_SUP).combine([EPS_C]) is EPS_C


def tiered_model(null_prob=0.1, learn_sigma=False):
    te = TieredEmbedder(6, 3, PARENT, 32, mode="sum", null_prob=null_prob)
    m = DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=6,
            learn_sigma=learn_sigma, y_embedder=te)
    return randomize(m, seed=4, scale=0.1)


def test_two_term_guided_forward_equals_the_formula_on_three_separate_forwards():
    m = tiered_model(learn_sigma=True)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 2, 8, 8, generator=g), torch.tensor([10, 400, 900]), torch.tensor([0, 3, 5])
    te = m.y_embedder
    with torch.no_grad():
        e_c, e_sup, e_null = m(x, t, y), m(x, t, te.super_labels(y)), m(x, t, te.null_labels(y))
        out = guided_forward(m, x, t, y, Guidance("two_term", S, scale_super=S_SUP))
    # the three branches are really different here, so the formula is not degenerate
    assert (e_c[:, :2] - e_sup[:, :2]).abs().mean() > 1e-3 and (e_sup[:, :2] - e_null[:, :2]).abs().mean() > 1e-3
    expect = e_null[:, :2] + S_SUP * (e_sup[:, :2] - e_null[:, :2]) + S * (e_c[:, :2] - e_sup[:, :2])
    torch.testing.assert_close(out[:, :2], expect, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:, 2:], e_c[:, 2:], rtol=1e-5, atol=1e-6)   # learned Σ: conditional branch
    swapped = guided_forward(m, x, t, y, Guidance("two_term", S_SUP, scale_super=S))
    assert not torch.allclose(swapped[:, :2], out[:, :2], atol=1e-4)


def test_superclass_guided_forward_uses_the_parent_superclass_branch():
    m = tiered_model(null_prob=0.0)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 2, 8, 8, generator=g), torch.tensor([50, 500, 950]), torch.tensor([1, 2, 5])
    with torch.no_grad():
        e_c = m(x, t, y)
        e_sup = m(x, t, torch.tensor([6 + 0, 6 + 1, 6 + 2]))   # S + π(y), written out
        out = guided_forward(m, x, t, y, Guidance("super", S))
    torch.testing.assert_close(out, e_sup + S * (e_c - e_sup), rtol=1e-4, atol=1e-5)


def test_null_cfg_forward_uses_the_null_branch():
    m = tiered_model(null_prob=0.1)
    g = torch.Generator().manual_seed(2)
    x, t, y = torch.randn(2, 2, 8, 8, generator=g), torch.tensor([300, 700]), torch.tensor([0, 4])
    with torch.no_grad():
        e_c, e_null = m(x, t, y), m(x, t, torch.tensor([9, 9]))   # null id S + P = 9
        out = guided_forward(m, x, t, y, Guidance("cfg", S))
    torch.testing.assert_close(out, e_null + S * (e_c - e_null), rtol=1e-4, atol=1e-5)
