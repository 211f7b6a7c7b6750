"""The rendered config schema, its default.yaml and its schema.json agree, whatever the answers.

config.py (pydantic models), configs/default.yaml and configs/schema.json are rendered from one list of
keys, config_keys.jinja. For a set of combinations in which every answer of every question
those files read appears at least once, plus the maximal one (every optional section), the rendered
project's own tests/test_config.py must pass: default.yaml loads to ``Config()`` and names every key,
and schema.json is byte for byte what ``python -m <package>.config --schema`` writes.
"""

from __future__ import annotations

import re

import pytest
from questionnaire import TEMPLATE_ROOT, choice_questions, question, resolve_answers, witness_of
from rendering import check, run_module, run_project_tests

CONFIG_TEMPLATES = [
    TEMPLATE_ROOT / "config_keys.jinja",
    TEMPLATE_ROOT / "template/src/{{package_name}}/config.py.jinja",
    TEMPLATE_ROOT / "template/configs/default.yaml.jinja",
    TEMPLATE_ROOT / "template/configs/schema.json.jinja",
]


def config_questions() -> list[str]:
    """The questions whose answers the config templates and their list of keys read (in Jinja tags)."""
    tags = " ".join(
        " ".join(re.findall(r"\{\{.*?\}\}|\{%.*?%\}", path.read_text(), re.DOTALL)) for path in CONFIG_TEMPLATES
    )
    return [name for name in choice_questions() if re.search(rf"\b{name}\b", tags)]


def every_answer_once() -> list[dict]:
    """Combinations in which each answer of each config question appears at least once.

    Row i gives every question its i-th option (cycling), so few rows cover many answers; an answer
    that a ``when`` condition dropped from every row gets a row of its own.
    """
    names = config_questions()
    options = {name: question(name).options() for name in names}
    rows = []
    for i in range(max(map(len, options.values()))):
        chosen: dict = {}
        for name, values in options.items():  # in questionnaire order; a choice another answer rules out waits
            if question(name).offers(values[i % len(values)], resolve_answers(chosen)):
                chosen[name] = values[i % len(values)]
        rows.append(resolve_answers(chosen))
    for name, values in options.items():
        for value in values:
            if not any(row.get(name) == value for row in rows):
                row = resolve_answers({**witness_of({name: value}), **_enablers(name), name: value})
                assert row.get(name) == value, f"no combination asks {name}={value!r}"
                rows.append(row)
    return rows


def _enablers(name: str) -> dict:
    """Answers under which ``name`` is asked: the first option of each earlier question that allows it."""
    chosen: dict = {}
    for earlier in choice_questions():
        if earlier == name or question(name).is_asked(resolve_answers(chosen)):
            break
        for option in question(earlier).options():
            if question(name).is_asked(resolve_answers({**chosen, earlier: option})):
                chosen[earlier] = option
                break
    return chosen


def maximal() -> dict:
    """Every optional config section and key: the non-default answer that adds the most."""
    return resolve_answers(
        {
            "device": "auto",
            "optimizer": "adamw",
            "scheduler": "cosine",
            "warmup": True,
            "layer_lr": True,
            "grad_clip": "norm",
            "grad_accumulation": True,
            "ema": True,
            "early_stopping": True,
            "freezing": "patterns",
            "pretrained": True,
            "amp": "fp16",
            "compile": True,
            "loggers": list(question("loggers").choices),
            "weight_init": "normal",
        }
    )


def _id(answers: dict) -> str:
    defaults = resolve_answers({})
    changed = [f"{name}={value}" for name, value in answers.items() if defaults.get(name) != value]
    return ",".join(changed) or "defaults"


COMBINATIONS = {_id(row): row for row in [resolve_answers({}), maximal(), *every_answer_once()]}


def test_the_config_combinations_cover_every_answer_of_the_config_questions():
    for name in config_questions():
        for value in question(name).options():
            assert any(row.get(name) == value for row in COMBINATIONS.values()), (name, value)


@pytest.mark.parametrize("answers", COMBINATIONS.values(), ids=list(COMBINATIONS))
def test_default_yaml_and_schema_json_match_the_rendered_schema(answers, render_project):
    project = render_project(**answers)
    check(run_project_tests(project, "tests/test_config.py"), "the project's tests/test_config.py", project)


def test_schema_command_writes_the_committed_schema_json(default_project, tmp_path):
    printed = check(run_module(default_project, "config", "--schema"), "config --schema", default_project).stdout
    assert printed == (default_project / "configs/schema.json").read_text()
    check(run_module(default_project, "config", "--schema", str(tmp_path / "schema.json")), "--schema PATH", tmp_path)
    assert (tmp_path / "schema.json").read_text() == printed
    first_line = (default_project / "configs/default.yaml").read_text().splitlines()[0]
    assert first_line == "# yaml-language-server: $schema=schema.json"
