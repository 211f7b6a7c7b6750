"""Preemption and crashes: a signal mid-epoch saves the exact step, kill -9 never leaves last.pt unreadable.

The signals come from outside, as a scheduler sends them: the test starts training, waits for the
first epoch's summary line and signals the process, so the stop lands inside the second epoch. The
training code has no test hooks.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timing
import torch
from questionnaire import questions
from rendering import (
    PREEMPTED_EXIT_CODE,
    SMOKE_OVERRIDES,
    layered,
    project_answers,
    project_env,
    render,
    run_package_code,
    train,
)

# Long enough epochs (about 200 steps) that a signal sent after epoch 1's line lands mid-epoch 2, the last.
LONG_EPOCHS = (
    "data.dataset=synthetic",
    "data.synthetic_size=4096",
    "data.batch_size=16",
    "log.progress_bar=false",
    "deterministic=true",
    "epochs=2",
)
STEPS_PER_EPOCH = (4096 - round(4096 * 0.2)) // 16


def start_training(project: Path, *overrides: str) -> subprocess.Popen:
    env = project_env(project) | {"PYTHONUNBUFFERED": "1"}
    package = project_answers(project)["package_name"]
    return subprocess.Popen(
        [sys.executable, "-m", f"{package}.train", *layered(overrides)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(process: subprocess.Popen, prefix: str) -> list[str]:
    """Read stdout until a line starting with ``prefix``; fail with the output if the process ends first."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return seen
    process.wait()
    raise AssertionError(f"no line starting with {prefix!r}:\n{''.join(seen)}\n{process.stderr.read()}")


def load_last(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)


def load_progress(out: Path) -> dict:
    return load_last(out)["progress"]


def assert_same_training_state(expected: dict, actual: dict) -> None:
    assert expected["progress"]["global_step"] == actual["progress"]["global_step"]
    assert expected["progress"]["epoch"] == actual["progress"]["epoch"]
    assert expected["model"].keys() == actual["model"].keys()
    for key, tensor in expected["model"].items():
        assert torch.equal(tensor, actual["model"][key]), key
    assert expected["optimizer"]["state"].keys() == actual["optimizer"]["state"].keys()
    for param_id, moments in expected["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(actual["optimizer"]["state"][param_id][name]))


@pytest.fixture(scope="module")
def uninterrupted(default_project, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(default_project, *LONG_EPOCHS, f"output_dir={out}")
    return load_last(out)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_mid_epoch_saves_the_step_and_resume_matches_an_uninterrupted_run_bit_for_bit(
    signum, default_project, uninterrupted, tmp_path
):
    out = tmp_path / "run"
    process = start_training(default_project, *LONG_EPOCHS, f"output_dir={out}")
    wait_for_line(process, "epoch 1/2 |")
    process.send_signal(signum)
    stdout, stderr = timing.communicate(process, 300)

    assert process.returncode == PREEMPTED_EXIT_CODE, stderr  # saved and resumable, not finished
    assert f"received {signum.name}: saved" in stdout, stdout
    assert "Traceback" not in stderr, stderr
    stopped = load_progress(out)
    assert stopped["epoch"] == 1  # one completed epoch, the second one under way
    assert 1 <= stopped["batch_in_epoch"] <= STEPS_PER_EPOCH
    assert stopped["global_step"] == STEPS_PER_EPOCH + stopped["batch_in_epoch"]
    assert not (out / "summary.json").exists()

    resumed = train(default_project, *LONG_EPOCHS, f"output_dir={out}", "resume=auto")
    position = f"step {stopped['global_step']} (epoch 2, {stopped['batch_in_epoch']} batches in)"
    assert f"resumed from {out / 'checkpoints' / 'last.pt'} at {position}" in resumed.stdout
    assert f"at {position}; resume with resume=auto" in stdout  # the stop and the resume count alike
    assert_same_training_state(uninterrupted, load_last(out))


def test_kill_9_at_random_moments_never_leaves_last_pt_unreadable(default_project, tmp_path):
    """Tiny epochs, so a save is under way much of the time; every restart resumes from what survived."""
    out = tmp_path / "run"
    overrides = (
        "data.dataset=synthetic",
        "data.synthetic_size=64",
        "data.batch_size=8",
        "log.progress_bar=false",
        "epochs=100000",
        "resume=auto",
        f"output_dir={out}",
    )
    rng = random.Random(0)
    epochs_seen = [0]
    for attempt in range(8):
        log = tmp_path / f"attempt-{attempt}.log"
        with log.open("w") as stdout:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    f"{project_answers(default_project)['package_name']}.train",
                    *layered(overrides),
                ],
                cwd=default_project,
                env=project_env(default_project) | {"PYTHONUNBUFFERED": "1"},
                stdout=stdout,
                stderr=subprocess.STDOUT,
            )
        while "epoch " not in log.read_text():  # training is under way and saving every epoch
            assert process.poll() is None, log.read_text()
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))  # a random moment: in a step, an evaluation or a save
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL

        state = load_last(out)  # loads with weights_only=True: never half-written
        assert {"model", "optimizer", "progress", "rng"} <= state.keys()
        epoch = state["progress"]["epoch"]
        assert epoch >= epochs_seen[-1]  # the previous good checkpoint survived, or a newer one
        epochs_seen.append(epoch)
        # A save cut short leaves its temporary file; the next save removes it, so they never pile up.
        assert len(list((out / "checkpoints").glob(".*.tmp"))) <= 1
    assert epochs_seen[-1] > epochs_seen[1]  # each restart resumed and went on training


