"""Answers change the render only where they apply, and each is taken as given or refused with a message.

- An answer to a question whose ``when`` is false is not recorded in ``.copier-answers.yml``, but Copier
  still hands it to the templates: every guard must use its question's ``when``, so that such an answer
  changes no byte of the project. Where the question is asked, the same answer does change it.
- A boolean question accepts only booleans; ``package_name`` refuses every module name the project
  would shadow (standard library and dependencies, listed once in validators.jinja).
- Free text (description, author_name) is escaped wherever it is rendered: every file parses and the
  value reads back as given.
"""

from __future__ import annotations

import ast
import importlib.metadata
import io
import os
import pkgutil
import subprocess
import sys
import tomllib
import warnings
from email import message_from_string
from email.utils import getaddresses
from functools import cache
from pathlib import Path
from typing import Any

import copier
import jinja2
import pytest
import yaml
from markdown_it import MarkdownIt
from questionnaire import (
    COPIER_YML,
    combinations,
    depends_on,
    other_answers,
    questions,
    skipping_contexts,
)
from rendering import project_answers, render, tree_differences

# --- Answers to skipped questions are inert --------------------------------------------------------

# Files that others are rewriting: a guard in them waits for the lead (see the guard list in the
# inert-answers report). The test fails for any other file.
LEAD_OWNED = ("train.py", "config.py", "data.py", "model.py", "checkpoint.py", "configs/default.yaml", "scripts/")


class LeadGuardPending(AssertionError):
    """The answer still changes a file whose guard the lead has to fix."""


PENDING_GUARDS: dict[str, str] = {}


def skipped_cases() -> list[Any]:
    cases = []
    for q in questions():
        for context in skipping_contexts(q.name):
            given = {name: context[name] for name in depends_on(q)}
            for answer in other_answers(q.name, context):
                where = ",".join(f"{name}={value}" for name, value in given.items())
                marks = []
                if q.name in PENDING_GUARDS:
                    reason = PENDING_GUARDS[q.name]
                    marks.append(pytest.mark.xfail(raises=LeadGuardPending, strict=False, reason=reason))
                cases.append(pytest.param(q.name, answer, given, id=f"{q.name}={answer}-when-{where}", marks=marks))
    return cases


@pytest.fixture(scope="module")
def renders(template_dir, tmp_path_factory):
    """Render each set of answers once per module: the skipped-answer cases share their base renders."""
    done: dict[str, Path] = {}

    def _render(answers: dict[str, Any]) -> Path:
        key = repr(sorted(answers.items()))
        if key not in done:
            done[key] = render(template_dir, tmp_path_factory.mktemp("answers") / "project", answers)
        return done[key]

    return _render


@pytest.mark.parametrize(("name", "answer", "context"), skipped_cases())
def test_answer_to_a_skipped_question_changes_no_byte_of_the_render(renders, name, answer, context):
    differing = tree_differences(renders(context), renders({**context, name: answer}))
    not_lead = [path for path in differing if not any(part in path for part in LEAD_OWNED)]
    assert not not_lead, f"{name}={answer!r} changed {not_lead} though {name} is not asked"
    if differing:
        raise LeadGuardPending(f"{name}={answer!r} changed {differing} though {name} is not asked")


def asked_cases() -> list[Any]:
    cases = []
    for q in questions():
        if q.when is True:
            continue
        context = next(c for c in combinations(depends_on(q)) if q.is_asked(c))
        given = {name: context[name] for name in depends_on(q)}
        for answer in other_answers(q.name, context):
            cases.append(pytest.param(q.name, answer, given, id=f"{q.name}={answer}"))
    return cases


@pytest.mark.parametrize(("name", "answer", "context"), asked_cases())
def test_answer_to_an_asked_conditional_question_changes_the_render(renders, name, answer, context):
    differing = tree_differences(renders(context), renders({**context, name: answer}))
    assert set(differing) - {".copier-answers.yml"}, f"{name}={answer!r} changed nothing but the answers file"


# --- Booleans are booleans -------------------------------------------------------------------------

BOOLEANS = [q.name for q in questions() if q.type == "bool"]


@pytest.mark.parametrize("given", ["maybe", "1", ""])
@pytest.mark.parametrize("name", BOOLEANS)
def test_boolean_question_refuses_an_answer_that_is_not_a_boolean(template_dir, tmp_path, name, given):
    with pytest.raises(ValueError, match=f"{name} must be a boolean, true or false"):
        render(template_dir, tmp_path / "project", {name: given})
    assert not (tmp_path / "project").exists()


def test_boolean_questions_take_the_spellings_of_true_and_false(template_dir, tmp_path):
    spellings = ["yes", "No", "on", "off", "y", "n", "true", "False"]
    given = {name: spellings[i % len(spellings)] for i, name in enumerate(BOOLEANS)}
    recorded = project_answers(render(template_dir, tmp_path / "project", given))
    for name, text in given.items():
        if name in recorded:
            assert recorded[name] is (text.lower() in {"yes", "on", "y", "true"}), name


