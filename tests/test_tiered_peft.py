"""Tiered Embedder, superclass-guided CFG and PEFT presets."""
import pytest
import torch

from efdit.config import build_config
from efdit.diffusion import Guidance
from efdit.diffusion.samplers import _model_forward
from efdit.errors import EfditError
from efdit.models.dit import DiT, build_dit
from efdit.models.embedders import TieredEmbedder
from efdit.models.peft import apply_peft, parameter_report

PARENT = torch.tensor([0, 0, 1, 1, 1, 2])  # 6 subclasses under 3 superclasses


def tiny(y_embedder=None, **kw):
    cfg = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=6)
    cfg.update(kw)
    return DiT(**cfg, y_embedder=y_embedder)


def randomize(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


@pytest.mark.parametrize("mode", ["finediffusion", "sum"])
@pytest.mark.parametrize("ns,npar,trainable,total", [(10000, 11, 12_153_632, 685_640_480), (292, 25, 986_144, 674_472_992)])
def test_finediffusion_rule_parameter_counts(mode, ns, npar, trainable, total):
    parent = torch.arange(ns) % npar
    with torch.device("meta"):
        te = TieredEmbedder(ns, npar, parent, 1152, mode=mode)
        m = build_dit("DiT-XL/2", input_size=32, y_embedder=te)
        apply_peft(m, "efdit")
    assert sum(p.numel() for p in m.parameters()) == total
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == trainable
    if ns == 10000:
        assert "1.7726%" in parameter_report(m)


def test_sum_mode_embeds_sub_plus_super_and_superclass_labels():
    te = TieredEmbedder(6, 3, PARENT, 8, dropout_prob=0.0, mode="sum", null_prob=0.1)
    y = torch.tensor([0, 4, 5])
    emb = te(y, train=False)
    torch.testing.assert_close(emb, te.sub_table.weight[y] + te.super_table.weight[PARENT[y]])
    sup = te.super_labels(y)
    assert sup.tolist() == [6, 7, 8]
    torch.testing.assert_close(te(sup, train=False), te.super_table.weight[PARENT[y]])
    torch.testing.assert_close(te(te.null_labels(y), train=False), te.null_embedding.expand(3, 8))


@pytest.mark.parametrize("mode,null", [("finediffusion", 0.0), ("sum", 0.0), ("sum", 0.2)])
def test_dropout_never_yields_a_subclass_of_another_superclass(mode, null):
    te = TieredEmbedder(6, 3, PARENT, 8, dropout_prob=0.5, mode=mode, null_prob=null)
    y = torch.randint(0, 6, (5000,))
    out = te.token_drop(y)
    kept = out == y
    to_super = out == te.super_labels(y)
    to_null = out == te.null_id
    assert (kept | to_super | (to_null if null else torch.zeros_like(kept))).all()
    assert abs(to_super.float().mean() - 0.5 * (1 - null)) < 0.05 and not (out[~kept & ~to_null] < 6).any()
    assert (to_null.float().mean() > 0.1) == (null > 0)


def test_finediffusion_mode_has_no_null_label():
    te = TieredEmbedder(6, 3, PARENT, 8, mode="finediffusion")
    with pytest.raises(EfditError, match="no null label"):
        te.null_labels(torch.tensor([0]))
    with pytest.raises(ValueError, match="finediffusion has no null row"):
        TieredEmbedder(6, 3, PARENT, 8, mode="finediffusion", null_prob=0.1)


@pytest.mark.parametrize("mode", ["finediffusion", "sum"])
def test_superclass_cfg_scale_one_equals_subclass_prediction(mode):
    m = randomize(tiny(TieredEmbedder(6, 3, PARENT, 32, mode=mode)))
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([5, 100, 500, 900]), torch.tensor([0, 2, 3, 5])
    out = _model_forward(m, x, t, y, Guidance("super", 1.0), {}, None, 1)
    torch.testing.assert_close(out, m(x, t, y), rtol=1e-5, atol=1e-6)
    out4 = _model_forward(m, x, t, y, Guidance("super", 4.0), {}, None, 1)
    e_sup = m(x, t, m.y_embedder.super_labels(y))[:, :1]
    torch.testing.assert_close(out4[:, :1], e_sup + 4 * (m(x, t, y)[:, :1] - e_sup), rtol=1e-4, atol=1e-5)


def test_two_term_guidance_batches_three_branches():
    m = randomize(tiny(TieredEmbedder(6, 3, PARENT, 32, mode="sum", null_prob=0.1)))
    seen = []
    m.register_forward_pre_hook(lambda mod, args: seen.append(args[2].clone()))
    _model_forward(m, torch.randn(2, 1, 8, 8), torch.tensor([5, 5]), torch.tensor([1, 4]),
                   Guidance("two_term", 3.0, 2.0), {}, None, 1)
    assert seen[-1].tolist() == [1, 4, 6, 7, 9, 9]


@pytest.mark.parametrize("preset", ["bitfit", "difffit", "finediffusion", "efdit", "lora"])
def test_peft_adds_identity_modules_and_freezes_the_rest(preset):
    m = randomize(tiny())
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 700]), torch.tensor([1, 4])
    before = m(x, t, y)
    frozen_before = {k: v.clone() for k, v in m.state_dict().items()}
    added = apply_peft(m, preset, lora_rank=2)
    m.eval()
    torch.testing.assert_close(m(x, t, y), before, rtol=1e-5, atol=1e-6)  # identity start
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "y_embedder.embedding_table.weight" in trainable and "pos_embed" not in trainable
    assert not any(n.endswith("qkv.weight") or n.endswith("base_layer.weight") for n in trainable)
    if preset == "lora":
        D = 32
        per_block = 2 * (D + 3 * D) + 2 * (D + D) + 2 * (D + 4 * D) + 2 * (4 * D + D)  # r * (in + out), r = 2
        assert sum(m.state_dict()[k].numel() for k in added) == 2 * per_block
        assert all("lora_" in n for n in trainable if not n.startswith("y_embedder"))
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m.train()
    m(x, t, y).square().mean().backward()
    opt.step()
    after = m.state_dict()
    changed = {k for k in frozen_before for k2 in after if k2.replace("base_layer.", "") == k
               and not torch.equal(frozen_before[k], after[k2])}
    assert changed, "nothing trained"
    for k in changed:
        assert k.startswith("y_embedder.") or k.endswith(".bias"), k  # base weights unchanged


