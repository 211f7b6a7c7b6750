"""Rendered files read as hand-written: ruff-clean, byte-compiling, no Jinja leftovers or blank-line runs.

Checked for the default project and for one render per answer of every choice question, so each
answer's code is linted at least once.
"""

from __future__ import annotations

import compileall
import re
import subprocess
import sys

import pytest
from questionnaire import questions, resolve_answers, witness_of
from rendering import render

JINJA_LEFTOVER = re.compile(r"\{\{|\}\}|\{%|%\}|\{#|#\}")


def single_answer_variants() -> list[tuple[str, dict]]:
    """The defaults, and each answer changed alone; a choice that another answer brings (a dataset of another
    task) with that answer too."""
    variants = [("defaults", {})]
    defaults = resolve_answers({})
    for q in questions():
        for option in q.options():
            if option == defaults.get(q.name) or not q.is_asked(defaults):
                continue
            answers = {q.name: option}
            if not q.offers(option, defaults):
                witness = resolve_answers(witness_of({q.name: option}))
                answers = {name: value for name, value in witness.items() if value != defaults.get(name)}
            if answers not in [earlier for _, earlier in variants]:
                variants.append((f"{q.name}={option}", answers))
    return variants


VARIANTS = single_answer_variants()


def ruff(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("answers", [answers for _, answers in VARIANTS], ids=[name for name, _ in VARIANTS])
def test_rendered_files_are_clean(template_dir, tmp_path, answers):
    project = render(template_dir, tmp_path / "project", answers)

    check = ruff("check", "--no-cache", ".", cwd=project)
    assert check.returncode == 0, check.stdout
    fmt = ruff("format", "--check", "--no-cache", ".", cwd=project)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    assert compileall.compile_dir(project, quiet=1, force=True)

    for path in project.rglob("*"):
        if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        text = path.read_text()
        relative = path.relative_to(project)
        assert not JINJA_LEFTOVER.search(text), f"Jinja leftover in {relative}"
        assert "\n\n\n\n" not in text, f"run of blank lines in {relative}"
        # Python keeps PEP 8's two blank lines, in .py files and in a README's Python examples.
        prose = re.sub(r"```python\n.*?```", "```", text, flags=re.S) if path.suffix == ".md" else text
        if path.suffix != ".py":
            assert "\n\n\n" not in prose, f"run of blank lines in {relative}"
        assert text.endswith("\n") and not text.endswith("\n\n"), f"{relative} must end in one newline"