# --- package_name shadows nothing ------------------------------------------------------------------


@cache
def validators() -> Any:
    """validators.jinja's lists, read with the Jinja (and filters) that Copier uses."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(COPIER_YML.parent),
        extensions=["jinja2_ansible_filters.AnsibleCoreFiltersExtension"],
    )
    return environment.get_template("validators.jinja").module


def package_name_error(name: str) -> str:
    validator = yaml.safe_load(COPIER_YML.read_text())["package_name"]["validator"]
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(COPIER_YML.parent),
        extensions=["jinja2_ansible_filters.AnsibleCoreFiltersExtension"],
    )
    return environment.from_string(validator).render(package_name=name).strip()


def test_reserved_modules_hold_the_standard_library_of_this_python():
    # sys.stdlib_module_names leaves out the standard library's own `test` package, which a project
    # named test would be shadowed by: the modules installed in the standard library's directory count too.
    library = Path(os.__file__).parent
    installed = {module.name for module in pkgutil.iter_modules([str(library), str(library / "lib-dynload")])}
    missing = {name for name in set(sys.stdlib_module_names) | installed if name.isidentifier()}
    missing -= set(validators().stdlib_modules)
    assert not missing, f"add to validators.jinja's stdlib_modules: {sorted(missing)}"
    assert "test" in installed


def _import_names(distribution: str) -> set[str]:
    """Top-level modules and packages an installed distribution provides."""
    names = set()
    for file in importlib.metadata.distribution(distribution).files or []:
        top = file.parts[0]
        if top.endswith((".dist-info", ".data")) or top in ("..", "__pycache__"):
            continue
        if len(file.parts) == 1:
            if not top.endswith((".py", ".so", ".pyd")):
                continue
            top = top.split(".")[0]
        if top.isidentifier():
            names.add(top)
    return names


def _requirement_name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("~")[0].strip()


def test_reserved_modules_hold_every_import_name_of_a_full_projects_dependencies(render_project):
    everything = {q.name: q.options()[-1] for q in questions() if q.type == "bool" or q.multiselect}
    pyproject = tomllib.loads((render_project(parallelism="ddp", **everything) / "pyproject.toml").read_text())
    requirements = [
        *pyproject["build-system"]["requires"],
        *pyproject["project"]["dependencies"],
        *(r for extra in pyproject["project"]["optional-dependencies"].values() for r in extra),
    ]
    reserved = set(validators().dependency_modules)
    for requirement in requirements:
        name = _requirement_name(requirement)
        try:
            provided = _import_names(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} (a rendered project's dependency) is not installed here: add it to the [test] extra")
        assert provided <= reserved, f"add {sorted(provided - reserved)} ({name}) to validators.jinja"


def test_package_name_refuses_every_standard_library_and_dependency_module():
    for name in [*validators().stdlib_modules, *validators().dependency_modules]:
        message = package_name_error(name)
        if name.isidentifier() and name == name.lower() and not name[0].isdigit():
            assert "would shadow the module of that name" in message or "is a Python keyword" in message, name
        else:
            assert "must be a lowercase Python identifier" in message, name
    assert package_name_error("digit_classifier") == ""


@pytest.mark.parametrize("name", ["collections", "json", "torch", "sklearn", "yaml", "tests"])
def test_copier_refuses_a_package_name_that_shadows_a_module(template_dir, tmp_path, name):
    with pytest.raises(ValueError, match=f"package_name '{name}' would shadow the module of that name"):
        render(template_dir, tmp_path / "project", {"package_name": name})


# --- An answer that is not taken is named once -----------------------------------------------------


def test_the_conditions_the_messages_name_are_copier_ymls_when():
    """validators.jinja's ``conditions`` (which the messages after copy and update quote) is every
    conditional question of copier.yml with its ``when``, word for word."""
    when = {q.name: q.when for q in questions() if q.when is not True}
    assert {name: "{{ " + condition + " }}" for name, condition in validators().conditions.items()} == when


def test_copy_names_each_answer_it_does_not_take_once(template_dir, tmp_path, capsys):
    """Copier renders the project without the answers to questions it does not ask, or does not have, and
    says nothing (Copier's messages are what it prints last; quiet=True hides them)."""
    given = {"parallelism": "dataparallel", "compile": True, "sync_batchnorm": "yes", "scheduler": "plateau"}
    given |= {"warmup": True, "foo": "bar", "gpu_ids": "1"}
    copier.run_copy(str(template_dir), str(tmp_path / "project"), data=given, defaults=True, unsafe=True)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: compile=true was ignored: compile is asked only when parallelism != 'dataparallel' "
        "(parallelism is dataparallel)",
        "note: foo=bar was ignored: copier.yml has no question foo",
        "note: sync_batchnorm=yes was ignored: sync_batchnorm is asked only when parallelism == 'ddp' and "
        "task != 'language_model' (parallelism is dataparallel, task is classification)",
        "note: warmup=true was ignored: warmup is asked only when scheduler in "
        "['step', 'multistep', 'exponential', 'cosine', 'lambda'] (scheduler is plateau)",
    ]
    assert project_answers(tmp_path / "project")["gpu_ids"] == "1"  # asked and taken: no note