def test_unknown_peft_preset():
    with pytest.raises(EfditError, match="did you mean 'difffit'"):
        apply_peft(tiny(), "diffit")


def test_finetune_from_a_checkpoint_with_another_class_count(tmp_path):
    from efdit.engine.files import load_model
    from efdit.engine.train import train
    base = build_config("digits-tiny", {"run_dir": str(tmp_path / "base"), "total_images": 320,
                                        "condition_on": "super", "threads": 1})
    train(base, progress=False)
    base_model, _, h, _ = load_model(tmp_path / "base" / "model.safetensors")
    assert base_model.y_embedder.num_classes == 3
    from efdit.engine.build import build_model
    from efdit.engine.finetune import init_from_base
    ft = build_config("digits-tiny", {"run_dir": str(tmp_path / "ft"), "total_images": 32, "embedder": "tiered",
                                      "peft": "efdit", "init_from": str(tmp_path / "base" / "model.safetensors"),
                                      "threads": 1})
    model = build_model(ft, h, (8, 8), 1)   # the fine-tuning run's initialisation, before its first step
    init_from_base(model, ft, h, verbose=False)
    model.eval()
    assert model.y_embedder.num_classes == 10
    x, t = torch.randn(10, 1, 8, 8), torch.full((10,), 300)
    sub = torch.arange(10)
    # every subclass starts exactly where its superclass was in the base model
    torch.testing.assert_close(model(x, t, sub), base_model(x, t, h.parent[sub]), rtol=1e-4, atol=1e-5)
    ft.train.total_images = 320
    ft.run_dir = str(tmp_path / "ft2")
    train(ft, progress=False)
    model2, _, _, _ = load_model(tmp_path / "ft2" / "model.safetensors")
    base_sd = base_model.state_dict()
    for k, v in model2.state_dict().items():
        if k.endswith(".weight") and k in base_sd and "norm" not in k and not k.startswith("y_embedder"):
            assert torch.equal(v, base_sd[k]), k  # frozen under the efdit preset


# ---- attention adaptation: what trains when ProAttention replaces the pretrained attention --------------------
def attention_names(m):
    """The trainable tensors of the blocks' attention qkv / proj (biases aside: the rules train those)."""
    return sorted(n for n, p in m.named_parameters() if p.requires_grad and ".attn." in n and not n.endswith(".bias"))


def lora_names(depth=2):
    return sorted(f"blocks.{i}.attn.{layer}.{f}.default.weight" for i in range(depth) for layer in ("qkv", "proj")
                  for f in ("lora_A", "lora_B"))


def weight_names(depth=2):
    return sorted(f"blocks.{i}.attn.{layer}.weight" for i in range(depth) for layer in ("qkv", "proj"))


