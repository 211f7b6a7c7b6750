"""Devices and parallelism on CPU: DDP under torchrun with gloo, and the GPU choices' CPU fallback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import copier
import pytest
import timing
import torch
from rendering import SMOKE_OVERRIDES, project_env, run_module, run_project_tests, torchrun, train

TRAIN_SIZE = 256 - round(256 * 0.2)  # SMOKE_OVERRIDES: 256 synthetic samples, 20 % held out


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def test_ddp_trains_with_two_torchrun_processes_on_cpu_and_resumes(render_project, tmp_path):
    project = render_project(parallelism="ddp", device="auto")
    out = tmp_path / "run"
    result = torchrun(project, *SMOKE_OVERRIDES, "data.batch_size=16", "epochs=2", f"output_dir={out}")

    # torchrun exits 0 only when both ranks did; rank 0 alone prints, and warns once about the CPU.
    assert result.stdout.count("epoch 2/2 |") == 1, result.stdout
    assert len(warnings_in(result.stderr)) == 1, result.stderr
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    # metrics.csv: the default csv logger, written by rank 0 alone.
    assert sorted(path.name for path in out.iterdir()) == ["checkpoints", "metrics.csv", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    # data.batch_size is the global batch: each rank takes 8 of every 16, so the run takes the steps of one process.
    assert summary["global_step"] == 2 * (TRAIN_SIZE // 2 // 8)
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in state["model"])

    resumed = torchrun(project, *SMOKE_OVERRIDES, "data.batch_size=16", "epochs=3", "resume=auto", f"output_dir={out}")
    assert resumed.stdout.count("resumed from") == 1, resumed.stdout
    assert json.loads((out / "summary.json").read_text())["epochs_completed"] == 3


def test_other_ranks_are_quiet_but_a_user_s_own_prints_reach_the_console(render_project, tmp_path):
    project = render_project(parallelism="ddp", device="cpu")
    script = tmp_path / "chatty.py"
    script.write_text(
        "import os, sys\n"
        "from my_project import train\n"
        "train_one_epoch = train.train_one_epoch\n"
        "def chatty(*args):\n"
        "    print(f\"hello from rank {os.environ['RANK']}\", flush=True)\n"
        "    return train_one_epoch(*args)\n"
        "train.train_one_epoch = chatty\n"
        "train.main(sys.argv[1:])\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    argv = [*command, *SMOKE_OVERRIDES, "epochs=1", f"output_dir={tmp_path / 'run'}"]
    result = timing.run(argv, 300, cwd=project, env=project_env(project))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "hello from rank 0" in result.stdout and "hello from rank 1" in result.stdout
    assert result.stdout.count("epoch 1/1 |") == 1, result.stdout  # the run's own output: rank 0 alone


def test_ddp_project_runs_its_own_tests_with_identical_weights_on_both_ranks(render_project):
    project = render_project(parallelism="ddp", sync_batchnorm=True)
    result = run_project_tests(project, "tests/test_distributed.py", timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "1 passed" in result.stdout


@pytest.mark.parametrize(
    "answers",
    [
        {"parallelism": "dataparallel", "device": "auto", "gpu_ids": "0,1"},
        {"parallelism": "dataparallel", "device": "cpu"},
        {"parallelism": "none", "device": "cuda", "gpu_ids": "1"},
        {"parallelism": "ddp", "device": "cuda", "gpu_ids": "0,1", "sync_batchnorm": True},
    ],
    ids=["dataparallel-auto", "dataparallel-cpu", "cuda-gpu1", "ddp-cuda-syncbn"],
)
def test_gpu_choices_train_on_cpu_after_exactly_one_warning(render_project, tmp_path, answers):
    project = render_project(**answers)
    out = tmp_path / "run"
    result = train(project, *SMOKE_OVERRIDES, "epochs=1", f"output_dir={out}")

    assert len(warnings_in(result.stderr)) == 1, result.stderr
    assert "CPU" in warnings_in(result.stderr)[0]
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in state["model"])  # saved from the bare module


def test_gpu_ids_from_the_config_are_checked_and_name_the_key(render_project, tmp_path):
    project = render_project(device="auto", gpu_ids="0,1")
    assert 'gpu_ids: "0,1"' in (project / "configs/default.yaml").read_text()
    result = run_module(project, "train", *SMOKE_OVERRIDES, "gpu_ids=first", f"output_dir={tmp_path}")
    assert result.returncode != 0
    assert "gpu_ids" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("gpu_ids", ["0 1", "gpu0", "", "0,,1"])  # "0, 1" is taken as 0,1 (test_questionnaire)
def test_questionnaire_refuses_malformed_gpu_ids(template_dir, tmp_path, gpu_ids):
    with pytest.raises(ValueError, match="gpu_ids"):
        copier.run_copy(
            str(template_dir), str(tmp_path / "p"), data={"gpu_ids": gpu_ids}, defaults=True, unsafe=True, quiet=True
        )


def test_checkpoint_with_module_prefix_resumes(render_project, tmp_path):
    """Checkpoints saved from a DataParallel/DDP wrapper by older code carry ``module.``; they still load.

    Every render strips the prefix with the same code (checkpoint.load_model_state): one DDP render shows it.
    """
    project = render_project(parallelism="ddp")
    out = tmp_path / "run"
    train(project, *SMOKE_OVERRIDES, "epochs=1", f"output_dir={out}")
    path = out / "checkpoints/last.pt"
    state = torch.load(path, weights_only=True)
    state["model"] = {f"module.{key}": value for key, value in state["model"].items()}
    old = tmp_path / "old.pt"
    torch.save(state, old)

    result = train(project, *SMOKE_OVERRIDES, "epochs=2", f"resume={old}", f"output_dir={tmp_path / 'again'}")
    assert "resumed from" in result.stdout
    resumed = torch.load(tmp_path / "again/checkpoints/last.pt", weights_only=True)
    assert resumed["progress"]["epoch"] == 2
    assert not any(key.startswith("module.") for key in resumed["model"])


@pytest.mark.parametrize("parallelism", ["none", "dataparallel"])
def test_without_ddp_no_distributed_code_or_scripts_are_rendered(render_project, parallelism):
    project = render_project(parallelism=parallelism)
    assert not (project / "scripts").exists()
    assert not list(project.rglob("test_distributed.py"))
    assert not [path for path in project.rglob("*.py") if "torch.distributed" in path.read_text()]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs its CUDA cases instead")
def test_gpu_check_script_skips_cleanly_without_a_gpu():
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    result = timing.run([sys.executable, str(script)], 120)
    assert result.returncode == 0, result.stderr
    assert "no GPU, skipped" in result.stdout


@pytest.mark.slow  # the pairwise matrix's DDP rows learn to their bars in the plain run
def test_two_ddp_ranks_learn_as_well_as_one_process(render_project, tmp_path):
    """The global batch is split over the ranks: the same steps at the same learning rate, the same accuracy."""
    project = render_project(parallelism="ddp", device="cpu")
    common = ("log.progress_bar=false", "epochs=8")
    train(project, *common, f"output_dir={tmp_path / 'one'}")
    torchrun(project, *common, f"output_dir={tmp_path / 'two'}")
    one, two = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two"))
    assert one["global_step"] == two["global_step"]
    assert two["best_metric"] >= 0.9
    assert abs(one["best_metric"] - two["best_metric"]) <= 0.02, (one["best_metric"], two["best_metric"])
