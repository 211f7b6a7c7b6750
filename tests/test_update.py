"""`copier update` between two tagged versions of the template keeps the user's edits.

Each test builds its own template repository from the working tree (tag v0.1.0), changes the template
and tags v0.2.0, renders the older version, commits a user's edit, and updates with Copier itself.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import copier
import pytest
import yaml
from questionnaire import question
from rendering import SMOKE_OVERRIDES, project_answers, snapshot_template, train


@pytest.fixture(autouse=True)
def git_identity(monkeypatch, tmp_path):
    """Commits by the tests and by Copier need an identity, and no user or system git config."""
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "Template Tests")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "tests@example.com")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    (tmp_path / "gitconfig").write_text("[init]\n\tdefaultBranch = main\n")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def commit_all(repo: Path, message: str, tag: str | None = None) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    if tag:
        git(repo, "tag", tag)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


@pytest.fixture
def template_repo(tmp_path) -> Path:
    """A git repository holding the working tree's template, tagged v0.1.0 (a PEP 440 tag with a 'v')."""
    repo = snapshot_template(tmp_path / "template-repo")
    git(repo, "init", "-q")
    commit_all(repo, "template 0.1.0", tag="v0.1.0")
    return repo


def render_v1(template_repo: Path, dst: Path, **answers) -> Path:
    copier.run_copy(
        str(template_repo), str(dst), data=answers, defaults=True, unsafe=True, quiet=True, vcs_ref="v0.1.0"
    )
    git(dst, "init", "-q")
    commit_all(dst, "rendered from the template")
    assert project_answers(dst)["_commit"] == "v0.1.0"
    return dst


def update(project: Path, **data) -> None:
    """`copier update --trust --defaults [--data k=v]` to the newest tag, as a user runs it."""
    copier.run_update(str(project), data=data, defaults=True, overwrite=True, unsafe=True, quiet=True)


CONFIG = Path("configs/default.yaml")


def test_update_keeps_the_users_edit_and_brings_the_templates_change(template_repo, tmp_path):
    project = render_v1(template_repo, tmp_path / "project")
    edit(project / CONFIG, "epochs: 20", "epochs: 7  # the user's choice")
    commit_all(project, "user: fewer epochs")

    # The template changes the same file far from the user's edit, and adds a file.
    keys = template_repo / "config_keys.jinja"  # every config key's default, written once
    edit(
        keys,
        '{"key": "progress_bar", "type": "bool", "default": true',
        '{"key": "progress_bar", "type": "bool", "default": false',
    )
    (template_repo / "template/CONTRIBUTING.md").write_text("Run the tests before sending a change.\n")
    commit_all(template_repo, "template 0.2.0", tag="0.2.0")  # PEP 440 without the 'v' works as well

    update(project)

    config = (project / CONFIG).read_text()
    assert "epochs: 7  # the user's choice" in config
    assert "progress_bar: false" in config and "progress_bar: true" not in config
    assert (project / "CONTRIBUTING.md").read_text() == "Run the tests before sending a change.\n"
    assert project_answers(project)["_commit"] == "0.2.0"
    assert "<<<<<<<" not in config


