"""The benchmark scripts still run end to end (tiny sizes; nothing here is timed or compared)."""

from __future__ import annotations

import json
import subprocess
import sys

from questionnaire import TEMPLATE_ROOT

BENCHMARKS = TEMPLATE_ROOT / "benchmarks"


def test_loop_benchmark_quick_mode_measures_every_contender(tmp_path):
    out = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "loop_bench.py"), "--quick", "--no-lightning", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())["mlp"]
    for clock in ("wall_steps_per_s", "steps_per_cpu_s"):
        rates = figures[clock]
        assert {"raw loop", "rendered, bar off", "rendered, bar on"} <= {name.split(", loggers")[0] for name in rates}
        assert all(len(values) == 1 and values[0] > 0 for values in rates.values())


def test_gpu_benchmark_exits_cleanly_without_a_gpu():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_bench.py"), "--quick"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
