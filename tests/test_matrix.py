"""The combination matrix: every pair of answers (pairwise tier) or every design-axis combination
(exhaustive tier, ``pytest -m exhaustive``) renders with Copier, trains, checkpoints and lints clean.

The tiers run in long-lived worker processes (tests/matrix.py); each renders every combination, groups
those that render the same tree and trains one per tree. These tests also prove that the grouping
follows the rendered bytes, that the covering-set generator covers every pair and that the counted
product matches the enumeration, and run the own test suites of two feature-rich projects, which the
matrix does not.
"""

from __future__ import annotations

import itertools
import re
import shutil
import sys
from pathlib import Path

import pytest
import timing
from matrix import ANSWERS_FILE, exhaustive_size, group_by_tree, run_matrix, tier_combinations, tree_digest
from questionnaire import (
    Question,
    choice_questions,
    combinations,
    design_axes,
    other_answers,
    pairwise,
    product_size,
    questions,
    resolve_answers,
    skipping_contexts,
    uncovered_pairs,
)
from rendering import project_answers, render, run_in_project, run_project_tests, tree_differences


def _all_pairs(rows, names, multiselect=()):
    """Every pair of answers the rows hold; a multi-select in ``multiselect`` as one yes/no per choice."""

    def factors(row):
        for name in names:
            if name not in row:
                continue
            if name in multiselect:
                yield from ((f"{name}[{choice}]", choice in row[name]) for choice in multiselect[name])
            else:
                yield name, repr(row[name])

    return {pair for row in rows for pair in itertools.combinations(list(factors(row)), 2)}


SYNTHETIC = (
    Question("size", "str", ("s", "m", "l"), False, "m", True),
    Question("gpu", "bool", (), False, False, True),
    # Asked only with a GPU: its answers pair with gpu=True only, never with gpu=False.
    Question("precision", "str", ("fp32", "bf16", "fp16"), False, "fp32", "{{ gpu }}"),
    Question("extras", "str", ("a", "b", "c"), True, [], True),
    Question("name", "str", (), False, "x", True),  # free text: chooses no code, not multiplied
    Question("opt", "str", ("adam", "sgd"), False, "adam", True),
)


def _synthetic_exhaustive():
    names = [q.name for q in SYNTHETIC]
    options = [q.options() or [q.default] for q in SYNTHETIC]
    resolve_rows = []
    for values in itertools.product(*options):
        answers = {}
        for q, value in zip(SYNTHETIC, values, strict=True):
            if q.is_asked(answers):
                answers[q.name] = value
        resolve_rows.append(answers)
    return resolve_rows, names


def test_pairwise_set_covers_every_possible_pair_of_a_synthetic_questionnaire():
    names = [q.name for q in SYNTHETIC if q.options()]
    rows = pairwise(names, specs=SYNTHETIC)
    everything, _ = _synthetic_exhaustive()

    # Every pair that some full combination holds, found by brute force, is in the covering set, the
    # multi-select counted as one yes/no per choice (every choice on and off beside every other answer).
    multiselect = {"extras": SYNTHETIC[3].choices}
    assert _all_pairs(everything, names, multiselect) <= _all_pairs(rows, names, multiselect)
    # ...and the set holds no impossible pair: precision only appears with a GPU.
    assert all(row["gpu"] for row in rows if "precision" in row)
    assert not any("precision" in row for row in rows if not row["gpu"])
    # the multi-select's answers are none, all and all-but-one; far fewer rows than the 3*2*(1+3)*8*2 product
    assert {tuple(row["extras"]) for row in rows} == {(), ("a", "b", "c"), ("b", "c"), ("a", "c"), ("a", "b")}
    assert len(rows) < len(everything) / 4
    assert rows == pairwise(names, specs=SYNTHETIC), "the covering set must be deterministic"


def test_pairwise_set_covers_every_pair_and_every_answer_of_copier_yml():
    names = choice_questions()
    rows = pairwise(names)
    assert uncovered_pairs(rows, names) == set()
    for name in names:
        q = next(q for q in questions() if q.name == name)
        used = {repr(row[name]) for row in rows if name in row}
        assert used == {repr(option) for option in q.pairwise_options()}, name


def test_a_multi_select_is_paired_as_one_yes_no_factor_per_choice():
    """Its pairwise answers hold every two choices on/on, on/off, off/on and off/off, each choice on and off."""
    extras = Question("extras", "str", ("a", "b", "c", "d"), True, [], True)
    answers = extras.pairwise_options()
    assert len(answers) == 2 + 4
    for first, second in itertools.combinations(extras.choices, 2):
        seen = {(first in answer, second in answer) for answer in answers}
        assert seen == {(True, True), (True, False), (False, True), (False, False)}, (first, second)
    assert Question("one", "str", ("a",), True, [], True).pairwise_options() == [[], ["a"]]


