"""Shared by the benchmark scripts: render the template with Copier and time the rendered loop in-process.

The rendered loop is timed by wrapping the rendered ``train_one_epoch`` while the rendered ``fit()``
runs unchanged: setup, validation and checkpoints happen as usual but fall outside the timed window,
and whatever ``fit()`` builds for the loop (progress bar, loggers, AMP, compile) is inside it.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

if TYPE_CHECKING:
    from questionnaire import Question


def question_or_none(name: str) -> Question | None:
    """The copier.yml question ``name``, or None while the template does not ask it."""
    from questionnaire import questions

    return next((q for q in questions() if q.name == name), None)


@dataclass
class RenderedProject:
    """A rendered project imported in this process under its own package name."""

    path: Path
    package: str
    modules: dict[str, ModuleType] = field(default_factory=dict)

    def __getattr__(self, name: str) -> ModuleType:
        modules = self.__dict__["modules"]
        if name not in modules:
            modules[name] = importlib.import_module(f"{self.package}.{name}")
        return modules[name]


def render_project(workdir: Path, package: str, answers: dict[str, Any]) -> RenderedProject:
    """Render the template's working tree with ``answers`` and make the package importable."""
    # Imported here, not at the top: a process that only trains a rendered project (a benchmark's worker)
    # does not load Copier, whose memory would count in its peak RSS.
    from rendering import render, snapshot_template

    template = workdir / "template"
    if not template.exists():
        snapshot_template(template)
    answers = {"project_name": package.replace("_", "-"), "package_name": package, **answers}
    path = render(template, workdir / package, answers)
    sys.path.insert(0, str(path / "src"))
    return RenderedProject(path, package)


class NullTerminal(io.TextIOBase):
    """A terminal that shows nothing: tqdm draws its bar (formatting included) as on a real one."""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)


@dataclass
class EpochTimes:
    """Per-epoch wall-clock and CPU time (``cpu_clock``; by default ``time.process_time``: all of this
    process's threads)."""

    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    fit_seconds: float = 0.0
    cpu_clock: Callable[[], float] = time.process_time

    @contextlib.contextmanager
    def epoch(self, count_steps):
        """Time the block as one epoch; ``count_steps()`` gives the steps done so far."""
        steps, wall, cpu = count_steps(), time.perf_counter(), self.cpu_clock()
        yield
        self.seconds.append(time.perf_counter() - wall)
        self.cpu_seconds.append(self.cpu_clock() - cpu)
        self.steps.append(count_steps() - steps)

    def steps_per_second(self, skip: int = 1) -> float:
        """Steady-state rate over the epochs after the first ``skip`` (warm-up) ones."""
        return sum(self.steps[skip:]) / sum(self.seconds[skip:])

    def steps_per_cpu_second(self, skip: int = 1) -> float:
        """As ``steps_per_second`` but per CPU second: time spent descheduled by other processes drops out."""
        return sum(self.steps[skip:]) / sum(self.cpu_seconds[skip:])


def timed_fit(
    project: RenderedProject,
    overrides: list[str],
    *,
    terminal: bool = False,
    beside_epoch: Callable[[dict[str, Any]], None] | None = None,
    cpu_clock: Callable[[], float] = time.process_time,
) -> EpochTimes:
    """Run the rendered ``fit()`` and time each call of its ``train_one_epoch``.

    ``terminal``: stderr looks like a terminal (so a progress bar is drawn, into nothing).
    ``beside_epoch``: called, untimed, with ``train_one_epoch``'s arguments by name: after the first
    epoch and then before and after the timed epoch in turn (before on even-numbered calls).
    ``cpu_clock``: the CPU seconds so far that ``EpochTimes.cpu_seconds`` counts.
    """
    train = project.train
    cfg = project.config.load_config(None, overrides)
    original = train.train_one_epoch
    signature = inspect.signature(original)
    times = EpochTimes(cpu_clock=cpu_clock)

    def timed_train_one_epoch(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        before = len(times.seconds) % 2 == 1
        if beside_epoch is not None and before:
            beside_epoch(arguments)
        with times.epoch(lambda: arguments["state"].progress.global_step):
            result = original(*args, **kwargs)
        if beside_epoch is not None and not before:
            beside_epoch(arguments)
        return result

    train.train_one_epoch = timed_train_one_epoch
    stderr = NullTerminal() if terminal else sys.stderr
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(stderr):
            start = time.perf_counter()
            train.fit(cfg)
            times.fit_seconds = time.perf_counter() - start
    finally:
        train.train_one_epoch = original
    return times


def summarise(values: list[float]) -> str:
    """Median and the spread of the repeats around it, e.g. ``812.4 (-3.1%/+2.0%)``."""
    mid = statistics.median(values)
    return f"{mid:8.1f} ({min(values) / mid - 1:+.1%}/{max(values) / mid - 1:+.1%})"


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu")


def count_host_reads(project: RenderedProject, overrides: list[str]) -> tuple[int, int]:
    """(host reads, optimiser steps) that the project's own code makes in ``train_one_epoch``.

    A host read (``item``, ``tolist``, ``bool``/``float``/``int`` of a tensor, ``cpu``) waits for the
    device on a GPU; the run is untimed, since counting wraps every such call.
    """
    import torch

    train = project.train
    source = str(Path(train.__file__).parent)
    counts = {"reads": 0, "steps": 0}
    counting = [False]
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(original: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            if counting[0] and sys._getframe(1).f_code.co_filename.startswith(source):
                counts["reads"] += 1
            return original(*args, **kwargs)

        return wrapper

    original_epoch = train.train_one_epoch

    def counted_epoch(state, *args, **kwargs):
        before = state.progress.global_step
        counting[0] = True
        try:
            return original_epoch(state, *args, **kwargs)
        finally:
            counting[0] = False
            counts["steps"] += state.progress.global_step - before

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    train.train_one_epoch = counted_epoch
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            train.fit(project.config.load_config(None, overrides))
    finally:
        train.train_one_epoch = original_epoch
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return counts["reads"], counts["steps"]
