"""Debug runs, present in every render as run-time config: fast_run, overfit_batches, profile, detect_anomaly."""

from __future__ import annotations

import json

from rendering import SMOKE_OVERRIDES, check, run_package_code, train

# Train through train.main while counting what the task scores: the training loss once per batch
# (with a fingerprint of the batch's targets) and the validation metrics once per batch.
COUNTING_RUN = """
import json, sys
task = importlib.import_module(pkg + ".task")
train = importlib.import_module(pkg + ".train")
loss, sums, batches = task.training_loss, task.evaluation_sums, {"train": [], "val": 0}
def counted_loss(outputs, batch, *settings):
    batches["train"].append(batch[1].tolist())
    return loss(outputs, batch, *settings)
def counted_sums(outputs, batch):
    batches["val"] += 1
    return sums(outputs, batch)
task.training_loss, task.evaluation_sums = counted_loss, counted_sums
train.main(sys.argv[1:])
print("BATCHES " + json.dumps(batches))
"""

# A loss whose forward is finite but whose backward makes a NaN: d sqrt(x)/dx at x = 0 is 1 / (2 * 0).
NAN_IN_BACKWARD_RUN = """
import sys, torch
task = importlib.import_module(pkg + ".task")
train = importlib.import_module(pkg + ".train")
loss = task.training_loss
def loss_with_nan_gradient(outputs, batch, *settings):
    mean, samples = loss(outputs, batch, *settings)
    return mean + 0.0 * torch.sqrt(outputs.sum() * 0.0), samples
task.training_loss = loss_with_nan_gradient
train.main(sys.argv[1:])
"""


def counted_batches(result) -> dict:
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("BATCHES ")]
    return json.loads(line.removeprefix("BATCHES "))


def test_fast_run_takes_one_batch_each_way_and_writes_nothing_even_with_every_logger(render_project, tmp_path):
    project = render_project(loggers=["csv", "tensorboard", "wandb", "mlflow"])
    out = tmp_path / "run"
    result = run_package_code(project, COUNTING_RUN, *SMOKE_OVERRIDES, "debug.fast_run=true", f"output_dir={out}")
    check(result, "fast run", project)

    assert "debug.fast_run passed" in result.stdout
    assert "epoch 1/1 |" in result.stdout  # one epoch, whatever `epochs` says
    batches = counted_batches(result)
    assert len(batches["train"]) == 1 and batches["val"] == 1
    assert not out.exists()  # no checkpoint, summary, metrics.csv, tensorboard, wandb or mlflow.db


def test_fast_run_may_run_where_another_run_lives_and_leaves_it_untouched(default_project, tmp_path):
    out = tmp_path / "run"
    train(default_project, *SMOKE_OVERRIDES, "epochs=1", f"output_dir={out}")
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}

    result = train(default_project, *SMOKE_OVERRIDES, "debug.fast_run=true", f"output_dir={out}")

    assert "debug.fast_run passed" in result.stdout
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_overfit_batches_repeats_the_same_batches_and_drives_the_training_loss_close_to_zero(default_project, tmp_path):
    out = tmp_path / "overfit"
    overrides = (*SMOKE_OVERRIDES, "debug.overfit_batches=1", "epochs=40", "optim.lr=0.01", f"output_dir={out}")
    result = check(run_package_code(default_project, COUNTING_RUN, *overrides), "overfit run", default_project)

    seen = counted_batches(result)["train"]
    assert len(seen) == 40 and all(targets == seen[0] for targets in seen)  # one batch, the same every epoch
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_train_loss"] < 0.05, summary

    two = (*SMOKE_OVERRIDES, "debug.overfit_batches=2", "epochs=3", f"output_dir={tmp_path / 'two'}")
    seen = counted_batches(check(run_package_code(default_project, COUNTING_RUN, *two), "overfit run", default_project))
    assert len(seen["train"]) == 6 and seen["train"][:2] == seen["train"][2:4] == seen["train"][4:]
    assert seen["train"][0] != seen["train"][1]


def test_profile_writes_a_trace_file_and_prints_a_table_of_the_top_ops(default_project, tmp_path):
    out = tmp_path / "run"
    result = train(default_project, *SMOKE_OVERRIDES, "debug.profile=true", "epochs=1", f"output_dir={out}")

    (trace,) = (out / "profile").glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(event.get("name", "").startswith("ProfilerStep#") for event in events)
    assert "Self CPU time total" in result.stdout and "aten::" in result.stdout
    assert "debug.profile: trace written to" in result.stdout
    assert (out / "summary.json").exists()  # profiling a run does not cut it short


def test_detect_anomaly_names_the_backward_op_that_made_a_nan(default_project, tmp_path):
    common = (*SMOKE_OVERRIDES, "epochs=1")
    anomaly = (*common, "debug.detect_anomaly=true", f"output_dir={tmp_path / 'anomaly'}")
    result = run_package_code(default_project, NAN_IN_BACKWARD_RUN, *anomaly)
    assert result.returncode != 0
    assert "Function 'SqrtBackward0' returned nan values" in result.stderr, result.stderr
    # The traceback of the forward call that made the op leads to the loss function that did it.
    assert "Error detected in SqrtBackward0" in result.stderr and "in loss_with_nan_gradient" in result.stderr

    plain = run_package_code(default_project, NAN_IN_BACKWARD_RUN, *common, f"output_dir={tmp_path / 'plain'}")
    assert plain.returncode != 0  # the NaN reaches the weights; the non-finite guard stops the run later
    assert "SqrtBackward0" not in plain.stderr, plain.stderr
