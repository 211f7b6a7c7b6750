"""Hyperparameter sweeps (question `sweeps`): Optuna trials as real training runs, resumable from SQLite."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import timing
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from rendering import PREEMPTED_EXIT_CODE, check, project_answers, project_env, render, run_module, run_package_code

QUICK = ("data.dataset=synthetic", "data.synthetic_size=256", "data.batch_size=32", "log.progress_bar=false")
SPACE = ("optim.lr=1e-4:1e-1", "model.width=8:32", "model.arch=cnn,mlp", "epochs=2")

# Run the sweep, but stop during trial 1 (after the third validation, the first epoch of trial 1)
# with the signal given as the first argument: SIGTERM is a preemption the run saves at, SIGKILL a
# crash that leaves the trial running in the study. HEARTBEAT_S is the second argument.
INTERRUPTED_SWEEP = """
import os, sys
sweep = importlib.import_module(pkg + ".sweep")
train = importlib.import_module(pkg + ".train")
stop_with, sweep.HEARTBEAT_S = int(sys.argv[1]), int(sys.argv[2])
evaluate, calls = train.evaluate, []
def evaluate_then_stop(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), stop_with)
    return evaluate(*args, **kwargs)
train.evaluate = evaluate_then_stop
sweep.main(sys.argv[3:])
"""

# The sweep, each trial's run sent a SIGTERM after its last epoch's save (as it writes its summary).
SIGTERM_AFTER_EACH_TRIAL = """
import os, signal, sys
train = importlib.import_module(pkg + ".train")
summarize_run = train.summarize_run
def signalled(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return summarize_run(*args, **kwargs)
train.summarize_run = signalled
importlib.import_module(pkg + ".sweep").main(sys.argv[1:])
"""

# The sweep with its heartbeat at HEARTBEAT_S seconds (first argument).
SWEEP_WITH_HEARTBEAT = """
import sys
sweep = importlib.import_module(pkg + ".sweep")
sweep.HEARTBEAT_S = int(sys.argv[1])
sweep.main(sys.argv[2:])
"""

# The sweep with a pruner that stops every trial after its first epoch (accuracy is never 1.5 or more).
PRUNE_EVERY_TRIAL = """
import sys, optuna
optuna.pruners.MedianPruner = lambda: optuna.pruners.ThresholdPruner(lower=1.5)
importlib.import_module(pkg + ".sweep").main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def sweep_project(template_dir, tmp_path_factory) -> Path:
    return render(template_dir, tmp_path_factory.mktemp("sweeps") / "sweep-project", {"sweeps": True})


def sweep(project: Path, sweep_dir: Path, trials: int, *arguments: str):
    return run_module(project, "sweep", "--trials", str(trials), "--dir", str(sweep_dir), *arguments)


def load_study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=sweep_dir.name, storage=f"sqlite:///{sweep_dir / 'study.db'}")


def states(study: optuna.Study) -> list[str]:
    return [trial.state.name for trial in study.trials]


