"""The questionnaire refuses bad answers with the validator's message, and its answer space is sane."""

from __future__ import annotations

import pytest
from questionnaire import combinations, question, questions, resolve_answers
from rendering import render


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        ({"package_name": "class"}, "is a Python keyword"),
        ({"package_name": "torch"}, "would shadow the module of that name"),
        ({"package_name": "collections"}, "would shadow the module of that name"),
        ({"package_name": "1st_model"}, "must be a lowercase Python identifier"),
        ({"package_name": "My-Package"}, "must be a lowercase Python identifier"),
        ({"project_name": "My Project"}, "project_name must be lowercase"),
        ({"project_name": "bad--name"}, "project_name must be lowercase"),
        ({"author_email": "nobody"}, "author_email must look like"),
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
            options = q.options()
            assert (sorted(default) if q.multiselect else default) in options, q.name


def test_answer_space_multiplies_only_questions_that_are_asked():
    choice_questions = [q.name for q in questions() if q.is_choice or q.type == "bool"]
    for name in choice_questions:
        q = question(name)
        # A question asked only after another answer (e.g. sync_batchnorm under ddp) collapses alone.
        expected = len(q.options()) if q.is_asked(resolve_answers({})) else 1
        assert len(list(combinations([name]))) == expected, name
