"""DDP launch scripts: what they ask of a cluster, how they size and name a launch, and that torchrun
through them stops cleanly on SIGTERM and survives a killed worker across two "nodes" on loopback.

SLURM's commands are replaced by stubs here, so the sbatch script's own logic (the time-limit trap,
the requeue on a preempted exit) runs in the default test run; tests/test_slurm.py runs it under a
real SLURM (pytest -m slurm).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import timing
from rendering import PREEMPTED_EXIT_CODE, project_answers, project_env, render, run_package_code

SCRIPTS = ["slurm.sbatch", "train_multi_node.sh", "train_single_node.sh"]


@pytest.fixture(scope="module")
def cpu_project(template_dir, tmp_path_factory) -> Path:
    project = render(
        template_dir, tmp_path_factory.mktemp("launchers") / "cpu-project", {"parallelism": "ddp", "device": "cpu"}
    )
    return project


@pytest.fixture(scope="module")
def gpu_project(template_dir, tmp_path_factory) -> Path:
    answers = {"parallelism": "ddp", "device": "cuda", "gpu_ids": "0,1,2"}
    return render(template_dir, tmp_path_factory.mktemp("launchers") / "gpu-project", answers)


def sbatch_options(script: Path) -> dict[str, str]:
    """The ``#SBATCH --name=value`` lines as name -> 'value  # comment'."""
    lines = re.findall(r"^#SBATCH --([a-z-]+)(?:=(.*))?$", script.read_text(), re.MULTILINE)
    return {name: value for name, value in lines}


def test_launch_scripts_are_executable_bash(cpu_project, gpu_project):
    for project in (cpu_project, gpu_project):
        assert sorted(path.name for path in (project / "scripts").iterdir()) == SCRIPTS
        for name in SCRIPTS:
            path = project / "scripts" / name
            assert os.access(path, os.X_OK), name
            check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
            assert check.returncode == 0, check.stderr


@pytest.fixture(scope="module")
def auto_project(template_dir, tmp_path_factory) -> Path:
    """DDP with the other answers at their defaults: device=auto (CUDA when present), gpu_ids "0"."""
    return render(template_dir, tmp_path_factory.mktemp("launchers") / "auto-project", {"parallelism": "ddp"})


def test_sbatch_asks_for_gpus_only_in_gpu_renders_and_comments_every_resource(cpu_project, gpu_project, auto_project):
    cpu = sbatch_options(cpu_project / "scripts/slurm.sbatch")
    gpu = sbatch_options(gpu_project / "scripts/slurm.sbatch")
    auto = sbatch_options(auto_project / "scripts/slurm.sbatch")
    assert not any("gpu" in name or "gres" in name for name in cpu), cpu
    assert gpu["gpus-per-node"].startswith("3 ")  # one per entry of gpu_ids
    assert auto["gpus-per-node"].startswith("1 ")  # device=auto trains on the GPU a node has
    # A small CPU node runs the CPU render unedited: one node, two cores; the GPU renders ask for no more
    # cores than any GPU node has (SLURM refuses more than a node has: "Requested node configuration is
    # not available"), and on CPU-only nodes take sbatch --gpus-per-node=0 (the README says so).
    assert cpu["nodes"].startswith("1 ") and cpu["cpus-per-task"].startswith("2 ")
    assert gpu["cpus-per-task"].startswith("2 ") and auto["cpus-per-task"].startswith("2 ")
    cpu_recipe = "NPROC=2 sbatch --gpus-per-node=0 scripts/slurm.sbatch device=cpu"
    assert cpu_recipe in (auto_project / "README.md").read_text()
    for options in (cpu, gpu, auto):
        for name in ("nodes", "ntasks-per-node", "cpus-per-task", "time", "signal", "open-mode"):
            assert "# " in options[name], f"--{name} has no comment saying what to change"
        assert options["open-mode"].startswith("append")  # a requeued run keeps the earlier runs' log
        assert "requeue" in options and options["signal"].startswith("B:USR1@")


# --- the scripts' settings, read from the command they would run ------------------------------------


def fake_bin(tmp_path: Path, **programs: str) -> Path:
    """A directory of stub programs (bash bodies) to put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in programs.items():
        path = bin_dir / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    return bin_dir


def launch_command(project: Path, script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run a launch script with a stub ``python`` that prints the torchrun arguments it was given."""
    bin_dir = fake_bin(tmp_path, python='printf "%s\\n" "$@"')
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NPROC", "RDZV_", "CUDA_"))}
    return subprocess.run(
        [str(project / "scripts" / script), "epochs=3"],
        cwd=project,
        env=clean | {"PATH": f"{bin_dir}:{os.environ['PATH']}"} | env,
        capture_output=True,
        text=True,
    )


