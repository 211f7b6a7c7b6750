"""Migrations that `copier update` runs in the user's project (listed under `_migrations` in copier.yml).

    python hooks/migrate.py rename-answer OLD NEW [ANSWERS_FILE]   # an answer was renamed
    python hooks/migrate.py move-file OLD NEW                      # a rendered file moved

Both run in the project directory during the "before" stage, so Copier reads the renamed answer and
merges the user's edits into the file at its new place. Both are idempotent: a project that never had
the old answer or file is left alone, and an answer or file already at the new name is never overwritten.
Only the standard library is used: Copier runs this with its own Python.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

ANSWERS_FILE = ".copier-answers.yml"


def rename_answer(old: str, new: str, answers_file: str = ANSWERS_FILE) -> bool:
    """Rename the top-level key ``old`` to ``new`` in the answers file, keeping every other line as is.

    The file is edited as text rather than re-dumped with a YAML library, so its comments and key
    order survive and Copier's own formatting stays.
    """
    path = Path(answers_file)
    if not path.is_file():
        return False
    lines = path.read_text().splitlines(keepends=True)
    keys = {match.group(1) for line in lines if (match := re.match(r"^([A-Za-z_]\w*):", line))}
    if old not in keys or new in keys:
        return False
    pattern = re.compile(rf"^{re.escape(old)}:")
    path.write_text("".join(pattern.sub(f"{new}:", line, count=1) for line in lines))
    return True


def move_file(old: str, new: str) -> bool:
    """Move ``old`` to ``new`` inside the project (creating parent folders) unless ``new`` exists."""
    source, target = Path(old), Path(new)
    if not source.exists() or target.exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(source, target)
    return True


COMMANDS = {"rename-answer": rename_answer, "move-file": move_file}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS or len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    command, *args = argv
    changed = COMMANDS[command](*args)
    print(f"migration {command} {' '.join(args)}: {'done' if changed else 'nothing to do'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