# Two runs in one process, each sent a SIGTERM from inside the call named first, which it then makes:
# build_state is start-up, before the first step; summarize_run comes after the last epoch's save.
# Prints each run's exit status.
SIGTERM_AT = """
import json, os, signal, sys
train = importlib.import_module(pkg + ".train")
codes = {}
for where, out in zip(("build_state", "summarize_run"), sys.argv[1:3], strict=True):
    function = getattr(train, where)
    def signalled(*args, function=function, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return function(*args, **kwargs)
    setattr(train, where, signalled)
    try:
        train.main([*sys.argv[3:], f"output_dir={out}"])
        codes[where] = 0
    except SystemExit as stop:
        codes[where] = stop.code
    setattr(train, where, function)
print(json.dumps(codes))
"""


def test_a_signal_in_start_up_asks_for_a_rerun_and_one_after_the_last_epoch_leaves_the_run_complete(
    default_project, tmp_path
):
    starting, ending = tmp_path / "starting", tmp_path / "ending"
    result = run_package_code(default_project, SIGTERM_AT, str(starting), str(ending), *SMOKE_OVERRIDES, "epochs=1")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]  # not killed by either signal
    codes = json.loads(result.stdout.splitlines()[-1])

    # In start-up: one line, and 75 for the scheduler to start it again; nothing written, nothing trained.
    assert codes["build_state"] == PREEMPTED_EXIT_CODE, result.stdout
    message = "received SIGTERM during start-up: nothing trained yet, nothing saved; start it again (resume=auto)"
    assert message in result.stdout
    assert not starting.exists()
    # After the last epoch was saved: a complete run, exit status 0, its summary written.
    assert codes["summarize_run"] == 0, result.stdout
    assert "received SIGTERM after the last step: ignored, the run is complete" in result.stdout
    assert json.loads((ending / "summary.json").read_text())["epochs_completed"] == 1
    assert "Traceback" not in result.stderr, result.stderr


def _catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM (Linux: the SigCgt mask in /proc/<pid>/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.MULTILINE).group(1), 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask from /proc (Linux)")
def test_a_signal_while_torch_still_imports_asks_for_a_rerun_in_one_line(default_project, tmp_path):
    """The package installs the start-up handler before train.py imports torch: a SIGTERM then is not exit 143."""
    out = tmp_path / "run"
    process = start_training(default_project, *SMOKE_OVERRIDES, f"output_dir={out}")
    deadline = time.monotonic() + timing.limit(60)
    while not _catches_sigterm(process.pid):
        assert process.poll() is None and time.monotonic() < deadline, "no SIGTERM handler was installed"
        time.sleep(0.002)
    torch_loaded = "libtorch" in Path(f"/proc/{process.pid}/maps").read_text()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = timing.communicate(process, 60)
    assert not torch_loaded, "the first SIGTERM handler came after torch had loaded"
    assert process.returncode == PREEMPTED_EXIT_CODE, stdout + stderr
    message = "received SIGTERM during start-up: nothing trained yet, nothing saved; start it again (resume=auto)"
    assert stdout.splitlines() == [message]
    assert not stderr.strip() and not out.exists()


