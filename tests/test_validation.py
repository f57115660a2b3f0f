"""Bad input at the command line: one `efdit: error:` line naming the option, a non-zero exit, no traceback, and
nothing written (no run folder, no output file) — for every command. And the config schema's choices agree with
what the core packages implement."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from efdit.cli import main as cli_main
from efdit.config import build_config

ROOT = Path(__file__).resolve().parents[1]

# (argv, text the error line must contain); RUN is a trained tiny run folder, OUT a path that must stay absent
CASES = [
    # train
    ("train --lr -1", "--lr must be a positive number"),
    ("train --lr abc", "--lr must be a number"),
    ("train --batch-size 0", "--batch-size must be a positive integer"),
    ("train --total-images -5", "--total-images must be a positive integer"),
    ("train --total-images 2.5", "--total-images must be an integer"),
    ("train --model.depth 0", "--model.depth must be a positive integer"),
    ("train --model.num_heads 3 --model.hidden_size 64", "--model.num_heads 3 must divide --model.hidden_size 64"),
    ("train --ema-decay 1.5", "--ema-decay must be a number in [0, 1)"),
    ("train --warmup-images -1", "--warmup-images must be an integer ≥ 0"),
    ("train --minutes nan", "--minutes must be a number ≥ 0"),
    ("train --peft lorra", "--peft must be one of"),
    ("train --grad-accum 0", "--grad-accum must be a positive integer"),
    ("train --precision fp8", "--precision must be one of fp32 | bf16"),
    ("train --class-dropout-prob 1", "--class-dropout-prob must be a number in [0, 1)"),
    ("train --diffusion.prediction eps2", "--diffusion.prediction must be one of eps | v | x0"),
    ("train --threads -2", "--threads must be an integer ≥ 0"),
    ("train --hflip maybe", "--hflip must be true or false"),
    ("train --preset fmnist-tin", "unknown preset 'fmnist-tin'"),
    ("train --lrr 1", "unknown option --lrr"),
    ("train --dataset foldr", "unknown dataset 'foldr'"),
    ("train --sample.steps 0", "--sample.steps must be a positive integer or a respacing"),
    ("train --preset digits-tiny --model.patch_size 3", "--model.patch_size 3 must divide"),
    ("train --diffusion.weighting snr", "--diffusion.weighting must be one of none | min_snr"),
    ("train --model.guidance_embed true", "efdit distill-guidance RUN --teacher MODEL"),
    # sample
    ("sample RUN --steps abc", '--steps must be a positive integer or a respacing such as "ddim50", got \'abc\''),
    ("sample RUN --steps 0", "--steps must be a positive integer"),
    ("sample RUN --steps -5", "--steps must be a positive integer"),
    ("sample RUN --steps 2000", "asks for more steps than the 1000-step chain"),
    ("sample RUN --per-class -1", "--per-class must be a positive integer"),
    ("sample RUN --per-class 0", "--per-class must be a positive integer"),
    ("sample RUN --classes ''", "--classes must name at least one class"),
    ("sample RUN --classes zebra", "--classes: unknown subclass 'zebra'"),
    ("sample RUN --superclass ''", "--superclass must name at least one superclass"),
    ("sample RUN --cfg-scale nan", "--cfg-scale must be a guidance scale"),
    ("sample RUN --cfg-scale -2", "--cfg-scale must be a guidance scale"),
    ("sample RUN --sampler euler", "--sampler must be one of"),
    ("sample RUN --sampler dpmpp2m --eta 0.5", "is deterministic"),
    ("sample RUN --eta -1", "--eta must be a number in [0, 1]"),
    ("sample RUN --accel foraa", "--accel must be one of"),
    ("sample RUN --accel fora --accel-kw interval", "--accel-kw: expected key=value"),
    ("sample RUN --hrig band=673:259", "--hrig 'band=673:259'"),
    ("sample RUN --guidance-interval 5", "--guidance-interval must be \"T_LO,T_HI\""),
    ("sample RUN --guidance-interval 800,200", "--guidance-interval must be \"T_LO,T_HI\""),
    ("sample RUN --out /proc/efdit-out", "cannot write the samples folder /proc/efdit-out"),
    ("sample OUT", "no model file or run folder at"),
    # evaluate
    ("evaluate RUN --n-per-class 0", "--n-per-class must be a positive integer"),
    ("evaluate RUN --resolution -64", "--resolution must be a positive integer"),
    ("evaluate RUN --split dev", "--split: invalid choice: 'dev'"),
    ("evaluate RUN --steps 0", "--steps must be a positive integer"),
    ("evaluate RUN --npz OUT/nope.npz", "cannot read samples from"),
    ("evaluate RUN --inception-weights OUT/inception.pth", "Inception weights not found"),
    ("evaluate --compare OUT/a.json OUT/b.json", "cannot read"),
    ("evaluate", "a model (or --compare A B) is required"),
    # export
    ("export RUN /proc/efdit-x.safetensors", "cannot write the model file /proc/efdit-x.safetensors"),
    ("export RUN OUT/m.safetensors --dtype fp8", "--dtype: invalid choice: 'fp8'"),
    ("export OUT OUT/m.safetensors", "no model file or run folder at"),
    # distill-guidance
    ("distill-guidance OUT/run", "--teacher is required"),
    ("distill-guidance OUT/run --teacher OUT/none", "no model file or run folder at"),
    ("distill-guidance OUT/run --teacher RUN --w-min -1", "--w-min must be a guidance scale from 0 to 100"),
    ("distill-guidance OUT/run --teacher RUN --w-max abc", "--w-max must be a guidance scale"),
    ("distill-guidance OUT/run --teacher RUN --w-min 4 --w-max 2", "--w-max 2 must be ≥ --w-min 4"),
    ("distill-guidance OUT/run --teacher RUN --guidance none", "--guidance: invalid choice: 'none'"),
    ("distill-guidance OUT/run --teacher RUN --guidance super", "--guidance super: a flat LabelEmbedder has no super"),
    ("distill-guidance OUT/run --teacher RUN --lr -1", "--lr must be a positive number"),
    ("distill-guidance OUT/run --teacher RUN --batch-size 0", "--batch-size must be a positive integer"),
    ("distill-guidance OUT/run --teacher RUN --total-images 2.5", "--total-images must be an integer"),
    ("distill-guidance OUT/run --teacher RUN --ema-decay 1", "--ema-decay must be a number in [0, 1)"),
    ("distill-guidance OUT/run --teacher RUN --model.depth 4", "--model.depth: a distillation keeps the teacher's"),
    ("distill-guidance OUT/run --teacher RUN --diffusion.steps 10", "--diffusion.steps: a distillation keeps the"),
    ("distill-guidance OUT/run --teacher RUN --grad-accum 2", "--grad-accum is not an option of distill-guidance"),
    ("distill-guidance OUT/run --teacher RUN --lrr 1", "unknown option --lrr"),
    ("distill-guidance OUT/run --teacher RUN --sample.steps 0", "--sample.steps must be a positive integer"),
    ("distill-guidance /proc/efdit-distill --teacher RUN", "cannot write the run folder /proc/efdit-distill"),
    # serve
    ("serve --port 0", "--port must be a port from 1 to 65535"),
    ("serve --port http", "--port must be a port from 1 to 65535"),
    ("serve --device tpu", "--device: invalid choice: 'tpu'"),
    ("serve --run OUT", "no model file or run folder at"),
    # ablate
    ("ablate --n-per-class 0", "--n-per-class must be a positive integer"),
    ("ablate --set nope", "--set: invalid choice: 'nope'"),
    ("ablate --lr -1", "--lr must be a positive number"),
    # cache-latents
    ("cache-latents --out OUT/cache --shard-size 0", "--shard-size must be a positive integer"),
    ("cache-latents --out /proc/efdit-cache", "cannot write the latent cache /proc/efdit-cache"),
    # d2it, grains
    ("d2it sample RUN --per-class 0", "--per-class must be a positive integer"),
    ("d2it train --dct.lr -1 --run-dir OUT", "--dct.lr must be a positive number"),
    ("d2it train --dgt.num_heads 5 --run-dir OUT", "--dgt.num_heads 5 must divide --dgt.hidden_size 64"),
    ("d2it frobnicate", "unknown d2it action 'frobnicate'"),
    ("grains show --n 0", "--n must be a positive integer"),
    ("grains frob", "invalid choice: 'frob'"),
    # hrig
    ("hrig train-refiner RUN --steps 0", "--steps must be a positive integer"),
    ("hrig sweep RUN --n-per-class 0", "--n-per-class must be a positive integer"),
    ("hrig sweep RUN --specs gain=abc", "--specs: --hrig 'gain=abc'"),
    # demo, presets, the dispatcher
    ("demo --minutes -1", "--minutes must be a number ≥ 0"),
    ("demo --lr 0", "--lr must be a positive number"),
    ("demo --run-dir /proc/efdit-demo", "cannot write the demo folder /proc/efdit-demo"),
    ("presets --bogus", "unrecognized arguments: --bogus"),
    ("trian", "unknown command 'trian'; did you mean 'train'"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    cfg = build_config("digits-tiny", {"run_dir": str(root / "run"), "total_images": 32, "threads": 1})
    from efdit.engine.train import train
    train(cfg, progress=False)
    return root / "run"


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.mark.parametrize("args,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_value_is_one_line_before_any_work(args, expected, run, tmp_path, monkeypatch, capsys):
    import shlex
    out = tmp_path / "out"          # must not come into being
    argv = [a.replace("RUN", str(run)).replace("OUT", str(out)) for a in shlex.split(args)]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EFDIT_CACHE", str(tmp_path / "cache"))
    before_run, before_here = tree(run), tree(tmp_path)
    rc = cli_main(argv)
    cap = capsys.readouterr()
    err_lines = [line for line in cap.err.splitlines() if "error:" in line]
    assert rc != 0
    assert len(err_lines) == 1 and err_lines[0].startswith("efdit: error: "), cap.err
    assert expected in err_lines[0], err_lines[0]
    assert "Traceback" not in cap.out + cap.err
    assert tree(run) == before_run, "the run folder changed"
    assert tree(tmp_path) == before_here and not out.exists(), "something was written"


def test_enough_cases_across_every_command():
    from efdit.cli import COMMANDS
    assert len(CASES) >= 40
    covered = {c[0].split()[0] for c in CASES}
    assert set(COMMANDS) <= covered, set(COMMANDS) - covered


def test_a_bad_value_in_a_real_process_has_no_traceback(run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "efdit.cli", "sample", str(run), "--steps", "abc"], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        'efdit: error: --steps must be a positive integer or a respacing such as "ddim50", got \'abc\'']


def test_config_choices_agree_with_the_core_registries():
    """The config schema names what the core packages implement: a sampler, PEFT preset or cache added there
    must be added to the schema (and the reverse)."""
    from efdit import config
    from efdit.data.hierarchy import Hierarchy  # noqa: F401  (the data package imports)
    from efdit.diffusion.hooks.cache import ACCEL
    from efdit.diffusion.solvers import DETERMINISTIC, SAMPLERS
    from efdit.diffusion.timesteps import LOSS_WEIGHTING, TIMESTEP_SAMPLING
    from efdit.models.peft import PEFT_PRESETS
    assert config.SAMPLERS == tuple(SAMPLERS) and config.DETERMINISTIC == tuple(DETERMINISTIC)
    assert config.PEFT == tuple(PEFT_PRESETS)
    assert config.ACCEL == ("none", *ACCEL)
    assert config.RULES["diffusion.timesteps"] == TIMESTEP_SAMPLING
    assert config.RULES["diffusion.weighting"] == LOSS_WEIGHTING


def test_library_functions_say_the_same_words():
    from efdit.diffusion.schedule import space_timesteps
    with pytest.raises(ValueError, match='a positive integer or a respacing such as "ddim50", got \'abc\''):
        space_timesteps(1000, "abc")
    with pytest.raises(ValueError, match="a positive integer or a respacing"):
        space_timesteps(1000, 0)


def test_warmup_rule_under_a_time_budget():
    from efdit.engine.lr import warmup_warning
    tc = build_config("fmnist-tiny", {"minutes": 12}).train           # 50,000-image warm-up
    note = warmup_warning(tc, img_per_s=72.0)                          # 12 min at 72 img/s: 51,840 images
    assert note is not None and "96%" in note and "51,840 images in 12 min" in note
    assert "--warmup-images 5120" in note                              # 10 % of the budget, in whole steps
    assert warmup_warning(tc, img_per_s=720.0) is None                 # 518,400 images: the warm-up is 9.6 %
    tc_images = build_config("fmnist-tiny", {"total_images": 100_000}).train
    assert "50%" in warmup_warning(tc_images)                          # an image budget needs no throughput
    assert warmup_warning(build_config("fmnist-tiny", {"warmup_images": 0}).train) is None


def test_warmup_warning_is_printed_once_under_minutes(tmp_path, capsys):
    from efdit.engine.train import train
    cfg = build_config("digits-tiny", {"run_dir": str(tmp_path / "r"), "total_images": 100_000, "minutes": 0.05,
                                       "warmup_images": 50_000, "threads": 1, "log_every": 10 ** 6})
    train(cfg, progress=False)
    out = capsys.readouterr().out
    assert out.count("learning-rate warm-up (50,000 images)") == 1 and "at the measured" in out
