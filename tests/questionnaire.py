"""The questionnaire's answer space, read from copier.yml: the one list of questions and choices.

Tests and benchmarks derive every answer combination from here, so a choice added to copier.yml
is tested with no second list to keep in sync.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import yaml

TEMPLATE_ROOT = Path(__file__).resolve().parents[1]
COPIER_YML = TEMPLATE_ROOT / "copier.yml"
FALSE_STRINGS = {"", "false", "no", "n", "off", "0", "none", "null"}


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(extensions=["jinja2_ansible_filters.AnsibleCoreFiltersExtension"])


def render_value(value: Any, answers: dict[str, Any]) -> Any:
    """Render a Jinja string from copier.yml (a default or a ``when``) against earlier answers."""
    if not isinstance(value, str) or "{" not in value:
        return value
    return _environment().from_string(value).render(**answers)


@dataclass(frozen=True)
class Question:
    name: str
    type: str
    choices: tuple[Any, ...]
    multiselect: bool
    default: Any
    when: Any

    @property
    def is_choice(self) -> bool:
        return bool(self.choices)

    def options(self) -> list[Any]:
        """Every answer this question can take: choices, both booleans, every subset of a multi-select.

        A free-text question contributes only its default (it chooses no code).
        """
        if self.multiselect:
            return [
                list(subset)
                for size in range(len(self.choices) + 1)
                for subset in itertools.combinations(self.choices, size)
            ]
        if self.is_choice:
            return list(self.choices)
        if self.type == "bool":
            return [False, True]
        return []

    def is_asked(self, answers: dict[str, Any]) -> bool:
        when = render_value(self.when, answers)
        if isinstance(when, str):
            return when.strip().lower() not in FALSE_STRINGS
        return bool(when)

    def default_for(self, answers: dict[str, Any]) -> Any:
        value = render_value(self.default, answers)
        if self.type == "bool" and isinstance(value, str):
            return value.strip().lower() not in FALSE_STRINGS
        return value


@cache
def questions() -> tuple[Question, ...]:
    spec = yaml.safe_load(COPIER_YML.read_text())
    result = []
    for name, body in spec.items():
        if name.startswith("_"):
            continue
        choices = body.get("choices") or ()
        if isinstance(choices, dict):
            choices = tuple(choices.values())
        result.append(
            Question(
                name=name,
                type=body.get("type", "str"),
                choices=tuple(choices),
                multiselect=bool(body.get("multiselect", False)),
                default=body.get("default"),
                when=body.get("when", True),
            )
        )
    return tuple(result)


def question(name: str) -> Question:
    return next(q for q in questions() if q.name == name)


def resolve_answers(chosen: dict[str, Any]) -> dict[str, Any]:
    """Complete ``chosen`` with defaults, in questionnaire order, dropping questions not asked."""
    answers: dict[str, Any] = {}
    for q in questions():
        if not q.is_asked(answers):
            continue
        answers[q.name] = chosen[q.name] if q.name in chosen else q.default_for(answers)
    return answers


def combinations(axes: list[str], base: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Every combination of the options of ``axes`` that the ``when`` conditions allow.

    A question that is not asked under a combination is not multiplied: its options collapse.
    """
    seen: set[str] = set()

    def expand(index: int, chosen: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if index == len(axes):
            answers = resolve_answers(chosen)
            key = repr(sorted(answers.items()))
            if key not in seen:
                seen.add(key)
                yield answers
            return
        q = question(axes[index])
        if not q.is_asked(resolve_answers(chosen)):
            yield from expand(index + 1, chosen)
            return
        for option in q.options():
            yield from expand(index + 1, {**chosen, q.name: option})

    yield from expand(0, dict(base or {}))
