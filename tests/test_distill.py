"""Guidance distillation: the guidance embedding (off: the model as before), the student at its start (the teacher's
conditional branch), the target (the teacher's guided forward), the training (the gap to the guided output shrinks
where w was drawn), one forward per sampling step with every sampler and hook, exact resume, the student's model
file through `efdit sample`."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from tiny import TINY, randomize

from efdit.cli import main as cli_main
from efdit.config import build_config
from efdit.diffusion import Guidance, guided_forward
from efdit.engine.build import build_diffusion, build_model
from efdit.engine.datasets import load_data
from efdit.engine.distill import distill, distill_guidance, guided_target, init_student, plan_distillation
from efdit.engine.files import load_model, save_model
from efdit.engine.generate import generate, guidance_of, sampling_kwargs
from efdit.engine.paths import shipped
from efdit.errors import EfditError
from efdit.models.checkpoint import load_safetensors
from efdit.models.dit import DiT

FAST = {"threads": 1, "log_every": 10 ** 6, "ckpt_every": 10 ** 6, "sample.per_class": 1, "sample.steps": "2"}


def teacher_config(**over):
    return build_config("digits-tiny", {"threads": 1, "hidden_size": 32, "num_heads": 2, **over})


@pytest.fixture(scope="module")
def digits():
    return load_data(teacher_config())


def make_teacher(path, ds, seed: int = 1, **over):
    """A digits teacher with random weights (ε_c and ε_∅ differ), saved as a model file."""
    cfg = teacher_config(**over)
    model = randomize(build_model(cfg, ds.hierarchy, ds.image_size, ds.num_channels), seed)
    save_model(path, model, cfg, ds.hierarchy, ds.image_size, ds.num_channels)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, digits):
    return make_teacher(tmp_path_factory.mktemp("teacher") / "teacher.safetensors", digits)


def noised_batch(ds, n: int = 64, seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    x0, sub, _ = ds.sample_batch(n, g)
    t = torch.randint(0, 1000, (n,), generator=g)
    x_t = build_diffusion(teacher_config()).q_sample(x0, t, torch.randn(x0.shape, generator=g))
    return x_t, t, sub


# ---- the option off: the model as before ---------------------------------------------------------------------
def test_guidance_embed_off_keeps_state_dicts_and_outputs():
    # the same random draws as before the option existed (sums of the seed-0 TINY init, computed before it)
    torch.manual_seed(0)
    model = DiT(**TINY)
    params = [p.double() for p in model.state_dict().values()]
    assert len(params) == 32 and not any(k.startswith("w_embedder") for k in model.state_dict())
    assert sum(float(p.sum()) for p in params) == pytest.approx(249.29873143918712, rel=1e-9)
    assert sum(float((p * p).sum()) for p in params) == pytest.approx(631.6793976316351, rel=1e-9)
    # off explicitly = the default, bit for bit; no w is taken
    torch.manual_seed(0)
    off = DiT(**TINY, guidance_embed=False)
    assert off.w_embedder is None and list(off.state_dict()) == list(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(off.state_dict().values(), model.state_dict().values()))
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 400, 999]), torch.tensor([0, 1, 4])
    randomize(model), randomize(off)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), off(x, t, y))
    with pytest.raises(TypeError, match="w needs a guidance-distilled model"):
        model(x, t, y, w=2.0)
    # the shipped model file: its keys exactly, strict load, its output as before the option (computed before it)
    base, cfg, _, _ = load_model(shipped("fmnist-base"))
    tensors, _, _ = load_safetensors(shipped("fmnist-base"))
    assert not cfg.model.guidance_embed and set(base.state_dict()) == set(tensors)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 28, 28, generator=g)
    with torch.no_grad():
        out = base(x, torch.tensor([0, 250, 500, 999]), torch.tensor([0, 1, 2, 4])).double()
    assert float(out.sum()) == pytest.approx(1015.783780797603, rel=1e-5)
    assert float(out.abs().sum()) == pytest.approx(3512.2246983975783, rel=1e-5)


# ---- the student at its start, the target ------------------------------------------------------------------
def test_student_starts_as_the_teachers_conditional_branch(teacher, digits):
    model, cfg, h, meta = load_model(teacher)
    scfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, guidance_embed=True))
    student = init_student(model, scfg, h, tuple(meta["input_size"]), meta["channels"]).eval()
    assert sorted(set(student.state_dict()) - set(model.state_dict())) == [
        "w_embedder.mlp.0.bias", "w_embedder.mlp.0.weight", "w_embedder.mlp.2.bias", "w_embedder.mlp.2.weight"]
    x_t, t, y = noised_batch(digits, 16)
    with torch.no_grad():
        cond = model(x_t, t, y)
        for w in (1.0, 2.0, 7.5, torch.linspace(0, 9, 16)):
            assert torch.equal(student(x_t, t, y, w=w), cond)
    assert all(p.requires_grad for n, p in student.named_parameters() if n != "pos_embed")
    with pytest.raises(EfditError, match="guidance-distilled"):
        student(x_t, t, y)


@pytest.mark.parametrize("mode", ["cfg", "super", "two_term"])
def test_target_is_the_teachers_guided_forward(mode, tmp_path, digits):
    over = {"model.embedder": "tiered", "model.null_prob": 0.1} if mode != "cfg" else {}
    model = load_model(make_teacher(tmp_path / "t.safetensors", digits, **over))[0]
    x_t, t, y = noised_batch(digits, 8)
    g = Guidance(mode, 1.0, 1.5, "all")
    w = torch.tensor([1.0, 2.0, 3.5, 5.0, 0.0, 1.0, 4.0, 2.5])
    with torch.no_grad():
        target = guided_target(model, x_t, t, y, g, w)
        for i, wi in enumerate(w.tolist()):
            ref = guided_forward(model, x_t[i:i + 1], t[i:i + 1], y[i:i + 1], dataclasses.replace(g, scale=wi))
            assert torch.allclose(target[i:i + 1], ref, atol=1e-6, rtol=1e-5), (mode, wi)
        assert not torch.allclose(target[:, :1], model(x_t, t, y)[:, :1])   # guidance changes it
        assert torch.allclose(target[:, 1:], model(x_t, t, y)[:, 1:], atol=1e-6)  # learned Σ: conditional


# ---- training ------------------------------------------------------------------------------------------------
def outputs(student, teacher_model, ds, w: float):
    """(student's ε, the teacher's guided ε) at w on held noisy images: (256, 1, 8, 8) each."""
    x_t, t, y = noised_batch(ds, 256)
    W = torch.full((len(t),), float(w))
    with torch.no_grad():
        target = guided_target(teacher_model, x_t, t, y, Guidance("cfg", 1.0), W)
        pred = student(x_t, t, y, w=W) if student.guidance_embed else student(x_t, t, y)
    return pred[:, :1], target[:, :1]


def gap(student, teacher_model, ds, w: float) -> float:
    """mean |student(w) − the teacher's guided output at w| over the ε channel."""
    pred, target = outputs(student, teacher_model, ds, w)
    return float((pred - target).abs().mean())


