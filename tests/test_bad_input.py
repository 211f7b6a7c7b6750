"""Bad checkpoints, config files, keys and values stop training with one clear line and touch no checkpoint.

Every case runs against an output directory that already holds a run's checkpoints (a copy of one
trained run), so the test also proves that a refused run leaves ``last.pt``/``best.pt`` byte for byte
and mtime for mtime as they were.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from rendering import SMOKE_OVERRIDES, check, project_answers, run_in_project, run_module, run_package_code, train


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


def drop_rng(last: Path) -> None:
    state = torch.load(last, weights_only=True)
    del state["rng"]
    torch.save(state, last)


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
    "checkpoint directory to resume from": (
        None,
        [lambda run: [f"resume={run / 'checkpoints'}"]],
        "checkpoints is a directory; give a checkpoint file (.pt), e.g. ",
    ),
    "checkpoint without random-number states": (drop_rng, [], "last.pt has no random-number state (rng)"),
    "negative seed": (None, ["seed=-1"], "seed must be >= 0, got -1"),
    "Adam betas out of range": (None, ["optim.betas=[1.5, 2]"], "optim.betas[0] must be < 1.0, got 1.5"),
    "resume parting the norm and bias decays": (
        None,
        ["optim.bias_weight_decay=0.1"],
        "optim.norm_weight_decay and optim.bias_weight_decay: in the resumed run they were equal",
    ),
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


CONFIG_REFUSALS = """
import importlib, pathlib, sys
config = importlib.import_module(pkg + ".config")
model = importlib.import_module(pkg + ".model")
duplicate = pathlib.Path(sys.argv[1])
duplicate.write_text("epochs: 1\\noptim:\\n  lr: 0.1\\n  weight_decay: 0.0\\n  lr: 0.2\\n")
cases = {
    "--config": "config file %s sets optim.lr twice (lines 3 and 5): keep one" % duplicate,
    "model.dropout=1.0": "model.dropout must be < 1.0, got 1.0",
    "data.batch_size=1000000000000000000": "data.batch_size must be <= 16777216, got 1000000000000000000",
    "model.width=100000000000": "model.width must be <= 16384, got 100000000000",
    "optim.lr=1e308": "optim.lr must be <= 1e+38, got 1e+308",
    "optim.betas=0.9": "optim.betas: expected a list of 2 floats like [0.9, 0.999], got 0.9",
}
for case, expected in cases.items():
    try:
        config.load_config(duplicate, []) if case == "--config" else config.load_config(None, [case])
    except config.ConfigError as err:
        assert str(err) == expected, (case, str(err))
    else:
        raise AssertionError(case + " was taken")
# A model too large for the memory: torch's allocation error becomes one line naming the setting.
def too_large(cfg, info):
    raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 3600000000000 bytes.")
model.MODELS["cnn"] = too_large
try:
    model.build_model(config.ModelConfig(), None)
except config.ConfigError as err:
    assert str(err) == "model.width=32: the model does not fit in this machine's memory (one tensor of 3352.8 GiB)", err
else:
    raise AssertionError("the allocation error escaped")
"""


def test_duplicate_keys_absurd_sizes_and_a_scalar_for_a_pair_are_refused_naming_the_key(default_project, tmp_path):
    result = run_package_code(default_project, CONFIG_REFUSALS, str(tmp_path / "duplicate.yaml"))
    check(result, "the config's refusals", default_project)


def test_a_resume_names_in_one_warning_the_changed_settings_it_does_not_apply(default_project, trained_run, tmp_path):
    """optim.lr, the norm and bias decays and schedule.min_lr live on in the optimiser's and the schedule's state
    (the parameter groups are laid out alike while the two decays stay equal); model.dropout applies."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    changed = (
        "optim.lr=0.01",
        "schedule.min_lr=0.001",
        "model.dropout=0.2",
        "optim.weight_decay=0.01",
        "optim.norm_weight_decay=0.05",
        "optim.bias_weight_decay=0.05",
    )
    result = train(default_project, *SMOKE_OVERRIDES, "epochs=2", "resume=auto", f"output_dir={run}", *changed)
    warnings = [line for line in result.stderr.splitlines() if "do not apply" in line]
    assert warnings == [
        "warning: a resume restores the checkpoint's training state, so these changed settings do not apply: "
        "optim.lr=0.01 (the checkpoint's: 0.002), optim.norm_weight_decay=0.05 (the checkpoint's: 0.0), "
        "optim.bias_weight_decay=0.05 (the checkpoint's: 0.0), schedule.min_lr=0.001 (the checkpoint's: 0.0); "
        "a new run, in another output_dir, takes them"
    ], result.stderr


# A full disk as torch's writer meets it: part of the file written, then a RuntimeError (not an OSError).
FULL_DISK = """
import sys
import torch
train = importlib.import_module(pkg + ".train")


def full_disk(obj, file, *args, **kwargs):
    file.write(b"PK" + bytes(600))
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


torch.save = full_disk
train.main(sys.argv[1:])
"""


def test_a_full_disk_stops_the_run_with_one_line_and_leaves_the_last_checkpoint_as_it_was(
    default_project, trained_run, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = {path.name: path.read_bytes() for path in (run / "checkpoints").iterdir()}
    result = run_package_code(
        default_project, FULL_DISK, *SMOKE_OVERRIDES, "epochs=2", "resume=auto", f"output_dir={run}"
    )
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        f"error: cannot write checkpoint {run / 'checkpoints' / 'last.pt'} (RuntimeError: unexpected pos 704 vs 598; "
    ), lines[0]
    assert lines[0].endswith("free there: is the disk full?); last.pt was left as it was"), lines[0]
    # No temporary file left beside it, and both checkpoints as they were.
    assert {path.name: path.read_bytes() for path in (run / "checkpoints").iterdir()} == before


def test_evaluate_given_a_directory_names_the_checkpoint_file_it_expects(default_project, trained_run):
    result = run_module(default_project, "evaluate", str(trained_run))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint {trained_run} is a directory; give a checkpoint file (.pt), "
        f"e.g. {trained_run / 'checkpoints' / 'last.pt'}"
    ), result.stderr
    assert "Traceback" not in result.stderr


def test_a_key_given_twice_on_the_command_line_is_refused_naming_both(default_project, trained_run, tmp_path):
    """Which of optim.lr=0.1 optim.lr=0.2 would win is a guess: train takes neither and touches nothing."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = {path.name: path.read_bytes() for path in (run / "checkpoints").iterdir()}
    command = [sys.executable, "-m", f"{project_answers(default_project)['package_name']}.train", *SMOKE_OVERRIDES]
    result = run_in_project(
        default_project, [*command, "optim.lr=0.1", "resume=auto", f"output_dir={run}", "optim.lr=0.2"]
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert errors == ["error: optim.lr is given twice (optim.lr=0.1 and optim.lr=0.2): keep one"], result.stderr
    assert {path.name: path.read_bytes() for path in (run / "checkpoints").iterdir()} == before
