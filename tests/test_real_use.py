"""Real use: a second run in the same folder, checkpoints from elsewhere or from older code, a finished run.

Nothing a user did before is ever lost or silently replaced, and every refusal is one line.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import timing
import torch
from rendering import (
    INTERRUPTED_RUN,
    PREEMPTED_EXIT_CODE,
    SMOKE_OVERRIDES,
    project_env,
    run_module,
    run_package_code,
    train,
)

QUICK = (*SMOKE_OVERRIDES, "epochs=2", "deterministic=true")


def tree_digest(root: Path) -> dict[str, str]:
    """Every file below ``root`` with a hash of its bytes: equal digests mean an untouched directory."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def assert_one_line_error(result, expected: str) -> None:
    assert result.returncode != 0, result.stdout
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr


@pytest.fixture
def finished_run(default_project, tmp_path) -> Path:
    out = tmp_path / "run"
    train(default_project, *QUICK, f"output_dir={out}")
    return out


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_and_changes_nothing(default_project, finished_run):
    before = tree_digest(finished_run)
    result = run_module(default_project, "train", *QUICK, f"output_dir={finished_run}")
    assert_one_line_error(result, "already holds another run; continue it with resume=auto")
    assert tree_digest(finished_run) == before


def test_resuming_a_finished_run_says_it_is_complete_and_changes_nothing(default_project, finished_run):
    before = tree_digest(finished_run)
    result = train(default_project, *QUICK, "resume=auto", f"output_dir={finished_run}")
    assert "is complete (all 2 epochs done); nothing to do" in result.stdout
    assert tree_digest(finished_run) == before


def test_an_early_stopped_run_resumed_stays_stopped(render_project, tmp_path):
    project = render_project(early_stopping=True)
    out = tmp_path / "run"
    stopping = ("epochs=6", "early_stopping.patience=1", "early_stopping.min_delta=1", f"output_dir={out}")
    train(project, *SMOKE_OVERRIDES, *stopping)
    assert json.loads((out / "summary.json").read_text())["epochs_completed"] == 2
    before = tree_digest(out)
    result = train(project, *SMOKE_OVERRIDES, *stopping, "resume=auto")
    assert "is complete (early stopping: val_accuracy did not improve" in result.stdout
    assert tree_digest(out) == before


def test_a_run_failing_before_its_first_epoch_ends_leaves_no_trace(render_project, tmp_path):
    # A learning rate this high turns the loss NaN within the first epoch: the guard stops the run.
    project = render_project(loggers=["csv", "tensorboard"], nonfinite_guard=True)
    out = tmp_path / "run"
    result = run_module(project, "train", *QUICK, "optim.lr=1e30", "log.every_n_steps=1", f"output_dir={out}")
    assert_one_line_error(result, "loss became nan in step")
    assert not out.exists()


def test_a_checkpoint_of_a_project_with_other_answers_is_refused_before_anything_is_touched(render_project, tmp_path):
    source = render_project(scheduler="plateau", ema=True, optimizer="adam")
    target = render_project(scheduler="cosine")
    foreign = tmp_path / "foreign"
    train(source, *QUICK, f"output_dir={foreign}")
    out = tmp_path / "own"
    train(target, *QUICK, f"output_dir={out}")
    before = tree_digest(tmp_path)
    foreign_last = foreign / "checkpoints" / "last.pt"
    result = run_module(target, "train", *QUICK, "epochs=3", f"resume={foreign_last}", f"output_dir={tmp_path / 'new'}")
    assert_one_line_error(result, "belongs to a run with other answers")
    for difference in ("optimizer='adam' there, 'adamw' here", "scheduler='plateau' there, 'cosine' here"):
        assert difference in result.stderr
    assert result.stderr.rstrip().endswith("cannot resume here")  # this render has no pretrained.path to offer
    result = run_module(
        target, "train", *QUICK, "epochs=3", f"output_dir={out}", f"resume={foreign}/checkpoints/last.pt"
    )
    assert_one_line_error(result, "already holds another run")
    assert tree_digest(tmp_path) == before


def test_an_older_checkpoint_gets_default_bookkeeping_and_resumes(render_project, tmp_path):
    """A project updated to early_stopping=true resumes a checkpoint written before the field existed."""
    project = render_project(early_stopping=True)
    out = tmp_path / "run"
    train(project, *SMOKE_OVERRIDES, "epochs=1", f"output_dir={out}")
    last = out / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["progress"]["validations_without_improvement"], state["progress"]["best_epoch"]
    torch.save(state, last)
    resumed = train(project, *SMOKE_OVERRIDES, "epochs=2", "resume=auto", f"output_dir={out}")
    assert "resumed from" in resumed.stdout and "epoch 2/2 |" in resumed.stdout
    # Epoch 1's best is of unknown epoch: the closing line names the epoch only when epoch 2 beat it.
    best_epoch = json.loads((out / "summary.json").read_text())["best_epoch"]
    at = "in 2 epochs" if best_epoch is None else "at epoch 2 of 2"
    assert resumed.stdout.splitlines()[-1].startswith("done: best val_accuracy ") and f" {at}; " in resumed.stdout


def test_a_checkpoint_of_another_format_and_a_broken_one_are_one_line(default_project, tmp_path):
    out = tmp_path / "run"
    train(default_project, *SMOKE_OVERRIDES, "epochs=1", f"output_dir={out}")
    last = out / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    # Progress fields at the top level, no layout, no format: no release of this template wrote it.
    flat = {key: value for key, value in state.items() if key not in ("format_version", "layout", "progress", "scaler")}
    flat.update({**state["progress"], "best_metric": float("-inf")})
    torch.save(flat, tmp_path / "flat.pt")
    result = run_module(default_project, "train", *SMOKE_OVERRIDES, "epochs=2", f"resume={tmp_path / 'flat.pt'}")
    assert_one_line_error(result, "was written by other code: format unknown, this code reads 2")

    broken = torch.load(last, weights_only=True)
    del broken["optimizer"]
    torch.save(broken, tmp_path / "broken.pt")
    result = run_module(default_project, "train", *SMOKE_OVERRIDES, "epochs=3", f"resume={tmp_path / 'broken.pt'}")
    assert_one_line_error(result, "its optimizer state does not fit this run")


