"""Every subset of logging backends writes its real files, and they hold what training printed.

The console epoch line is always there and serves as the reference; summary.json gives the final
epoch's values at full precision. Each backend's files are read back with its own library.
"""

from __future__ import annotations

import csv
import json
import re
import struct
import tomllib
from pathlib import Path

import pytest
from questionnaire import question
from rendering import INTERRUPTED_RUN, SMOKE_OVERRIDES, project_answers, run_package_code, torchrun, train

# None, all, and all but one: every backend chosen and not chosen beside every other, in 6 renders of the 16.
LOGGER_SUBSETS = question("loggers").pairwise_options()
BACKENDS = question("loggers").choices
EPOCHS = 2
# What each backend leaves behind: files in the run directory, modules in the package, dependencies.
RUN_FILES = {"csv": "metrics.csv", "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow.db"}
MODULES = {
    "csv": ["csv_logger.py", "plot.py"],
    "tensorboard": ["tensorboard_logger.py"],
    "wandb": ["wandb_logger.py"],
    "mlflow": ["mlflow_logger.py"],
}
DEPENDENCIES = {
    "csv": [],  # plot.py's matplotlib is in every render: evaluate draws its confusion matrix with it
    "tensorboard": ["tensorboard"],
    "wandb": ["wandb"],
    "mlflow": ["mlflow-skinny", "sqlalchemy", "alembic"],
}
# As the line prints them and every backend records them (the synthetic data have 10 classes: top-5 is measured).
METRICS = (
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "val_top5_accuracy",
    "lr",
    "samples_per_s",
    "data_wait",
)
FIELDS = r" \| ".join(rf"{name} (\S+)(?: \(best\))?" for name in METRICS)
EPOCH_LINE = re.compile(rf"^epoch (\d+)/\d+ \| {FIELDS} \|", re.M)
SPEED = ("samples_per_s", "data_wait")  # measured with the host's clock: they differ from run to run
PRINTED_TO = {"samples_per_s": 0.5, "data_wait": 0.005}  # the line's rounding, where coarser than 4 decimals
# `python -m <package>.plot RUN_DIR`, then the y scales of the figure it drew: loss, metrics, learning rate.
PLOT = """
import csv, sys
plot = importlib.import_module(pkg + ".plot")
plot.main(sys.argv[1:])
with open(sys.argv[1] + "/metrics.csv", newline="") as file:
    print("y scales:", *(axes.get_yscale() for axes in plot.curves(list(csv.DictReader(file))).axes))
"""


def console_epochs(stdout: str) -> dict[int, dict[str, float]]:
    """Per-epoch values from the console lines (4 significant decimals)."""
    return {
        int(match[1]): dict(zip(METRICS, map(float, match.groups()[1:]), strict=True))
        for match in EPOCH_LINE.finditer(stdout)
    }


def assert_matches_console(logged: dict[int, dict[str, float]], console: dict[int, dict[str, float]], final: dict):
    assert sorted(logged) == list(range(1, EPOCHS + 1))
    for epoch, values in console.items():
        for name in METRICS:
            rounding = PRINTED_TO.get(name, 1e-4)
            assert logged[epoch][name] == pytest.approx(values[name], rel=1e-3, abs=rounding), (epoch, name)
        assert logged[epoch]["samples_per_s"] > 0 and 0 <= logged[epoch]["data_wait"] <= 1, logged[epoch]
    for name, value in final.items():  # the last epoch at full precision
        assert logged[EPOCHS][name] == pytest.approx(value, rel=1e-6), name