# --- Free text is escaped where it is rendered ------------------------------------------------------

HOSTILE_TEXT = {
    "quotes": "He said \"hi\", she said 'bye'",
    "backslashes": "C:\\new\\table \\ \\\\",
    "jinja": "{{ project_name }} {% if x %}{# not a comment #}{% endif %}",
    "non-ascii": "Café – naïve “quotes” ’ 日本語 😀",
    "markdown": "1. *not* a `list` <b>bold</b> &amp; [link](x) # ~~no~~ | _u_",
    "leading-markdown": "- not a list item and no --- rule",
    "quote-at-the-ends": '"""quoted" and a trailing quote"',
    "long": " ".join(["a long description"] * 20) + " ending in a backslash\\",
}


def _readme_paragraph(readme: str) -> tuple[list[str], str]:
    """The README's block structure (token types) and the text of the paragraph under the title."""
    tokens = MarkdownIt("commonmark").enable(["table", "strikethrough"]).parse(readme)
    structure = [token.type for token in tokens]
    assert structure[:6] == [
        "heading_open",
        "inline",
        "heading_close",
        "paragraph_open",
        "inline",
        "paragraph_close",
    ], structure[:6]
    inline = tokens[4]
    assert all(child.type == "text" for child in inline.children), [child.type for child in inline.children]
    return structure, "".join(child.content for child in inline.children)


def _docstring(project: Path) -> str:
    package = project_answers(project)["package_name"]
    return ast.get_docstring(ast.parse((project / "src" / package / "__init__.py").read_text()), clean=False)


def _metadata(project: Path):
    """The core metadata setuptools writes from the rendered pyproject.toml."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        distribution = apply_configuration(Distribution(), project / "pyproject.toml")
    buffer = io.StringIO()
    distribution.metadata.write_pkg_file(buffer)
    return message_from_string(buffer.getvalue())


@pytest.fixture(scope="module")
def hostile_projects(template_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    projects = {"default": render(template_dir, root / "default")}
    for key, text in HOSTILE_TEXT.items():
        projects[key] = render(template_dir, root / key, {"description": text, "author_name": text})
    return projects


@pytest.mark.parametrize("key", HOSTILE_TEXT)
def test_free_text_is_escaped_and_reads_back_as_given(hostile_projects, key):
    text, project = HOSTILE_TEXT[key], hostile_projects[key]
    # TOML, as written and as setuptools turns it into core metadata.
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    assert pyproject["description"] == text
    assert pyproject["authors"] == [{"name": text, "email": "you@example.com"}]
    metadata = _metadata(project)
    assert metadata["Summary"] == text
    assert getaddresses([metadata["Author-email"]]) == [(text, "you@example.com")]
    # YAML: the answers file.
    answers = project_answers(project)
    assert (answers["description"], answers["author_name"]) == (text, text)
    # Python: every module parses; the package docstring is the description, trimmed and wrapped.
    for path in project.rglob("*.py"):
        ast.parse(path.read_text(), filename=str(path))
    assert " ".join(_docstring(project).split()) == " ".join(text.split())
    # Markdown: the same blocks as the default README, and the description paragraph shows the text.
    structure, paragraph = _readme_paragraph((project / "README.md").read_text())
    assert structure == _readme_paragraph((hostile_projects["default"] / "README.md").read_text())[0]
    assert paragraph == text.strip()
    for path in [*project.rglob("*.yaml"), *project.rglob("*.yml")]:
        yaml.safe_load(path.read_text())


def test_projects_with_hostile_free_text_are_ruff_clean(hostile_projects):
    paths = [str(path) for path in hostile_projects.values()]
    for args in (["check", "--no-cache"], ["format", "--check", "--no-cache"]):
        result = subprocess.run([sys.executable, "-m", "ruff", *args, *paths], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("text", ["two\nlines", "carriage\rreturn", "a\ttab", "nul\0", "line\u2028separator"])
@pytest.mark.parametrize("name", ["description", "author_name"])
def test_free_text_with_a_line_break_or_control_character_is_refused(template_dir, tmp_path, name, text):
    with pytest.raises(ValueError, match=f"{name} must be one line of text"):
        render(template_dir, tmp_path / "project", {name: text})
