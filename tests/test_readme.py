"""The READMEs say what is true: the rendered README names every config key of its project, and the
template README's questionnaire table and first command follow copier.yml and the rendered Makefile."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from packaging.version import Version
from questionnaire import COPIER_YML, TEMPLATE_ROOT, questions
from rendering import run_package_code

MAXIMAL = {
    "parallelism": "ddp",
    "sync_batchnorm": True,
    "scheduler": "cosine",
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
    "weight_init": "normal",
}
OTHERS = {
    "parallelism": "dataparallel",
    "device": "cpu",
    "optimizer": "sgd",
    "scheduler": "plateau",
    "grad_clip": "value",
    "freezing": "first_n",
    "loggers": [],
}
# FSDP with what it changes: its own section and keys, checkpoint directories, EMA and accumulation notes.
FSDP = {**MAXIMAL, "parallelism": "fsdp", "sync_batchnorm": False, "dataset": "imagefolder", "sweeps": True}
CASES = {"default": {}, "maximal": MAXIMAL, "others": OTHERS, "fsdp": FSDP}
for scheduler in ("step", "multistep", "exponential", "lambda", "onecycle", "none"):
    CASES[scheduler] = {"scheduler": scheduler}
CASES["language_model"] = {"task": "language_model"}
CASES["language_model-fsdp"] = {**FSDP, "task": "language_model", "dataset": "text", "freeze_bn": False}

CONFIG_KEYS = """
import json
from pydantic import BaseModel
config = importlib.import_module(pkg + ".config")

def keys(section, prefix=""):
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            yield from keys(value, f"{prefix}{name}.")
        else:
            yield prefix + name

print(json.dumps(list(keys(config.Config()))))
"""


@pytest.mark.parametrize("case", CASES)
def test_every_config_key_of_a_render_is_documented_in_its_readme(render_project, case):
    project = render_project(**CASES[case])
    keys = json.loads(run_package_code(project, CONFIG_KEYS).stdout)
    readme = (project / "README.md").read_text()
    missing = [key for key in keys if f"`{key}" not in readme]
    assert not missing, f"config keys missing from the README of the {case} render: {missing}"


TEMPLATE_README = (TEMPLATE_ROOT / "README.md").read_text()


def questionnaire_table() -> dict[str, str]:
    """The template README's table of questions: each question it names, with its row's answers cell."""
    section = TEMPLATE_README.split("\n## The questionnaire\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            names, answers, _changes = line.strip("|").split(" | ")
            rows.update(dict.fromkeys(re.findall(r"`(\w+)`", names), answers))
    return rows


def test_the_questionnaire_table_lists_every_question_of_copier_yml_with_its_answers():
    table = questionnaire_table()
    assert list(table) == [q.name for q in questions()], "the table's questions or their order differ from copier.yml"
    for q in questions():
        answers = table[q.name]
        if q.type == "bool":
            assert "yes / no" in answers, q.name
        missing = [c for c in q.choices if not re.search(rf"(?<![\w.-]){re.escape(str(c))}(?![\w.-])", answers)]
        assert not missing, f"the table's row for {q.name} lacks the answers {missing}"


def test_the_readmes_first_command_renders_with_copier_alone_and_trains_with_the_projects_makefile():
    command = next(line for line in TEMPLATE_README.splitlines() if "copier copy" in line)
    installs = [step for step in command.split(" && ") if "pip install" in step]
    assert installs and all(re.fullmatch(r'\S+/pip install -q "copier[^"]*"', step) for step in installs), installs
    # The project's own Makefile installs and trains it; the run keeps out of runs/default, where the
    # project README's first `make train` goes.
    assert "make install TORCH=cpu" in command and "make train" in command, command
    assert re.search(r"output_dir=runs/(?!default\b)\w+", command), command


def test_the_readme_asks_for_the_copier_versions_the_template_declares():
    minimum = Version(yaml.safe_load(COPIER_YML.read_text())["_min_copier_version"])
    pyproject = (TEMPLATE_ROOT / "pyproject.toml").read_text()
    pins = re.findall(r"copier>=([\d.]+),<(\d+)", TEMPLATE_README)
    assert pins, "the README names no Copier version"
    for low, high in [*pins, *re.findall(r"copier>=([\d.]+),<(\d+)", pyproject)]:
        assert (Version(low), high) == (minimum, str(minimum.major + 1)), (low, high, minimum)
