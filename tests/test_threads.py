"""CPU threads per process: the `threads` key, its automatic value, and what wins over what.

The launchers' OMP_NUM_THREADS per worker is tested in tests/test_launchers.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

from rendering import project_answers, project_env, run_module, run_package_code

# With OMP_NUM_THREADS out of the environment (torch has read it already), set_threads(None) follows the
# cores this process may use (affinity, patched here) and the processes on its node (LOCAL_WORLD_SIZE).
AUTOMATIC = """
import json, os, torch
devices = importlib.import_module(pkg + ".devices")
os.environ.pop("OMP_NUM_THREADS", None)
seen = {}
for cores, local_world_size in [(9, None), (9, "2"), (8, "4"), (2, None), (1, None), (4, "8")]:
    os.sched_getaffinity = lambda pid, cores=cores: set(range(cores))
    if local_world_size is None:
        os.environ.pop("LOCAL_WORLD_SIZE", None)
    else:
        os.environ["LOCAL_WORLD_SIZE"] = local_world_size
    returned = devices.set_threads(None)
    seen[f"{cores}/{local_world_size}"] = [returned, torch.get_num_threads()]
print(json.dumps(seen))
"""


def test_automatic_threads_are_the_cores_less_one_shared_by_the_processes_of_the_node(default_project):
    result = run_package_code(default_project, AUTOMATIC)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen == {
        "9/None": [8, 8],  # one process: all cores but one
        "9/2": [4, 4],  # two processes on the node share the eight
        "8/4": [1, 1],
        "2/None": [1, 1],  # the 2-core case measured in the README
        "1/None": [1, 1],
        "4/8": [1, 1],  # never below one
    }


# The environment's OMP_NUM_THREADS (1 here) wins over the automatic value; an explicit `threads` over both,
# applied by the run's set-up before anything is built. fast_run trains one batch and writes nothing.
PRECEDENCE = """
import os, sys, torch
config = importlib.import_module(pkg + ".config")
devices = importlib.import_module(pkg + ".devices")
train = importlib.import_module(pkg + ".train")
os.sched_getaffinity = lambda pid: set(range(9))  # automatic would be 8
print("env", devices.set_threads(None), torch.get_num_threads())
small = ["data.dataset=synthetic", "data.synthetic_size=256", "log.progress_bar=false", "debug.fast_run=true"]
train.fit(config.load_config(None, [*small, f"output_dir={sys.argv[1]}", "threads=2"]))
print("explicit", torch.get_num_threads())
"""


def test_omp_num_threads_wins_over_the_automatic_value_and_an_explicit_threads_over_both(default_project, tmp_path):
    code = f"import importlib\npkg = {project_answers(default_project)['package_name']!r}\n{PRECEDENCE}"
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "run")],
        cwd=default_project,
        env=project_env(default_project) | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "env 1 1" in lines and "explicit 2" in lines, result.stdout


BAD_VALUES = """
config = importlib.import_module(pkg + ".config")
for value in ["-1", "x", "1.5", "true"]:
    try:
        config.load_config(None, [f"threads={value}"])
    except config.ConfigError as err:
        print(err)
"""


def test_a_bad_threads_value_stops_the_run_with_one_line_naming_the_key(default_project, tmp_path):
    result = run_module(default_project, "train", "threads=0", f"output_dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["error: threads must be >= 1, got 0"], result.stderr
    messages = run_package_code(default_project, BAD_VALUES).stdout.splitlines()
    assert len(messages) == 4 and all(line.startswith("threads") for line in messages), messages