def test_exhaustive_product_counted_from_copier_yml_equals_the_enumeration():
    axes = design_axes()
    assert axes, "copier.yml asks no design axis"
    assert product_size(axes) == len(list(combinations(axes)))
    # The full questionnaire's product is far too big to enumerate; these questions hold every `when`
    # chain of it (sync_batchnorm on parallelism on device, warmup on scheduler, compile on parallelism).
    conditional = ["device", "parallelism", "sync_batchnorm", "scheduler", "warmup", "compile", "amp"]
    assert set(conditional) <= set(choice_questions())
    assert product_size(conditional) == len(list(combinations(conditional)))


def _run_tier(tier, record_property):
    combos = tier_combinations(tier)
    expected = exhaustive_size() if tier == "exhaustive" else len(combos)
    result = run_matrix(combos, tier)
    message = (
        f"{tier} tier: {result.trees().describe()}; rendered, and {len(result.trained)} trained, "
        f"in {result.wall_s:.0f}s (expected {expected} combinations); median render "
        f"{result.median_render_s():.2f}s, train {result.median_train_s():.2f}s"
    )
    print(message)
    record_property("matrix", message)
    assert not result.failures, f"{len(result.failures)} combinations failed:\n{result.describe_failures()}"
    assert len(result.outcomes) == expected
    assert all(outcome.summary["global_step"] >= 2 for outcome in result.trained)
    if tier == "exhaustive":
        # Two DDP or FSDP ranks split each global batch: the optimiser steps of one process (other answers at defaults).
        steps = {
            ddp: {
                o.summary["global_step"]
                for o in result.trained
                if (o.answers.get("parallelism") in ("ddp", "fsdp")) == ddp
            }
            for ddp in (False, True)
        }
        if steps[True]:
            assert steps[True] == steps[False], steps


def test_pairwise_tier_every_combination_renders_trains_checkpoints_and_lints_clean(record_property):
    _run_tier("pairwise", record_property)


@pytest.mark.slow
def test_pairwise_segmentation_and_language_model_rows_learn_to_their_bars(record_property):
    """The default pairwise tier trains these rows' smoke runs; here each learns as the other tasks' rows do."""
    _run_tier("pairwise-learning", record_property)


@pytest.mark.exhaustive
def test_exhaustive_tier_every_design_axis_combination_renders_trains_checkpoints_and_lints_clean(
    record_property,
):
    _run_tier("exhaustive", record_property)


def test_tree_digest_follows_every_byte_path_and_mode_of_a_render_but_not_its_answers_or_default_values(
    template_dir, tmp_path
):
    project = render(template_dir, tmp_path / "project")
    twin = tmp_path / "twin"
    shutil.copytree(project, twin)
    assert tree_digest(twin) == tree_digest(project)
    # Another render's answers file: the answers differ, the project does not.
    other = render(template_dir, tmp_path / "other", {"amp": other_answers("amp", project_answers(project))[0]})
    shutil.copy(other / ANSWERS_FILE, twin / ANSWERS_FILE)
    assert tree_differences(twin, project) == [ANSWERS_FILE]
    assert tree_digest(twin) == tree_digest(project)
    # amp only picks amp.dtype's default: the same project; EMA brings code: another.
    assert tree_differences(other, project) != [ANSWERS_FILE]
    assert tree_digest(other) == tree_digest(project)
    assert tree_digest(render(template_dir, tmp_path / "ema", {"ema": True})) != tree_digest(project)
    source = next(path for path in sorted(twin.rglob("*.py")) if path.stat().st_size)
    for change in (
        lambda: source.write_bytes(source.read_bytes() + b"\n"),
        lambda: source.chmod(0o755),
        lambda: source.rename(source.with_name("renamed.py")),
    ):
        change()
        assert tree_digest(twin) != tree_digest(project)
        shutil.rmtree(twin)
        shutil.copytree(project, twin)


def _twin(answers):
    """``answers`` plus an answer to a question they do not ask: the same project (test_answers proves such an
    answer changes no byte), found from copier.yml, and the name of that question."""
    name = next(q.name for q in questions() if q.name not in answers and skipping_contexts(q.name))
    return {**answers, name: other_answers(name, answers)[0]}, name


def test_combinations_that_render_the_same_tree_are_grouped_by_the_count_mode(template_dir):
    base = tier_combinations("pairwise")[0]
    twin, name = _twin(base)
    axis = next(axis for axis in design_axes() if axis in base)
    changed = resolve_answers({**base, axis: other_answers(axis, base)[0]})
    trees = group_by_tree([base, changed, twin], workers=1, template=template_dir)
    assert trees.groups == [[base, twin], [changed]]
    assert trees.representatives() == [base, changed]
    assert trees.combinations == 3
    assert trees.shared_by() == {(name,): 1}


