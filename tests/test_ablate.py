"""`efdit ablate`: the variant sets and the reuse of a trained model across sampling-only variants."""
import pytest
import torch

import efdit.commands.ablate as ablate
from efdit.config import build_config
from efdit.errors import EfditError


def test_mechanism_variants_share_training_only_when_sampling_differs():
    keys = {name: ablate.training_key(build_config("fmnist-finetune", v))
            for name, v in ablate.mechanism_variants("gain=0.5").items()}
    assert keys["+ HRIG"] == keys["baseline (flat + null CFG)"]      # HRIG is a sampler hook: same weights
    others = [keys[k] for k in keys if k != "+ HRIG"]
    assert len(set(others)) == len(others)                            # TE, proxy, all: each trains its own
    cfg = build_config("fmnist-finetune", ablate.mechanism_variants("gain=0.5")["all"])
    assert (cfg.sample.hrig, cfg.model.attn_backend, cfg.model.embedder) == ("gain=0.5", "proxy", "tiered")


def test_run_ablation_trains_each_distinct_config_once(tmp_path, monkeypatch):
    trained, evaluated = [], []

    def fake_train(cfg, progress=True):
        trained.append(cfg.run_dir)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

    def fake_load(path):
        return M(), build_config("fmnist-finetune", {}), None, {"sha256": str(path)}

    def fake_eval(model, cfg, h, **kw):
        evaluated.append((kw["model_sha"], cfg.sample.hrig))
        return {"metrics": {"fd_effnetlite0": 1.0}, "floor": {"fd_effnetlite0": 0.5}}

    monkeypatch.setattr(ablate, "train", fake_train)
    monkeypatch.setattr(ablate, "load_model", fake_load)
    monkeypatch.setattr(ablate, "evaluate_model", fake_eval)
    monkeypatch.setattr(ablate, "read_log", lambda p: [{"img_per_s": 2.0, "loss": 0.1}])
    out = ablate.run_ablation("fmnist-finetune", tmp_path, ablate.mechanism_variants("gain=0.5"), {}, 2, False)
    assert len(trained) == 4 and len(evaluated) == 5
    sha, hrig = evaluated[2]                                          # "+ HRIG", in the set's order
    assert hrig == "gain=0.5" and "baseline" in sha                   # sampled the baseline's model
    assert evaluated[0] == (sha, "")                                  # the baseline itself: HRIG off
    text = out.read_text()
    assert text.count("\n| ") == 7 and "+ ProAttention (proxy)" in text  # header, 5 rows, floor


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(EfditError, match="unknown variant"):
        ablate.main(["--set", "mechanisms", "--variants", "+ HRIGG"])


def test_hrig_sweep_reuses_only_matching_rows(tmp_path):
    import json

    from efdit.commands.hrig import _reusable
    cfg = build_config("fmnist-finetune", {})
    s = cfg.sample
    rec = {"hrig": "gain=0.5", "model_sha256": "abc", "n_per_class": 20, "sampler": s.sampler, "steps": s.steps,
           "seed": s.seed, "cfg_scale": s.cfg_scale, "metrics": {}}
    p = tmp_path / "m.json"
    p.write_text(json.dumps(rec))
    assert _reusable(p, "gain=0.5", "abc", 20, cfg) == rec
    assert _reusable(p, "gain=0.3", "abc", 20, cfg) is None          # another spec
    assert _reusable(p, "gain=0.5", "xyz", 20, cfg) is None          # another model
    assert _reusable(p, "gain=0.5", "abc", 10, cfg) is None          # another N
    cfg.sample.steps = "25"
    assert _reusable(p, "gain=0.5", "abc", 20, cfg) is None          # another sampler setting