def test_a_sweep_trains_each_trial_in_its_own_folder_and_prints_a_table_and_draws_a_png(sweep_project, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = check(sweep(sweep_project, sweep_dir, 3, *QUICK, *SPACE), "sweep", sweep_project)

    study = load_study(sweep_dir)
    assert states(study) == ["COMPLETE"] * 3
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE  # task.HIGHER_IS_BETTER
    for trial in study.trials:
        summary = json.loads((sweep_dir / f"trial-{trial.number:04d}" / "summary.json").read_text())
        assert summary["epochs_completed"] == 2
        assert trial.value == summary["best_metric"]  # the trial's value is its best val_accuracy
        assert trial.intermediate_values.keys() == {1, 2}  # reported after every epoch, for the pruner
    # The schema types the ranges: optim.lr a float (log: it spans three decades), model.width an int.
    distributions = study.trials[0].distributions
    assert distributions["optim.lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert distributions["model.width"] == IntDistribution(8, 32)
    assert distributions["model.arch"] == CategoricalDistribution(("cnn", "mlp"))

    header = next(line for line in result.stdout.splitlines() if line.startswith("trial  state"))
    assert header.split() == ["trial", "state", "val_accuracy", "epochs", "optim.lr", "model.width", "model.arch"]
    best = max(study.trials, key=lambda trial: trial.value)
    assert f"best: trial {best.number}, val_accuracy {best.value:.4f}" in result.stdout
    assert (sweep_dir / "sweep.png").read_bytes().startswith(b"\x89PNG")
    # What holds for every trial is said once, and a trial does not end with a run's closing lines.
    fallbacks = result.stderr.count("warning: device=auto but no CUDA GPU is available")
    assert fallbacks == (0 if torch.cuda.is_available() else 1), result.stderr
    assert "next: python -m" not in result.stdout


def test_an_interrupted_sweep_reruns_the_stopped_trial_and_resumes_to_the_asked_number(sweep_project, tmp_path):
    sweep_dir = tmp_path / "sweep"
    arguments = ("--trials", "4", "--dir", str(sweep_dir), *QUICK, *SPACE)
    stopped = run_package_code(sweep_project, INTERRUPTED_SWEEP, str(int(signal.SIGTERM)), "60", *arguments)

    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr
    assert "trial 1 stopped at SIGTERM" in stopped.stderr
    assert states(load_study(sweep_dir)) == ["COMPLETE", "FAIL", "WAITING"]  # failed, never counted; queued again
    assert (sweep_dir / "trial-0001" / "checkpoints" / "last.pt").exists()  # its folder keeps what it wrote

    resumed = check(sweep(sweep_project, sweep_dir, 4, *QUICK, *SPACE), "resumed sweep", sweep_project)
    assert "1 of 4 trials finished" in resumed.stdout
    assert "trial  state     val_accuracy" in resumed.stdout  # the results table
    study = load_study(sweep_dir)
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    failed, rerun = study.trials[1], study.trials[2]
    assert rerun.params == failed.params and rerun.user_attrs["rerun_of"] == 1
    assert (sweep_dir / "sweep.png").exists()

    again = check(sweep(sweep_project, sweep_dir, 4, *QUICK, *SPACE), "finished sweep", sweep_project)
    assert "4 of 4 trials finished" in again.stdout and "epoch 1/2" not in again.stdout
    assert len(load_study(sweep_dir).trials) == 5

    other = sweep(sweep_project, sweep_dir, 5, *QUICK, "optim.lr=1e-3:1e-2", "epochs=2")
    assert other.returncode != 0 and "continue it with the same arguments" in other.stderr


def test_a_signal_after_a_trials_last_step_completes_that_trial_and_stops_the_sweep_before_the_next(
    sweep_project, tmp_path
):
    sweep_dir = tmp_path / "sweep"
    arguments = ("--trials", "2", "--dir", str(sweep_dir), *QUICK, *SPACE)
    stopped = run_package_code(sweep_project, SIGTERM_AFTER_EACH_TRIAL, *arguments)

    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr
    assert "received SIGTERM after the last step: ignored, the run is complete" in stopped.stdout
    assert "stopped by SIGTERM after 1 of 2 trials: run the same command to continue" in stopped.stderr
    assert states(load_study(sweep_dir)) == ["COMPLETE"]
    assert json.loads((sweep_dir / "trial-0000" / "summary.json").read_text())["epochs_completed"] == 2


def test_a_killed_trial_is_failed_at_once_on_its_machine_and_the_table_never_shows_it_running(sweep_project, tmp_path):
    sweep_dir = tmp_path / "sweep"
    arguments = ("--trials", "3", "--dir", str(sweep_dir), *QUICK, *SPACE)
    killed = run_package_code(sweep_project, INTERRUPTED_SWEEP, str(int(signal.SIGKILL)), "60", *arguments)
    assert killed.returncode == -signal.SIGKILL
    assert states(load_study(sweep_dir)) == ["COMPLETE", "RUNNING"]

    # At once, its heartbeat not yet stale: the sweep sees the trial's process is gone. One trial was
    # asked for, so this run trains nothing and prints the table: the dead trial is failed, not running.
    table = check(sweep(sweep_project, sweep_dir, 1, *QUICK, *SPACE), "sweep of one trial", sweep_project).stdout
    rows = {line.split()[0]: line.split()[1] for line in table.splitlines() if line[:1].isdigit()}
    assert rows == {"0": "complete", "1": "fail", "2": "waiting"}, table
    assert load_study(sweep_dir).trials[2].user_attrs["rerun_of"] == 1  # its parameters queued to run again


# The killed sweep, as if on another machine: this one cannot tell whether the trial's process lives.
ELSEWHERE = "import socket\nsocket.gethostname = lambda: 'another-machine'\n"


def test_another_machines_killed_trial_is_failed_by_its_silent_heartbeat_and_run_again(sweep_project, tmp_path):
    sweep_dir = tmp_path / "sweep"
    arguments = ("--trials", "3", "--dir", str(sweep_dir), *QUICK, *SPACE)
    killed = run_package_code(sweep_project, ELSEWHERE + INTERRUPTED_SWEEP, str(int(signal.SIGKILL)), "1", *arguments)
    assert killed.returncode == -signal.SIGKILL
    assert states(load_study(sweep_dir)) == ["COMPLETE", "RUNNING"]

    time.sleep(3)  # longer than the grace period of two heartbeats
    resumed = run_package_code(sweep_project, SWEEP_WITH_HEARTBEAT, "1", *arguments)
    check(resumed, "resumed sweep", sweep_project)
    study = load_study(sweep_dir)
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[2].params == study.trials[1].params


def test_two_processes_share_one_study_and_take_turns_at_its_trials(sweep_project, tmp_path):
    sweep_dir = tmp_path / "sweep"
    package = project_answers(sweep_project)["package_name"]
    command = [sys.executable, "-m", f"{package}.sweep", "--trials", "6", "--dir", str(sweep_dir), *QUICK, *SPACE]
    workers = [
        subprocess.Popen(command, cwd=sweep_project, env=project_env(sweep_project), stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [timing.communicate(worker, 300)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs

    study = load_study(sweep_dir)
    finished = [trial for trial in study.trials if trial.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= 6 and len(finished) == len(study.trials)  # each stops once the study holds 6
    # Each trial ran in exactly one of the processes (how many each took depends on their start-up times).
    pattern = re.compile(r"^trial (\d+): (?:val_accuracy|pruned)", re.MULTILINE)
    ran = [set(map(int, pattern.findall(output))) for output in outputs]
    assert not ran[0] & ran[1] and ran[0] | ran[1] == {trial.number for trial in finished}
    for trial in finished:
        assert (sweep_dir / f"trial-{trial.number:04d}" / "summary.json").exists()
    assert (sweep_dir / "sweep.png").read_bytes().startswith(b"\x89PNG")


# Processes that open a new study at the same moment race to create its tables; each must still get the study.
OPEN_TOGETHER = """
import multiprocessing, sys, tempfile
sweep = importlib.import_module(pkg + ".sweep")
def open_at(url, barrier, results):
    barrier.wait()
    try:
        sweep.connect(url)
        results.put("ok")
    except Exception as err:
        results.put(repr(err)[:200])
context = multiprocessing.get_context("fork")
failures = []
for _ in range(int(sys.argv[1])):
    url = f"sqlite:///{tempfile.mkdtemp(dir=sys.argv[2])}/study.db"
    barrier, results = context.Barrier(4), context.Queue()
    workers = [context.Process(target=open_at, args=(url, barrier, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    failures += [result for result in (results.get(timeout=120) for _ in workers) if result != "ok"]
    for worker in workers:
        worker.join()
print(failures)
"""


def test_processes_opening_a_new_study_together_all_get_it(sweep_project, tmp_path):
    # Unguarded, about a quarter of such openings failed with "table ... already exists" (CI, 2026-11-24).
    result = check(run_package_code(sweep_project, OPEN_TOGETHER, "6", str(tmp_path)), "open together", sweep_project)
    assert result.stdout.strip() == "[]"


def test_a_pruned_trial_ends_its_run_cleanly_and_keeps_what_it_wrote(sweep_project, tmp_path):
    sweep_dir = tmp_path / "sweep"
    arguments = ("--trials", "2", "--dir", str(sweep_dir), *QUICK, "optim.lr=1e-3:1e-2", "epochs=3")
    result = check(run_package_code(sweep_project, PRUNE_EVERY_TRIAL, *arguments), "pruned sweep", sweep_project)

    study = load_study(sweep_dir)
    assert states(study) == ["PRUNED", "PRUNED"]  # finished trials: the sweep stops at 2
    trial_dir = sweep_dir / "trial-0000"
    summary = json.loads((trial_dir / "summary.json").read_text())
    assert summary["epochs_completed"] == 1
    assert summary["stop_reason"].startswith("pruned by the sweep")
    assert (trial_dir / "checkpoints" / "last.pt").exists()
    assert len((trial_dir / "metrics.csv").read_text().splitlines()) == 2  # header and epoch 1, closed
    assert "trial 0: pruned" in result.stdout
    assert not (sweep_dir / "sweep.png").exists()  # nothing complete to draw


BAD_ARGUMENTS = {
    "optim.lrr=1e-4:1e-1": (
        "unknown config key 'optim.lrr'; valid keys here: lr, weight_decay, betas, norm_weight_decay, bias_weight_decay"
    ),
    "model.width=8.5:16": "model.width: expected int, got 8.5",
    "model.arch=cnn,transformer": "model.arch: unknown model 'transformer'; known: cnn, mlp",
    "model.dropout=0:0.5:log": "model.dropout=0:0.5:log: a log scale needs a low end above 0",
    "optim.lr=1e-1:1e-4": "optim.lr=1e-1:1e-4: the low end must be below the high end",
    "data.dataset=1:2": "data.dataset: '1' is not one of 'digits', 'synthetic'",
    "output_dir=runs/x": "output_dir is set by the sweep: each trial starts afresh in its own folder under --dir",
    "epochs=3": "nothing to search: give at least one key=low:high or key=a,b,c",
}

# Each bad argument through sweep.main in one process (one torch import): print what it exits with.
SWEEP_ERRORS = """
import json, sys
sweep = importlib.import_module(pkg + ".sweep")
errors = {}
for argument in sys.argv[2:]:
    try:
        sweep.main(["--trials", "2", "--dir", sys.argv[1], argument])
    except SystemExit as stop:
        errors[argument] = stop.code
print(json.dumps(errors))
"""


def test_unknown_keys_and_bad_ranges_are_refused_in_one_line_before_anything_is_written(sweep_project, tmp_path):
    result = run_package_code(sweep_project, SWEEP_ERRORS, str(tmp_path / "sweep"), *BAD_ARGUMENTS)
    errors = json.loads(check(result, "bad sweep arguments", sweep_project).stdout)
    assert errors == {argument: f"error: {message}" for argument, message in BAD_ARGUMENTS.items()}
    assert not (tmp_path / "sweep").exists()


def test_sweeps_add_a_module_make_target_readme_section_and_optuna_only_when_chosen(sweep_project, default_project):
    assert (sweep_project / "src/my_project/sweep.py").exists()
    assert not (default_project / "src/my_project/sweep.py").exists()
    assert '"optuna>=' in (sweep_project / "pyproject.toml").read_text()
    assert "optuna" not in (default_project / "pyproject.toml").read_text()
    assert "\nsweep:  ## " in (sweep_project / "Makefile").read_text()
    assert "sweep" not in (default_project / "Makefile").read_text()
    assert "## Hyperparameter sweeps" in (sweep_project / "README.md").read_text()
    assert "sweep" not in (default_project / "README.md").read_text().lower()


# The space sweep.main would search for the given arguments, described one line per key.
SEARCH_SPACE = """
import sys
sweep = importlib.import_module(pkg + ".sweep")
space, _ = sweep.parse_arguments(sys.argv[1:], None)
print("\\n".join(param.describe() for param in space))
"""


def test_a_sweep_searches_label_smoothing_as_a_float_range_and_auto_augment_policies_as_choices(sweep_project):
    arguments = ("loss.label_smoothing=0:0.2", "data.auto_augment=none,trivialaugment")
    result = check(run_package_code(sweep_project, SEARCH_SPACE, *arguments), "search space", sweep_project)
    assert result.stdout.splitlines() == [
        "loss.label_smoothing from 0.0 to 0.2",
        "data.auto_augment in none, trivialaugment",
    ]
    bad = run_package_code(sweep_project, SEARCH_SPACE, "data.auto_augment=none,trivial")
    assert "data.auto_augment: expected one of 'none', 'autoaugment'" in bad.stderr