def test_a_conflicting_edit_is_shown_as_a_conflict_never_silently_overwritten(template_repo, tmp_path):
    """Copier exits 0 with conflict markers left in files: the project's `make update` fails naming them.
    Copier's message after the update names the answers it drops: an unknown question, and the questions
    that an answer given now stops asking (compile, asked only without dataparallel, was answered true)."""
    project = render_v1(template_repo, tmp_path / "project", compile=True)
    edit(project / CONFIG, "batch_size: 64", "batch_size: 128")
    commit_all(project, "user: bigger batches")

    edit(
        template_repo / "config_keys.jinja",
        '{"key": "batch_size", "type": "int", "default": 16 if lm else 64',
        '{"key": "batch_size", "type": "int", "default": 16 if lm else 32',
    )
    commit_all(template_repo, "template 0.2.0", tag="v0.2.0")

    copier_cli = Path(sys.executable).parent / "copier"
    arguments = "--defaults --data parallelism=dataparallel --data foo=bar"
    result = subprocess.run(
        ["make", "update", f"COPIER={copier_cli}", f"ARGS={arguments}"], cwd=project, capture_output=True, text=True
    )

    assert result.returncode != 0, result.stdout + result.stderr
    assert "error: resolve the conflicts copier update left in: configs/default.yaml\n" in result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: foo=bar was ignored: copier.yml has no question foo",
        "note: with parallelism=dataparallel, compile and sync_batchnorm are not asked: any answer from before "
        "this update is dropped (git diff .copier-answers.yml shows which)",
    ]
    assert "compile" not in project_answers(project)
    config = (project / CONFIG).read_text()
    rejects = list(project.rglob("*.rej"))
    if rejects:  # Copier's `--conflict rej` mode: the file keeps the user's line, the .rej the template's
        assert "batch_size: 128" in config
        assert any("batch_size: 32" in path.read_text() for path in rejects)
    else:  # the default, inline markers holding both sides
        assert re.search(r"^<<<<<<< .*\n(.*\n)*?=======\n(.*\n)*?>>>>>>> ", config, re.MULTILINE), config
        assert "batch_size: 128" in config and "batch_size: 32" in config


def _answer_that_adds_a_file(template: Path) -> tuple[str, object, Path]:
    """A non-default answer of a choice question whose rendered tree gains a file (from copier.yml)."""
    conditional = re.compile(r"\{%\s*if\s+(\w+)\s*==\s*['\"]([^'\"]+)['\"]\s*%\}(.+?)\{%\s*endif\s*%\}")
    boolean = re.compile(r"\{%\s*if\s+(\w+)\s*%\}(.+?)\{%\s*endif\s*%\}")
    in_multiselect = re.compile(r"\{%\s*if\s+['\"]([^'\"]+)['\"]\s+in\s+(\w+)\s*%\}(.+?)\{%\s*endif\s*%\}")
    for path in sorted((template / "template").rglob("*")):
        relative = path.relative_to(template / "template")
        name = str(relative)
        if (match := conditional.search(name)) and question(match.group(1)).default != match.group(2):
            answer, value = match.group(1), match.group(2)
            rendered = name[: match.start()] + match.group(3) + name[match.end() :]
        elif (
            (match := boolean.search(name))
            and question(match.group(1)).type == "bool"
            and not question(match.group(1)).default
        ):
            answer, value = match.group(1), True
            rendered = name[: match.start()] + match.group(2) + name[match.end() :]
        elif (match := in_multiselect.search(name)) and [match.group(1)] != question(match.group(2)).default:
            answer, value = match.group(2), [match.group(1)]
            rendered = name[: match.start()] + match.group(3) + name[match.end() :]
        else:
            continue
        if "{" in rendered.replace("{{package_name}}", "") or path.is_dir():
            continue
        return answer, value, Path(rendered.removesuffix(".jinja"))
    # No conditional file in the template yet: the optimiser's settings in the config change instead.
    return "optimizer", "sgd", CONFIG


def test_changing_an_answer_with_update_data_adds_the_features_files_and_keeps_edits(template_repo, tmp_path):
    answer, value, added = _answer_that_adds_a_file(template_repo)
    project = render_v1(template_repo, tmp_path / "project")
    package = project_answers(project)["package_name"]
    added = Path(str(added).replace("{{package_name}}", package))
    model = project / "src" / package / "model.py"
    model.write_text(model.read_text() + "\n\n# the user's note: try a wider CNN next\n")
    commit_all(project, "user: a note in model.py")
    before = (project / added).read_text() if (project / added).exists() else None

    update(project, **{answer: value})

    assert project_answers(project)[answer] == value
    assert (project / added).is_file()
    assert (project / added).read_text() != before
    if added == CONFIG:
        assert "momentum: 0.9" in (project / CONFIG).read_text()
    assert model.read_text().endswith("# the user's note: try a wider CNN next\n")