def torchrun_flag(result: subprocess.CompletedProcess, name: str) -> str:
    assert result.returncode == 0, result.stderr
    return next(arg.split("=", 1)[1] for arg in result.stdout.splitlines() if arg.startswith(f"--{name}="))


def test_nproc_follows_cuda_visible_devices_then_gpu_ids_and_nproc_wins(gpu_project, tmp_path):
    for script in ("train_single_node.sh", "train_multi_node.sh"):
        env = {"NNODES": "1", "RDZV_HOST": "localhost", "RDZV_ID": "test"}
        assert torchrun_flag(launch_command(gpu_project, script, tmp_path, **env), "nproc-per-node") == "3"
        visible = launch_command(gpu_project, script, tmp_path, CUDA_VISIBLE_DEVICES="4,5", **env)
        assert torchrun_flag(visible, "nproc-per-node") == "2"
        assert torchrun_flag(launch_command(gpu_project, script, tmp_path, NPROC="1", **env), "nproc-per-node") == "1"


def test_nproc_on_the_cpu_is_two_unless_set(cpu_project, tmp_path):
    for script in ("train_single_node.sh", "train_multi_node.sh"):
        env = {"NNODES": "1", "RDZV_HOST": "localhost", "RDZV_ID": "test"}
        assert torchrun_flag(launch_command(cpu_project, script, tmp_path, **env), "nproc-per-node") == "2"
        assert torchrun_flag(launch_command(cpu_project, script, tmp_path, NPROC="3", **env), "nproc-per-node") == "3"


