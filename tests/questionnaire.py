"""The questionnaire's answer space, read from copier.yml: the one list of questions and choices.

Tests and benchmarks derive every answer combination from here, so a choice added to copier.yml
is tested with no second list to keep in sync.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import yaml

TEMPLATE_ROOT = Path(__file__).resolve().parents[1]
COPIER_YML = TEMPLATE_ROOT / "copier.yml"


def copier_bool(value: Any) -> bool:
    """A rendered ``when`` (or bool default) read as Copier's ``cast_to_bool`` reads it.

    tests/test_copier_versions.py checks the outcome against the answers stock Copier records.
    """
    try:
        return bool(float(value))
    except (TypeError, ValueError):
        pass
    if isinstance(value, str):
        text = value.strip().lower()
        if text in {"", "n", "no", "f", "false", "off", "~", "null", "none"}:
            return False
    return bool(value)


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(extensions=["jinja2_ansible_filters.AnsibleCoreFiltersExtension"])


@cache
def _compiled(source: str) -> jinja2.Template:
    return _environment().from_string(source)


def render_value(value: Any, answers: dict[str, Any]) -> Any:
    """Render a Jinja string from copier.yml (a default or a ``when``) against earlier answers."""
    if not isinstance(value, str) or "{" not in value:
        return value
    return _compiled(value).render(**answers)


@dataclass(frozen=True)
class Question:
    name: str
    type: str
    choices: tuple[Any, ...]
    multiselect: bool
    default: Any
    when: Any
    # Choices offered only under some answers: value -> Copier's choice validator (non-empty: not offered).
    validators: tuple[tuple[Any, str], ...] = ()

    @property
    def is_choice(self) -> bool:
        return bool(self.choices)

    def options(self, answers: dict[str, Any] | None = None) -> list[Any]:
        """Every answer this question can take: choices, both booleans, every subset of a multi-select.

        With ``answers``, only the choices offered under them (a choice's validator renders empty).
        A free-text question contributes only its default (it chooses no code).
        """
        if answers is not None and self.validators:
            return [option for option in self.options() if self.offers(option, answers)]
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

    def pairwise_options(self) -> list[Any]:
        """The answers a pairwise covering set combines: ``options()``, but a multi-select counts as one
        yes/no factor per choice, not as 2**n answers.

        Its answers are none, all, and all but one for each choice: every two choices are then seen
        on/on, off/off, on/off and off/on, and pairing these answers with another question's puts each
        choice both on and off beside each of that question's answers.
        """
        if not self.multiselect:
            return self.options()
        every = list(self.choices)
        subsets = [[], every, *([choice for choice in every if choice != left_out] for left_out in every)]
        return [subset for i, subset in enumerate(subsets) if subset not in subsets[:i]]

    def offers(self, option: Any, answers: dict[str, Any]) -> bool:
        """Whether ``option`` is offered under ``answers``: its choice validator, if any, renders empty."""
        validator = dict(self.validators).get(_freeze(option), "")
        return not str(render_value(validator, answers)).strip()

    def is_asked(self, answers: dict[str, Any]) -> bool:
        return copier_bool(render_value(self.when, answers))

    def default_for(self, answers: dict[str, Any]) -> Any:
        value = render_value(self.default, answers)
        if self.type == "bool":
            return copier_bool(value)
        return value


def depends_on(q: Question) -> list[str]:
    """The questions whose answers ``q``'s ``when`` reads, in questionnaire order."""
    if not isinstance(q.when, str):
        return []
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", q.when))
    return [other.name for other in questions() if other.name in words and other.name != q.name]


# A valid answer, other than the default, to each conditional free-text question: copier.yml lists no
# options for them, and the tests that pass answers to skipped questions need one.
SAMPLE_ANSWERS = {"gpu_ids": "1,3"}


def other_answers(name: str, answers: dict[str, Any]) -> list[Any]:
    """Every answer to ``name`` but its default under ``answers`` (a sample one for free text)."""
    q = question(name)
    if not q.options():
        assert name in SAMPLE_ANSWERS, f"add a valid sample answer for {name} to SAMPLE_ANSWERS"
        return [SAMPLE_ANSWERS[name]]
    default = q.default_for(answers)
    return [option for option in q.options() if option != default]


def skipping_contexts(name: str) -> list[dict[str, Any]]:
    """Every combination of the answers ``name``'s ``when`` reads under which ``name`` is not asked."""
    q = question(name)
    return [answers for answers in combinations(depends_on(q)) if not q.is_asked(answers)]


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
        validators = tuple((c["value"], c.get("validator", "")) for c in choices if isinstance(c, dict))
        choices = tuple(c["value"] if isinstance(c, dict) else c for c in choices)
        result.append(
            Question(
                name=name,
                type=body.get("type", "str"),
                choices=tuple(choices),
                multiselect=bool(body.get("multiselect", False)),
                default=body.get("default"),
                when=body.get("when", True),
                validators=validators,
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
        for option in q.options(resolve_answers(chosen)):
            yield from expand(index + 1, {**chosen, q.name: option})

    yield from expand(0, dict(base or {}))


# --- The combination matrix ----------------------------------------------------------------------

# The six design axes whose every combination the exhaustive tier trains. Axes not (yet) in copier.yml
# are skipped, so the matrix grows by itself as questions are added.
DESIGN_AXES = ("device", "parallelism", "scheduler", "freezing", "amp", "loggers")


def design_axes() -> list[str]:
    """The design axes that copier.yml asks, in questionnaire order."""
    names = [q.name for q in questions()]
    return [name for name in names if name in DESIGN_AXES]


def choice_questions() -> list[str]:
    """Questions whose answer chooses code: choices, booleans and multi-selects (free text chooses none)."""
    return [q.name for q in questions() if q.options()]


def _freeze(value: Any) -> Any:
    """A hashable form of an answer (multi-select answers are lists)."""
    return tuple(value) if isinstance(value, list) else value


def _mentions(source: Any, name: str) -> bool:
    return isinstance(source, str) and name in source


def _gated_by(q: Question, name: str) -> bool:
    """Whether ``q``'s ``when``, default or offered choices read the answer to ``name``."""
    return any(_mentions(source, name) for source in (q.when, q.default, *(v for _, v in q.validators)))


def product_size(axes: list[str], base: dict[str, Any] | None = None) -> int:
    """How many combinations of ``axes`` copier.yml allows, computed as a product.

    An axis whose answer no later ``when`` (or default) looks at contributes a plain factor, the number
    of its options, or 1 when it is not asked; only axes that a later condition depends on are branched
    over. ``combinations(axes)`` enumerates the same set one by one, so the two must agree.
    """
    specs = {q.name: q for q in questions()}

    def count(index: int, chosen: dict[str, Any]) -> int:
        if index == len(axes):
            return 1
        q = specs[axes[index]]
        if not q.is_asked(resolve_answers(chosen)):
            return count(index + 1, chosen)
        later = [specs[name] for name in list(specs)[list(specs).index(q.name) + 1 :]]
        options = q.options(resolve_answers(chosen))
        if not any(_gated_by(other, q.name) for other in later):
            return len(options) * count(index + 1, chosen)
        return sum(count(index + 1, {**chosen, q.name: option}) for option in options)

    return count(0, dict(base or {}))


Pair = tuple[tuple[str, Any], tuple[str, Any]]


def _pairs_of(answers: dict[str, Any], names: list[str]) -> set[Pair]:
    present = [(name, _freeze(answers[name])) for name in names if name in answers]
    return {(a, b) for i, a in enumerate(present) for b in present[i + 1 :]}


def _resolver(specs: tuple[Question, ...]):
    """``resolve_answers`` over ``specs`` instead of copier.yml's questions."""

    def resolve(chosen: dict[str, Any]) -> dict[str, Any]:
        answers: dict[str, Any] = {}
        for q in specs:
            if not q.is_asked(answers):
                continue
            answers[q.name] = chosen[q.name] if q.name in chosen else q.default_for(answers)
        return answers

    return resolve


def _offered(answers: dict[str, Any], specs: tuple[Question, ...]) -> bool:
    """Whether every answer in ``answers`` is one its question offers under the others."""
    return all(q.offers(answers[q.name], answers) for q in specs if q.name in answers and q.validators)


def _holds(answers: dict[str, Any], fixed: dict[str, Any]) -> bool:
    return all(name in answers and _freeze(answers[name]) == _freeze(value) for name, value in fixed.items())


def _witness(fixed: dict[str, Any], specs: tuple[Question, ...]) -> dict[str, Any] | None:
    """Answers under which every question in ``fixed`` is asked with its fixed answer, or None.

    Depth-first over the questions in order; only a question that a later ``when`` (or default) refers to
    is branched over (its default first), every other one takes its default.
    """
    names = [q.name for q in specs]
    gating = {q.name for i, q in enumerate(specs) if any(_gated_by(later, q.name) for later in specs[i + 1 :])}

    def search(index: int, answers: dict[str, Any]) -> dict[str, Any] | None:
        if index == len(specs):
            return answers
        q = specs[index]
        if not q.is_asked(answers):
            return None if q.name in fixed else search(index + 1, answers)
        if q.name in fixed:
            candidates = [fixed[q.name]] if q.offers(fixed[q.name], answers) else []
        elif q.name in gating and q.options():
            default = q.default_for(answers)
            candidates = [default, *(o for o in q.options(answers) if _freeze(o) != _freeze(default))]
        else:
            candidates = [q.default_for(answers)]
        for value in candidates:
            found = search(index + 1, {**answers, q.name: value})
            if found is not None:
                return found
        return None

    assert set(fixed) <= set(names)
    return search(0, {})


def witness_of(fixed: dict[str, Any]) -> dict[str, Any]:
    """Answers to copier.yml's questions under which every answer in ``fixed`` is asked and offered."""
    found = _witness(fixed, questions())
    assert found is not None, f"no combination of answers holds {fixed}"
    return found


def _possible_pairs(names: list[str], specs: tuple[Question, ...]) -> dict[Pair, dict[str, Any]]:
    """Every pair of answers of two of ``names`` that some combination holds, with one such combination."""
    by_name = {q.name: q for q in specs}
    possible = {}
    for i, n1 in enumerate(names):
        for n2 in names[i + 1 :]:
            for v1 in by_name[n1].pairwise_options():
                for v2 in by_name[n2].pairwise_options():
                    witness = _witness({n1: v1, n2: v2}, specs)
                    if witness is not None:
                        possible[((n1, _freeze(v1)), (n2, _freeze(v2)))] = witness
    return possible


def pairwise(names: list[str] | None = None, specs: tuple[Question, ...] | None = None) -> list[dict[str, Any]]:
    """A covering set: every pair of answers of any two of ``names`` is in at least one combination.

    Greedy (AETG-like) and deterministic. Each new combination starts from the first uncovered pair
    (plus whatever answers its ``when`` conditions need, from ``_witness``) and gives every other
    question, in questionnaire order, the answer that covers the most uncovered pairs with the answers
    chosen so far, ties to the earlier option, never one that would un-ask the seed pair. Combinations
    are completed with the questionnaire's own resolution, so a question not asked is absent and an
    impossible pair is never required. Every answer of every question appears at least once; a
    multi-select's answers are ``Question.pairwise_options`` (one yes/no factor per choice).
    ``specs`` replaces copier.yml's questions (to test the generator itself).
    """
    specs = specs or questions()
    by_name = {q.name: q for q in specs}
    names = names or [q.name for q in specs if q.options()]
    resolve = _resolver(specs)
    options = {name: by_name[name].pairwise_options() for name in names}
    order = {name: i for i, name in enumerate(names)}
    possible = _possible_pairs(names, specs)
    uncovered = set(possible)
    rows: list[dict[str, Any]] = []
    for seed in possible:  # dicts keep insertion order: deterministic
        if seed not in uncovered:
            continue
        fixed = {name: value for name, value in seed}
        witness = possible[seed]
        defaults = resolve({})
        chosen = {name: value for name, value in witness.items() if _freeze(defaults.get(name)) != _freeze(value)}
        chosen.update({name: options[name][_index(options[name], value)] for name, value in seed})
        for name in names:
            if name in chosen or name not in resolve(chosen):
                continue
            best, best_gain = None, -1
            for option in options[name]:
                candidate = resolve({**chosen, name: option})
                if not _holds(candidate, fixed) or not _offered(candidate, specs):
                    continue
                gain = sum(
                    _ordered((name, _freeze(option)), (other, _freeze(value)), order) in uncovered
                    for other, value in chosen.items()
                    if other in order and other != name
                )
                if gain > best_gain:
                    best, best_gain = option, gain
            chosen[name] = best
        answers = resolve(chosen)
        assert _holds(answers, fixed), (seed, answers)
        uncovered -= _pairs_of(answers, names)
        rows.append(answers)
    # Each answer at least once, also one that pairs with nothing (a lone question).
    for name in names:
        for option in options[name]:
            if any(_freeze(row.get(name)) == _freeze(option) for row in rows):
                continue
            witness = _witness({name: option}, specs)
            if witness is not None:
                rows.append(resolve(witness))
    return rows


def _ordered(a: tuple[str, Any], b: tuple[str, Any], order: dict[str, int]) -> Pair:
    return (a, b) if order[a[0]] < order[b[0]] else (b, a)


def _index(options: list[Any], frozen: Any) -> int:
    return next(i for i, option in enumerate(options) if _freeze(option) == frozen)


def uncovered_pairs(
    rows: list[dict[str, Any]], names: list[str], specs: tuple[Question, ...] | None = None
) -> set[Pair]:
    """Pairs of answers that some combination could hold but none of ``rows`` does (empty when covering)."""
    covered: set[Pair] = set()
    for row in rows:
        covered |= _pairs_of(row, names)
    return set(_possible_pairs(names, specs or questions())) - covered
