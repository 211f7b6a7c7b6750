"""The template keeps Jinja at the edges: few block tags in code templates, no `.jinja` file without Jinja.

A feature's code lives in its own module (a conditional file name) or at the one place it acts, not in
`{% if %}` bookkeeping spread through shared files; every config key is one line of config_keys.jinja.
"""

from __future__ import annotations

import re

import pytest
from questionnaire import TEMPLATE_ROOT

BLOCK_TAG_SHARE = 0.08  # at most this share of a `.py.jinja` file's lines may hold a block tag or comment
TEMPLATES = sorted(path for path in (TEMPLATE_ROOT / "template").rglob("*.jinja") if path.is_file())
# A conditional name, e.g. {% if loggers %}loggers.py{% endif %}.jinja, is read without its tags.
CODE_TEMPLATES = [path for path in TEMPLATES if re.sub(r"\{%.*?%\}", "", path.name).endswith(".py.jinja")]
JINJA = re.compile(r"\{\{|\{%|\{#")


def _name(path) -> str:
    return str(path.relative_to(TEMPLATE_ROOT / "template"))


@pytest.mark.parametrize("path", CODE_TEMPLATES, ids=[_name(path) for path in CODE_TEMPLATES])
def test_a_code_template_holds_few_block_tag_lines(path):
    lines = path.read_text().splitlines()
    tags = [line for line in lines if "{%" in line or "{#" in line]
    assert len(tags) <= BLOCK_TAG_SHARE * len(lines), f"{len(tags)} of {len(lines)} lines hold block tags"


def test_every_jinja_file_holds_jinja():
    plain = [_name(path) for path in TEMPLATES if not JINJA.search(path.read_text())]
    assert not plain, f"no Jinja in these: drop their .jinja suffix (keep the condition in the name): {plain}"


def test_config_keys_are_written_only_in_config_keys_jinja():
    """The three config files render every key from config_keys.jinja: none spells a key of its own."""
    default_yaml = (TEMPLATE_ROOT / "template/configs/default.yaml.jinja").read_text()
    assert not re.findall(r"^\s*\w+:", default_yaml, re.MULTILINE)  # a YAML key
    schema_json = (TEMPLATE_ROOT / "template/configs/schema.json.jinja").read_text()
    assert not re.findall(r"^\s*\"\w+\": \{\"", schema_json, re.MULTILINE)  # a property and its schema
    config_py = (TEMPLATE_ROOT / "template/src/{{package_name}}/config.py.jinja").read_text()
    sections = config_py[config_py.index("class Section(") : config_py.index("def to_dict(")]
    assert not re.findall(r"^    \w+: .* = .*$", sections, re.MULTILINE)  # a pydantic field and its default
