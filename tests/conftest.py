from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from rendering import render, snapshot_template  # noqa: E402


@pytest.fixture(scope="session")
def template_dir(tmp_path_factory) -> Path:
    """A plain-directory copy of the template's working tree, shared by the session's renders."""
    return snapshot_template(tmp_path_factory.mktemp("template"))


@pytest.fixture(scope="session")
def default_project(template_dir, tmp_path_factory) -> Path:
    """The project a user gets by accepting every default."""
    return render(template_dir, tmp_path_factory.mktemp("default") / "my-project")


@pytest.fixture
def render_project(template_dir, tmp_path_factory):
    """Render a project with the given answers (defaults for the rest) into a fresh directory.

    Not inside the test's ``tmp_path``: tests train with ``output_dir=tmp_path``, which must not hold
    anything else (train refuses to write a run over another run's directory).
    """

    def _render(**answers) -> Path:
        return render(template_dir, tmp_path_factory.mktemp("project") / "project", answers)

    return _render


def pytest_configure(config):
    config.addinivalue_line("markers", "exhaustive: the exhaustive combination matrix (run with: pytest -m exhaustive)")
    config.addinivalue_line("markers", "slurm: a real one-host SLURM cluster, needs root (run with: pytest -m slurm)")
    config.addinivalue_line("markers", "cluster: multi-node failures waiting out timeouts (pytest -m cluster)")
    config.addinivalue_line("markers", "slow: heavier scenarios beyond the default run's budget (pytest -m slow)")


ASKED_FOR_BY_MARKER = {
    "exhaustive": "exhaustive matrix tier: run with pytest -m exhaustive",
    "slurm": "starts SLURM daemons: run with pytest -m slurm",
    "cluster": "waits out rendezvous and collective timeouts: run with pytest -m cluster",
    "slow": "a heavier scenario, outside the default run's 15 minutes: run with pytest -m slow",
}


def pytest_collection_modifyitems(config, items):
    """The exhaustive tier, the SLURM check, the cluster failures and the slow scenarios run only when asked for."""
    for marker, reason in ASKED_FOR_BY_MARKER.items():
        if marker in (config.option.markexpr or ""):
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """Print the matrix tiers' counts (recorded by tests/test_matrix.py, also under pytest-xdist)."""
    for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", []):
        for name, value in getattr(report, "user_properties", []):
            if name == "matrix":
                terminalreporter.write_line(value)
