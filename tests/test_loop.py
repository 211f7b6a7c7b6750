"""The training loop as a GPU would need it: no host reads in a steady-state step, step checkpoints.

Host reads (``item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``cpu``) and collectives
are counted where the project's own code makes them, during ``train_one_epoch``: on a GPU each read
waits for the device, so the bound is one read per ``log.every_n_steps`` steps and one at the epoch's end.
The same reads bring back the training accuracy, the samples per second and the share of time spent
waiting for data.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timing
import torch
from rendering import SMOKE_OVERRIDES, layered, project_answers, project_env, render, run_package_code, train

# 4096 synthetic samples, 3277 for training: 204 steps of 16 in one process.
LONG_EPOCH = ("data.dataset=synthetic", "data.synthetic_size=4096", "data.batch_size=16", "log.progress_bar=false")

COUNTING = """
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist

train = importlib.import_module(pkg + ".train")
source = str(Path(train.__file__).parent)
counts = {"reads": 0, "collectives": 0, "steps": 0, "epochs": 0}
counting = [False]


def counted(kind, original):
    def wrapper(*args, **kwargs):
        if counting[0] and sys._getframe(1).f_code.co_filename.startswith(source):
            counts[kind] += 1
        return original(*args, **kwargs)
    return wrapper


for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu"):
    setattr(torch.Tensor, name, counted("reads", getattr(torch.Tensor, name)))
