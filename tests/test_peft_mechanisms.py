"""PEFT mechanisms on tiny DiTs: DiffFit's γ (applied, trained, placed), each preset's exact trainable set, and the
Tiered Embedder's label-id space and dropout rules."""
import pytest
import torch
from tiny import randomize

from efdit.models.dit import DiT, modulate
from efdit.models.embedders import LabelEmbedder, TieredEmbedder
from efdit.models.peft import apply_peft

PARENT = torch.tensor([0, 0, 1, 1, 1, 2])  # 6 subclasses under 3 superclasses


def tiny(depth=2, y_embedder=None):
    m = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=depth, num_heads=2, num_classes=4,
            y_embedder=y_embedder)
    return randomize(m, seed=3, scale=0.1)


def inputs(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.tensor([40, 700][:n]), torch.tensor([1, 3][:n])


# ---- DiffFit's γ -----------------------------------------------------------------------------------------------
def block_by_hand(block, x, c, g_attn, g_mlp):
    """A DiT block with DiffFit scales: x + γ_a·gate_a·Attn(mod(LN x)), then + γ_m·gate_m·MLP(mod(LN x'))."""
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = block.adaLN_modulation(c).chunk(6, dim=1)
    x = x + g_attn * gate_a.unsqueeze(1) * block.attn(modulate(block.norm1(x), shift_a, scale_a))
    return x + g_mlp * gate_m.unsqueeze(1) * block.mlp(modulate(block.norm2(x), shift_m, scale_m))


@pytest.mark.parametrize("g_attn,g_mlp", [(2.5, 1.0), (1.0, -0.5), (0.0, 3.0)])
def test_difffit_gammas_scale_their_own_branch(g_attn, g_mlp):
    m = tiny()
    apply_peft(m, "difffit")
    b = m.blocks[0]
    with torch.no_grad():
        b.gamma_attn.fill_(g_attn)
        b.gamma_mlp.fill_(g_mlp)
        g = torch.Generator().manual_seed(1)
        x, c = torch.randn(2, 16, 32, generator=g), torch.randn(2, 32, generator=g)
        torch.testing.assert_close(b(x, c), block_by_hand(b, x, c, g_attn, g_mlp), rtol=1e-5, atol=1e-6)
        # and the two scales are not interchangeable
        assert not torch.allclose(b(x, c), block_by_hand(b, x, c, g_mlp, g_attn), atol=1e-4)


def test_difffit_gammas_change_the_model_output():
    m = tiny()
    apply_peft(m, "difffit")
    m.eval()
    x, t, y = inputs()
    with torch.no_grad():
        before = m(x, t, y)
        for name in ("gamma_attn", "gamma_mlp"):
            getattr(m.blocks[1], name).fill_(2.0)
            after = m(x, t, y)
            assert (after - before).abs().max() > 1e-4, name
            getattr(m.blocks[1], name).fill_(1.0)
        torch.testing.assert_close(m(x, t, y), before, rtol=0, atol=0)


def test_difffit_gammas_are_trainable_receive_gradients_and_move():
    m = tiny()
    added = apply_peft(m, "difffit")
    gammas = [f"blocks.{i}.gamma_{b}" for i in range(2) for b in ("attn", "mlp")]
    assert set(gammas) <= set(added)
    params = dict(m.named_parameters())
    for n in gammas:
        assert params[n].requires_grad and params[n].shape == (1,) and params[n].item() == 1.0, n
    m.train()
    m.y_embedder.dropout_prob = 0.0
    x, t, y = inputs()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m(x, t, y).square().mean().backward()
    for n in gammas:
        assert params[n].grad is not None and params[n].grad.abs().item() > 0, n
    opt.step()
    for n in gammas:
        assert params[n].item() != 1.0, n


def test_difffit_gammas_apply_through_a_block_cache():
    """A pass-through block cache (what FORA and friends wrap) sees the γ-scaled branches."""
    m = tiny()
    apply_peft(m, "difffit")
    m.eval()
    with torch.no_grad():
        m.blocks[0].gamma_attn.fill_(0.25)
        m.blocks[1].gamma_mlp.fill_(-2.0)
        x, t, y = inputs()
        plain = m(x, t, y)

        def passthrough(i, branch, fn, x_, c_):
            return fn(x_, c_)
        passthrough.granularity = "branch"
        torch.testing.assert_close(m(x, t, y, block_cache=passthrough), plain, rtol=1e-5, atol=1e-6)


def test_difffit_first_half_puts_gammas_on_the_first_blocks_only():
    m = tiny(depth=4)
    added = apply_peft(m, "difffit", difffit_blocks="first_half")
    assert sorted(n for n in added if "gamma" in n) == ["blocks.0.gamma_attn", "blocks.0.gamma_mlp",
                                                          "blocks.1.gamma_attn", "blocks.1.gamma_mlp"]
    assert m.blocks[2].gamma_attn is None and m.blocks[3].gamma_mlp is None
    assert not any("gamma" in k for k in m.state_dict() if k.startswith(("blocks.2.", "blocks.3.")))


# ---- exact trainable sets -----------------------------------------------------------------------------------
BIASES = ["x_embedder.proj.bias", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.bias", "blocks.0.attn.qkv.bias",
          "blocks.0.attn.proj.bias", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.bias",
          "blocks.0.adaLN_modulation.1.bias", "final_layer.linear.bias", "final_layer.adaLN_modulation.1.bias"]
NORMS = ["blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.norm2.weight", "blocks.0.norm2.bias",
         "final_layer.norm_final.weight", "final_layer.norm_final.bias"]
TABLE = ["y_embedder.embedding_table.weight"]
GAMMAS = ["blocks.0.gamma_attn", "blocks.0.gamma_mlp"]


@pytest.mark.parametrize("preset,expect", [
    ("bitfit", BIASES + TABLE),
    ("difffit", BIASES + NORMS + TABLE + GAMMAS),
    ("finediffusion", BIASES + NORMS + TABLE),
    ("efdit", BIASES + NORMS + TABLE),
])
def test_preset_trains_exactly_its_parameters(preset, expect):
    m = tiny(depth=1)
    added = apply_peft(m, preset)
    trainable = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert trainable == sorted(expect)
    assert sorted(added) == sorted(n for n in expect if n in NORMS + GAMMAS)   # what the base checkpoint lacks


def test_full_preset_trains_everything_but_the_fixed_pos_embed():
    m = tiny(depth=1)
    apply_peft(m, "full")
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    assert frozen == ["pos_embed"]


def test_efdit_preset_trains_the_tiered_tables():
    te = TieredEmbedder(6, 3, PARENT, 32, mode="sum", null_prob=0.1, learned_null_sub=True)
    m = tiny(depth=1, y_embedder=te)
    apply_peft(m, "efdit")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {"y_embedder.sub_table.weight", "y_embedder.super_table.weight", "y_embedder.null_sub",
            "y_embedder.null_embedding"} <= trainable


# ---- Tiered Embedder ------------------------------------------------------------------------------------------
def sum_te(**kw):
    te = TieredEmbedder(6, 3, PARENT, 8, **{"mode": "sum", **kw})
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in te.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return te


def test_label_id_space_of_the_tiered_embedder():
    te = sum_te(null_prob=0.1)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    assert te.super_labels(y).tolist() == [6, 6, 7, 7, 7, 8]
    assert te.super_labels(torch.tensor([6, 7, 8])).tolist() == [6, 7, 8]   # superclass labels map to themselves
    assert te.null_labels(y).tolist() == [9] * 6
    assert te.num_classes == 6 and te.null_id == 9


def test_finediffusion_mode_embeds_each_label_as_its_own_row():
    te = TieredEmbedder(6, 3, PARENT, 8, mode="finediffusion", dropout_prob=0.1)
    y = torch.tensor([0, 2, 5])
    W = te.embedding_table.weight
    torch.testing.assert_close(te(y, train=False), W[[0, 2, 5]], rtol=0, atol=0)
    torch.testing.assert_close(te(te.super_labels(y), train=False), W[[6, 7, 8]], rtol=0, atol=0)
    # dropout (forced) replaces a subclass by its superclass row
    torch.testing.assert_close(te(y, train=False, force_drop_ids=torch.tensor([1, 0, 1])), W[[6, 2, 8]], rtol=0, atol=0)


def test_sum_mode_learned_null_sub_goes_to_superclass_labels_only():
    te = sum_te(null_prob=0.1, learned_null_sub=True)
    y = torch.tensor([0, 3, 5])
    emb_sub = te(y, train=False)
    torch.testing.assert_close(emb_sub, te.sub_table.weight[y] + te.super_table.weight[PARENT[y]], rtol=0, atol=1e-6)
    torch.testing.assert_close(te(te.super_labels(y), train=False),
                               te.super_table.weight[PARENT[y]] + te.null_sub, rtol=0, atol=1e-6)
    torch.testing.assert_close(te(te.null_labels(y), train=False), te.null_embedding.expand(3, 8), rtol=0, atol=0)


def test_forced_drop_is_deterministic_and_sends_subclasses_to_their_superclass():
    te = sum_te(dropout_prob=0.5, null_prob=0.5)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 8, 9])       # subclasses, superclass labels, the null label
    force = torch.ones_like(y)
    for _ in range(20):   # a forced drop never goes to null at random
        assert te.token_drop(y, force).tolist() == [6, 6, 7, 7, 7, 8, 6, 8, 9]
        assert te.token_drop(y, torch.zeros_like(y)).tolist() == y.tolist()