def test_distillation_closes_the_gap_where_w_was_drawn(teacher, digits, tmp_path):
    plan = plan_distillation(tmp_path / "run", str(teacher), 1.0, 3.0, None,
                             {**FAST, "lr": "1e-3", "batch_size": 16, "total_images": 120 * 16})
    distill(plan, progress=False, dataset=digits)
    student, teacher_model = load_model(tmp_path / "run")[0], plan.teacher
    # the gap to the guided output, relative to the start (the conditional output: a gap of (w − 1)·|ε_c − ε_∅|)
    seen, unseen = (gap(student, teacher_model, digits, w) / gap(teacher_model, teacher_model, digits, w)
                    for w in (2.0, 8.0))
    assert seen < 0.6, seen                    # a measurable step towards the guided output where w was drawn
    assert unseen > seen + 0.2, (seen, unseen)  # far less at a w it never saw
    # and the student's change with w follows the teacher's guided change (a student ignoring w would score 1)
    (s_lo, g_lo), (s_hi, g_hi) = outputs(student, teacher_model, digits, 1.5), outputs(student, teacher_model,
                                                                                        digits, 2.5)
    follow = float(((s_hi - s_lo) - (g_hi - g_lo)).abs().mean() / (g_hi - g_lo).abs().mean())
    assert follow < 0.95, follow


# ---- sampling: one forward per step -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def student_run(teacher, digits, tmp_path_factory):
    run = tmp_path_factory.mktemp("student") / "run"
    over = {**FAST, "batch_size": 8, "total_images": 16 * 8, "lr": "1e-3"}
    assert cli_main(["distill-guidance", str(run), "--teacher", str(teacher), "--no-progress", "--w-max", "4",
                     *[f"--{k}={v}" for k, v in over.items()]]) == 0
    return run


class Counter:
    def __init__(self, model):
        self.calls, self.rows = 0, []
        model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        self.rows.append(args[0].shape[0])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m", "unipc"])
