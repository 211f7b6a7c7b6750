"""The tests' time limits are work at a reference speed: a busy machine stretches them, a hang still fails."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time

import pytest
import timing


@pytest.fixture
def slow_machine(monkeypatch):
    """A machine measured three times slower than the reference."""
    monkeypatch.setattr(timing, "slowdown", lambda: 3.0)


def test_a_budget_lasts_as_many_times_longer_as_the_machine_is_slower(slow_machine):
    budget, started = timing.Budget(0.2), time.monotonic()
    while not budget.expired():
        time.sleep(budget.next_wait(0.05))
    assert 0.6 <= time.monotonic() - started < 2.0


def test_run_kills_a_process_that_outlasts_its_budget_and_keeps_what_finishes(slow_machine):
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        timing.run([sys.executable, "-c", "import time; time.sleep(60)"], 0.3)
    assert 0.9 <= time.monotonic() - started < 10  # 0.3 s of work on a machine three times slower
    done = timing.run([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], 30)
    assert (done.returncode, done.stdout) == (3, "out\n")


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_the_measured_slowdown_grows_when_every_core_is_busy(monkeypatch):
    monkeypatch.setattr(timing, "_measured", None)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    spinners = [multiprocessing.get_context("fork").Process(target=spin, args=(3.0,)) for _ in range(2 * cores)]
    for spinner in spinners:
        spinner.start()
    try:
        time.sleep(0.2)
        busy = min(timing.workload() for _ in range(3))
    finally:
        for spinner in spinners:
            spinner.terminate()
            spinner.join()
    idle = min(timing.workload() for _ in range(3))
    assert busy > 1.8 * idle  # three runnable processes a core: about a third of one each