# --- DDP: the same guarantees with 2 gloo ranks under torchrun --------------------------------------


def _has_ddp() -> bool:
    return any(q.name == "parallelism" and "ddp" in q.choices for q in questions())


@pytest.fixture(scope="module")
def ddp_project(template_dir, tmp_path_factory) -> Path:
    if not _has_ddp():
        pytest.skip("copier.yml has no parallelism=ddp yet")
    return render(template_dir, tmp_path_factory.mktemp("ddp") / "ddp-project", {"parallelism": "ddp", "device": "cpu"})


# About 50 steps per rank and epoch: a SIGTERM sent after epoch 1's line lands mid-epoch 2.
DDP_EPOCHS = (
    "data.dataset=synthetic",
    "data.synthetic_size=2048",
    "data.batch_size=16",
    "log.progress_bar=false",
    "deterministic=true",
    "epochs=2",
)


def torchrun_command(project: Path, *overrides: str) -> list[str]:
    package = project_answers(project)["package_name"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return [*launcher, "-m", f"{package}.train", *overrides]


def test_sigterm_to_torchrun_stops_both_ranks_at_one_step_and_resume_is_bit_exact(ddp_project, tmp_path):
    straight = tmp_path / "straight"
    result = timing.run(
        torchrun_command(ddp_project, *DDP_EPOCHS, f"output_dir={straight}"),
        300,
        cwd=ddp_project,
        env=project_env(ddp_project),
    )
    assert result.returncode == 0, result.stderr[-4000:]

    out = tmp_path / "run"
    agent = subprocess.Popen(
        torchrun_command(ddp_project, *DDP_EPOCHS, f"output_dir={out}"),
        cwd=ddp_project,
        env=project_env(ddp_project) | {"PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_line(agent, "epoch 1/2 |")
    # As a scheduler does: SIGTERM to the launcher, which passes it on to every worker.
    agent.send_signal(signal.SIGTERM)
    stdout, stderr = timing.communicate(agent, 300)
    assert re.search(r"received SIGTERM on ranks? [\d, ]+: saved", stdout), stdout + stderr[-4000:]
    # torchrun itself reports the signal with a traceback of its own; the workers exit cleanly.
    package = project_answers(ddp_project)["package_name"]
    assert f"{package}/train.py" not in stderr and "ChildFailedError" not in stderr, stderr[-4000:]
    stopped = load_progress(out)
    assert stopped["epoch"] == 1 and stopped["batch_in_epoch"] >= 1
    assert not (out / "summary.json").exists()

    resumed = timing.run(
        torchrun_command(ddp_project, *DDP_EPOCHS, f"output_dir={out}", "resume=auto"),
        300,
        cwd=ddp_project,
        env=project_env(ddp_project),
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"step {stopped['global_step']}" in resumed.stdout
    assert_same_training_state(load_last(straight), load_last(out))


def test_a_restarted_torchrun_worker_group_resumes_from_last_pt_by_itself(ddp_project, tmp_path):
    out = tmp_path / "run"
    train(ddp_project, *SMOKE_OVERRIDES, "epochs=1", f"output_dir={out}")

    def run(restart_count: str) -> subprocess.CompletedProcess:
        package = project_answers(ddp_project)["package_name"]
        return timing.run(
            [sys.executable, "-m", f"{package}.train", *SMOKE_OVERRIDES, "epochs=2", f"output_dir={out}"],
            300,
            cwd=ddp_project,
            env=project_env(ddp_project) | {"TORCHELASTIC_RESTART_COUNT": restart_count},
        )

    restarted = run("1")  # what torchrun --max-restarts sets in a restarted group; config resume=null
    assert restarted.returncode == 0, restarted.stderr
    assert f"resumed from {out / 'checkpoints' / 'last.pt'} at step" in restarted.stdout
    assert load_progress(out)["epoch"] == 2

    first_attempt = run("0")  # a first launch never resumes unless asked, nor overwrites the run there
    assert first_attempt.returncode == 1, first_attempt.stderr
    assert "already holds another run" in first_attempt.stderr
    assert "resumed from" not in first_attempt.stdout
    assert load_progress(out)["epoch"] == 2


# Slow steps: each batch's loss waits SLOW_STEP_S and says "step"; the stop check is due every quarter second.
# The read window then shrinks to one step, so a signal is acted on after the step under way, however
# large log.every_n_steps is (as with steps of seconds on a GPU and the default window of 50).
SLOW_STEP_S = 0.5
SLOW_STEPS = f"""
import importlib, os, sys, time
pkg = sys.argv.pop(1)
train, task = importlib.import_module(pkg + ".train"), importlib.import_module(pkg + ".task")
train.STOP_CHECK_S = 0.25
loss = task.training_loss
def slow_loss(outputs, batch, *settings):
    time.sleep({SLOW_STEP_S})
    print("step", os.environ.get("RANK", "0"), os.getpid(), flush=True)
    return loss(outputs, batch, *settings)
task.training_loss = slow_loss
train.main(sys.argv[1:])
"""
SLOW_OVERRIDES = ("log.progress_bar=false", "log.every_n_steps=1000", "epochs=1")


def stop_slow_steps(process: subprocess.Popen, out: Path, ranks: int = 1) -> tuple[str, float]:
    """SIGTERM to ``process`` (of two ranks: to rank 1 alone) in its fourth slow step; its output, and the
    seconds it took to save and exit."""
    seen = []
    while sum(line.startswith("step ") for line in seen) < 4 * ranks:
        seen += wait_for_line(process, "step ")
    pid = process.pid if ranks == 1 else int(next(line.split()[2] for line in seen if line.startswith("step 1 ")))
    signalled = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    stdout, stderr = timing.communicate(process, 120)
    assert process.returncode == PREEMPTED_EXIT_CODE, stdout + stderr[-4000:]
    assert load_progress(out)["global_step"] >= 3, stdout  # saved mid-epoch, at the step the ranks stopped
    return stdout, time.monotonic() - signalled


def test_a_signal_saves_within_a_step_or_two_when_steps_are_slow(default_project, tmp_path):
    out, script = tmp_path / "run", tmp_path / "slow.py"
    script.write_text(SLOW_STEPS)
    package = project_answers(default_project)["package_name"]
    process = subprocess.Popen(
        [sys.executable, str(script), package, *SLOW_OVERRIDES, f"output_dir={out}"],
        cwd=default_project,
        env=project_env(default_project) | {"PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, seconds = stop_slow_steps(process, out)
    assert "received SIGTERM: saved" in stdout
    assert seconds < timing.limit(4 * SLOW_STEP_S + 5), seconds  # not the 1000-step window: ~17 min


def test_a_signal_to_one_slow_rank_saves_both_within_a_step_or_two_and_names_that_rank(ddp_project, tmp_path):
    out, script = tmp_path / "run", tmp_path / "slow.py"
    script.write_text(SLOW_STEPS)
    package = project_answers(ddp_project)["package_name"]
    launcher = [sys.executable, "-m", f"{package}.preemption", "--standalone", "--nproc_per_node=2"]  # torchrun's
    process = subprocess.Popen(
        [*launcher, str(script), package, *SLOW_OVERRIDES, f"output_dir={out}"],
        cwd=ddp_project,
        env=project_env(ddp_project) | {"PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, seconds = stop_slow_steps(process, out, ranks=2)
    assert "received SIGTERM on rank 1: saved" in stdout, stdout  # said by rank 0, which got no signal
    assert seconds < timing.limit(4 * SLOW_STEP_S + 10), seconds  # torchrun kills its workers after 30 s