def omp_threads(project: Path, script: str, tmp_path: Path, **env: str) -> str:
    """The OMP_NUM_THREADS a launch script gives torchrun (a stub ``python`` prints it)."""
    bin_dir = fake_bin(tmp_path, python='echo "OMP_NUM_THREADS=${OMP_NUM_THREADS-unset}"')
    drop = ("SLURM_", "NPROC", "RDZV_", "CUDA_", "OMP_NUM_THREADS")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    rdzv = {"NNODES": "1", "RDZV_HOST": "localhost", "RDZV_ID": "test"}
    result = subprocess.run(
        [str(project / "scripts" / script)],
        cwd=project,
        env=clean | rdzv | {"PATH": f"{bin_dir}:{os.environ['PATH']}"} | env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().removeprefix("OMP_NUM_THREADS=")


def test_launchers_give_each_worker_the_cores_less_one_shared_by_the_workers_unless_omp_num_threads_is_set(
    cpu_project, gpu_project, tmp_path
):
    """Set for one worker too, where torchrun sets nothing, and for several, where it would print a banner."""
    machine = max(1, (len(os.sched_getaffinity(0)) - 1) // 3)  # nproc counts the cores this process may use
    for script in ("train_single_node.sh", "train_multi_node.sh"):
        assert omp_threads(cpu_project, script, tmp_path, SLURM_CPUS_PER_TASK="9") == "4"  # 2 workers share 8
        assert omp_threads(cpu_project, script, tmp_path, SLURM_CPUS_ON_NODE="5", NPROC="1") == "4"
        assert omp_threads(cpu_project, script, tmp_path, SLURM_CPUS_PER_TASK="2") == "1"  # never below one
        assert omp_threads(cpu_project, script, tmp_path, NPROC="3") == str(machine)
        assert omp_threads(cpu_project, script, tmp_path, SLURM_CPUS_PER_TASK="9", OMP_NUM_THREADS="3") == "3"
        # GPU renders: one worker per visible GPU.
        assert omp_threads(gpu_project, script, tmp_path, SLURM_CPUS_PER_TASK="9", CUDA_VISIBLE_DEVICES="0,1") == "4"
        # torchrun's own --nproc-per-node=auto: the count is torchrun's, so the threads are too.
        assert omp_threads(gpu_project, script, tmp_path, NPROC="auto") == "unset"


def test_rendezvous_id_is_required_outside_slurm_and_new_for_every_slurm_run(cpu_project, tmp_path):
    env = {"NNODES": "2", "RDZV_HOST": "node0"}
    missing = launch_command(cpu_project, "train_multi_node.sh", tmp_path, **env)
    assert missing.returncode != 0 and "RDZV_ID" in missing.stderr
    first = launch_command(cpu_project, "train_multi_node.sh", tmp_path, SLURM_JOB_ID="812", **env)
    requeued = launch_command(
        cpu_project, "train_multi_node.sh", tmp_path, SLURM_JOB_ID="812", SLURM_RESTART_COUNT="1", **env
    )
    assert torchrun_flag(first, "rdzv-id") == "slurm-812-0" and torchrun_flag(requeued, "rdzv-id") == "slurm-812-1"
    assert "rendezvous slurm-812-1 at node0:29400" in requeued.stderr  # each launch names its rendezvous
    assert (
        torchrun_flag(launch_command(cpu_project, "train_multi_node.sh", tmp_path, RDZV_ID="mine", **env), "rdzv-id")
        == "mine"
    )
    # A restart waits a bounded time for the other nodes, and it resumes: resume=auto goes to every rank.
    assert torchrun_flag(first, "rdzv-conf") == "join_timeout=300"
    assert "resume=auto" in first.stdout.splitlines()


# --- the sbatch script under stub SLURM commands ----------------------------------------------------

SLURM_ENV = {
    "SLURM_JOB_ID": "812",
    "SLURM_NNODES": "1",
    "SLURM_JOB_NODELIST": "node0",
    "SLURM_CPUS_PER_TASK": "2",
}


def python_env(path: Path, has_project: bool) -> Path:
    """A stand-in environment whose python imports the project (exits 0) or not."""
    (path / "bin").mkdir(parents=True, exist_ok=True)
    python = path / "bin/python"
    python.write_text(f"#!/usr/bin/env bash\nexit {0 if has_project else 1}\n")
    python.chmod(0o755)
    return path


def run_sbatch(
    project: Path, tmp_path: Path, srun_body: str, send_usr1: bool = False, venv: bool = True, **slurm_env: str
) -> tuple[int, str]:
    """Run the sbatch script as SLURM's batch shell would, with stubs logging every SLURM command, from a
    submit directory with the project's scripts and, with ``venv``, a .venv that has the project."""
    tmp_path.mkdir(exist_ok=True)
    log = tmp_path / "slurm-calls.log"
    bin_dir = fake_bin(
        tmp_path,
        srun=f'echo "srun NPROC=$NPROC RDZV_HOST=$RDZV_HOST $*" >> {log}\n'
        f'echo "python: $(command -v python)" >> {log}\n{srun_body}',
        scontrol=f'if [[ $1 == show ]]; then echo node0; else echo "scontrol $*" >> {log}; fi',
        scancel=f'echo "scancel $*" >> {log}; kill -TERM "$(cat {tmp_path}/step.pid)"',
        python="exit 1",  # the python on PATH: one without the project
    )
    submit = tmp_path / "submit"
    submit.mkdir(exist_ok=True)
    if not (submit / "scripts").exists():
        (submit / "scripts").symlink_to(project / "scripts")
    if venv:
        python_env(submit / ".venv", has_project=True)
    drop = ("SLURM_", "NPROC", "VIRTUAL_ENV", "CONDA_PREFIX")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    batch = subprocess.Popen(
        ["bash", str(submit / "scripts/slurm.sbatch"), "epochs=3"],
        cwd=submit,
        env=env | SLURM_ENV | slurm_env | {"PATH": f"{bin_dir}:{os.environ['PATH']}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if send_usr1:
        while not (tmp_path / "step.pid").exists():
            time.sleep(0.05)
        batch.send_signal(signal.SIGUSR1)  # SLURM's --signal=B:USR1@90
    output, _ = timing.communicate(batch, 60)
    return batch.returncode, (log.read_text() if log.exists() else "") + output


def test_sbatch_time_limit_warning_stops_the_step_with_sigterm_and_requeues(cpu_project, tmp_path):
    # The step's workers answer SIGTERM by saving and exiting with 75 (preempted).
    step = f"sleep 60 & echo $! > {tmp_path}/pid; mv {tmp_path}/pid {tmp_path}/step.pid; wait $! || exit 75"
    status, calls = run_sbatch(cpu_project, tmp_path, step, send_usr1=True)
    assert "srun NPROC=2 RDZV_HOST=node0 scripts/train_multi_node.sh epochs=3" in calls
    assert "scancel --signal=TERM 812.0" in calls  # a real SIGTERM to the step, not to srun
    assert "scontrol requeue 812" in calls
    assert status == 0, calls


def test_sbatch_starts_a_worker_per_gpu_slurm_gave_or_per_core_on_the_cpu(cpu_project, gpu_project, tmp_path):
    _, calls = run_sbatch(gpu_project, tmp_path / "gpus", "exit 0", SLURM_GPUS_ON_NODE="4")
    assert "srun NPROC=4 " in calls
    _, calls = run_sbatch(gpu_project, tmp_path / "no-gpus", "exit 0")  # train_multi_node.sh counts
    assert "srun NPROC= " in calls  # CUDA_VISIBLE_DEVICES or gpu_ids (test_nproc_follows_...)
    _, calls = run_sbatch(cpu_project, tmp_path / "cores", "exit 0", SLURM_CPUS_PER_TASK="6")
    assert "srun NPROC=6 " in calls
    _, calls = run_sbatch(cpu_project, tmp_path / "nproc", "exit 0", SLURM_CPUS_PER_TASK="6", NPROC="3")
    assert "srun NPROC=3 " in calls


def test_sbatch_does_not_requeue_a_run_that_saved_nothing_new_and_says_why(cpu_project, tmp_path):
    # The launcher's exit status when its workers saved no step beyond the one the run started from.
    step = f"sleep 60 & echo $! > {tmp_path}/pid; mv {tmp_path}/pid {tmp_path}/step.pid; wait $! || exit 3"
    status, calls = run_sbatch(cpu_project, tmp_path, step, send_usr1=True)
    assert "scancel --signal=TERM 812.0" in calls and "scontrol requeue" not in calls, calls
    assert status == 3, calls
    assert "not requeueing job 812: this run saved no step beyond the one it started from" in calls, calls


def test_sbatch_does_not_requeue_a_finished_or_failed_run(cpu_project, tmp_path):
    status, calls = run_sbatch(cpu_project, tmp_path, "exit 0")
    assert status == 0 and "scontrol requeue" not in calls
    status, calls = run_sbatch(cpu_project, tmp_path, "exit 1")
    assert status == 1 and "scontrol requeue" not in calls


def test_sbatch_runs_the_python_that_has_the_project_or_says_how_to_give_it_one(cpu_project, tmp_path):
    """Not just whatever python the submitting shell had on PATH (sbatch passes the environment on)."""
    status, calls = run_sbatch(cpu_project, tmp_path / "venv", "exit 0")  # make install's .venv
    assert status == 0 and f"python: {tmp_path}/venv/submit/.venv/bin/python" in calls, calls
    active = python_env(tmp_path / "active", has_project=True)  # an environment active at submission
    status, calls = run_sbatch(cpu_project, tmp_path / "active-env", "exit 0", VIRTUAL_ENV=str(active))
    assert status == 0 and f"python: {active}/bin/python" in calls, calls
    other = python_env(tmp_path / "other", has_project=False)  # active, but without the project: .venv
    status, calls = run_sbatch(cpu_project, tmp_path / "other-env", "exit 0", CONDA_PREFIX=str(other))
    assert status == 0 and f"python: {tmp_path}/other-env/submit/.venv/bin/python" in calls, calls
    status, calls = run_sbatch(cpu_project, tmp_path / "none", "exit 0", venv=False, VIRTUAL_ENV=str(other))
    assert status == 1 and "srun" not in calls, calls
    assert calls.strip().splitlines() == [
        f"slurm.sbatch: no Python with my_project installed: run make install in {tmp_path}/none/submit, "
        "or submit with its environment active"
    ]


LAUNCH_ENV = {"NNODES": "1", "RDZV_HOST": "localhost", "RDZV_ID": "test"}


def test_sbatch_and_launchers_run_no_command_hidden_in_slurm_values(cpu_project, tmp_path):
    crafted = f"a[$(touch {tmp_path}/ran)]"  # bash arithmetic would run the command in it
    status, calls = run_sbatch(cpu_project, tmp_path / "job-id", "exit 0", SLURM_JOB_ID=crafted)
    assert status == 1 and calls.strip() == f"slurm.sbatch: SLURM_JOB_ID={crafted} is not a job id: submit with sbatch"
    for script in ("train_single_node.sh", "train_multi_node.sh"):
        result = launch_command(cpu_project, script, tmp_path, SLURM_CPUS_PER_TASK=crafted, **LAUNCH_ENV)
        assert result.returncode == 1 and "not a number of cores" in result.stderr, result.stderr
    assert not (tmp_path / "ran").exists()


# --- torchrun through the scripts, on the CPU -----------------------------------------------------


def start_script(project: Path, script: str, log: Path, *overrides: str, **env: str) -> subprocess.Popen:
    python_dir = str(Path(sys.executable).parent)
    full_env = project_env(project) | {"PYTHONUNBUFFERED": "1", "PATH": f"{python_dir}:{os.environ['PATH']}"} | env
    with log.open("w") as out:
        return subprocess.Popen(
            [str(project / "scripts" / script), *overrides],
            cwd=project,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a group for the launcher; torchrun starts each worker in a session of its own
        )


def wait_for(log: Path, text: str, processes: list[subprocess.Popen], timeout: float = 90) -> None:
    budget = timing.Budget(timeout)
    while text not in log.read_text():
        assert not budget.expired(), f"no {text!r} within {timeout} s of work:\n{log.read_text()[-3000:]}"
        assert all(p.poll() is None for p in processes), log.read_text()[-3000:]
        time.sleep(0.1)


def workers_of(launcher: subprocess.Popen) -> list[int]:
    """The worker processes torchrun started (its children; each in a session of its own)."""
    found = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # ended already
            os.kill(pid, signal.SIGKILL)


def stop_all(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            workers = workers_of(process)
            os.killpg(process.pid, signal.SIGKILL)
            kill(workers)
            process.wait()


def listening(port: int) -> bool:
    """Whether a process on this machine listens on TCP ``port`` (Linux's /proc/net)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


EPOCHS = ("data.dataset=synthetic", "data.synthetic_size=4096", "data.batch_size=16", "log.progress_bar=false")


def test_sigterm_to_the_launcher_saves_and_ends_with_75_without_a_traceback(cpu_project, tmp_path):
    out, log = tmp_path / "run", tmp_path / "launch.log"
    launcher = start_script(cpu_project, "train_single_node.sh", log, *EPOCHS, "epochs=3", f"output_dir={out}")
    try:
        wait_for(log, "epoch 1/3 |", [launcher])
        launcher.send_signal(signal.SIGTERM)  # as scancel --signal=TERM or a scheduler's preemption
        assert timing.wait(launcher, 60) == 75, log.read_text()[-3000:]
    finally:
        stop_all([launcher])
    text = log.read_text()
    saved = re.search(r"received SIGTERM on ranks? [\d, ]+: saved \S+ at step (\d+)", text)
    assert saved, text[-3000:]
    said = f"torchrun: stopped by SIGTERM; its workers saved last.pt at step {saved[1]}; exit status 75 (preempted)"
    assert said in text, text[-3000:]  # the step the workers saved, read from what they reported
    assert "Traceback" not in text and "ChildFailedError" not in text, text[-3000:]


# What the launcher says after a stop, from what the workers reported (preemption.report_progress).
OUTCOMES = """
import json, os, sys
preemption = importlib.import_module(pkg + ".preemption")
os.environ[preemption.PROGRESS_FILE] = path = sys.argv[1]
os.environ["LOCAL_RANK"] = "1"
preemption.report_progress("start", 5)  # how far the run got: local rank 0 alone says
assert not os.path.exists(path)
os.environ["LOCAL_RANK"] = "0"
for event, step in [("start", 5), ("save", 9), ("start", 9)]:  # a restart resumed from step 9
    preemption.report_progress(event, step)
reported = preemption.read_progress(path)
os.environ["LOCAL_RANK"] = "1"
preemption.report_progress("error")  # every rank says it ended with its error line
assert preemption.read_progress(path)["event"] == "error"
outcomes = [preemption.stop_outcome("stopped by SIGTERM", progress) for progress in json.loads(sys.argv[2])]
print(json.dumps({"reported": reported, "outcomes": outcomes}))
"""


def test_the_launcher_says_what_a_stop_saved_and_exits_75_only_when_the_run_moved_on(cpu_project, tmp_path):
    cases = [
        {"first_step": 5, "step": 9, "event": "stop"},  # saved at the signal
        {"first_step": 5, "step": 9, "event": "save"},  # killed before saving, after an earlier save
        {"first_step": 5, "step": 5, "event": "stop"},  # saved the step it had resumed from
        {"first_step": 5, "step": 5, "event": "start"},  # nothing saved since the launch began
        {},  # the workers never began
        {"first_step": 5, "step": 9, "event": "done"},  # the signal came as the run ended
    ]
    result = run_package_code(cpu_project, OUTCOMES, str(tmp_path / "progress.json"), json.dumps(cases))
    answer = json.loads(result.stdout)
    assert answer["reported"] == {"first_step": 5, "step": 9, "event": "start"}
    (line_saved, saved), (line_earlier, earlier), *no_progress, (line_done, done) = answer["outcomes"]
    assert saved == 75 and line_saved == (
        "torchrun: stopped by SIGTERM; its workers saved last.pt at step 9; "
        "exit status 75 (preempted), resume with resume=auto"
    )
    assert earlier == 75 and "saved nothing at the signal" in line_earlier and "holds step 9" in line_earlier
    assert [status for _, status in no_progress] == [3, 3, 3]
    assert [line for line, _ in no_progress][:2] == [
        "torchrun: stopped by SIGTERM; no step beyond 5, where it began, was saved; exit status 3 (no progress), "
        "not 75, so that nothing requeues it to redo the same steps"
    ] * 2
    assert "its workers had not begun training, nothing was saved; exit status 3" in no_progress[2][0]
    assert done == 0 and line_done == "torchrun: stopped by SIGTERM after the run had completed; exit status 0"


# A worker under the launcher that reports a start at step 7 and waits, or crashes with a traceback.
FAKE_WORKER = """
import importlib, sys, time
preemption = importlib.import_module(sys.argv[1] + ".preemption")
if sys.argv[2] == "crash":
    raise RuntimeError("a crash, not an error the run explains")
preemption.report_progress("start", 7)
print("started", flush=True)
time.sleep(300)
"""


def start_launcher(project: Path, log: Path, *argv: str) -> subprocess.Popen:
    """``python -m <package>.preemption argv...``: torchrun through the project's launcher."""
    package = project_answers(project)["package_name"]
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", f"{package}.preemption", *argv],
            cwd=project,
            env=project_env(project) | {"PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def test_a_stop_before_any_save_exits_3_saying_so_and_a_crash_keeps_torchruns_report(cpu_project, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(FAKE_WORKER)
    package = project_answers(cpu_project)["package_name"]
    logs = [tmp_path / "stopped.log", tmp_path / "crashed.log"]
    standalone = ("--standalone", "--nproc-per-node=1", str(script), package)
    launchers = [start_launcher(cpu_project, logs[0], *standalone, "wait")]
    launchers.append(start_launcher(cpu_project, logs[1], *standalone, "crash"))
    try:
        wait_for(logs[0], "started", launchers[:1])
        launchers[0].send_signal(signal.SIGTERM)
        statuses = [timing.wait(launcher, 60) for launcher in launchers]
    finally:
        stop_all(launchers)
    stopped, crashed = (log.read_text() for log in logs)
    assert statuses[0] == 3, stopped[-3000:]
    assert stopped.rstrip().endswith(
        "torchrun: stopped by SIGTERM; no step beyond 7, where it began, was saved; exit status 3 (no progress), "
        "not 75, so that nothing requeues it to redo the same steps"
    ), stopped[-3000:]
    assert "Traceback" not in stopped, stopped[-3000:]
    assert statuses[1] == 1 and "ChildFailedError" in crashed and "RuntimeError: a crash" in crashed, crashed[-3000:]


def test_workers_that_end_with_their_own_error_line_get_one_line_from_the_launcher(cpu_project, tmp_path):
    log = tmp_path / "launch.log"
    launcher = start_script(
        cpu_project, "train_single_node.sh", log, "epochs=abc", f"output_dir={tmp_path / 'run'}", NPROC="1"
    )
    try:
        status = timing.wait(launcher, 90)
    finally:
        stop_all([launcher])
    text = log.read_text()
    assert status == 1 and "error: epochs: expected int, got 'abc'" in text, text[-3000:]
    assert text.rstrip().endswith("torchrun: the workers stopped with an error (above); exit status 1"), text[-3000:]
    assert "ChildFailedError" not in text and "Traceback" not in text, text[-3000:]


def free_port() -> int:
    with socket.socket() as probe:  # a port free now
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_rendezvous_that_times_out_or_loses_its_store_ends_with_one_line_naming_it(cpu_project, tmp_path):
    """A second node that never comes; a store host nobody serves (as when its node died); a SIGTERM
    while the launcher waits for the other node."""
    port, lonely_id, waiting_port = free_port(), uuid.uuid4().hex, free_port()
    rdzv = {"NNODES": "2", "NPROC": "1", "RDZV_HOST": "127.0.0.1", "RDZV_PORT": str(port), "RDZV_TIMEOUT": "2"}
    logs = [tmp_path / "alone.log", tmp_path / "no-store.log", tmp_path / "stopped.log"]
    launchers = [start_script(cpu_project, "train_multi_node.sh", logs[0], "epochs=1", RDZV_ID=lonely_id, **rdzv)]
    endpoint = f"127.0.0.1:{free_port()}"
    no_store = ("--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=orphan")
    no_store += ("--rdzv-conf=is_host=0,read_timeout=1", "-m", f"{project_answers(cpu_project)['package_name']}.train")
    launchers.append(start_launcher(cpu_project, logs[1], *no_store))
    waiting = rdzv | {"RDZV_PORT": str(waiting_port), "RDZV_TIMEOUT": "300", "RDZV_ID": "waiting"}
    launchers.append(start_script(cpu_project, "train_multi_node.sh", logs[2], "epochs=1", **waiting))
    try:
        budget = timing.Budget(60)
        while not listening(waiting_port):  # its torchrun holds the rendezvous and waits for a second node
            assert not budget.expired() and launchers[2].poll() is None, logs[2].read_text()[-3000:]
            time.sleep(0.1)
        launchers[2].send_signal(signal.SIGTERM)
        statuses = [timing.wait(launcher, 60) for launcher in launchers]
    finally:
        stop_all(launchers)
    alone, orphan, stopped = (log.read_text() for log in logs)
    assert statuses == [1, 1, 3], alone[-3000:] + orphan[-3000:] + stopped[-3000:]
    assert stopped.rstrip().endswith(
        "torchrun: stopped by SIGTERM; its workers had not begun training, nothing was saved; "
        "exit status 3 (no progress), not 75, so that nothing requeues it to redo the same steps"
    ), stopped[-3000:]
    assert alone.rstrip().endswith(
        f"torchrun: rendezvous {lonely_id} at 127.0.0.1:{port} timed out: only this node of 2 joined within "
        "join_timeout=2 s (RDZV_TIMEOUT); a node did not start, or was lost and its launcher ended; exit status 1"
    ), alone[-3000:]
    last = orphan.rstrip().splitlines()[-1]
    assert last.startswith(f"torchrun: rendezvous orphan at {endpoint} lost its store"), orphan[-3000:]
    assert "read_timeout=1 s" in last and last.endswith("; exit status 1"), last
    assert "Traceback" not in alone + orphan, alone[-3000:] + orphan[-3000:]


def test_two_node_launch_on_loopback_resumes_after_a_worker_is_killed(cpu_project, tmp_path):
    """Two launchers as two nodes of one worker each; kill -9 one worker after the first epoch.

    Both nodes restart their workers, which rendezvous again, resume from last.pt and finish. A
    restart that cannot gather both nodes would fail after RDZV_TIMEOUT instead of hanging.
    """
    out = tmp_path / "run"
    # The restarted group's rendezvous has RDZV_TIMEOUT wall seconds: more on a busy machine.
    rdzv_timeout = str(round(timing.limit(60)))
    env = {"NNODES": "2", "NPROC": "1", "RDZV_HOST": "127.0.0.1", "RDZV_ID": uuid.uuid4().hex}
    env["RDZV_TIMEOUT"] = rdzv_timeout
    env["RDZV_PORT"] = str(20000 + os.getpid() % 20000)
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    nodes = [
        start_script(cpu_project, "train_multi_node.sh", log, *EPOCHS, "epochs=3", f"output_dir={out}", **env)
        for log in logs
    ]
    try:
        wait_for(logs[0], "epoch 1/3 |", nodes)
        package = project_answers(cpu_project)["package_name"]
        worker = subprocess.run(
            ["pgrep", "-P", str(nodes[1].pid), "-f", f"{package}.train"], capture_output=True, text=True
        )
        os.kill(int(worker.stdout.split()[0]), signal.SIGKILL)
        statuses = [timing.wait(node, 100) for node in nodes]
    finally:
        stop_all(nodes)
    text = "".join(log.read_text() for log in logs)
    assert statuses == [0, 0], text[-4000:]
    assert "resumed from" in text, text[-4000:]
    assert json.loads((out / "summary.json").read_text())["epochs_completed"] == 3


def start_two_nodes(
    project: Path, tmp_path: Path, *overrides: str, **env: str
) -> tuple[list[subprocess.Popen], list[Path]]:
    """Two launchers of one worker each as two nodes on loopback; node0 starts first and so holds the rendezvous."""
    with socket.socket() as probe:  # a port free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        "NNODES": "2",
        "NPROC": "1",
        "RDZV_HOST": "127.0.0.1",
        "RDZV_ID": uuid.uuid4().hex,
        "RDZV_PORT": str(port),
    } | env
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    common = (*EPOCHS, "epochs=3", f"output_dir={tmp_path / 'run'}", *overrides)
    nodes = [start_script(project, "train_multi_node.sh", logs[0], *common, **env)]
    budget = timing.Budget(60)
    while not listening(port):
        assert not budget.expired() and nodes[0].poll() is None, logs[0].read_text()[-3000:]
        time.sleep(0.1)
    nodes.append(start_script(project, "train_multi_node.sh", logs[1], *common, **env))
    return nodes, logs


@pytest.mark.slow  # two nodes train an epoch: some 15 s of two cores
def test_sigterm_to_both_launchers_of_a_two_node_run_saves_and_each_says_which_step(cpu_project, tmp_path):
    """A plain kill -TERM of both launchers, as scancel --signal=TERM does: each reads its own node's report."""
    nodes, logs = start_two_nodes(cpu_project, tmp_path)
    try:
        wait_for(logs[0], "epoch 1/3 |", nodes)
        for node in nodes:
            node.send_signal(signal.SIGTERM)
        statuses = [timing.wait(node, 90) for node in nodes]
    finally:
        stop_all(nodes)
    text = [log.read_text() for log in logs]
    assert statuses == [PREEMPTED_EXIT_CODE] * 2, text[0][-3000:] + text[1][-3000:]
    saved = re.search(r"received SIGTERM on ranks 0, 1: saved \S+ at step (\d+)", text[0])
    assert saved, text[0][-3000:]
    for node_text in text:
        said = node_text.rstrip().splitlines()[-1]
        assert said.startswith(f"torchrun: stopped by SIGTERM; its workers saved last.pt at step {saved[1]}; "), said


@pytest.mark.cluster  # waits out timeouts: about a minute and a half of the default run
def test_two_node_launch_fails_within_rdzv_timeout_when_a_node_dies(cpu_project, tmp_path):
    """kill -9 of a whole node (its torchrun and its worker) after the first epoch.

    The other node's worker fails at its next collective and its torchrun restarts it, but the
    restart cannot gather two nodes: it fails after RDZV_TIMEOUT seconds instead of waiting for ever.
    """
    rdzv_timeout = 20
    nodes, logs = start_two_nodes(cpu_project, tmp_path, RDZV_TIMEOUT=str(rdzv_timeout))
    try:
        wait_for(logs[0], "epoch 1/3 |", nodes)
        lost = workers_of(nodes[1])
        assert lost, logs[1].read_text()
        os.killpg(nodes[1].pid, signal.SIGKILL)
        kill(lost)
        killed = time.monotonic()
        status = nodes[0].wait(timeout=rdzv_timeout + 90)
        waited = time.monotonic() - killed
    finally:
        stop_all(nodes)
    text = logs[0].read_text()
    assert status not in (0, PREEMPTED_EXIT_CODE), text[-4000:]
    last = text.rstrip().splitlines()[-1]  # one line naming the rendezvous and the timeout, no traceback
    assert re.fullmatch(
        rf"torchrun: rendezvous \w+ at 127\.0\.0\.1:\d+ timed out: only this node of 2 joined within "
        rf"join_timeout={rdzv_timeout} s \(RDZV_TIMEOUT\); .*; exit status 1",
        last,
    ), text[-4000:]
    assert rdzv_timeout <= waited < rdzv_timeout + 60, waited


@pytest.mark.cluster  # waits out timeouts: about a minute and a half of the default run
def test_a_hung_worker_ends_the_launch_within_dist_timeout_and_rdzv_timeout(cpu_project, tmp_path):
    """SIGSTOP of one node's worker after the first epoch: alive, so torchrun sees nothing wrong.

    The other rank fails when its collective has waited dist_timeout_s; the restart that follows
    resumes or fails within RDZV_TIMEOUT, so both launchers end in bounded time.
    """
    dist_timeout, rdzv_timeout = 15, 15
    nodes, logs = start_two_nodes(
        cpu_project, tmp_path, f"dist_timeout_s={dist_timeout}", RDZV_TIMEOUT=str(rdzv_timeout)
    )
    hung: list[int] = []
    try:
        wait_for(logs[0], "epoch 1/3 |", nodes)
        hung = workers_of(nodes[1])
        assert hung, logs[1].read_text()
        os.kill(hung[0], signal.SIGSTOP)
        stopped = time.monotonic()
        bound = dist_timeout + rdzv_timeout + 60  # torchrun also waits up to 30 s for the hung worker to stop
        for node in nodes:
            node.wait(timeout=max(1.0, bound - (time.monotonic() - stopped)))
    finally:
        kill(hung)
        stop_all(nodes)
    text = logs[0].read_text()
    assert f"Timed out waiting {dist_timeout * 1000}ms" in text, text[-4000:]