def test_matrix_runner_trains_each_tree_once_and_reports_the_combination_that_fails():
    base = tier_combinations("pairwise")[0]
    twin, _ = _twin(base)
    keyword = {**base, "package_name": "class"}
    result = run_matrix([base, keyword, twin], "pairwise", workers=1)
    assert [outcome.answers for outcome in result.outcomes] == [base, keyword, twin]
    assert [outcome.same_tree_as for outcome in result.outcomes] == [None, None, 0]
    assert result.outcomes[0].summary and not result.outcomes[2].summary  # the twin's tree was trained once
    assert result.trees().groups == [[base, twin], [keyword]]
    assert [outcome.answers["package_name"] for outcome in result.failures] == ["class"]
    assert "is a Python keyword" in result.failures[0].error


# The matrix trains every combination but does not run a project's own tests. The default project's
# run them (test_default_project); these two answer sets take the other branches of the rendered test
# files (accumulation, DDP, DataParallel, freezing, pretrained weights, every logger).
OWN_TEST_ANSWERS = {
    "every-feature-ddp": {
        "device": "cuda",
        "parallelism": "ddp",
        "sync_batchnorm": True,
        "warmup": True,
        "layer_lr": True,
        "grad_clip": "norm",
        "grad_accumulation": True,
        "ema": True,
        "early_stopping": True,
        "freezing": "patterns",
        "freeze_bn": True,
        "pretrained": True,
        "amp": "fp16",
        "compile": True,
        "loggers": ["csv", "tensorboard", "wandb", "mlflow"],
        "weight_init": "kaiming",
        "model_summary": True,
        "dataset": "imagefolder",
    },
    "dataparallel-onecycle-accumulation": {
        "device": "cuda",
        "parallelism": "dataparallel",
        "scheduler": "onecycle",
        "amp": "bf16",
        "grad_accumulation": True,
        "grad_clip": "value",
        "freezing": "first_n",
        "optimizer": "sgd",
        "loggers": [],
    },
}


@pytest.mark.parametrize(
    "answers",
    [
        pytest.param(OWN_TEST_ANSWERS["every-feature-ddp"], id="every-feature-ddp", marks=pytest.mark.slow),
        pytest.param(OWN_TEST_ANSWERS["dataparallel-onecycle-accumulation"], id="dataparallel-onecycle-accumulation"),
    ],
)
def test_feature_rich_projects_pass_their_own_tests(render_project, answers):
    result = run_project_tests(render_project(**answers))
    assert result.returncode == 0, result.stdout[-4000:]


# The matrix's rank processes, driven as a worker drives them, in a process of their own (forking pytest's).
RANK_PROCESSES = """
import sys, threading, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import matrix
project, package = Path(sys.argv[2]), sys.argv[3]
smoke = (*matrix.MATRIX_OVERRIDES, *matrix.TASK_RUNS["classification"].smoke)
overrides = lambda run, *more: (*smoke, f"output_dir={project / 'runs' / run}", *more)

ranks = matrix.RankProcesses(2)
try:
    ranks.fit(project, "no_such_package", overrides("a"))
except RuntimeError as err:
    assert "No module named 'no_such_package'" in str(err), err
    print("import failure reported")

ranks = matrix.RankProcesses(2)
ranks.fit(project, package, overrides("b"))
assert (project / "runs/b/summary.json").is_file()
print("trained")
threading.Timer(3, lambda: matrix.os.kill(ranks.pids[1], 9)).start()
started = time.monotonic()
try:
    ranks.fit(project, package, overrides("c", "epochs=500"))
except RuntimeError as err:
    assert "the rank process died" in str(err), err
    print(f"killed rank reported after {time.monotonic() - started:.0f} s")

matrix.RankProcesses(2).fit(project, package, overrides("d"))
assert (project / "runs/d/summary.json").is_file()
print("new ranks trained")
"""


def test_rank_processes_train_combinations_report_failures_and_a_dead_rank_without_waiting(render_project):
    project = render_project(parallelism="ddp", device="cpu")
    package = project_answers(project)["package_name"]
    argv = [sys.executable, "-c", RANK_PROCESSES, str(Path(__file__).parent), str(project), package]
    result = run_in_project(project, argv, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert lines[:2] == ["import failure reported", "trained"], result.stdout
    killed = re.fullmatch(r"killed rank reported after (\d+) s", lines[2])
    # Not the 300 s of work a silent rank is given (timing.py: more wall seconds on a busy machine).
    assert killed and int(killed[1]) < timing.limit(60), result.stdout
    assert lines[3:] == ["new ranks trained"], result.stdout
