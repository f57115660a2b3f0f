"""Distributed training: 2 CPU processes under torchrun (gloo), identical weights, resume on one process."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import torch
import torch.distributed as dist
import torch.nn as nn

from efdit.config import build_config
from efdit.engine import distributed
from efdit.engine.train import sample_indices, train
from efdit.models.checkpoint import load_safetensors

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

WORKER = textwrap.dedent('''
    import json, sys
    import torch
    torch.set_num_threads(1)
    import efdit.engine.train as T
    from efdit.engine import distributed
    from efdit.config import build_config
    from safetensors.torch import save_file

    run_dir, out = sys.argv[1], sys.argv[2]
    drawn = []
    real = T.sample_indices
    def spy(n, batch, gen, rank=0, world=1):
        idx = real(n, batch, gen, rank, world)
        drawn.extend(idx.tolist())
        return idx
    T.sample_indices = spy

    def dump(model, ema):
        r = distributed.rank()
        sd = distributed.unwrap(model).state_dict()
        save_file({k: v.contiguous() for k, v in sd.items()}, f"{out}/rank{r}.safetensors")
        json.dump({"world": distributed.world_size(), "indices": drawn}, open(f"{out}/rank{r}.json", "w"))

    cfg = build_config("digits-tiny", {"run_dir": run_dir, "total_images": 192, "batch_size": 32, "ckpt_every": 96,
                                       "log_every": 64, "threads": 1, "device": "cpu", "sample.steps": "2",
                                       "sample.per_class": 1})
    T.train(cfg, progress=False, on_finish=dump)
    distributed.cleanup()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_stay_in_sync_and_resume_on_one(tmp_path, capsys):
    (tmp_path / "worker.py").write_text(WORKER)
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
           str(tmp_path / "worker.py"), str(run), str(out)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # both ranks hold bit-identical weights, equal to rank 0's checkpoint
    from safetensors.torch import load_file
    w0, w1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert set(w0) == set(w1)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    ckpt, meta, _ = load_safetensors(run / "checkpoints" / "latest.safetensors")
    for k in w0:
        assert torch.equal(ckpt[f"model.{k}"], w0[k]), k
    assert meta["progress"]["step"] == 6 and meta["progress"]["images"] == 192 and meta["progress"]["world_size"] == 2
    assert "rng.data" in ckpt and "rng.data.1" in ckpt  # every rank's data stream is saved
    assert not torch.equal(ckpt["rng.data"], ckpt["rng.data.1"])

    # each rank drew its own shard (DistributedSampler's partition: rank r gets items r, r + 2, …) of the batch
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert len(r0["indices"]) == len(r1["indices"]) == 6 * 16  # 6 steps x per-rank batch 32 / 2
    assert all(i % 2 == 0 for i in r0["indices"]) and all(i % 2 == 1 for i in r1["indices"])
    assert max(r1["indices"]) < 1797  # digits has 1797 images

    # the log is written once (rank 0), with the loss averaged over the ranks
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]  # one writer: no duplicated lines
    assert all(r["loss"] > 0 for r in log)

    # the checkpoint resumes in a single process (another world size: data streams re-seeded)
    cfg = build_config("digits-tiny", {"run_dir": str(run), "total_images": 256, "batch_size": 32,
                                       "ckpt_every": 96, "log_every": 64, "threads": 1, "device": "cpu",
                                       "sample.steps": "2", "sample.per_class": 1})
    train(cfg, progress=False)
    printed = capsys.readouterr().out
    assert f"resuming {run} from step 6" in printed and "saved by 2" in printed
    _, meta2, _ = load_safetensors(run / "checkpoints" / "latest.safetensors")
    assert meta2["progress"]["step"] == 8 and meta2["progress"]["world_size"] == 1


def test_sample_indices_shard_the_dataset():
    g = torch.Generator().manual_seed(3)
    ref = torch.randint(10, (7,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(sample_indices(10, 7, g), ref)  # one process: exactly the loop's old draw
    for rank in range(3):
        idx = sample_indices(10, 500, torch.Generator().manual_seed(rank), rank, 3)
        assert set(idx.tolist()) == set(range(rank, 10, 3))  # its whole shard, nothing else


def test_unwrap_and_single_process_helpers(tmp_path):
    model = nn.Linear(3, 2)
    assert distributed.unwrap(model) is model
    assert distributed.unwrap(torch.compile(model)) is model  # OptimizedModule (compiled lazily: nothing runs)
    class Wrapper:  # a plain-object wrapper with .module, like efdit's CompiledModel
        def __init__(self, m):
            self.module = m
    assert distributed.unwrap(Wrapper(Wrapper(model))) is model
    # one process: no group, collectives are identities
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.all_reduce_mean([1.5, 2.0]) == [1.5, 2.0]
    assert distributed.gather_objects("x") == ["x"]
    assert distributed.rank_seed(7, 0, 1) == 7 and distributed.rank_seed(7, 1, 4) == 29
    # a real (1-process gloo) group: DDP wraps, unwrap undoes it, check_in_sync passes
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert distributed.unwrap(ddp) is model
        assert distributed.unwrap(torch.compile(ddp)) is model
    finally:
        dist.destroy_process_group()


FAILING_WORKER = textwrap.dedent('''
    import os, sys
    import torch
    torch.set_num_threads(1)
    from efdit.cli import main as cli_main
    import efdit.engine.train as T

    real = T.load_data
    def load_data(cfg, *a, **k):  # rank 1 meets a bad image at its third batch (a lazily read file, say)
        ds = real(cfg, *a, **k)
        batch, calls = ds.batch, [0]
        def bad(idx, *a, **k):
            calls[0] += 1
            if os.environ["RANK"] == "1" and calls[0] == 3:
                raise T.EfditError("cannot read image 17 (simulated corrupt file)")
            return batch(idx, *a, **k)
        ds.batch = bad
        return ds
    T.load_data = load_data
    sys.exit(cli_main(["train", "--preset", "digits-tiny", "--run-dir", sys.argv[1], "--total-images", "100000",
                       "--batch-size", "32", "--threads", "1", "--device", "cpu", "--no-progress"]))
''')


def test_an_error_on_one_rank_ends_the_whole_job(tmp_path):
    """No rank is left waiting in a collective: rank 1 exits with its one-line error, torchrun stops rank 0."""
    (tmp_path / "worker.py").write_text(FAILING_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
           str(tmp_path / "worker.py"), str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)  # a hang would time out
    assert proc.returncode != 0
    assert "efdit: error: cannot read image 17 (simulated corrupt file)" in proc.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()


PEFT_WORKER = textwrap.dedent('''
    import sys
    import torch
    torch.set_num_threads(1)
    from efdit.engine import distributed
    from efdit.config import build_config
    from efdit.engine.train import train
    cfg = build_config("digits-tiny", {"run_dir": sys.argv[1], "init_from": sys.argv[2], "peft": "finediffusion",
                                       "total_images": 64, "batch_size": 16, "ckpt_every": 32, "threads": 1,
                                       "device": "cpu", "sample.steps": "2", "sample.per_class": 1})
    train(cfg, progress=False)
    distributed.cleanup()
''')


def test_torchrun_peft_run_saves_a_delta_over_its_base(tmp_path):
    """Two ranks fine-tune from a base: rank 0 records the base once, the files are deltas, the model reloads."""
    from efdit.engine.files import frozen_keys, load_model
    base = tmp_path / "base"
    train(build_config("digits-tiny", {"run_dir": str(base), "total_images": 32, "threads": 1,
                                       "sample.steps": "2", "sample.per_class": 1}), progress=False)
    (tmp_path / "worker.py").write_text(PEFT_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
           str(tmp_path / "worker.py"), str(tmp_path / "run"), str(base / "model.safetensors")]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tensors, meta, _ = load_safetensors(tmp_path / "run" / "model.safetensors")
    assert meta["base"]["path"] == str((base / "model.safetensors").resolve())
    model, _, _, _ = load_model(tmp_path / "run" / "model.safetensors")
    assert set(tensors) == set(model.state_dict()) - set(frozen_keys(model))
    _, smeta, _ = load_safetensors(tmp_path / "run" / "checkpoints" / "latest.safetensors")
    assert smeta["base"] == meta["base"] and smeta["progress"]["world_size"] == 2
