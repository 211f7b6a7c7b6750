"""The project rendered with default answers trains, checkpoints, resumes exactly and checks its config."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from rendering import (
    INTERRUPTED_RUN,
    SMOKE_OVERRIDES,
    project_answers,
    run_module,
    run_package_code,
    run_project_tests,
    train,
)


def test_default_project_trains_and_writes_checkpoints_and_summary(default_project, tmp_path):
    out = tmp_path / "run"
    result = train(default_project, *SMOKE_OVERRIDES, "epochs=2", f"output_dir={out}")

    assert "epoch 2/2 |" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 2
    assert summary["global_step"] == 2 * (205 // 32)  # 256 samples, 51 held out, full batches only
    assert summary["best_metric_name"] == "val_accuracy"
    assert 0.0 <= summary["best_metric"] <= 1.0
    assert summary["final_train_loss"] > 0.0
    best_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ") and "(best)" in line]
    assert summary["best_epoch"] == int(best_lines[-1].split("/")[0].removeprefix("epoch "))

    # The run ends with one line: what it reached, where its checkpoints are and what to run next.
    best, package = out / "checkpoints" / "best.pt", project_answers(default_project)["package_name"]
    assert result.stdout.splitlines()[-1] == (
        f"done: best val_accuracy {summary['best_metric']:.4f} at epoch {summary['best_epoch']} of 2; "
        f"checkpoints {best} (best), last.pt (last); "
        f"next: python -m {package}.evaluate {best} | python -m {package}.predict {best} IMAGE..."
    )

    for name in ("last.pt", "best.pt"):
        state = torch.load(out / "checkpoints" / name, weights_only=True)
        assert {"format_version", "layout", "model", "optimizer", "scaler", "progress", "rng", "config"} <= state.keys()
        assert {"epoch", "global_step", "best_metric", "best_epoch"} <= state["progress"].keys()
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["progress"]["epoch"] == 2


def _final_state(path):
    return torch.load(path / "checkpoints" / "last.pt", weights_only=True)


def test_resume_matches_an_uninterrupted_run_bit_for_bit(default_project, tmp_path):
    common = (*SMOKE_OVERRIDES, "deterministic=true")
    train(default_project, *common, "epochs=4", f"output_dir={tmp_path / 'straight'}")
    # Preempted in epoch 3 rather than a shorter run: the default cosine schedule spans `epochs`.
    interrupted = run_package_code(
        default_project, INTERRUPTED_RUN, *common, "epochs=4", f"output_dir={tmp_path / 'split'}"
    )
    assert "received SIGUSR1" in interrupted.stdout, interrupted.stderr
    # The stopped run's last line is the command that continues it, with the overrides it was given.
    package = project_answers(default_project)["package_name"]
    resume = shlex.join([f"{package}.train", *common, "epochs=4", f"output_dir={tmp_path / 'split'}", "resume=auto"])
    assert interrupted.stdout.splitlines()[-1].endswith(f"; resume: python -m {resume}")
    first = _final_state(tmp_path / "split")["progress"]  # the interrupted process's time, up to its save
    resumed = train(default_project, *common, "epochs=4", "resume=auto", f"output_dir={tmp_path / 'split'}")
    assert "resumed from" in resumed.stdout
    # summary.json counts the run's time over both processes (a requeued SLURM job's allocations).
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert first["allocations"] == 1 and first["wall_time_s"] > 0 and summary["allocations"] == 2
    assert abs(summary["wall_time_s"] - first["wall_time_s"] - summary["last_allocation_s"]) < 0.002, summary
    alone = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert alone["allocations"] == 1 and alone["wall_time_s"] == alone["last_allocation_s"] > 0

    straight, split = _final_state(tmp_path / "straight"), _final_state(tmp_path / "split")
    assert straight["progress"]["global_step"] == split["progress"]["global_step"]
    assert straight["model"].keys() == split["model"].keys()
    for key, tensor in straight["model"].items():
        assert torch.equal(tensor, split["model"][key]), key
    for param_id, moments in straight["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(split["optimizer"]["state"][param_id][name]))


def test_unknown_or_mistyped_config_keys_exit_nonzero_naming_the_key(default_project, tmp_path):
    for override, expected in [
        ("optim.lrr=0.1", "unknown config key 'optim.lrr'"),
        ("data.batch_size=ten", "data.batch_size: expected int"),
        ("data.batch_size=0", "data.batch_size must be >= 1"),
        ("data.dataset=mnist", "'digits', 'synthetic'"),
    ]:
        result = run_module(default_project, "train", override, f"output_dir={tmp_path}")
        assert result.returncode != 0
        assert expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_config_file_that_is_not_yaml_is_refused(default_project, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    result = run_module(default_project, "train", "--config", str(bad))
    assert result.returncode != 0
    assert "is not valid YAML" in result.stderr


def test_rendered_project_passes_its_own_tests(default_project):
    result = run_project_tests(default_project)
    assert result.returncode == 0, result.stdout[-4000:]


def epoch_lines(text: str) -> dict[str, list[tuple[str, str]]]:
    """The epoch lines in ``text`` by epoch (``"20/20"``): each field's name and value as printed."""
    lines = {}
    for line in text.splitlines():
        if line.startswith("epoch ") and " | " in line:
            epoch, *fields, _seconds = line.split(" | ")
            lines[epoch.removeprefix("epoch ")] = [tuple(field.split(" ", 1)) for field in fields]
    return lines


def test_the_default_project_learns_the_digits_with_its_own_config(default_project, tmp_path):
    """Exactly what a new user runs first: the rendered config, unchanged, on the digits."""
    out = tmp_path / "run"
    result = train(default_project, "log.progress_bar=false", f"output_dir={out}", timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 20
    assert summary["best_metric"] >= 0.98, summary
    # Training accuracy, on the training batches' hard labels, rises with the epochs.
    train_accuracy = [float(dict(fields)["train_accuracy"]) for fields in epoch_lines(result.stdout).values()]
    assert len(train_accuracy) == 20 and train_accuracy[0] < 0.9 and train_accuracy[-1] >= 0.98, train_accuracy
    assert summary["final_metrics"]["train_accuracy"] == pytest.approx(train_accuracy[-1], abs=1e-4)

    # The README's sample output is this run's: its epochs, columns and learning rates as printed, its
    # losses and accuracy within what another machine's arithmetic (or thread count) changes; its speed
    # is another machine's.
    sample, printed = epoch_lines((default_project / "README.md").read_text()), epoch_lines(result.stdout)
    assert "20/20" in sample and sample.keys() <= printed.keys(), (sample.keys(), printed.keys())
    for epoch, fields in sample.items():
        real = dict(printed[epoch])
        assert [name for name, _ in fields] == [name for name, _ in printed[epoch]], (epoch, fields)
        for name, value in fields:
            shown, ran = float(value.split()[0]), float(real[name].split()[0])
            if name == "samples_per_s":
                assert shown > 0 and ran > 0, (epoch, value, real[name])
            elif name == "data_wait":
                assert 0 <= shown <= 1 and 0 <= ran <= 1, (epoch, value, real[name])
            elif name == "lr":
                assert value == real[name], (epoch, value, real[name])
            else:
                assert abs(shown - ran) <= 0.05 + 0.25 * ran, (epoch, name, value, real[name])
