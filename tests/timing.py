"""Time limits that hold on a busy machine: a limit is work at a reference speed, not wall-clock seconds.

The tests' limits (300 s for a short training run, 60 s for a launcher to stop, ...) were sized on an
idle 2-core machine. On a loaded one (other jobs, the other pytest-xdist worker training DDP ranks, a
laptop on battery) the same work takes several times as long. So a limit is spent at the speed the
machine runs at meanwhile: every few seconds a short fixed CPU workload is timed, and the wall time
that passed counts divided by how much slower than the reference that workload ran. A hung process
still fails its test, after the same amount of work; a slow machine only makes it wait longer.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

# The workload's wall time on an idle core of the 2-core VM the limits were sized on (median of many).
REFERENCE_S = 0.025
MEASURE_EVERY_S = 5.0
_measured: tuple[float, float] | None = None  # (when, slowdown)


def workload() -> float:
    """Seconds one fixed piece of pure-Python work takes now."""
    started = time.perf_counter()
    total = 0
    for value in range(1_000_000):
        total += value & 7
    return time.perf_counter() - started


def slowdown() -> float:
    """How many times slower than the reference this machine runs now (at least 1), measured every few
    seconds. ``TEST_SLOWDOWN`` in the environment sets a floor, for a machine known to be slow."""
    global _measured
    now = time.monotonic()
    if _measured is None or now - _measured[0] > MEASURE_EVERY_S:
        _measured = (now, max(1.0, workload() / REFERENCE_S, float(os.environ.get("TEST_SLOWDOWN", "1"))))
    return _measured[1]


def limit(seconds: float) -> float:
    """``seconds`` of reference work in wall-clock seconds at the machine's present speed."""
    return seconds * slowdown()


class Budget:
    """``seconds`` of reference work, spent as wall time passes at the machine's present speed."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.left, self.last = seconds, seconds, time.monotonic()

    def spend(self) -> float:
        """Charge the time since the last call; return what is left, in reference seconds."""
        now = time.monotonic()
        self.left -= (now - self.last) / slowdown()
        self.last = now
        return self.left

    def expired(self) -> bool:
        return self.spend() <= 0

    def next_wait(self, most: float = MEASURE_EVERY_S) -> float:
        """Wall seconds to wait before charging again: at most ``most``, no further than the budget reaches."""
        return max(0.05, min(most, self.spend() * slowdown()))


def communicate(process: subprocess.Popen, timeout: float, stdin: str | None = None) -> tuple[Any, Any]:
    """``process.communicate()`` within a budget of ``timeout`` reference seconds; kills it and raises
    ``subprocess.TimeoutExpired`` when the budget runs out (retrying communicate loses no output)."""
    budget = Budget(timeout)
    while True:
        try:
            return process.communicate(stdin, timeout=budget.next_wait())
        except subprocess.TimeoutExpired:
            stdin = None  # sent by the first call
            if budget.expired():
                process.kill()
                process.communicate()
                raise subprocess.TimeoutExpired(process.args, timeout) from None


def wait(process: subprocess.Popen, timeout: float) -> int:
    """``process.wait()`` within a budget of ``timeout`` reference seconds (the process is left running
    when it runs out, as ``Popen.wait`` does)."""
    budget = Budget(timeout)
    while True:
        try:
            return process.wait(timeout=budget.next_wait())
        except subprocess.TimeoutExpired:
            if budget.expired():
                raise subprocess.TimeoutExpired(process.args, timeout) from None


def run(argv: list[str], timeout: float, input: str | None = None, **options: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True, ...)`` with a budget of ``timeout``
    reference seconds instead of a wall-clock limit."""
    stdin = subprocess.PIPE if input is not None else options.pop("stdin", None)
    with subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options) as p:
        stdout, stderr = communicate(p, timeout, input)
    return subprocess.CompletedProcess(argv, p.returncode, stdout, stderr)
