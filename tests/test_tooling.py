"""The rendered project's tooling works as shipped: Makefile targets, pre-commit hooks and the CI workflow."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import timing
import yaml
from rendering import SMOKE_OVERRIDES, check, project_answers, project_env

MAXIMAL_FILES = {
    "parallelism": "ddp",
    "scheduler": "cosine",
    "warmup": True,
    "freezing": "patterns",
    "freeze_bn": True,
    "pretrained": True,
    "amp": "fp16",
    "loggers": ["csv", "tensorboard", "wandb", "mlflow"],
    "ci": "github",
}


def run(project: Path, argv: list[str], env: dict[str, str] | None = None, timeout: float = 600):
    env = env or project_env(project)
    return timing.run(argv, timeout, cwd=project, env=env)


def make(project: Path, *args: str) -> subprocess.CompletedProcess:
    """``make ARGS`` with this interpreter as the project's Python and the package importable from src/."""
    return run(project, ["make", f"PYTHON={sys.executable}", *args])


CACHES = {"__pycache__", ".pytest_cache", ".ruff_cache"}


def tree(project: Path) -> dict[str, bytes]:
    """The project's files and their contents, caches left out."""
    files = (path for path in project.rglob("*") if path.is_file())
    return {str(path.relative_to(project)): path.read_bytes() for path in files if not CACHES & set(path.parts)}


def test_ci_answer_none_renders_no_workflow(render_project):
    assert not (render_project(ci="none") / ".github").exists()


# --- Makefile ------------------------------------------------------------------------------------


def test_make_without_a_target_lists_every_target(render_project):
    project = render_project()
    listed = check(make(project), "make", project).stdout
    for target in ("help", "install", "train", "test", "lint", "format", "schema", "clean"):
        assert f"make {target} " in listed, listed


def test_make_install_takes_torch_from_the_chosen_wheel_index(render_project):
    cpu_project, gpu_project = render_project(device="cpu"), render_project(device="auto")
    cpu = check(make(cpu_project, "-n", "install"), "make -n install", cpu_project).stdout
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in cpu
    # device auto/cuda: PyPI's own build unless TORCH names one (the README says why and how)
    gpu = check(make(gpu_project, "-n", "install"), "make -n install", gpu_project).stdout
    assert "pip install torch \n" in gpu or "pip install torch\n" in gpu, gpu
    cuda = check(make(gpu_project, "-n", "install", "TORCH=cu128"), "make -n install", gpu_project).stdout
    assert "pip install torch --index-url https://download.pytorch.org/whl/cu128" in cuda
    assert 'pip install -e ".[dev]"' in cuda


