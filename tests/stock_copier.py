"""Stock Copier at a given version, in a virtual environment of its own, to check the test harness against.

The matrix renders through Copier with speed-ups patched in (tests/matrix.py) and reads the questionnaire
with its own Jinja (tests/questionnaire.py); tests/test_copier_versions.py compares both with what
unpatched Copier does at copier.yml's ``_min_copier_version`` and at the newest release on the index.
Each version's environment is created once under a cache directory (``$COPIER_PYTORCH_CACHE``, default
``~/.cache/copier-pytorch``) and reused by later runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import yaml
from questionnaire import COPIER_YML


class IndexUnavailable(RuntimeError):
    """pip could not reach the package index (offline machine)."""


def cache_dir() -> Path:
    root = Path(os.environ.get("COPIER_PYTORCH_CACHE", Path.home() / ".cache" / "copier-pytorch"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def minimum_version() -> str:
    return str(yaml.safe_load(COPIER_YML.read_text())["_min_copier_version"])


def newest_version() -> str:
    """The newest Copier release on the index, as pip resolves it."""
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps"]
    result = subprocess.run([*command, "--quiet", "--report", "-", "copier"], capture_output=True, text=True)
    if result.returncode != 0:
        raise IndexUnavailable(result.stderr[-2000:])
    return json.loads(result.stdout)["install"][0]["metadata"]["version"]


@contextlib.contextmanager
def _locked(path: Path):
    """One process at a time (pytest-xdist workers share the cache)."""
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def copier_python(version: str) -> Path:
    """The interpreter of a virtual environment holding ``copier==version`` (created on first use)."""
    env = cache_dir() / f"copier-{version}"
    python = env / "bin" / "python"
    done = env / ".installed"
    with _locked(cache_dir() / f"copier-{version}.lock"):
        if not done.is_file():
            venv.EnvBuilder(clear=True, with_pip=True).create(env)
            install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            result = subprocess.run([*install, f"copier=={version}"], capture_output=True, text=True)
            if result.returncode != 0:
                raise IndexUnavailable(result.stderr[-2000:])
            done.write_text(version + "\n")
    return python


# Runs in the version's own interpreter: renders each job with the public API and nothing patched.
_DRIVER = """
import importlib.metadata, json, sys
import copier

spec = json.loads(open(sys.argv[1]).read())
for job in spec["jobs"]:
    copier.run_copy(
        spec["template"], job["dst"], data=job["data"], defaults=True, unsafe=True, quiet=True,
        exclude=["*", "!.copier-answers.yml"] if spec["answers_only"] else [],
    )
print(importlib.metadata.version("copier"))
"""


def render_stock(
    version: str, template: Path, jobs: list[tuple[dict[str, Any], Path]], spec: Path, answers_only: bool = False
) -> subprocess.Popen:
    """Start rendering ``jobs`` (answers, destination) with stock Copier ``version``; ``finish`` waits for it.

    ``spec`` is a scratch file for the job list. ``answers_only`` writes nothing but ``.copier-answers.yml``
    (Copier still runs the whole questionnaire).
    """
    jobs_spec = [{"data": data, "dst": str(dst)} for data, dst in jobs]
    spec.write_text(json.dumps({"template": str(template), "answers_only": answers_only, "jobs": jobs_spec}))
    return subprocess.Popen(
        [str(copier_python(version)), "-c", _DRIVER, str(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, version: str) -> None:
    """Wait for a ``render_stock`` process; fail with Copier's output if it failed or ran another version."""
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise AssertionError(f"stock Copier {version} failed:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    assert stdout.split()[-1] == version, f"asked for Copier {version}, ran {stdout.split()[-1]}"
