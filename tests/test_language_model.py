"""task=language_model: a GPT that learns text, generates it the same for the same seed, and refuses bad input
in one line with a non-zero exit, leaving every checkpoint as it was.

Short runs train on one source file of the standard library as text; ``pytest -m slow`` adds the rendered
defaults on the embedded corpus (the standard library), which must reach the README's figure in time.
"""

from __future__ import annotations

import argparse
import json
import math
import re

import pytest
from rendering import render, run_module, run_project_tests, train

LM = {"task": "language_model"}
# A small GPT on one ~100 KB file: a few seconds per run. Uniform guesses are 8 bits per byte, the file's
# byte frequencies alone 4.2.
QUICK = (
    "data.dataset=text",
    f"data.path={argparse.__file__}",
    "data.windows_per_epoch=256",
    "model.n_layer=2",
    "model.n_embd=64",
    "model.block_size=32",
    "log.progress_bar=false",
    "device=cpu",  # no warning that a GPU is missing before the one error line
)
BITS_PER_BYTE = re.compile(r"val_bits_per_byte (\d+\.\d+)")
LATIN_1 = "café\n".encode("latin-1") * 500


@pytest.fixture(scope="module")
def lm_project(template_dir, tmp_path_factory):
    return render(template_dir, tmp_path_factory.mktemp("lm") / "my-project", LM)


@pytest.fixture(scope="module")
def trained(lm_project, tmp_path_factory):
    """A short run (8 epochs of 16 steps) and its output: its directory and what it printed."""
    out = tmp_path_factory.mktemp("lm-run") / "run"
    return out, train(lm_project, *QUICK, "epochs=8", f"output_dir={out}").stdout


def test_a_short_run_learns_far_beyond_the_texts_byte_frequencies(trained):
    out, stdout = trained
    per_epoch = [float(match[1]) for line in stdout.splitlines() if (match := BITS_PER_BYTE.search(line))]
    assert len(per_epoch) == 8 and per_epoch[-1] < 3.6 and per_epoch[0] - per_epoch[-1] > 0.8, per_epoch
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_metric_name"] == "val_loss"
    metrics = summary["final_metrics"]
    assert metrics.keys() == {"val_loss", "val_perplexity", "val_bits_per_byte", "samples_per_s", "data_wait"}
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert "next: python -m my_project.evaluate" in stdout and "python -m my_project.generate" in stdout


def test_generate_continues_the_prompt_and_the_same_seed_gives_the_same_text(lm_project, trained):
    best = str(trained[0] / "checkpoints" / "best.pt")
    runs = [
        run_module(lm_project, "generate", best, "--prompt", "def add(self, ", "--max-new-tokens=60", f"--seed={seed}")
        for seed in (7, 7, 8)
    ]
    assert [run.returncode for run in runs] == [0, 0, 0], runs[0].stderr
    texts = [run.stdout for run in runs]
    assert texts[0] == texts[1] != texts[2]
    assert texts[0].startswith("def add(self, ") and len(texts[0].encode()) >= len("def add(self, ") + 60


def test_a_prompt_longer_than_the_context_is_cropped_and_said_once(lm_project, trained):
    best = str(trained[0] / "checkpoints" / "best.pt")
    result = run_module(lm_project, "generate", best, "--prompt", "import os\n" * 10, "--max-new-tokens=5")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("note: the prompt is 100 tokens, longer than the model's context of 32") == 1


def test_evaluate_reports_every_metric_on_the_validation_text_or_another(lm_project, trained, tmp_path):
    best = str(trained[0] / "checkpoints" / "best.pt")
    other = tmp_path / "prose.txt"
    other.write_text("An English sentence the model never saw, repeated to fill a few windows. " * 5)
    for extra in ([], [f"--data={other}"]):
        result = run_module(lm_project, "evaluate", best, *extra)
        assert result.returncode == 0, result.stderr
        assert re.search(r"^loss \d+\.\d+ \| perplexity \d+\.\d+ \| bits_per_byte \d+\.\d+$", result.stdout, re.M)


def write(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


# case: (the arguments, given the test's tmp_path; the words of the one error line)
TRAIN_CASES = {
    "empty text": (lambda tmp: [f"data.path={write(tmp, 'empty.txt', b'')}"], "empty.txt holds no text"),
    "text shorter than a window": (
        lambda tmp: [f"data.path={write(tmp, 'short.txt', b'x = 1' * 4)}"],
        "fewer than model.block_size + 1 = 33",
    ),
    "a path that does not exist": (lambda tmp: [f"data.path={tmp / 'absent.txt'}"], "absent.txt does not exist"),
    "text that is not UTF-8 under bpe": (
        lambda tmp: [f"data.path={write(tmp, 'latin1.txt', LATIN_1)}", "data.tokenizer=bpe"],
        "latin1.txt is not UTF-8 text (byte 3: invalid continuation byte)",
    ),
}


@pytest.mark.parametrize("case", TRAIN_CASES, ids=list(TRAIN_CASES))
def test_bad_text_stops_training_with_one_line_before_anything_is_written(lm_project, tmp_path, case):
    arguments, words = TRAIN_CASES[case]
    out = tmp_path / "run"
    result = run_module(lm_project, "train", *QUICK, *arguments(tmp_path), f"output_dir={out}")
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and words in result.stderr, result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("override", "words"),
    [("model.block_size=16", "block_size 32 there, 16 here"), ("data.tokenizer=bpe", "vocab_size 256 there")],
    ids=["another block_size", "another vocabulary"],
)
def test_a_resume_that_would_change_the_context_or_vocabulary_is_refused(lm_project, trained, override, words):
    out = trained[0]
    checkpoints = {path: path.stat().st_mtime_ns for path in (out / "checkpoints").iterdir()}
    result = run_module(lm_project, "train", *QUICK, "epochs=9", f"output_dir={out}", "resume=auto", override)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and words in result.stderr, result.stderr
    assert {path: path.stat().st_mtime_ns for path in (out / "checkpoints").iterdir()} == checkpoints


def test_generate_refuses_zero_new_tokens_in_one_line(lm_project, trained):
    best = str(trained[0] / "checkpoints" / "best.pt")
    result = run_module(lm_project, "generate", best, "--prompt", "import", "--max-new-tokens=0")
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip() == "error: --max-new-tokens 0: generate at least 1 token"


def test_the_rendered_project_passes_its_own_tests(lm_project):
    result = run_project_tests(lm_project)
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.slow
def test_the_defaults_reach_2_5_bits_per_byte_on_the_standard_library_within_10_minutes(lm_project, tmp_path):
    """The rendered defaults, as the README states them: byte-level, the standard library's text, one thread
    (the threads rule on 2 cores); 600 s of work at the reference speed (tests/timing.py)."""
    out = tmp_path / "run"
    tokens = f"data.cache_dir={tmp_path / 'tokens'}"
    result = train(lm_project, "log.progress_bar=false", tokens, f"output_dir={out}", timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_metrics"]["val_bits_per_byte"] <= 2.5, result.stdout
    print(f"defaults: {summary['final_metrics']} in {summary['wall_time_s']:.0f} s")