@pytest.mark.parametrize("backend,preset,adapt,expected", [
    ("sdpa", "finediffusion", "auto", []),
    ("math", "finediffusion", "auto", []),
    ("proxy", "finediffusion", "auto", lora_names()),
    ("robust", "efdit", "auto", lora_names()),
    ("proxy", "bitfit", "auto", lora_names()),
    ("proxy", "difffit", "auto", lora_names()),
    ("proxy", "finediffusion", "frozen", []),
    ("proxy", "finediffusion", "lora", lora_names()),
    ("proxy", "finediffusion", "full", weight_names()),
    ("sdpa", "finediffusion", "lora", lora_names()),
    ("sdpa", "finediffusion", "full", weight_names()),
    ("proxy", "full", "auto", weight_names()),         # everything trains already: no adapters added
    ("proxy", "full", "lora", weight_names()),
])
def test_attention_adaptation_trains_these_tensors(backend, preset, adapt, expected):
    m = tiny(attn_backend=backend)
    added = apply_peft(m, preset, lora_rank=2, attn_adapt=adapt)
    assert attention_names(m) == expected
    assert m.attn_adapt == ("lora" if "lora_A" in str(expected) else "full" if expected and preset != "full"
                            else "frozen")
    assert set(lora_names()) <= set(added) if "lora_A" in str(expected) else not any("lora_" in k for k in added)
    rule = {n for n, p in apply_and_return(tiny(), preset).named_parameters() if p.requires_grad}
    # the rule's own set is unchanged: adaptation only adds the attention tensors above
    assert {n.replace("base_layer.", "") for n, p in m.named_parameters() if p.requires_grad} == rule | set(expected)


def apply_and_return(m, preset):
    apply_peft(m, preset, lora_rank=2, attn_adapt="frozen")
    return m


def test_lora_preset_under_proxy_keeps_its_own_adapters_only():
    m = tiny(attn_backend="proxy")
    apply_peft(m, "lora", lora_rank=2)
    names = dict(m.named_parameters())
    assert m.attn_adapt == "frozen" and "blocks.0.mlp.fc1.lora_A.default.weight" in names
    assert sum("blocks.0.attn.qkv.lora_A" in n for n in names) == 1      # the preset's adapter, not a second one


def test_attention_lora_starts_as_the_frozen_model_and_then_adapts_it():
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 700]), torch.tensor([1, 4])
    m0 = randomize(tiny(attn_backend="proxy"))
    apply_peft(m0, "finediffusion", attn_adapt="frozen")
    m = randomize(tiny(attn_backend="proxy"))
    added = apply_peft(m, "finediffusion", lora_rank=2)
    # the same peft LoRA as the lora preset, on the attention only: qkv / proj wrapped, the MLP untouched
    wrapped = {k.replace("base_layer.", "") for k in m.state_dict() if "base_layer" in k}
    assert wrapped == {f"blocks.{i}.attn.{layer}.{leaf}" for i in range(2) for layer in ("qkv", "proj")
                       for leaf in ("weight", "bias")}
    assert set(lora_names()) == {k for k in added if "lora_" in k}
    m0.eval(), m.eval()
    with torch.no_grad():
        assert torch.equal(m(x, t, y), m0(x, t, y))   # B = 0: exactly the frozen model
    m.train()
    m.y_embedder.dropout_prob = 0.0
    (m(x, t, y) - torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3))).square().mean().backward()
    params = dict(m.named_parameters())
    assert params["blocks.0.attn.qkv.base_layer.weight"].grad is None
    assert params["blocks.1.attn.proj.lora_B.default.weight"].grad.abs().sum() > 0
    # y = x Wᵀ + b + s·(x Aᵀ) Bᵀ, s = α / r = 1
    layer = m.blocks[0].attn.qkv
    A, B = params["blocks.0.attn.qkv.lora_A.default.weight"], params["blocks.0.attn.qkv.lora_B.default.weight"]
    with torch.no_grad():
        B.normal_()
        v = torch.randn(4, A.shape[1])
        W, b = layer.base_layer.weight, layer.base_layer.bias
        torch.testing.assert_close(layer(v), v @ W.T + b + (v @ A.T) @ B.T)


@pytest.mark.parametrize("preset,adapt", [("lora", "auto"), ("finediffusion", "lora")])
def test_lora_models_load_a_plain_base_checkpoint(preset, adapt):
    """A base saved without adapters fills a LoRA-wrapped model (`qkv.weight` -> `qkv.base_layer.weight`), which
    then computes exactly the base: before, the lora preset refused every base ("does not fit the model")."""
    from efdit.models.checkpoint import load_state_dict_checked
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 700]), torch.tensor([1, 4])
    base = randomize(tiny(attn_backend="proxy")).eval()
    m = tiny(attn_backend="proxy")
    added = apply_peft(m, preset, lora_rank=2, attn_adapt=adapt)
    load_state_dict_checked(m, base.state_dict(), allow_missing=tuple(added), verbose=False)
    with torch.no_grad():
        assert torch.equal(m.eval()(x, t, y), base(x, t, y))