for name in ("all_reduce", "broadcast", "barrier", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor"):
    setattr(dist, name, counted("collectives", getattr(dist, name)))
train_one_epoch = train.train_one_epoch


def train_one_epoch_counted(state, *args, **kwargs):
    steps_before = state.progress.global_step
    counting[0] = True
    try:
        return train_one_epoch(state, *args, **kwargs)
    finally:
        counting[0] = False
        counts["steps"] += state.progress.global_step - steps_before
        counts["epochs"] += 1


train.train_one_epoch = train_one_epoch_counted
record = sys.argv.pop()
train.main(sys.argv[1:])
rank = os.environ.get("RANK", "0")
Path(f"{record}.{rank}").write_text(json.dumps(counts))
"""


def assert_reads_bounded(counts: dict, every_n_steps: int) -> None:
    assert counts["steps"] >= 100
    # One read (and across ranks one all-reduce) per window of every_n_steps steps, one at each epoch's end,
    # and one after the process's first step, which times the steps (read_window).
    bound = counts["steps"] // every_n_steps + counts["epochs"] + 1
    assert 0 < counts["reads"] <= bound, counts


def assert_epoch_figures_measured(run_dir: Path) -> None:
    """The training accuracy, samples per second and data wait that rode on the counted reads."""
    final = json.loads((run_dir / "summary.json").read_text())["final_metrics"]
    assert 0 < final["train_accuracy"] <= 1 and final["samples_per_s"] > 0 and 0 <= final["data_wait"] <= 1, final


def test_a_single_process_epoch_reads_the_device_once_per_window(default_project, tmp_path):
    record = tmp_path / "counts"
    overrides = (*LONG_EPOCH, "epochs=1", "log.every_n_steps=50", f"output_dir={tmp_path / 'run'}")
    run_package_code(default_project, "import os\n" + COUNTING, *overrides, str(record))
    counts = json.loads(Path(f"{record}.0").read_text())
    assert_reads_bounded(counts, 50)
    assert counts["collectives"] == 0
    assert_epoch_figures_measured(tmp_path / "run")


@pytest.fixture(scope="module")
def ddp_project(template_dir, tmp_path_factory) -> Path:
    return render(template_dir, tmp_path_factory.mktemp("ddp") / "ddp-project", {"parallelism": "ddp", "device": "cpu"})


def counts_per_rank(project: Path, tmp_path: Path) -> list[dict]:
    """Host reads and collectives each of 2 torchrun ranks made over one epoch of 204 steps (COUNTING)."""
    script = tmp_path / "counting.py"
    script.write_text(f"import importlib, os\npkg = {project_answers(project)['package_name']!r}\n" + COUNTING)
    record = tmp_path / "counts"
    # The global batch of 32 splits into 16 per rank: the same 204 steps as one process with batch 16.
    overrides = (
        *LONG_EPOCH,
        "data.batch_size=32",
        "epochs=1",
        "log.every_n_steps=50",
        f"output_dir={tmp_path / 'run'}",
    )
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*launcher, str(script), *layered(overrides), str(record)]
    result = timing.run(command, 300, cwd=project, env=project_env(project))
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(Path(f"{record}.{rank}").read_text()) for rank in (0, 1)]


def test_each_ddp_rank_reads_and_all_reduces_once_per_window(ddp_project, tmp_path):
    for counts in counts_per_rank(ddp_project, tmp_path):
        assert_reads_bounded(counts, 50)
        # Between two reads, only DDP's own gradient all-reduce (in C++, not counted here) runs.
        assert counts["collectives"] == counts["reads"], counts
    assert_epoch_figures_measured(tmp_path / "run")


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same_weights(expected: dict, actual: dict) -> None:
    assert expected["progress"]["global_step"] == actual["progress"]["global_step"]
    for key, tensor in expected["model"].items():
        assert torch.equal(tensor, actual["model"][key]), key
    assert expected["optimizer"]["state"].keys() == actual["optimizer"]["state"].keys()


STEPPED = (*SMOKE_OVERRIDES, "epochs=3", "deterministic=true", "checkpoint.every_n_steps=4", "log.every_n_steps=3")


def test_step_checkpoints_keep_the_newest_and_each_resumes_bit_for_bit(default_project, tmp_path):
    straight = tmp_path / "straight"
    train(default_project, *STEPPED, "checkpoint.keep_last=100", f"output_dir={straight}")
    steps = sorted(int(path.stem.split("-")[1]) for path in (straight / "checkpoints").glob("step-*.pt"))
    assert steps == list(range(4, 3 * 6 + 1, 4))  # 6 steps per epoch: 4, 8, 12, 16

    final = load(straight / "checkpoints" / "last.pt")
    for step in (4, 8):  # mid-epoch 1 and mid-epoch 2
        resumed = tmp_path / f"from-{step}"
        (resumed / "checkpoints").mkdir(parents=True)
        (resumed / "checkpoints" / "last.pt").write_bytes(
            (straight / "checkpoints" / f"step-{step:09d}.pt").read_bytes()
        )
        result = train(default_project, *STEPPED, "resume=auto", f"output_dir={resumed}")
        assert f"resumed from {resumed / 'checkpoints' / 'last.pt'} at step {step}" in result.stdout
        assert_same_weights(final, load(resumed / "checkpoints" / "last.pt"))

    kept = tmp_path / "kept"
    train(default_project, *STEPPED, "checkpoint.keep_last=2", f"output_dir={kept}")
    assert sorted(path.name for path in (kept / "checkpoints").glob("step-*.pt")) == [
        "step-000000012.pt",
        "step-000000016.pt",
    ]
    assert (kept / "checkpoints" / "best.pt").is_file()


def test_max_steps_trains_that_many_steps_and_ends_the_run(default_project, tmp_path):
    out = tmp_path / "run"
    result = train(default_project, *SMOKE_OVERRIDES, "max_steps=9", f"output_dir={out}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 9 and summary["stop_reason"] == "reached max_steps=9"
    assert "epoch 2/2 |" in result.stdout  # 6 steps per epoch: the steps need two epochs


def test_a_kill_9_loses_at_most_every_n_steps(default_project, tmp_path):
    out = tmp_path / "run"
    overrides = (*LONG_EPOCH, "epochs=2", "checkpoint.every_n_steps=10", "log.every_n_steps=10", f"output_dir={out}")
    package = project_answers(default_project)["package_name"]
    process = subprocess.Popen(
        [sys.executable, "-m", f"{package}.train", *layered(overrides)],
        cwd=default_project,
        env=project_env(default_project),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = out / "checkpoints"
    budget = timing.Budget(120)
    while len(list(checkpoints.glob("step-*.pt"))) < 3:
        assert process.poll() is None and not budget.expired()
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.0, 0.5))
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    saved = load(checkpoints / "last.pt")["progress"]["global_step"]
    # last.pt is the newest step checkpoint (or one interval past it, if the kill fell between the two
    # writes): the kill lost at most the 10 steps since.
    newest = max(int(path.stem.split("-")[1]) for path in checkpoints.glob("step-*.pt"))
    assert saved % 10 == 0 and newest <= saved <= newest + 10
    resumed = train(default_project, *overrides, "resume=auto")
    assert f"at step {saved} " in resumed.stdout
    assert math.isfinite(json.loads((out / "summary.json").read_text())["final_train_loss"])