def test_make_install_makes_a_venv_only_when_no_environment_is_active(render_project):
    project = render_project()
    bare = {key: value for key, value in project_env(project).items() if key not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    fresh = check(run(project, ["make", "-n", "install"], env=bare), "make -n install", project).stdout
    assert re.search(r"^\S*python3(\.\d+)? -m venv \.venv$", fresh, re.MULTILINE), fresh
    assert ".venv/bin/python -m pip install torch" in fresh and '.venv/bin/python -m pip install -e ".[dev]"' in fresh
    active = check(run(project, ["make", "-n", "install"], env={**bare, "VIRTUAL_ENV": "/elsewhere"}), "make", project)
    assert "venv" not in active.stdout and active.stdout.startswith("python -m pip install torch"), active.stdout
    train = check(run(project, ["make", "-n", "train"], env=bare), "make -n train", project).stdout
    assert train.startswith(".venv/bin/python -m my_project.train"), train


def test_make_lint_format_test_train_schema_and_clean_run_on_a_fresh_render(render_project, tmp_path):
    project = render_project()
    rendered = tree(project)
    check(make(project, "lint"), "make lint", project)
    check(make(project, "format"), "make format", project)
    check(make(project, "schema"), "make schema", project)
    assert tree(project) == rendered, "format or schema changed a freshly rendered file"

    check(make(project, "test", "ARGS=-q tests/test_config.py"), "make test", project)
    out = tmp_path / "run"
    overrides = " ".join([*SMOKE_OVERRIDES, "epochs=1", f"output_dir={out}"])
    check(make(project, "train", f"ARGS={overrides}"), "make train", project)
    assert (out / "summary.json").is_file() and (out / "checkpoints" / "last.pt").is_file()

    (project / "runs").mkdir()
    (project / "runs" / "keep.txt").write_text("a run's outputs\n")
    package = project / "src" / project_answers(project)["package_name"]
    (package / "__pycache__").mkdir(exist_ok=True)  # bytecode may be off (PYTHONDONTWRITEBYTECODE)
    (package / "__pycache__" / "config.cpython-311.pyc").write_bytes(b"")
    (project / "build").mkdir()
    assert (project / ".ruff_cache").is_dir()
    check(make(project, "clean"), "make clean", project)
    assert not any(project.rglob("__pycache__")) and not (project / "build").exists()
    assert not (project / ".ruff_cache").exists() and not (project / ".pytest_cache").exists()
    assert (project / "runs" / "keep.txt").is_file()
    assert tree(project).keys() - {"runs/keep.txt"} == rendered.keys()


# --- pre-commit ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pre_commit_home(tmp_path_factory) -> Path:
    """One hook cache for the session: the hooks' environments are installed from PyPI once."""
    return tmp_path_factory.mktemp("pre-commit-home")


def pre_commit(project: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**project_env(project), "PRE_COMMIT_HOME": str(home)}
    return run(project, [sys.executable, "-m", "pre_commit", "run", *args], env=env)


@pytest.mark.parametrize("answers", [{}, MAXIMAL_FILES], ids=["defaults", "maximal"])
def test_pre_commit_passes_on_a_fresh_render_and_refuses_conflict_markers(answers, render_project, pre_commit_home):
    project = render_project(**answers)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    result = pre_commit(project, pre_commit_home, "--all-files")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Failed" not in result.stdout and "files were modified" not in result.stdout

    # What `copier update` writes where the user's edit and the template's change clash.
    config = project / "configs" / "default.yaml"
    config.write_text(
        config.read_text().replace(
            "epochs: 20\n", "<<<<<<< before updating\nepochs: 7\n=======\nepochs: 30\n>>>>>>> after updating\n"
        )
    )
    (project / "pyproject.toml.rej").write_text("@@ a hunk copier update could not apply\n")
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    result = pre_commit(project, pre_commit_home, "--files", "configs/default.yaml", "pyproject.toml.rej")
    assert result.returncode != 0
    assert "configs/default.yaml:" in result.stdout and "Merge conflict string" in result.stdout, result.stdout
    assert "pyproject.toml.rej" in result.stdout


# --- CI workflow ---------------------------------------------------------------------------------


def see_installed_packages(path: Path) -> None:
    """Let the virtual environment at ``path`` see this interpreter's installed packages.

    The workflow's steps then install into it as on a runner, but torch (and the other dependencies)
    are found already installed instead of being downloaded.
    """
    # Python 3.11's venv bundles an old setuptools that would hide the newer one torch requires.
    subprocess.run([path / "bin" / "python", "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True)
    purelib = Path(sysconfig.get_paths(vars={"base": str(path), "platbase": str(path)})["purelib"])
    (purelib / "test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


def test_ci_workflow_steps_run_in_order_in_a_fresh_environment(render_project, tmp_path):
    """Every ``run:`` step of .github/workflows/ci.yml, in order, as GitHub's runner runs it.

    The ``uses:`` steps (checkout, setup-python with the pip cache) cannot run here: the project is
    already on disk and this interpreter plays the runner's Python. One substitution: download.pytorch.org
    is unreachable from the test machines and the CPU wheel is ~200 MB, so the `.venv` that
    `make install` makes is made first (by the Makefile's own rule) and shown this interpreter's
    packages, and the install step runs with TORCH_INDEX=--no-index (the Makefile's override of the
    wheel index): pip finds torch already installed. A test above checks that TORCH=cpu means the CPU
    index. Everything else, the project's editable install with its dev tools, ruff and the project's
    test suite, runs as written.
    """
    # A lean combination: the default one's own test suite already runs in test_default_project.py.
    project = render_project(ci="github", python_version="3.11", device="cpu", scheduler="none", loggers=[])
    workflow = yaml.safe_load((project / ".github/workflows/ci.yml").read_text())
    (job,) = workflow["jobs"].values()
    uses = [step["uses"].split("@")[0] for step in job["steps"] if "uses" in step]
    assert uses == ["actions/checkout", "actions/setup-python"]
    setup = next(step for step in job["steps"] if step.get("uses", "").startswith("actions/setup-python"))
    assert setup["with"] == {
        "python-version": project_answers(project)["python_version"],
        "cache": "pip",
        "cache-dependency-path": "pyproject.toml",
    }
    runs = [step["run"] for step in job["steps"] if "run" in step]
    assert runs[0] == "make install TORCH=cpu"

    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH")}
    env.update(CI="true", TORCH_INDEX="--no-index", OMP_NUM_THREADS="1", VENV_PYTHON=sys.executable)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    check(run(project, ["make", ".venv/bin/python"], env=env), "make .venv/bin/python", project)
    see_installed_packages(project / ".venv")
    for command in runs:
        # GitHub's default shell for run steps
        result = run(project, ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", command], env=env)
        assert result.returncode == 0, f"{command}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    name = project_answers(project)["project_name"]
    installed = run(project, [str(project / ".venv/bin/python"), "-m", "pip", "show", name], env)
    assert "Editable project location" in installed.stdout
