"""The questionnaire refuses bad answers with the validator's message, and its answer space is sane."""

from __future__ import annotations

import re

import pytest
import yaml
from questionnaire import COPIER_YML, combinations, question, questions, resolve_answers
from rendering import render


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        ({"package_name": "class"}, "is a Python keyword"),
        ({"package_name": "torch"}, "would shadow the module of that name"),
        ({"package_name": "collections"}, "would shadow the module of that name"),
        # The standard library's own tests: sys.stdlib_module_names leaves the package out.
        ({"project_name": "test"}, "package_name 'test' would shadow the module of that name"),
        ({"package_name": "1st_model"}, "must be a lowercase Python identifier"),
        ({"package_name": "My-Package"}, "must be a lowercase Python identifier"),
        ({"project_name": "My Project"}, "project_name must be lowercase"),
        ({"project_name": "bad--name"}, "project_name must be lowercase"),
        ({"author_email": "nobody"}, "author_email must look like"),
        ({"gpu_ids": "0 1"}, "gpu_ids must be GPU indices separated by commas"),
        ({"gpu_ids": "0,,1"}, "gpu_ids must be GPU indices separated by commas"),
    ],
)
def test_bad_answers_are_refused_with_the_validators_message(template_dir, tmp_path, answers, message):
    with pytest.raises(ValueError, match=message):
        render(template_dir, tmp_path / "project", answers)
    assert not (tmp_path / "project").exists()


def test_package_name_defaults_to_the_project_name_as_an_identifier():
    assert resolve_answers({"project_name": "digit-classifier"})["package_name"] == "digit_classifier"


def test_every_choice_question_defaults_to_one_of_its_choices():
    answers = resolve_answers({})
    for q in questions():
        if q.is_choice and q.name in answers:
            default = answers[q.name]
            options = q.options(answers)
            assert (sorted(default) if q.multiselect else default) in options, q.name


def test_answer_space_multiplies_only_questions_that_are_asked():
    choice_questions = [q.name for q in questions() if q.is_choice or q.type == "bool"]
    for name in choice_questions:
        q = question(name)
        # A question asked only after another answer (e.g. sync_batchnorm under ddp) collapses alone, and
        # one whose choices follow another answer (dataset follows task) offers those of the defaults.
        defaults = resolve_answers({})
        expected = len(q.options(defaults)) if q.is_asked(defaults) else 1
        assert len(list(combinations([name]))) == expected, name


def test_gpu_ids_with_spaces_around_the_commas_render_as_the_list_without_them(template_dir, tmp_path):
    project = render(template_dir, tmp_path / "project", {"gpu_ids": " 0, 1 ,2", "parallelism": "ddp"})
    package = project / "src" / "my_project"
    assert 'gpu_ids: "0,1,2"' in (project / "configs/default.yaml").read_text()
    assert 'gpu_ids: str | None = "0,1,2"' in (package / "config.py").read_text()
    assert '"default": "0,1,2"' in (project / "configs/schema.json").read_text()
    assert "${CUDA_VISIBLE_DEVICES:-0,1,2}" in (project / "scripts/train_single_node.sh").read_text()
    assert "(`0,1,2`)" in (project / "README.md").read_text()


SECTION = re.compile(r"# --- (\d+)\. (.*?)(?: \(axis: [^)]*\))? -+$")


def test_every_question_is_shown_with_the_section_copier_yml_puts_it_in():
    """Copier has no groups of questions: each help text starts with its section, e.g. [2/10 Devices]."""
    lines = COPIER_YML.read_text().splitlines()
    numbers = [int(heading[1]) for heading in map(SECTION.match, lines) if heading]
    assert numbers == list(range(1, len(numbers) + 1))
    label, labels = None, {}
    for line in lines:
        if heading := SECTION.match(line):
            label = f"[{heading[1]}/{len(numbers)} {heading[2]}] "
        elif name := re.match(r"([a-z]\w*):$", line):
            labels[name[1]] = label
    spec = yaml.safe_load(COPIER_YML.read_text())
    for q in questions():
        assert labels[q.name] and spec[q.name]["help"].startswith(labels[q.name]), (q.name, spec[q.name]["help"])


def test_dataset_choices_follow_the_task_and_each_task_defaults_to_one_it_offers():
    dataset = question("dataset")
    offered = {task: dataset.options({"task": task}) for task in question("task").options()}
    assert offered == {
        "classification": ["digits", "synthetic", "imagefolder", "csv"],
        "regression": ["csv", "diabetes"],
        "segmentation": ["shapes", "folders"],
    }
    for task, datasets in offered.items():
        assert resolve_answers({"task": task})["dataset"] in datasets


def test_a_dataset_another_task_uses_is_refused_by_copier_with_the_reason(template_dir, tmp_path):
    with pytest.raises(ValueError, match="tables are for task=classification or regression"):
        render(template_dir, tmp_path / "project", {"task": "segmentation", "dataset": "csv"})