def check_csv(project: Path, run_dir: Path, console: dict, final: dict) -> None:
    with (run_dir / "metrics.csv").open(newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
    assert reader.fieldnames == ["epoch", *METRICS]
    assert_matches_console({int(row["epoch"]): {k: float(row[k]) for k in METRICS} for row in rows}, console, final)

    plotted = run_package_code(project, PLOT, str(run_dir))
    assert plotted.returncode == 0, plotted.stderr
    assert f"wrote {run_dir / 'curves.png'}" in plotted.stdout
    assert "y scales: log linear linear" in plotted.stdout  # the loss panel on a log axis
    png = (run_dir / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def check_tensorboard(run_dir: Path, console: dict, final: dict, summary: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged: dict[int, dict[str, float]] = {}
    for name in METRICS:
        for event in events.Scalars(name):
            logged.setdefault(event.step, {})[name] = event.value
    assert_matches_console(logged, console, final)
    assert events.Scalars("hparam/val_accuracy")[-1].value == pytest.approx(final["val_accuracy"])
    assert events.Scalars("hparam/best_val_accuracy")[-1].value == pytest.approx(summary["best_metric"])
    hparams = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    assert b"optim.lr" in hparams and b"model.arch" in hparams  # the flattened config
    assert events.Tags()["graph"], "model graph missing"


def wandb_records(path: Path) -> list:
    """Records of a W&B offline run file (LevelDB log format: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, position, block = [], b"", 7, 32768
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left < 7 or (kind == 0 and length == 0):  # block padding
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk completes a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_items(items) -> dict:
    """Key-value items of a W&B record; the key is in ``key`` or, for some records, ``nested_key``."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def wandb_epoch_rows(records: list) -> list[dict]:
    """The history rows our loop logged (they carry ``epoch``), leaving out W&B's own bookkeeping rows."""
    rows = (wandb_items(record.history.item) for record in records if record.HasField("history"))
    return [row for row in rows if "epoch" in row]


def check_wandb(run_dir: Path, console: dict, final: dict, summary: dict) -> None:
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")  # offline: nothing went to a server
    records = wandb_records(run_file)
    kinds = [record.WhichOneof("record_type") for record in records]
    assert kinds[-1] == "exit"
    (run,) = [record.run for record in records if record.HasField("run")]
    config = wandb_items(run.config.update)
    assert config["epochs"] == EPOCHS and config["log"]["wandb_mode"] == "offline"
    logged = {row["epoch"]: row for row in wandb_epoch_rows(records)}
    assert_matches_console(logged, console, final)
    recorded_summary = {}
    for record in records:
        if record.HasField("summary"):
            recorded_summary.update(wandb_items(record.summary.update))
    assert recorded_summary["best_metric"] == summary["best_metric"]
    assert recorded_summary["final_metrics"] == summary["final_metrics"]


def check_mlflow(run_dir: Path, console: dict, final: dict, summary: dict) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("my-project")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == str(EPOCHS) and run.data.params["data.dataset"] == "synthetic"
    logged: dict[int, dict[str, float]] = {}
    for name in METRICS:
        for metric in client.get_metric_history(run.info.run_id, name):
            logged.setdefault(metric.step, {})[name] = metric.value
    assert_matches_console(logged, console, final)
    assert run.data.metrics["best_val_accuracy"] == pytest.approx(summary["best_metric"])


@pytest.mark.parametrize("loggers", LOGGER_SUBSETS, ids=lambda subset: "+".join(subset) or "none")
def test_chosen_backends_record_every_epoch_and_unchosen_leave_no_trace(render_project, tmp_path, loggers):
    project = render_project(loggers=loggers)
    run_dir = tmp_path / "run"
    result = train(project, *SMOKE_OVERRIDES, f"epochs={EPOCHS}", f"output_dir={run_dir}")
    console = console_epochs(result.stdout)
    assert sorted(console) == [1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    final = {"train_loss": summary["final_train_loss"], **summary["final_metrics"]}

    package_dir = project / "src" / project_answers(project)["package_name"]
    dependencies = tomllib.loads((project / "pyproject.toml").read_text())["project"]["dependencies"]
    for backend in BACKENDS:
        chosen = backend in loggers
        assert (run_dir / RUN_FILES[backend]).exists() == chosen, backend
        for module in MODULES[backend]:
            assert (package_dir / module).is_file() == chosen, module
        for name in DEPENDENCIES[backend]:
            assert any(re.match(rf"{name}\b", dep) for dep in dependencies) == chosen, name
    assert (package_dir / "loggers.py").is_file() == bool(loggers)

    if "csv" in loggers:
        check_csv(project, run_dir, console, final)
    if "tensorboard" in loggers:
        check_tensorboard(run_dir, console, final, summary)
    if "wandb" in loggers:
        check_wandb(run_dir, console, final, summary)
    if "mlflow" in loggers:
        check_mlflow(run_dir, console, final, summary)


def test_resumed_run_appends_to_the_csv_exactly_like_an_uninterrupted_one(default_project, tmp_path):
    assert project_answers(default_project)["loggers"] == ["csv"]
    common = (*SMOKE_OVERRIDES, "deterministic=true")
    train(default_project, *common, "epochs=3", f"output_dir={tmp_path / 'straight'}")
    # Preempted in epoch 3 (the default cosine schedule spans `epochs`, so no shorter first run).
    interrupted = run_package_code(
        default_project, INTERRUPTED_RUN, *common, "epochs=3", f"output_dir={tmp_path / 'split'}"
    )
    assert "received SIGUSR1" in interrupted.stdout, interrupted.stderr
    train(default_project, *common, "epochs=3", "resume=auto", f"output_dir={tmp_path / 'split'}")
    straight = (tmp_path / "straight" / "metrics.csv").read_text()
    assert straight.count("epoch,") == 1 and len(straight.splitlines()) == 4
    split = (tmp_path / "split" / "metrics.csv").read_text()
    assert split.splitlines()[0] == straight.splitlines()[0]
    assert learning_columns(split) == learning_columns(straight)


def learning_columns(text: str) -> list[dict[str, str]]:
    """metrics.csv's rows without the speed columns, as the file spells them."""
    rows = csv.DictReader(text.splitlines())
    return [{name: value for name, value in row.items() if name not in SPEED} for row in rows]


def test_under_ddp_only_rank_zero_logs(render_project, tmp_path):
    project = render_project(parallelism="ddp", loggers=list(BACKENDS))
    run_dir = tmp_path / "run"
    torchrun(project, *SMOKE_OVERRIDES, "epochs=1", "log.tensorboard_graph=false", f"output_dir={run_dir}", nproc=2)
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 2  # one header, one epoch
    writers = {path.name.split(".")[-2] for path in (run_dir / "tensorboard").glob("events.out.tfevents.*")}
    assert len(writers) == 1, f"event files from several processes: {writers}"
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    assert len(client.search_runs([client.get_experiment_by_name("my-project").experiment_id])) == 1


def test_resumed_run_continues_the_same_wandb_and_mlflow_runs(render_project, tmp_path):
    from mlflow import MlflowClient

    project = render_project(loggers=["wandb", "mlflow"])
    run_dir = tmp_path / "run"
    overrides = (*SMOKE_OVERRIDES, "epochs=3", f"output_dir={run_dir}")
    interrupted = run_package_code(project, INTERRUPTED_RUN, *overrides)  # preempted early in epoch 3
    assert "received SIGUSR1" in interrupted.stdout, interrupted.stderr
    resumed = train(project, *overrides, "resume=auto")
    assert "resumed from" in resumed.stdout

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("my-project").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2, 3]
    assert (run_dir / "mlflow-run-id.txt").read_text().strip() == run.info.run_id

    # Offline, each process writes its own directory; both carry the one run id and together every epoch.
    run_files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 2
    run_ids, epochs = set(), []
    for run_file in run_files:
        records = wandb_records(run_file)
        run_ids |= {record.run.run_id for record in records if record.HasField("run")}
        epochs += [row["epoch"] for row in wandb_epoch_rows(records)]
    assert run_ids == {(run_dir / "wandb-run-id.txt").read_text().strip()}
    assert sorted(epochs) == [1, 2, 3]