def test_mid_epoch_resume_loads_no_skipped_sample_again(default_project, tmp_path):
    """The resumed run starts at the next batch of the same order: it does not decode the skipped ones."""
    counting = """
    trainer = importlib.import_module(pkg + ".train")
    build_splits, loaded = trainer.build_splits, []

    class Counting(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner = inner
        def __len__(self):
            return len(self.inner)
        def __getitem__(self, index):
            loaded.append(index)
            return self.inner[index]

    def counting_splits(*args):
        splits = build_splits(*args)
        return dataclasses.replace(splits, train=Counting(splits.train), val=Counting(splits.val))

    trainer.build_splits = counting_splits
    record = sys.argv.pop()  # the last argument names the file that receives the loaded indices
    atexit.register(lambda: Path(record).write_text(json.dumps(loaded)))
    """
    prelude = "import atexit, dataclasses, json, sys, torch\nfrom pathlib import Path\n" + textwrap.dedent(counting)
    # The first session is stopped by a signal during epoch 1's validation: it saves one step into epoch 2.
    common = (*QUICK, "log.every_n_steps=1", f"output_dir={tmp_path / 'run'}")
    first_session = prelude + INTERRUPTED_RUN.replace("len(calls) == 2", "len(calls) == 1")
    run_package_code(default_project, first_session, *common, str(tmp_path / "first.json"))
    stopped = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["progress"]
    assert stopped["epoch"] == 1 and stopped["batch_in_epoch"] == 1
    resume = prelude + "importlib.import_module(pkg + '.train').main(sys.argv[1:])\n"
    run_package_code(default_project, resume, *common, "resume=auto", str(tmp_path / "second.json"))

    train_size, val_size, batch = 256 - 51, 51, 32
    second = json.loads((tmp_path / "second.json").read_text())
    # The rest of epoch 2's full batches, then one validation pass: no sample of the first batches again.
    assert len(second) == (train_size // batch - stopped["batch_in_epoch"]) * batch + val_size


def test_an_output_dir_that_is_a_file_is_one_line(default_project, tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a directory\n")
    result = run_module(default_project, "train", *QUICK, f"output_dir={target}")
    assert_one_line_error(result, f"output_dir {target} is a file, not a directory")


def test_a_full_disk_during_a_save_is_one_line_and_the_last_good_checkpoint_survives(default_project, tmp_path):
    out = tmp_path / "run"
    train(default_project, *QUICK, f"output_dir={out}")
    last = out / "checkpoints" / "last.pt"
    good = last.read_bytes()
    # The next save's write fails as on a full disk: after the temporary file is opened, mid-write.
    full_disk = """
    import errno, sys, torch
    save = torch.save
    def save_until_full(obj, file, *args, **kwargs):
        file.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(getattr(file, "name", "")))
    torch.save = save_until_full
    importlib.import_module(pkg + ".train").main(sys.argv[1:])
    """
    result = run_package_code(default_project, full_disk, *QUICK, "epochs=3", "resume=auto", f"output_dir={out}")
    assert_one_line_error(result, f"No space left on device: {last}")
    assert last.read_bytes() == good
    assert not list(last.parent.glob(".*.tmp"))  # the half-written temporary file is gone


def test_a_run_holds_its_output_dir_while_it_trains_against_a_second_run_fresh_or_resumed(default_project, tmp_path):
    """Two runs started together into one output_dir: one trains and the other is refused before it writes
    anything; a resume=auto into a run that still trains is refused too. The lock goes with the run."""
    common = ("data.dataset=synthetic", "data.synthetic_size=4096", "data.batch_size=16", "log.progress_bar=false")
    env, pipes = project_env(default_project), {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}

    def start(*overrides: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "my_project.train", *common, *overrides]
        return subprocess.Popen(command, cwd=default_project, env=env, **pipes)

    together = tmp_path / "together"
    runs = [start("epochs=2", f"output_dir={together}") for _ in range(2)]
    results = [subprocess.CompletedProcess(run.args, 0, *timing.communicate(run, 300)) for run in runs]
    for run, result in zip(runs, results, strict=True):
        result.returncode = run.returncode
    refused = [result for result in results if result.returncode != 0]
    assert len(refused) == 1, [result.stderr for result in results]
    # Refused by the lock or, if the other had already finished, by its outputs: never written over.
    assert_one_line_error(refused[0], f"output_dir {together} ")
    assert not (together / ".lock").exists() and (together / "summary.json").exists()

    # A run long enough to be still training when the resume starts, stopped as a preempted job is.
    out = tmp_path / "run"
    training = start("epochs=100", f"output_dir={out}")
    budget = timing.Budget(60)
    while not (out / ".lock").exists():
        assert training.poll() is None and not budget.expired(), training.communicate()
        time.sleep(0.05)
    resumed = run_module(default_project, "train", *common, "epochs=100", f"output_dir={out}", "resume=auto")
    assert_one_line_error(resumed, f"output_dir {out} is in use by a run still training (pid {training.pid} on ")
    assert training.poll() is None, "the run ended before the resume was refused: the refusal proved nothing"
    training.send_signal(signal.SIGTERM)
    assert timing.wait(training, 300) == PREEMPTED_EXIT_CODE
    assert not (out / ".lock").exists()
