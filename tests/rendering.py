"""Render projects with Copier itself, and run their training entry point."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import copier
import timing
import yaml
from questionnaire import TEMPLATE_ROOT

TEMPLATE_PARTS = ("copier.yml", "validators.jinja", "config_keys.jinja", "template", "hooks")
PREEMPTED_EXIT_CODE = 75  # a run stopped by SIGTERM/SIGUSR1 saved and exits with this (preemption.py)


def snapshot_template(dst: Path) -> Path:
    """Copy the template's working tree to a plain directory.

    Copier renders a plain directory as it is; a git checkout would be cloned at its latest tag
    instead, which is slower and would not test uncommitted work.
    """
    dst.mkdir(parents=True, exist_ok=True)
    for part in TEMPLATE_PARTS:
        source = TEMPLATE_ROOT / part
        if source.is_dir():
            shutil.copytree(source, dst / part, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.is_file():
            shutil.copy2(source, dst / part)
    return dst


def render(template: Path, dst: Path, answers: dict[str, Any] | None = None) -> Path:
    """Render ``template`` into ``dst`` with ``answers`` (defaults for the rest), as `copier copy` does."""
    copier.run_copy(str(template), str(dst), data=answers or {}, defaults=True, unsafe=True, quiet=True, overwrite=True)
    return dst


def read_tree(root: Path) -> dict[str, tuple[bool, bytes]]:
    """Every file under ``root`` by relative path: (executable, contents)."""
    return {
        path.relative_to(root).as_posix(): (bool(path.stat().st_mode & 0o111), path.read_bytes())
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def tree_differences(a: Path, b: Path) -> list[str]:
    """Relative paths of the files that differ between two trees (in contents, executable bit or presence)."""
    left, right = read_tree(a), read_tree(b)
    return sorted(path for path in left.keys() | right.keys() if left.get(path) != right.get(path))


def project_answers(project: Path) -> dict[str, Any]:
    return yaml.safe_load((project / ".copier-answers.yml").read_text())


def project_env(project: Path) -> dict[str, str]:
    """Environment for running a rendered project from its source tree without installing it."""
    env = os.environ.copy()
    env["PYTHONPATH"] = str(project / "src")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.setdefault("OMP_NUM_THREADS", "1")  # tests share two cores; oversubscription only slows them
    return env


def run_in_project(project: Path, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``argv`` in the project directory with its package importable from src/, capturing output;
    ``timeout`` is seconds of work on an idle machine (timing.py), longer on a busy one."""
    return timing.run(argv, timeout, cwd=project, env=project_env(project))


def check(result: subprocess.CompletedProcess, what: str, project: Path) -> subprocess.CompletedProcess:
    """Fail the test with the tail of the output when ``result`` exited non-zero."""
    if result.returncode != 0:
        raise AssertionError(
            f"{what} failed ({result.returncode}) for {project}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def layered(overrides: tuple[str, ...] | list[str]) -> list[str]:
    """Overrides stacked by a test (smoke settings, then the test's own): the last setting of a key wins,
    as train refuses a key given twice on its command line."""
    settings = {(item if item.startswith("-") else item.partition("=")[0]): item for item in overrides}
    return list(settings.values())


def run_module(project: Path, module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m <package>.<module> args...`` in the project directory (train's overrides layered)."""
    package = project_answers(project)["package_name"]
    args = tuple(layered(args)) if module == "train" else args
    return run_in_project(project, [sys.executable, "-m", f"{package}.{module}", *args], timeout)


def run_project_tests(project: Path, *paths: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the rendered project's own pytest suite (or the given test files) from its directory."""
    return run_in_project(project, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths], timeout)


def train(project: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Train the rendered project; fails the test with the output if training fails."""
    return check(run_module(project, "train", *overrides, timeout=timeout), "training", project)


SMOKE_OVERRIDES = (
    "data.dataset=synthetic",
    "data.synthetic_size=256",
    "data.batch_size=32",
    "log.progress_bar=false",
)


def run_python(project: Path, code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a Python snippet against the rendered project's package (imported from its src/)."""
    return check(run_in_project(project, [sys.executable, "-c", code], timeout), "snippet", project)


def torchrun(project: Path, *overrides: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """Train the rendered project as ``torchrun --standalone --nproc_per_node=N``, on one machine."""
    package = project_answers(project)["package_name"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    result = run_in_project(project, [*command, "-m", f"{package}.train", *layered(overrides)], timeout)
    return check(result, "torchrun", project)


def run_package_code(project: Path, code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in the rendered project's environment; the variable ``pkg`` names its package. ``args``
    (its sys.argv[1:], often train's overrides) are layered: the last setting of a key wins."""
    prelude = f"import importlib\npkg = {project_answers(project)['package_name']!r}\n"
    return run_in_project(project, [sys.executable, "-c", prelude + textwrap.dedent(code), *layered(args)], timeout)


# Train, but send ourselves SIGUSR1 after the second validation: the run saves last.pt one step into
# the third epoch and exits, as a preempted cluster job does. Resuming it must match a straight run
# even when a schedule depends on the total number of epochs.
INTERRUPTED_RUN = """
import os, signal, sys
train = importlib.import_module(pkg + ".train")
evaluate, calls = train.evaluate, []
def evaluate_then_preempt(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGUSR1)
    return evaluate(*args, **kwargs)
train.evaluate = evaluate_then_preempt
try:
    train.main(sys.argv[1:])
except SystemExit as stop:  # a preempted run exits with PREEMPTED_EXIT_CODE: here the expected outcome
    sys.exit(0 if stop.code == train.PREEMPTED_EXIT_CODE else stop.code)
"""
