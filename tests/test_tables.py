"""Tables: a regression render and a classification-of-a-table render train their defaults, learn, and
evaluate and predict on CSV files through their command lines; bad tables stop with one line.

Scikit-learn's diabetes table (regression) and wine table (classification, as the sample CSV a render
writes while data.path is not set) ship with scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import re

import pytest
from rendering import check, render, run_module, run_python, train

QUIET = ("log.progress_bar=false", "device=cpu")
R2_BAR = 0.4  # the bar for the rendered defaults on diabetes; the rendered README states what they reach


@pytest.fixture(scope="module")
def regression(template_dir, tmp_path_factory):
    """The regression render with every other answer at its default, trained with its defaults: (project, run)."""
    project = render(template_dir, tmp_path_factory.mktemp("regression") / "project", {"task": "regression"})
    run = tmp_path_factory.mktemp("regression-run")
    train(project, *QUIET, f"output_dir={run}")
    return project, run


@pytest.fixture(scope="module")
def wine(template_dir, tmp_path_factory):
    """The classification render with dataset=csv, trained with its defaults on the sample CSV: (project, run)."""
    answers = {"task": "classification", "dataset": "csv"}
    project = render(template_dir, tmp_path_factory.mktemp("wine") / "project", answers)
    run = tmp_path_factory.mktemp("wine-run")
    result = train(project, *QUIET, f"output_dir={run}")
    assert "data.path is not set: using a sample table, scikit-learn's wine (data/sample-table.csv)" in result.stdout
    return project, run


def read_csv(path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def test_regression_defaults_learn_and_evaluate_in_the_targets_units(regression):
    project, run = regression
    result = check(run_module(project, "evaluate", str(run / "checkpoints" / "best.pt")), "evaluate", project)
    folder = run / "evaluations" / "best-val"
    scores = json.loads((folder / "evaluation.json").read_text())
    assert scores["samples"] == 88 and scores["r2"] >= R2_BAR, scores
    # In the target's units: diabetes progression spreads over about 25..346, its standard deviation is ~77.
    rmse = scores["per_target"]["progression"]["rmse"]
    assert 30 < rmse < 77 and scores["rmse"] == rmse
    assert (folder / "predicted_vs_true.png").stat().st_size > 10_000
    assert "  progression  mae " in result.stdout
    stated = re.search(r"validation R² of (0\.\d+)", (project / "README.md").read_text())
    assert stated and abs(float(stated[1]) - scores["r2"]) < 0.05, (stated, scores["r2"])


def test_regression_predict_adds_the_prediction_column_and_keeps_the_others(regression, tmp_path):
    project, run = regression
    # The first rows of the diabetes table, without the target and with a column the model does not read.
    run_python(
        project,
        f"""
import csv
from sklearn.datasets import load_diabetes
table = load_diabetes(scaled=False)
with open({str(tmp_path / "rows.csv")!r}, "w", newline="") as file:
    writer = csv.writer(file)
    writer.writerow(["patient", *table.feature_names])
    writer.writerows([f"p{{index}}", *row] for index, row in enumerate(table.data[:20].tolist()))
""",
    )
    out = tmp_path / "predicted.csv"
    best = str(run / "checkpoints" / "best.pt")
    result = run_module(project, "predict", best, str(tmp_path / "rows.csv"), f"--output={out}")
    check(result, "predict", project)
    assert result.stderr.strip() == f"wrote 20 rows with predictions to {out}"
    given, rows = read_csv(tmp_path / "rows.csv"), read_csv(out)
    assert list(rows[0]) == [*given[0], "progression_pred"]
    assert [{name: row[name] for name in given[0]} for row in rows] == given  # every other cell as it was
    assert all(25 < float(row["progression_pred"]) < 350 for row in rows)  # in the target's units, not standardised


@pytest.mark.parametrize(
    ("content", "target", "message"),
    [
        ("a,b,y\n1,x,2\n2,y,3\n", "z", "bad.csv has no column 'z'; its columns: a, b, y"),
        ("a,b,y\n1,x,2\n2,y,lots\n3,x,4\n", "y", "bad.csv line 3: column 'y' holds 'lots', not a number"),
        ("a,b,y\n1,x,2\n2,,3\n3,x,4\n", "y", "bad.csv line 3: column 'b' is empty"),
        (None, "y", "cannot read"),
    ],
    ids=["no target column", "non-numeric target", "missing value", "no file"],
)
def test_a_bad_table_stops_training_with_one_line(regression, tmp_path, content, target, message):
    project, _ = regression
    table = tmp_path / "bad.csv"
    if content is not None:
        table.write_text(content)
    run = tmp_path / "run"
    overrides = (*QUIET, "data.dataset=csv", f"data.path={table}", f"data.target={target}", f"output_dir={run}")
    result = run_module(project, "train", *overrides)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr, result.stderr
    assert str(table) in result.stderr and not run.exists()


def test_classification_of_a_table_learns_evaluates_and_predicts_classes_with_probabilities(wine, tmp_path):
    project, run = wine
    best = str(run / "checkpoints" / "best.pt")
    check(run_module(project, "evaluate", best), "evaluate", project)
    scores = json.loads((run / "evaluations" / "best-val" / "evaluation.json").read_text())
    assert scores["accuracy"] >= 0.9 and scores["classes"] == ["class_0", "class_1", "class_2"], scores
    # Three classes: every one is in the top 5, so no top-5 accuracy is reported; training accuracy is.
    final = json.loads((run / "summary.json").read_text())["final_metrics"]
    assert "top5_accuracy" not in scores and "val_top5_accuracy" not in final, final
    assert 0.9 <= final["train_accuracy"] <= 1, final
    assert (run / "evaluations" / "best-val" / "confusion_matrix.png").is_file()
    # The sample table itself, its target column dropped: predict needs only the columns the model reads.
    sample = read_csv(project / "data" / "sample-table.csv")
    with (tmp_path / "rows.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, [name for name in sample[0] if name != "cultivar"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sample)
    result = run_module(project, "predict", best, str(tmp_path / "rows.csv"))  # the table goes to stdout
    check(result, "predict", project)
    header, *rows = list(csv.reader(result.stdout.splitlines()))
    added = ["cultivar_pred", "cultivar_prob_class_0", "cultivar_prob_class_1", "cultivar_prob_class_2"]
    assert header[-4:] == added and len(rows) == 178
    assert sum(row[-4] == truth["cultivar"] for row, truth in zip(rows, sample, strict=True)) >= 0.9 * 178
    assert all(abs(sum(map(float, row[-3:])) - 1) < 1e-4 for row in rows)