def _rename_answer(template: Path, old: str, new: str) -> None:
    """Rename a question in copier.yml and every Jinja expression that reads it (a quoted "name" is text)."""
    jinja = re.compile(r"(\{\{.*?\}\}|\{%.*?%\})", re.DOTALL)
    word = re.compile(rf"(?<![\w\"']){old}(?![\w\"'])")
    templates = [*template.glob("*.jinja"), *(p for p in (template / "template").rglob("*.jinja") if p.is_file())]
    for path in [template / "copier.yml", *templates]:
        text = path.read_text()
        renamed = jinja.sub(lambda m: word.sub(new, m.group(0)), text)
        if path.name == "copier.yml":
            renamed = re.sub(rf"^{old}:", f"{new}:", renamed, flags=re.MULTILINE)
        path.write_text(renamed)


def test_a_migration_renames_an_answer_during_update_so_the_users_choice_is_kept(template_repo, tmp_path):
    project = render_v1(template_repo, tmp_path / "project", dataset="synthetic")
    edit(project / CONFIG, "epochs: 20", "epochs: 3")
    commit_all(project, "user: three epochs")

    # 0.2.0 renames the question `dataset` to `default_dataset` and ships the migration for it.
    _rename_answer(template_repo, "dataset", "default_dataset")
    copier_yml = template_repo / "copier.yml"
    config = yaml.safe_load(copier_yml.read_text())
    assert "default_dataset" in config and "dataset" not in config
    config.setdefault("_migrations", []).append(
        {
            "version": "0.2.0",
            "when": "{{ _stage == 'before' }}",
            "command": [
                "{{ _copier_python }}",
                "{{ _copier_conf.src_path }}/hooks/migrate.py",
                "rename-answer",
                "dataset",
                "default_dataset",
            ],
        }
    )
    copier_yml.write_text(yaml.safe_dump(config, sort_keys=False))
    commit_all(template_repo, "template 0.2.0: rename dataset to default_dataset", tag="v0.2.0")

    update(project)

    answers = project_answers(project)
    assert answers["default_dataset"] == "synthetic"  # without the migration: the default, digits
    assert "dataset" not in answers
    assert "dataset: synthetic" in (project / CONFIG).read_text()
    assert "epochs: 3" in (project / CONFIG).read_text()


def test_migrations_in_copier_yml_are_pep440_versions_and_call_existing_hooks():
    from packaging.version import Version
    from questionnaire import COPIER_YML, TEMPLATE_ROOT

    for entry in yaml.safe_load(COPIER_YML.read_text()).get("_migrations") or []:
        Version(entry["version"])
        scripts = [part for part in entry["command"] if isinstance(part, str) and part.endswith(".py")]
        for script in scripts:
            assert (TEMPLATE_ROOT / "hooks" / Path(script).name).is_file(), script


def readme_copy_command() -> str:
    """The `copier copy` of the template README's first command, as a new user runs it."""
    from questionnaire import TEMPLATE_ROOT

    readme = (TEMPLATE_ROOT / "README.md").read_text()
    first = next(line for line in readme.splitlines() if "copier copy" in line)
    (copy,) = [part for part in first.split(" && ") if "copier copy" in part]
    return copy


