"""DiT backbone: shapes, adaLN-Zero identity start, parameter counts, position embeddings, caches."""
import numpy as np
import pytest
import torch

from efdit.errors import EfditError
from efdit.models.dit import DiT, DiT_models, build_dit, count_params, get_2d_sincos_pos_embed


def tiny(**kw):
    cfg = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    cfg.update(kw)
    return DiT(**cfg)


def randomize(model):
    """Break adaLN-Zero so outputs are non-trivial."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.mark.parametrize("size,patch,ch,sigma", [(28, 4, 1, True), ((32, 32), 2, 4, False), ((16, 24), 4, 3, True),
                                                 (8, 8, 3, False)])
def test_forward_shapes(size, patch, ch, sigma):
    m = tiny(input_size=size, patch_size=patch, in_channels=ch, learn_sigma=sigma)
    H, W = (size, size) if isinstance(size, int) else size
    x = torch.randn(3, ch, H, W)
    out = m(x, torch.tensor([0, 10, 999]), torch.tensor([0, 5, 9]))
    assert out.shape == (3, 2 * ch if sigma else ch, H, W)


def test_untrained_model_outputs_exact_zero():
    m = tiny(input_size=(16, 24), patch_size=4, in_channels=3)
    out = m(torch.randn(2, 3, 16, 24), torch.tensor([5, 500]), torch.tensor([1, 2]))
    assert torch.equal(out, torch.zeros_like(out))


def test_adaln_zero_blocks_start_as_identity():
    m = tiny()
    tokens, c = m.embed(torch.randn(2, 1, 8, 8), torch.tensor([3, 7]), torch.tensor([1, 2]))
    assert torch.equal(m.forward_blocks(tokens, c), tokens)


def test_indivisible_size_is_a_clear_error():
    with pytest.raises(EfditError, match="not divisible by patch size 4"):
        tiny(input_size=30, patch_size=4)


def test_wrong_input_size_is_a_clear_error():
    with pytest.raises(EfditError, match="expects 8x8"):
        tiny()(torch.randn(1, 1, 16, 16), torch.tensor([1]), torch.tensor([1]))


def test_parameter_counts_on_meta_device():
    expected = {"DiT-S/2": 32_865_056, "DiT-B/2": 130_315_808, "DiT-L/2": 457_840_672, "DiT-XL/2": 674_834_720}
    for name, n in expected.items():
        with torch.device("meta"):
            m = build_dit(name, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
        assert count_params(m, exclude=("pos_embed",)) == n, name
    assert count_params(m) == 675_129_632  # XL/2 with the frozen pos_embed
    assert len(DiT_models) == 12


def test_unknown_model_name_lists_close_matches():
    with pytest.raises(EfditError, match="DiT-XL/2"):
        build_dit("DiT-XL2")


def test_sincos_pos_embed_values_and_frozen():
    pe = get_2d_sincos_pos_embed(8, (2, 3))  # 6 tokens, D=8: [w-half | h-half], each [sin | cos] over 2 freqs
    # token (row 1, col 2): w=2, h=1; freqs 1/10000**(0/2), 1/10000**(1/2)
    w, h, om = 2.0, 1.0, np.array([1.0, 0.01])
    expect = np.concatenate([np.sin(w * om), np.cos(w * om), np.sin(h * om), np.cos(h * om)])
    np.testing.assert_allclose(pe[1 * 3 + 2], expect, rtol=1e-12)
    m = tiny()
    assert not m.pos_embed.requires_grad
    assert tiny(pos_embed="learned").pos_embed.requires_grad


def test_non_square_unpatchify_roundtrip():
    m = tiny(input_size=(8, 12), patch_size=2, in_channels=1, learn_sigma=False)
    x = torch.randn(2, 1, 8, 12)
    # patchify by hand in the layout the final layer produces: (N, h, w, p, q, c)
    patches = x.reshape(2, 1, 4, 2, 6, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 24, 4)
    assert torch.equal(m.unpatchify(patches), x)


def test_label_dropout_uses_null_id_from_num_classes():
    m = tiny(num_classes=7)
    emb = m.y_embedder
    assert emb.embedding_table.num_embeddings == 8 and emb.null_id == 7
    dropped = emb.token_drop(torch.arange(7), force_drop_ids=torch.ones(7, dtype=torch.long))
    assert torch.equal(dropped, torch.full((7,), 7))
    no_null = tiny(class_dropout_prob=0.0).y_embedder
    with pytest.raises(EfditError, match="no null class"):
        no_null.null_labels(torch.arange(3))


def test_attention_backends_agree_and_keep_state_dict():
    m = randomize(tiny())
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2])
    keys = set(m.state_dict())
    ref = m(x, t, y)
    m.set_attention_backend("math")
    assert set(m.state_dict()) == keys
    torch.testing.assert_close(m(x, t, y), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention backend"):
        m.set_attention_backend("nope")


def test_block_cache_entry_points_see_every_branch():
    m = randomize(tiny(depth=3))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2])
    calls = []

    class Recorder:
        granularity = "branch"

        def __call__(self, i, branch, fn, x_, c_):
            calls.append((i, branch))
            return fn(x_, c_)

    ref = m(x, t, y)
    torch.testing.assert_close(m(x, t, y, block_cache=Recorder()), ref)
    assert calls == [(i, b) for i in range(3) for b in ("attn", "mlp")]

    class ZeroBlocks:  # a cache that "reuses" zero residuals for blocks 1.. -> equals running block 0 only
        granularity = "block"

        def __call__(self, i, branch, fn, x_, c_):
            assert branch == "block"
            return fn(x_, c_) if i == 0 else x_

    tokens, c = m.embed(x, t, y)
    only0 = m.unpatchify(m.final_layer(m.forward_blocks(tokens, c, 0, 1), c))
    torch.testing.assert_close(m(x, t, y, block_cache=ZeroBlocks()), only0)


def test_gradient_checkpointing_same_gradients():
    m = randomize(tiny())
    m.train()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2])
    m.y_embedder.dropout_prob = 0.0
    m(x, t, y).square().mean().backward()
    g1 = [p.grad.clone() for p in m.parameters() if p.grad is not None]
    m.zero_grad()
    m.grad_checkpointing = True
    m(x, t, y).square().mean().backward()
    g2 = [p.grad.clone() for p in m.parameters() if p.grad is not None]
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
