"""The test harness agrees with stock Copier at copier.yml's minimum version and at the newest release.

A user renders with the command line: at both versions ``copier copy --data`` with a multi-select answer
written as the README writes one renders what the harness renders for that answer.

The matrix renders through Copier with speed-ups patched in, and tests/questionnaire.py decides with its
own Jinja which questions a combination asks. Unpatched Copier, installed from the index into an
environment of its own per version (tests/stock_copier.py), must render a sample of the matrix's
combinations to the same bytes and record, for every pairwise combination, exactly the answers that
questionnaire.py says are asked, even when it is also handed answers to the questions it skips.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from matrix import render_as_the_matrix_does, tier_combinations
from questionnaire import other_answers, questions
from rendering import project_answers, render, tree_differences
from stock_copier import IndexUnavailable, copier_python, finish, minimum_version, newest_version, render_stock

VERSIONS = {"minimum": minimum_version, "newest": newest_version}
SAMPLE_SIZE = 8  # pairwise combinations rendered in full, besides the defaults


@pytest.fixture(params=list(VERSIONS))
def version(request) -> str:
    try:
        return VERSIONS[request.param]()
    except IndexUnavailable as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the package index cannot be reached to find Copier's {request.param} version: {err}")


def _stock(version, *args, make=render_stock, **kwargs):
    """``make(version, ...)``: skipped, outside CI, when that Copier cannot be installed."""
    try:
        return make(version, *args, **kwargs)
    except IndexUnavailable as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"cannot install Copier {version} from the package index: {err}")


# A multi-select answer on the command line, as the README gives one: Copier 9.7 refused it (Invalid choice).
MULTI_SELECT_DATA = ("loggers", ["csv", "tensorboard"])


def test_stock_copier_cli_renders_a_multi_select_answer_given_with_data(template_dir, tmp_path, version):
    name, value = MULTI_SELECT_DATA
    copier = _stock(version, make=copier_python).parent / "copier"
    data = f"{name}={json.dumps(value)}"  # loggers=["csv", "tensorboard"]
    command = [str(copier), "copy", "--trust", "--defaults", "--data", data, str(template_dir), str(tmp_path / "cli")]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, f"Copier {version}: {' '.join(command)}\n{result.stderr[-3000:]}"
    assert project_answers(tmp_path / "cli")[name] == value
    # The files of the chosen answer: the render the tests check for it, byte for byte.
    render(template_dir, tmp_path / "api", {name: value})
    assert tree_differences(tmp_path / "cli", tmp_path / "api") == []


def test_stock_copier_renders_the_matrix_sample_byte_for_byte(template_dir, tmp_path, version):
    combos = tier_combinations("pairwise")
    sample = [{}, *combos[:: max(1, len(combos) // SAMPLE_SIZE)]]
    stock_jobs = [(answers, tmp_path / "stock" / str(i)) for i, answers in enumerate(sample)]
    process = _stock(version, template_dir, stock_jobs, tmp_path / "spec.json")
    fast_jobs = [(answers, tmp_path / "fast" / str(i)) for i, answers in enumerate(sample)]
    render_as_the_matrix_does(template_dir, fast_jobs)
    finish(process, version)
    for (answers, stock), (_, fast) in zip(stock_jobs, fast_jobs, strict=True):
        assert tree_differences(stock, fast) == [], f"Copier {version} renders {answers} otherwise"


def test_questionnaire_asks_what_copier_records_for_every_pairwise_combination(template_dir, tmp_path, version):
    combos = tier_combinations("pairwise")
    jobs = []
    for i, answers in enumerate(combos):
        # Answers to the questions that this combination skips too: Copier must leave them out.
        skipped = {q.name: other_answers(q.name, answers)[0] for q in questions() if q.name not in answers}
        jobs.append(({**answers, **skipped}, tmp_path / str(i)))
    finish(_stock(version, template_dir, jobs, tmp_path / "spec.json", answers_only=True), version)
    for answers, (_, project) in zip(combos, jobs, strict=True):
        recorded = {name: value for name, value in project_answers(project).items() if not name.startswith("_")}
        assert recorded == answers
