"""Bad checkpoints, config files, keys and values stop training with one clear line and touch no checkpoint.

Every case runs against an output directory that already holds a run's checkpoints (a copy of one
trained run), so the test also proves that a refused run leaves ``last.pt``/``best.pt`` byte for byte
and mtime for mtime as they were.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from rendering import SMOKE_OVERRIDES, run_module, train


@pytest.fixture(scope="module")
def trained_run(default_project, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad-input") / "run"
    train(default_project, *SMOKE_OVERRIDES, "epochs=1", f"output_dir={out}")
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"last.pt", "best.pt"}
    return out


def truncate(last: Path) -> None:
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])


def overwrite_header(last: Path) -> None:
    data = last.read_bytes()
    last.write_bytes(b"\0" * 64 + data[64:])


def replace_with_text(last: Path) -> None:
    last.write_text("not a checkpoint\n")


def write_config(name: str, text: str):
    def _write(run: Path) -> list[str]:
        path = run / name
        path.write_text(text)
        return ["--config", str(path)]

    return _write


CASES = {
    # name: (damage to last.pt or None, extra arguments, the words the one error line must contain)
    "truncated checkpoint": (truncate, [], "last.pt is unreadable or corrupt"),
    "checkpoint with a damaged header": (overwrite_header, [], "last.pt is unreadable or corrupt"),
    "file that is no checkpoint": (replace_with_text, [], "last.pt is unreadable or corrupt"),
    "checkpoint of a wider model": (None, ["model.width=16"], "last.pt does not fit this model"),
    "checkpoint of another architecture": (None, ["model.arch=mlp"], "last.pt does not fit this model"),
    "config file that is not YAML": (None, [write_config("bad.yaml", "epochs: [1, 2\n")], "is not valid YAML"),
    "config file that is a list": (None, [write_config("list.yaml", "- 1\n- 2\n")], "must hold a mapping"),
    "unknown key in a config file": (None, [write_config("typo.yaml", "optim:\n  lrr: 0.1\n")], "'optim.lrr'"),
    "unknown override key": (None, ["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
    "mistyped value": (None, ["epochs=two"], "epochs: expected int"),
    "negative learning rate": (None, ["optim.lr=-0.001"], "optim.lr must be > 0.0"),
    "zero batch size": (None, ["data.batch_size=0"], "data.batch_size must be >= 1"),
    "missing resume checkpoint": (None, ["resume=nowhere/last.pt"], "checkpoint nowhere/last.pt does not exist"),
    "negative seed": (None, ["seed=-1"], "seed must be >= 0, got -1"),
    "Adam betas out of range": (None, ["optim.betas=[1.5, 2]"], "optim.betas[0] must be < 1.0, got 1.5"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_exits_with_one_clear_line_and_leaves_checkpoints_untouched(
    case, default_project, trained_run, tmp_path
):
    damage, extra, expected = CASES[case]
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # copy2 keeps the mtimes
    if damage is not None:
        damage(run / "checkpoints" / "last.pt")
    arguments = [item(run) if callable(item) else [item] for item in extra]
    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in (run / "checkpoints").iterdir()}

    result = run_module(
        default_project, "train", *SMOKE_OVERRIDES, "resume=auto", f"output_dir={run}", *sum(arguments, [])
    )

    assert result.returncode != 0, result.stdout
    # device=auto on a machine without a GPU adds its one-line CPU-fallback warning; the error is the rest.
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    after = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in (run / "checkpoints").iterdir()}
    assert after == before
    assert (
        not (run / "summary.json").exists()
        or (trained_run / "summary.json").read_bytes() == (run / "summary.json").read_bytes()
    )