def test_sdpa_default_builds_and_trains_exactly_as_before():
    """model.attn_adapt's default (auto) leaves an SDPA model alone: same tensors, same trainable set, same random
    draws, the rule's parameter count."""
    from efdit.config import Config, get_preset
    from efdit.data.hierarchy import Hierarchy
    from efdit.engine.build import build_model
    assert Config().model.attn_adapt == "auto"
    h = Hierarchy([f"s{i}" for i in range(10)], ["a", "b", "c", "d"], torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3]))
    builds = []
    for adapt in ("auto", "frozen"):
        cfg = get_preset("fmnist-finetune")
        cfg.model.attn_adapt = adapt
        torch.manual_seed(0)
        m = build_model(cfg, h, (28, 28), 1)
        builds.append((m.state_dict(), {n for n, p in m.named_parameters() if p.requires_grad}, m.peft_added,
                       torch.rand(3), m.attn_adapt))
    (sd_a, tr_a, add_a, r_a, mode_a), (sd_f, tr_f, add_f, r_f, _) = builds
    assert mode_a == "frozen" and add_a == add_f and tr_a == tr_f and torch.equal(r_a, r_f)
    assert sd_a.keys() == sd_f.keys() and all(torch.equal(sd_a[k], sd_f[k]) for k in sd_a)
    assert not any(".attn." in n and not n.endswith(".bias") for n in tr_a)
    cfg = get_preset("fmnist-finetune")
    m = build_model(cfg, h, (28, 28), 1)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 33_824     # 0.46 %, as before


def test_build_model_adapts_proxy_attention_and_the_paper_presets_say_so():
    from efdit.config import PRESETS, build_config
    from efdit.data.hierarchy import Hierarchy
    from efdit.engine.build import build_model
    h = Hierarchy([f"s{i}" for i in range(10)], ["a", "b", "c", "d"], torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3]))
    cfg = build_config("fmnist-finetune", {"attn_backend": "proxy", "attn_kwargs": "pool=2"})
    m = build_model(cfg, h, (28, 28), 1)
    assert m.attn_adapt == "lora" and attention_names(m) == lora_names(6)
    n_lora = 6 * 8 * ((256 + 768) + (256 + 256))     # r (in + out) on qkv and proj, r = 8
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 33_824 + n_lora
    assert "of which attention (lora on qkv / proj) 73,728" in parameter_report(m)
    m = build_model(build_config("fmnist-finetune", {"attn_backend": "proxy", "attn_adapt": "frozen"}), h, (28, 28), 1)
    assert m.attn_adapt == "frozen" and attention_names(m) == []
    for data in ("inat21", "vegfru"):
        preset = PRESETS[f"{data}-dit-xl2-256-efdit"]
        assert preset["model.attn_backend"] == "proxy" and preset["model.attn_adapt"] == "lora"


def test_paper_preset_parameter_count_with_adapted_proxy_attention():
    """iNat 2021 mini (10,000 species, 11 supercategories): the efdit rule (1.77 %) plus LoRA r = 8 on the 28
    blocks' qkv / proj, 28 · 8 · ((1152 + 3456) + (1152 + 1152)) = 1,548,288 parameters."""
    from efdit.config import build_config
    from efdit.data.hierarchy import Hierarchy
    from efdit.engine.build import build_model
    h = Hierarchy([f"s{i}" for i in range(10000)], [f"k{i}" for i in range(11)], torch.arange(10000) % 11)
    with torch.device("meta"):
        m = build_model(build_config("inat21-dit-xl2-256-efdit", {}), h, (32, 32), 4)
    assert m.attn_adapt == "lora"
    assert sum(p.numel() for p in m.parameters()) == 685_640_480 + 1_548_288
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 12_153_632 + 1_548_288


def test_attn_adapt_choices_agree_and_bad_values_are_refused():
    from efdit.config import RULES, build_config
    from efdit.models.peft import ATTN_ADAPT
    assert RULES["model.attn_adapt"] == ATTN_ADAPT
    with pytest.raises(EfditError, match="--attn-adapt must be one of"):
        build_config("fmnist-finetune", {"attn-adapt": "lorra"})
    with pytest.raises(EfditError, match="model.attn_adapt must be one of"):
        apply_peft(tiny(), "efdit", attn_adapt="partial")