def test_student_samples_with_one_forward_per_step(sampler, student_run):
    student, cfg, h, _ = load_model(student_run)
    teacher, tcfg, _, _ = load_model(cfg.train.init_from)
    labels = torch.arange(4)
    for c in (cfg, tcfg):
        c.sample.sampler, c.sample.steps, c.sample.cfg_scale = sampler, "6", 3.0
    assert guidance_of(cfg).mode == "none" and sampling_kwargs(cfg) == {"w": 3.0}
    s_count, t_count = Counter(student), Counter(teacher)
    generate(student, cfg, labels, progress=False)
    generate(teacher, tcfg, labels, progress=False)
    assert s_count.calls == 6 and s_count.rows == [4] * 6       # one N-row forward per step
    assert t_count.calls == 6 and t_count.rows == [8] * 6       # the guided teacher: two branches per step
    for hook in ({"hrig": "band=0:999,gain=-0.3"}, {"accel": "fora", "accel_kwargs": "interval=2"},
                 {"accel": "taylorseer", "accel_kwargs": "interval=2,order=1"}):
        c = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, **hook))
        n = s_count.calls
        images = generate(student, c, labels, progress=False)
        assert images.shape == (4, 1, 8, 8) and s_count.calls - n == 6 and set(s_count.rows) == {4}


def test_the_sampling_scale_reaches_the_student(student_run, digits):
    student, cfg, _, _ = load_model(student_run)
    seen = []
    student.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("w")), with_kwargs=True)
    cfg.sample.steps, cfg.sample.cfg_scale = "3", 3.25
    generate(student, cfg, torch.arange(3), progress=False)
    assert seen == [3.25] * 3
    x_t, t, y = noised_batch(digits, 8)
    with torch.no_grad():   # trained: w changes the output
        assert not torch.allclose(student(x_t, t, y, w=1.5), student(x_t, t, y, w=3.5))


# ---- the run: resume, the model file, validation -------------------------------------------------------------
def test_resume_is_exact(teacher, digits, tmp_path):
    over = {**FAST, "batch_size": 8, "lr": "1e-3", "log_every": 16}
    distill_guidance(tmp_path / "ref", str(teacher), overrides={**over, "total_images": 160}, progress=False,
                     dataset=digits)
    distill_guidance(tmp_path / "run", str(teacher), overrides={**over, "total_images": 80}, progress=False,
                     dataset=digits)
    distill_guidance(tmp_path / "run", None, overrides={**over, "total_images": 160}, progress=False,
                     dataset=digits)   # rerun: the teacher, w range and mode are the run's
    a, meta_a, _ = load_safetensors(tmp_path / "run" / "checkpoints" / "latest.safetensors")
    b, meta_b, _ = load_safetensors(tmp_path / "ref" / "checkpoints" / "latest.safetensors")
    assert meta_a["progress"]["step"] == meta_b["progress"]["step"] == 20 and set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k        # student, EMA, optimizer, RNG states
    steps = [line["step"] for line in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())]
    assert steps == [2 * i for i in range(1, 11)]
    with pytest.raises(EfditError, match="other settings.*w_max"):
        plan_distillation(tmp_path / "run", None, w_max=4.0, overrides=over)
    with pytest.raises(EfditError, match="another config.*train.lr"):
        distill_guidance(tmp_path / "run", None, overrides={**over, "lr": "2e-3"}, dataset=digits)
    with pytest.raises(EfditError, match="already guidance-distilled"):
        plan_distillation(tmp_path / "again", str(tmp_path / "run"), overrides=over)
    other = make_teacher(tmp_path / "other.safetensors", digits, seed=2)
    with pytest.raises(EfditError, match="distils the teacher with sha256"):
        plan_distillation(tmp_path / "run", str(other), overrides=over)


def test_student_model_file_samples_via_the_cli(student_run, tmp_path, monkeypatch):
    import efdit.engine.generate as G
    model, cfg, _, meta = load_model(student_run)
    assert cfg.model.guidance_embed and model.w_embedder is not None
    assert meta["distill"]["guidance"] == "cfg" and (meta["distill"]["w_min"], meta["distill"]["w_max"]) == (1, 4)
    args = ["sample", str(student_run), "--classes", "1,7", "--per-class", "2", "--steps", "4", "--no-progress"]
    assert cli_main(args + ["--out", str(tmp_path / "a")]) == 0
    cfg.sample.steps = "4"
    a = np.load(tmp_path / "a" / "samples.npz")["arr_0"]
    ref = generate(model, cfg, torch.tensor([1, 1, 7, 7]), progress=False)
    assert a.shape == (4, 8, 8, 1) and np.array_equal(a, ref.permute(0, 2, 3, 1).numpy())
    calls = []
    real = G.sample
    monkeypatch.setattr(G, "sample", lambda *a, **kw: calls.append((kw["guidance"].mode, kw["model_kwargs"]))
                        or real(*a, **kw))
    assert cli_main(args + ["--out", str(tmp_path / "b"), "--cfg-scale", "3.5"]) == 0
    assert calls == [("none", {"w": 3.5})]
    assert cli_main(args + ["--out", str(tmp_path / "c"), "--guidance-interval", "0,500"]) == 2
    assert (student_run / "samples" / "final.png").is_file() and (student_run / "distill.json").is_file()