def test_dropout_leaves_superclass_and_null_labels_alone():
    te = sum_te(dropout_prob=1.0)
    labels = torch.tensor([6, 7, 8] * 50)
    assert torch.equal(te.token_drop(labels), labels)
    te_null = sum_te(dropout_prob=1.0, null_prob=0.1)
    nulls = torch.full((50,), 9)
    assert torch.equal(te_null.token_drop(nulls, torch.ones_like(nulls)), nulls)


@pytest.mark.parametrize("mode", ["sum", "finediffusion"])
def test_dropout_rates_to_superclass_and_null(mode):
    """P(superclass) = p·(1 − p_null), P(null) = p_null, P(kept) = (1 − p)·(1 − p_null), with p ≠ 1/2 so that
    a comparison the wrong way round shows."""
    p, p_null = 0.3, (0.1 if mode == "sum" else 0.0)
    te = TieredEmbedder(6, 3, PARENT, 8, mode=mode, dropout_prob=p, null_prob=p_null)
    torch.manual_seed(0)
    y = torch.randint(0, 6, (40000,))
    out = te.token_drop(y)
    to_super, to_null, kept = out == te.super_labels(y), out == te.null_id, out == y
    assert bool((to_super | to_null | kept).all())
    assert to_super.float().mean().item() == pytest.approx(p * (1 - p_null), abs=0.01)
    assert to_null.float().mean().item() == pytest.approx(p_null, abs=0.01)
    assert kept.float().mean().item() == pytest.approx((1 - p) * (1 - p_null), abs=0.01)


def test_training_forward_drops_to_null_without_superclass_dropout():
    te = sum_te(dropout_prob=0.0, null_prob=0.5)
    y = torch.zeros(4000, dtype=torch.long)
    torch.manual_seed(0)
    emb = te(y, train=True)
    is_null = (emb == te.null_embedding).all(-1)
    assert is_null.float().mean().item() == pytest.approx(0.5, abs=0.03)
    torch.testing.assert_close(emb[~is_null], (te.sub_table.weight[0] + te.super_table.weight[0]).expand(
        int((~is_null).sum()), 8), rtol=0, atol=1e-6)
    assert not (te(y, train=False) == te.null_embedding).all(-1).any()   # no dropout at evaluation


def test_flat_label_dropout_rate_and_null_id():
    le = LabelEmbedder(4, 8, dropout_prob=0.3)
    y = torch.randint(0, 4, (40000,), generator=torch.Generator().manual_seed(0))
    out = le.token_drop(y, generator=torch.Generator().manual_seed(1))
    dropped = out != y
    assert bool((out[dropped] == 4).all())
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.01)