def test_the_project_of_the_readmes_first_command_takes_a_later_template_commit(template_repo, tmp_path):
    """The README renders from a checkout with `--vcs-ref=HEAD`; the project must record where.

    With `.` as the template path Copier records `_src_path: .`, which `copier update` later resolves
    against the project itself and fails with `Unknown revision`.
    """
    copier_cli = Path(sys.executable).parent / "copier"
    command = readme_copy_command().replace(".venv/bin/copier", shlex.quote(str(copier_cli)))
    assert command != readme_copy_command(), "the README's first command no longer runs .venv/bin/copier"
    subprocess.run(["bash", "-c", command], cwd=template_repo, check=True, capture_output=True)
    project = tmp_path / "my-project"  # ../my-project from the checkout
    assert Path(project_answers(project)["_src_path"]) == template_repo
    git(project, "init", "-q")
    commit_all(project, "rendered from the checkout")

    # A later commit of the checkout, not tagged: what a user of the README's flow pulls.
    keys = template_repo / "config_keys.jinja"  # every config key's default, written once
    edit(
        keys,
        '{"key": "progress_bar", "type": "bool", "default": true',
        '{"key": "progress_bar", "type": "bool", "default": false',
    )
    commit_all(template_repo, "template: no progress bar by default")
    head = git(template_repo, "rev-parse", "--short", "HEAD").strip()

    update = [str(copier_cli), "update", "--trust", "--defaults", "--vcs-ref=HEAD"]
    result = subprocess.run(update, cwd=project, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "progress_bar: false" in (project / CONFIG).read_text()
    assert head in project_answers(project)["_commit"]


# The last commit before every config key came from one list (config_keys.jinja): config.py, default.yaml and
# schema.json were written out by hand in the template then. A project rendered from it must update cleanly.
BEFORE_ONE_DEFINITION = "e903ae740d372b20ac1f65364d0ddde0966730b6"


def template_before_the_one_definition(repo: Path) -> Path:
    """The template as it was at BEFORE_ONE_DEFINITION, tagged v0.1.0 in a new repository (skip without history)."""
    from questionnaire import TEMPLATE_ROOT

    if subprocess.run(["git", "cat-file", "-e", BEFORE_ONE_DEFINITION], cwd=TEMPLATE_ROOT).returncode:
        pytest.skip(f"the template's git history (commit {BEFORE_ONE_DEFINITION[:7]}) is not in this checkout")
    repo.mkdir()
    git(repo, "init", "-q")
    old = subprocess.run(
        ["git", "archive", BEFORE_ONE_DEFINITION, "copier.yml", "validators.jinja", "template", "hooks"],
        cwd=TEMPLATE_ROOT,
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(repo)], input=old, check=True)
    commit_all(repo, "template before the one definition", tag="v0.1.0")
    return repo


def test_a_checkpoint_of_a_project_rendered_before_the_restructuring_resumes(default_project, tmp_path):
    """The checkpoint layout outlived the move of checkpoint I/O into checkpoint.py: an older run continues."""
    repo = template_before_the_one_definition(tmp_path / "template-repo")
    old_project = tmp_path / "old-project"
    copier.run_copy(str(repo), str(old_project), defaults=True, unsafe=True, quiet=True)
    out = tmp_path / "run"
    train(old_project, *SMOKE_OVERRIDES, "epochs=1", f"output_dir={out}")
    resumed = train(default_project, *SMOKE_OVERRIDES, "epochs=2", "resume=auto", f"output_dir={out}")
    assert f"resumed from {out / 'checkpoints' / 'last.pt'}" in resumed.stdout and "epoch 2/2 |" in resumed.stdout


def test_a_project_rendered_before_the_one_definition_of_config_keys_updates_keeping_its_edits(tmp_path):
    repo = template_before_the_one_definition(tmp_path / "template-repo")
    answers = {"parallelism": "ddp", "layer_lr": True, "ema": True, "loggers": ["csv", "tensorboard"]}
    project = render_v1(repo, tmp_path / "project", **answers)
    edit(project / CONFIG, "epochs: 20", "epochs: 7  # the user's choice")
    edit(project / CONFIG, "  batch_size: 64", "  batch_size: 48")
    edit(project / CONFIG, "    head.*: 1.0", "    head.*: 1.0\n    block3.*: 0.5")
    commit_all(project, "user: fewer epochs, smaller batches, a slower block3")

    git(repo, "rm", "-rq", ".")
    snapshot_template(repo)
    commit_all(repo, "template with config_keys.jinja", tag="v0.2.0")
    update(project)

    config = (project / CONFIG).read_text()
    assert "<<<<<<<" not in config, config
    assert "epochs: 7  # the user's choice" in config and "  batch_size: 48" in config and "block3.*: 0.5" in config
    assert git(project, "diff", "--name-only", "--diff-filter=U") == ""
    snippet = (
        "from my_project.config import load_config; print(load_config('configs/default.yaml').optim.lr_multipliers)"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", snippet], cwd=project, env={"PYTHONPATH": "src"}, capture_output=True, text=True
    )
    assert loaded.stdout.strip() == "{'head.*': 1.0, 'block3.*': 0.5}", loaded.stderr[-2000:]
