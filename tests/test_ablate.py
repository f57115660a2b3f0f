"""`efdit ablate`: the variant sets and the reuse of a trained model across sampling-only variants."""
import pytest

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


def test_ablation_over_seeds_chooses_guidance_on_holdout_and_pairs_by_seed(tmp_path, monkeypatch):
    """Two variants sharing a training config (different guidance) × 2 seeds: each seed trains once, the guidance
    is chosen on the held-out split, rows carry intervals over seeds, the second variant's Δ to the first has a
    verdict, and a rerun reuses everything."""
    import json

    import efdit.engine.evaluate as E
    monkeypatch.setenv("EFDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(E, "JUDGE_PER_CLASS", 10)   # a small judge: this test is about the protocol
    variants = {"cfg 1": {"sample.guidance": "cfg"}, "cfg 1 again": {"sample.guidance": "cfg"}}
    ov = {"total_images": 64, "threads": 1, "data.holdout_per_class": 4, "sample.steps": "2", "init_from": ""}
    calls = []
    real = ablate.train
    monkeypatch.setattr(ablate, "train", lambda cfg, progress=True: (calls.append(cfg.run_dir), real(cfg, progress))[1])
    out = ablate.run_ablation("digits-tiny", tmp_path / "abl", variants, ov, n_per_class=4, progress=False,
                              seeds=[0, 1], scales=[1.0, 3.0], sweep_per_class=4)
    assert len(calls) == 2                                              # one training per seed, shared by both arms
    summary = json.loads((tmp_path / "abl" / "ablation.json").read_text())["variants"]
    fd = summary["cfg 1"]["fd_effnetlite0"]
    assert fd["low"] <= fd["mean"] <= fd["high"] and len(fd["per_seed"]) == 2
    delta = summary["cfg 1 again"]["delta_fd_effnetlite0"]                # the same model, scale and noise: zero
    assert delta["mean"] == 0 and delta["low"] == delta["high"] == 0 and delta["verdict"] == "no effect"
    rec = json.loads((tmp_path / "abl" / "cfg-1" / "seed-1" / "metrics.json").read_text())
    assert rec["seed"] == 1 and len(rec["guidance_sweep"]) == 2 and rec["cfg_scale"] in (1.0, 3.0)
    text = out.read_text()
    assert "| cfg 1 again |" in text and "no effect" in text and "[" in text
    calls.clear()
    ablate.run_ablation("digits-tiny", tmp_path / "abl", variants, ov, n_per_class=4, progress=False,
                        seeds=[0, 1], scales=[1.0, 3.0], sweep_per_class=4)
    assert calls == []                                                  # a rerun trains nothing


def test_two_term_variants_try_both_scales():
    trials = ablate.guidance_trials({"two_term": True}, [2.0, 3.0])
    assert {(t["sample.cfg_scale"], t["sample.cfg_scale_super"]) for t in trials} == \
        {(2.0, 1.0), (2.0, 2.0), (3.0, 1.0), (3.0, 2.0)}
    assert ablate.guidance_trials({}, [2.0]) == [{"sample.cfg_scale": 2.0}]


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


def test_unsharp_mask_baseline_by_hand():
    import torch

    from efdit.commands.hrig import unsharp_mask
    flat = torch.full((1, 3, 8, 8), 100, dtype=torch.uint8)
    assert torch.equal(unsharp_mask(flat, 1.0), flat)                       # nothing to sharpen
    x = torch.zeros(1, 1, 9, 9, dtype=torch.uint8)
    x[..., 4, 4] = 100
    y = unsharp_mask(x, 1.0)
    assert y[0, 0, 4, 4] > 100 and y[0, 0, 4, 3] == 0                        # the peak grows, its ring clips at 0
    assert torch.equal(unsharp_mask(x, 0.0), x)


def test_hrig_sweep_rows_share_noise_and_measure_spectra(tmp_path, monkeypatch):
    import efdit.engine.evaluate as E
    from efdit.commands.hrig import sweep
    from efdit.engine.train import train
    monkeypatch.setenv("EFDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(E, "JUDGE_PER_CLASS", 10)
    train(build_config("digits-tiny", {"run_dir": str(tmp_path / "run"), "total_images": 32, "threads": 1}),
          progress=False)
    out = sweep(str(tmp_path / "run"), ["gain=0"], n_per_class=2, out_dir=str(tmp_path / "sw"), progress=False,
                overrides={"sample.steps": "3"}, unsharp=[1.0])
    text = out.read_text()
    assert "| off |" in text and "`gain=0`" in text and "`unsharp=1`" in text and "spectral distance" in text
    gain0 = [line for line in text.splitlines() if "`gain=0`" in line][0]
    assert "+0.0 [+0.0, +0.0] no effect" in gain0                           # gain 0: bit-identical samples
