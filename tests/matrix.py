"""Render and smoke-train many answer combinations fast, in long-lived worker processes.

A fresh interpreter per combination would pay for importing torch every time (seconds). Instead one
worker per core imports torch once and then, for each combination in turn: renders it with Copier,
imports the rendered package (purging the previous one from ``sys.modules``, since every render shares
``package_name``), builds the config with the rendered ``config.load_config`` plus smoke overrides and
calls the in-process ``fit(cfg)``. It then checks a finite training loss, at least two optimiser steps,
``summary.json`` and a checkpoint that loads with ``torch.load(weights_only=True)`` back into the model.
DDP and FSDP combinations run ``fit`` in two gloo rank processes that the worker forks once and keeps
(``RANK``/``WORLD_SIZE``/``MASTER_*`` set, a rendezvous store per combination hosted by the worker, as
torchrun's agent hosts one). Each worker lints its batch of projects with ONE ``ruff check`` and ONE
``ruff format --check`` call and byte-compiles their sources. Work that does not depend on the
combination is done once per process: parsing copier.yml, compiling Jinja templates, compiling a
rendered module whose bytes an earlier combination already had.

Answer sets that render byte-identical trees (the answers file aside) are one project: every combination
is rendered, and a worker trains it only if no combination with the same tree digest was claimed before
(the claims live in a dict shared by the workers); the others are reported as sharing that tree.

    python tests/matrix.py --tier pairwise        # or --tier exhaustive [--limit N]
    python tests/matrix.py --tier exhaustive --count   # render and group only: combinations vs trees
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib
import importlib.machinery
import io
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import timing  # noqa: E402
from imagedata import write_image_folder  # noqa: E402
from questionnaire import choice_questions, combinations, design_axes, pairwise, product_size, question  # noqa: E402
from rendering import read_tree, render, snapshot_template  # noqa: E402

# Exhaustive tier, a smoke run: one epoch on 160 synthetic samples (128 for training) in global batches
# of 16 with a narrow model: 8 optimiser steps, on one process or two DDP ranks alike.
MATRIX_OVERRIDES = ("log.progress_bar=false", "data.batch_size=16", "epochs=1")


@dataclass(frozen=True)
class TaskRun:
    """How the matrix trains one task: its smoke data, its learning data and the bar its rows must reach."""

    smoke: tuple[str, ...]  # the exhaustive tier's data: a few steps
    learn: tuple[str, ...]  # the pairwise tier's data and epochs: each row's own defaults otherwise
    metric: str  # the validation metric the bar is on (best over the run)
    bar: float  # ... at least this (at most, for a metric where lower is better)


# One source file of the standard library as text (~100 KB): a small GPT learns in seconds to beat what its
# byte frequencies alone give (4.2 bits per byte).
LANGUAGE_TEXT = ("data.dataset=text", f"data.path={argparse.__file__}")
SMALL_GPT = ("model.n_layer=2", "model.n_embd=64", "model.block_size=32")

# Pairwise tier, a learning run: every combination must reach its task's bar with its own default config,
# shortened to the epochs given here (the schedules span them).
TASK_RUNS = {
    "classification": TaskRun(
        smoke=("data.dataset=synthetic", "data.synthetic_size=160"),
        # the slowest row (normal init, frozen BatchNorm and layers, no schedule) needs 10 epochs
        learn=("data.dataset=digits", "epochs=10"),
        metric="val_accuracy",
        bar=0.90,
    ),
    "segmentation": TaskRun(
        smoke=("data.dataset=shapes", "data.shapes_count=160"),
        # The shapes' defaults pass 0.7 in their second epoch (test_segmentation holds them to it). Rows that
        # handicap a from-scratch U-Net (BatchNorm frozen at its first statistics, SGD on a plateau schedule,
        # half the steps under accumulation) reach 0.5-0.7 in 8 epochs: predicting background alone scores 0.2.
        learn=("data.dataset=shapes", "epochs=8"),
        metric="val_miou",
        bar=0.50,
    ),
    # diabetes progression's units: the defaults reach 56 (R² 0.47); 65 is an R² of about 0.3
    "regression": TaskRun(
        smoke=("data.dataset=diabetes",), learn=("data.dataset=diabetes", "epochs=10"), metric="val_rmse", bar=65.0
    ),
    "language_model": TaskRun(
        smoke=(*LANGUAGE_TEXT, "data.windows_per_epoch=128", "model.n_layer=1", "model.n_embd=16"),
        # the slowest row (SGD, gradient accumulation: 160 optimiser steps) needs 20 epochs
        learn=(*LANGUAGE_TEXT, *SMALL_GPT, "data.windows_per_epoch=256", "epochs=20"),
        metric="val_bits_per_byte",
        bar=4.0,
    ),
}
TABLE_CLASSIFICATION = TaskRun(
    smoke=("data.dataset=wine",), learn=("data.dataset=wine", "epochs=10"), metric="val_accuracy", bar=0.90
)


def task_run(answers: dict[str, Any]) -> TaskRun:
    """The matrix's data and bar for the combination's task (classification on a table: the wine table)."""
    if answers.get("task", "classification") == "classification" and answers.get("dataset") == "csv":
        return TABLE_CLASSIFICATION
    return TASK_RUNS[answers.get("task", "classification")]


# A CPU has no fast float16 kernels: fp16 autocast trains ~15x slower there. amp is a run-time switch
# (an fp16 render's code is a bf16 render's), so fp16 combinations learn under bf16 here; the fp16
# path itself (GradScaler, skipped steps, clipping) is proven in test_optimisation.
CPU_AMP = {"fp16": "amp.dtype=bf16"}
BATCH_SIZE = 24  # combinations per worker task: one ruff call per batch
# A worker is replaced after this many batches. Each combination leaves a little memory behind (its
# imported package's objects that torch and the loggers keep referring to); over the exhaustive tier a
# worker grew past 4 GB (and its rank processes, which run as many combinations, grow likewise).
BATCHES_PER_WORKER = 8
DDP_WORLD_SIZE = 2


# FSDP's own code depends on these design axes alone (where it runs, what is frozen, the precision of the
# gathered parameters): the exhaustive tier crosses parallelism=fsdp with them, the other axes at their
# defaults. Every FSDP combination trains two ranks and runs ~2.5x slower than DDP, so all of them
# (3,456) would add ~15-30 minutes to the tier; the pairwise tier still pairs fsdp with every answer.
FSDP_AXES = ("device", "freezing", "amp")


# The other tasks share the loop and every feature's code with classification; what is their own (data,
# model, task) meets the design axes where they act on it: the exhaustive tier crosses each other task with
# these axes, the rest at their defaults. The pairwise tier pairs every task with every answer.
TASK_AXES = ("device", "parallelism", "freezing", "amp")


# Tasks whose learning runs take 10-30 s a row on a CPU (a U-Net, a GPT). In the default pairwise tier their
# rows train the smoke run (steps, checkpoints, outputs, lint) while the other tasks' rows learn to their
# bars; the ``pairwise-learning`` tier (``pytest -m slow``) holds these rows to their bars too.
SLOW_LEARNERS = ("segmentation", "language_model")


def tier_combinations(tier: str) -> list[dict[str, Any]]:
    """``pairwise``: a covering set over every choice question; ``pairwise-learning``: its rows of the
    ``SLOW_LEARNERS``; ``exhaustive``: every design-axis combination of classification, FSDP crossed with
    ``FSDP_AXES`` only, and every other task crossed with ``TASK_AXES``."""
    if tier == "pairwise":
        return pairwise(choice_questions())
    if tier == "pairwise-learning":
        return [answers for answers in pairwise(choice_questions()) if answers.get("task") in SLOW_LEARNERS]
    if tier == "exhaustive":
        first, *others = question("task").options() if "task" in choice_questions() else [None]
        base = {"task": first} if first else {}
        classification = [
            answers for answers in combinations(design_axes(), base) if answers.get("parallelism") != "fsdp"
        ]
        fsdp_axes = [axis for axis in design_axes() if axis in FSDP_AXES]
        fsdp = list(combinations(fsdp_axes, {**base, "parallelism": "fsdp"}))
        task_axes = [axis for axis in design_axes() if axis in TASK_AXES]
        tasks = [answers for task in others for answers in combinations(task_axes, {"task": task})]
        return classification + fsdp + tasks
    raise ValueError(f"unknown tier {tier!r}; valid tiers: pairwise, pairwise-learning, exhaustive")


def exhaustive_size() -> int:
    """How many combinations the exhaustive tier trains, counted from copier.yml (not enumerated)."""
    axes = design_axes()
    first, *others = question("task").options() if "task" in choice_questions() else [None]
    base = {"task": first} if first else {}
    size = product_size(axes, base)
    if "parallelism" in axes:
        rest = [axis for axis in axes if axis != "parallelism"]
        fsdp_axes = [axis for axis in axes if axis in FSDP_AXES]
        fsdp = {**base, "parallelism": "fsdp"}
        size += product_size(fsdp_axes, fsdp) - product_size(rest, fsdp)
    task_axes = [axis for axis in axes if axis in TASK_AXES]
    return size + sum(product_size(task_axes, {"task": task}) for task in others)


# Worker environment: no wandb network or chatter; one thread each, since the workers fill the cores.
WORKER_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


# The classification recipe's augmentations, all at once, in the exhaustive tier's runs of every render that has
# them (pictures to classify): settings of the runs, not an axis of renders. What each does is proven by the
# rendered projects' own test_augmentation.
AUGMENTATION_OVERRIDES = (
    "data.auto_augment=trivialaugment",
    "data.random_erase=0.25",
    "data.mixup_alpha=0.2",
    "data.cutmix_alpha=1.0",
    "loss.label_smoothing=0.1",
    "data.repeated_augmentations=2",
)


def tier_overrides(tier: str, worker_dir: Path) -> tuple[str, ...]:
    """Config overrides applied where the rendered config has the key (features not chosen lack it).

    Both tiers capture compiled graphs with torch.compile's ``eager`` backend (inductor's code generation
    costs ~30 s per project on a CPU, and test_optimisation trains one project with it), and keep every
    logging backend's code path but make the two costly ones cheap: wandb runs in its ``disabled`` mode
    (starting its offline service costs ~1 s a run) and MLflow logs to one SQLite store per worker
    instead of a fresh store per run (creating the tables costs ~0.5 s a run). The logging tests prove
    each backend's real files. Both switch the optimiser's training-recipe settings on (``RECIPE_OVERRIDES``).
    The exhaustive tier also accumulates over 2 batches (each DDP rank sees 4, so it still takes 2 optimiser
    steps), narrows the model where it has a width (``model.width=8``) and turns on every augmentation of
    ``AUGMENTATION_OVERRIDES`` (the pairwise tier's runs must learn to their bars: they keep the plain data).
    """
    cheap_loggers = ("log.wandb_mode=disabled", f"log.mlflow_tracking_uri=sqlite:///{worker_dir / 'mlflow.db'}")
    if tier != "exhaustive":
        return ("compile_backend=eager", *cheap_loggers, *RECIPE_OVERRIDES)
    narrow = ("model.width=8", "optim.accumulation_steps=2", "compile_backend=eager")
    return (*narrow, *cheap_loggers, *RECIPE_OVERRIDES, *AUGMENTATION_OVERRIDES)


# The training-recipe settings, off by default, on in every run of the matrix: each meets every answer.
RECIPE_OVERRIDES = (
    "channels_last=true",
    "optim.norm_weight_decay=null",
    "optim.bias_weight_decay=0.0001",
    "optim.ema_every_n_steps=2",
    "schedule.warmup_method=constant",
)


@dataclass
class Outcome:
    answers: dict[str, Any]
    index: int = 0  # in the list of combinations run_matrix was given
    same_tree_as: int | None = None  # the index of the combination that trained this one's tree
    render_s: float = 0.0
    train_s: float = 0.0
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


# --- worker side -----------------------------------------------------------------------------------

_TEMPLATE: Path | None = None
_TIER = "pairwise"
_CLAIMS: Any = None  # tree digest -> index of the combination that trains it, shared by the workers
_OPTIONAL_OVERRIDES: tuple[str, ...] = ()
_IMAGE_ROOT: Path | None = None
_COMPILED: dict[bytes, types.CodeType] = {}  # by the digest of the source: what compile() made of it


def dataset_overrides(answers: dict[str, Any]) -> tuple[str, ...]:
    """imagefolder combinations train on the worker's tiny generated folder (90 8x8 pictures: 2 steps of 2
    accumulated batches of 16), loaded in-process: a pool's daemon workers may not start loader processes.
    """
    if answers.get("dataset") != "imagefolder":
        return ()
    return ("data.dataset=imagefolder", f"data.root={_IMAGE_ROOT}", "data.image_size=8", "data.num_workers=0")


def _reuse_copier_work() -> None:
    """Let consecutive Copier renders in this worker share work that does not depend on the answers.

    Copier still renders every file of every combination. Two per-render costs are shared:
    - Jinja compiles the same template sources (files, paths, questions' defaults and ``when``) to the
      same Python code on every render, since Copier builds a fresh environment each time: the code
      objects are kept per source and environment settings (what Jinja's own bytecode cache does for
      loader templates), and extensions' ``preprocess`` hooks still run on every use.
    - After writing each file Copier probes ``git config core.fileMode`` (one subprocess per file) to
      fix up the destination's git index; the matrix renders into fresh temporary directories outside
      any git repository, where Copier documents the step as a no-op.
    - Copier asks git (three subprocesses) whether the template path is a repository or a bundle on
      every render; the answer for the worker's one template directory is kept.
    - Copier parses copier.yml (about a third of a render) on every render; the worker's template
      snapshot does not change, so it is parsed once and each render gets its own deep copy.
    """
    import copy
    import functools

    import copier._main
    import copier._template
    import jinja2

    original_compile = jinja2.Environment.compile
    compiled: dict[tuple, Any] = {}

    def compile_once(self, source, name=None, filename=None, raw=False, defer_init=False):
        if raw or not isinstance(source, str):
            return original_compile(self, source, name, filename, raw, defer_init)
        key = (
            type(self),
            tuple(sorted(self.extensions)),
            self.block_start_string,
            self.block_end_string,
            self.variable_start_string,
            self.variable_end_string,
            self.comment_start_string,
            self.comment_end_string,
            self.line_statement_prefix,
            self.line_comment_prefix,
            self.trim_blocks,
            self.lstrip_blocks,
            self.newline_sequence,
            self.keep_trailing_newline,
            self.optimized,
            self.is_async,
            source,
            name,
            filename,
            defer_init,
        )
        if key not in compiled:
            compiled[key] = original_compile(self, source, name, filename, raw, defer_init)
        else:
            for extension in self.iter_extensions():
                extension.preprocess(source, name, filename)
        return compiled[key]

    jinja2.Environment.compile = compile_once
    # Copier internals, patched where this Copier has them (tests/test_copier_versions.py proves that the
    # renders still equal stock Copier's).
    if hasattr(copier._main.Worker, "_sync_git_index_executable_bit"):
        copier._main.Worker._sync_git_index_executable_bit = lambda self, dst_relpath, src_mode: None
    if hasattr(copier._template, "get_repo"):
        copier._template.get_repo = functools.cache(copier._template.get_repo)
    if hasattr(copier._template, "load_template_config"):
        parse_once = functools.cache(copier._template.load_template_config)
        copier._template.load_template_config = lambda *args, **kwargs: copy.deepcopy(parse_once(*args, **kwargs))


def _init_worker(template: str, tier: str, scratch: str, claims: Any) -> None:
    global _TEMPLATE, _TIER, _CLAIMS, _OPTIONAL_OVERRIDES, _IMAGE_ROOT
    _TEMPLATE = Path(template)
    _TIER = tier
    _CLAIMS = claims
    worker_dir = Path(scratch) / f"worker-{os.getpid()}"
    worker_dir.mkdir(exist_ok=True)
    _IMAGE_ROOT = write_image_folder(worker_dir / "images", per_class=30, size=8)
    _OPTIONAL_OVERRIDES = tier_overrides(tier, worker_dir)
    os.environ.update(WORKER_ENV)
    _reuse_copier_work()
    _compile_each_source_once()
    import torch
    import torch.distributed

    torch.set_num_threads(1)
    # The first optimiser of a process imports torch._dynamo (seconds): pay it once here, not in every
    # forked DDP rank.
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])


def _compile(source: bytes, filename: str) -> types.CodeType:
    """``compile(source, filename, "exec")``, compiling each distinct source once in this process (the
    code keeps the file name of its first compilation)."""
    digest = hashlib.blake2b(source).digest()
    if digest not in _COMPILED:
        _COMPILED[digest] = compile(source, filename, "exec", dont_inherit=True)
    return _COMPILED[digest]


def _with_filename(code: types.CodeType, filename: str) -> types.CodeType:
    if code.co_filename == filename:
        return code
    consts = tuple(
        _with_filename(const, filename) if isinstance(const, types.CodeType) else const for const in code.co_consts
    )
    return code.replace(co_filename=filename, co_consts=consts)


def _compile_each_source_once() -> None:
    """Every combination imports its rendered package afresh, and most of its modules are the same bytes
    as in other combinations: the import system compiles each distinct source once per process (the code
    differs only in the file name it reports, which is set to the module's own). No bytecode is written
    into the projects, which are deleted after their batch.
    """
    sys.dont_write_bytecode = True
    loader = importlib.machinery.SourceFileLoader
    compile_afresh = loader.source_to_code

    def source_to_code(self, data, path, *, _optimize=-1):
        if _optimize != -1 or not isinstance(data, bytes):
            return compile_afresh(self, data, path, _optimize=_optimize)
        return _with_filename(_compile(data, str(path)), str(path))

    loader.source_to_code = source_to_code


def _init_render_worker(template: str) -> None:
    global _TEMPLATE
    _TEMPLATE = Path(template)
    _reuse_copier_work()


def _render_job(job: tuple[dict[str, Any], str]) -> None:
    render(_TEMPLATE, Path(job[1]), job[0])


def render_as_the_matrix_does(template: Path, jobs: list[tuple[dict[str, Any], Path]]) -> None:
    """Render each (answers, destination) as the matrix workers do, Copier's speed-ups patched in; no training."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, initializer=_init_render_worker, initargs=(str(template),)) as pool:
        pool.map(_render_job, [(answers, str(dst)) for answers, dst in jobs])


# Copier's record of the answers themselves: two answer sets never share it, even when they render the same project.
ANSWERS_FILE = ".copier-answers.yml"
# Where a render writes the default value of each config key (all three rendered from config_keys.jinja): the
# value is masked, the key and its type, bounds and comment are kept. An answer that only picks a default
# (amp's dtype, device auto or cuda, compile) renders the same project, whose runs set it per run.
DEFAULT_VALUES = {
    "configs/default.yaml": (re.compile(rb"^(\s*[\w.*-]+:) (?!\s*#)[^#\n]*?(?=\s*(?:#|$))", re.MULTILINE), rb"\1 _"),
    "configs/schema.json": (
        re.compile(rb'"default": (?:\[[^]]*\]|\{[^}]*\}|"(?:[^"\\]|\\.)*"|[^,}]+)'),
        rb'"default": _',
    ),
    "config.py": (re.compile(rb"^(    \w+: [^=\n]+ = ).*$", re.MULTILINE), rb"\1_"),
}


def tree_digest(root: Path) -> str:
    """A digest of the tree under ``root``: every file's relative path, executable bit and bytes, all but
    ``ANSWERS_FILE`` and with ``DEFAULT_VALUES`` masked. Two renders with the same digest are the same project."""
    digest = hashlib.blake2b(digest_size=16)
    for path, (executable, data) in read_tree(root).items():
        if path != ANSWERS_FILE:
            for name, (pattern, mask) in DEFAULT_VALUES.items():
                if path == name or path.endswith("/" + name):
                    data = pattern.sub(mask, data)
            digest.update(f"{path}\0{int(executable)}\0{len(data)}\0".encode())
            digest.update(data)
    return digest.hexdigest()


def _digest_batch(batch: list[dict[str, Any]]) -> list[str]:
    """Render each combination of ``batch`` in turn, as the matrix workers do, and digest its tree."""
    shm = Path("/dev/shm")
    workdir = Path(tempfile.mkdtemp(prefix="digest-", dir=shm if os.access(shm, os.W_OK) else None))
    try:
        digests = []
        for answers in batch:
            project = render(_TEMPLATE, workdir / "p", answers)
            digests.append(tree_digest(project))
            shutil.rmtree(project)
        return digests
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class TreeGroups:
    """Combinations grouped by the tree they render, each group led by the one that is trained."""

    groups: list[list[dict[str, Any]]]
    wall_s: float

    @property
    def combinations(self) -> int:
        return sum(len(group) for group in self.groups)

    def representatives(self) -> list[dict[str, Any]]:
        """One combination per distinct tree: the first of its group."""
        return [group[0] for group in self.groups]

    @staticmethod
    def _varying(group: list[dict[str, Any]]) -> dict[str, list[Any]]:
        """The answers that differ within ``group``: each question's answers, in the group's order."""
        names = sorted({name for answers in group for name in answers})
        values = {name: [answers.get(name) for answers in group] for name in names}
        return {name: answers for name, answers in values.items() if len({repr(a) for a in answers}) > 1}

    def shared_by(self) -> dict[tuple[str, ...], int]:
        """For the trees several combinations render: the questions whose answers differ within a group, and
        how many groups differ in just those."""
        counts: dict[tuple[str, ...], int] = {}
        for group in self.groups:
            if len(group) > 1:
                varying = tuple(self._varying(group))
                counts[varying] = counts.get(varying, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: -item[1]))

    def describe(self, examples: int = 3) -> str:
        shared = [group for group in self.groups if len(group) > 1]
        lines = [
            f"{self.combinations} combinations render {len(self.groups)} distinct trees "
            f"({len(shared)} of them by several combinations)"
        ]
        lines += [
            f"  {count} trees shared by combinations that differ only in {', '.join(names)}"
            for names, count in self.shared_by().items()
        ]
        for group in shared[:examples]:
            differ = "; ".join(f"{name}: {' | '.join(map(repr, a))}" for name, a in self._varying(group).items())
            lines.append(f"  e.g. one tree for {len(group)} combinations, the trained one first: {differ}")
        return "\n".join(lines)


def group_by_tree(combos: list[dict[str, Any]], workers: int | None = None, template: Path | None = None) -> TreeGroups:
    """Render every combination (in ``workers`` processes, Copier's speed-ups patched in) and group those
    whose trees have the same ``tree_digest``."""
    workers = workers or os.cpu_count() or 1
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="digest-") as scratch:
        template = template or snapshot_template(Path(scratch) / "template")
        size = max(1, min(BATCH_SIZE, math.ceil(len(combos) / workers)))
        batches = [combos[i : i + size] for i in range(0, len(combos), size)]
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, initializer=_init_render_worker, initargs=(str(template),)) as pool:
            digests = [digest for batch in pool.imap(_digest_batch, batches) for digest in batch]
    groups: dict[str, list[dict[str, Any]]] = {}
    for answers, digest in zip(combos, digests, strict=True):
        groups.setdefault(digest, []).append(answers)
    return TreeGroups(list(groups.values()), time.perf_counter() - started)


def _purge(package: str) -> None:
    for name in [name for name in sys.modules if name == package or name.startswith(package + ".")]:
        del sys.modules[name]


@contextlib.contextmanager
def _project_imported(project: Path, package: str) -> Iterator[Any]:
    """Import the rendered ``package`` from ``project/src``, with the project as working directory."""
    _purge(package)
    importlib.invalidate_caches()
    src = str(project / "src")
    sys.path.insert(0, src)
    cwd = os.getcwd()
    os.chdir(project)
    try:
        yield importlib.import_module(f"{package}.train")
    finally:
        os.chdir(cwd)
        sys.path.remove(src)
        _purge(package)


def _fit(
    project: Path, package: str, overrides: tuple[str, ...], run: TaskRun | None, ranks: int = 1
) -> dict[str, Any]:
    """Train in this process, or in ``ranks`` gloo ranks, then check the outputs in this process."""
    import torch

    torch.use_deterministic_algorithms(False)  # fit() may have switched it on in an earlier combination
    if ranks > 1:
        _rank_processes(ranks).fit(project, package, overrides)
    with _project_imported(project, package) as module:
        config = importlib.import_module(f"{package}.config")
        cfg = _load_config(config, project, overrides)
        if ranks == 1:
            module.fit(cfg)
        return _check_outputs(importlib.import_module(f"{package}.model"), cfg, run)


def _load_config(config: Any, project: Path, overrides: tuple[str, ...]) -> Any:
    """The rendered project's default config with ``overrides``, then the tier's optional overrides."""
    path, taken = project / "configs" / "default.yaml", list(overrides)
    for item in _OPTIONAL_OVERRIDES:  # each one that this render's schema has a key for
        try:
            config.load_config(path, [*taken, item])
        except config.ConfigError as err:
            if "unknown config key" not in str(err):
                raise
        else:
            taken.append(item)
    return config.load_config(path, taken)


class RankProcesses:
    """``world_size`` long-lived gloo rank processes, forked from this worker once torch is imported: each
    DDP or FSDP combination is one job for all of them.

    A rank runs one combination after another, as the worker does: it imports the rendered package, calls
    ``fit`` with ``RANK``, ``WORLD_SIZE`` and ``MASTER_*`` set (``fit`` joins the process group and leaves
    it, as under torchrun), and forgets the package. Kept for the worker's lifetime, the ranks pay once
    for what a fresh fork per combination paid every time: copying the worker's pages they write, and the
    imports a run makes lazily (a logger's backend opening its store). Ranks that fail or hang are
    killed, and the next combination forks new ones.
    """

    TIMEOUT_S = 300

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.pids: list[int] = []
        self.connections: list[multiprocessing.connection.Connection] = []
        for rank in range(world_size):
            ours, theirs = multiprocessing.Pipe()
            pid = os.fork()  # os.fork, not multiprocessing: pool workers are daemons and may not have children
            if pid == 0:
                for connection in [*self.connections, ours]:
                    connection.close()  # a rank holds no other end: it sees EOF when the worker exits
                self._serve(rank, theirs)  # never returns
            theirs.close()
            self.pids.append(pid)
            self.connections.append(ours)

    def _serve(self, rank: int, connection: multiprocessing.connection.Connection) -> None:
        import torch

        size = str(self.world_size)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=size, LOCAL_WORLD_SIZE=size)
        # As under torchrun, whose agent hosts the rendezvous store: every rank is a client of the store the
        # worker opened for the job (left to rank 0, a rank that came first waited ~0.5 s to retry).
        os.environ.update(MASTER_ADDR="127.0.0.1", TORCHELASTIC_USE_AGENT_STORE="True")
        while True:
            try:
                port, project, package, overrides = connection.recv()
            except EOFError:
                os._exit(0)  # no atexit handlers or pool shutdown inherited from the worker
            os.environ["MASTER_PORT"] = str(port)
            # What this rank holds so far is never garbage: a full collection (the rendered teardown runs
            # one) walks only the objects of this combination.
            gc.freeze()
            torch.use_deterministic_algorithms(False)  # as in _fit
            log = io.StringIO()
            ok = True
            try:
                with (
                    contextlib.redirect_stdout(log),
                    contextlib.redirect_stderr(log),
                    _project_imported(project, package) as module,
                ):
                    config = importlib.import_module(f"{package}.config")
                    module.fit(_load_config(config, project, overrides))
            except BaseException:  # noqa: BLE001 - reported to the worker with the combination
                log.write(traceback.format_exc())
                ok = False
            connection.send((ok, log.getvalue()[-2000:]))

    def fit(self, project: Path, package: str, overrides: tuple[str, ...]) -> None:
        """Train one combination on every rank; raise with the ranks' output if any fails or hangs."""
        import torch.distributed

        store = torch.distributed.TCPStore("127.0.0.1", 0, self.world_size, is_master=True, wait_for_workers=False)
        job = (store.port, project, package, overrides)
        for connection in self.connections:
            connection.send(job)
        results: list[tuple[bool, str] | None] = [None] * self.world_size
        budget = timing.Budget(self.TIMEOUT_S)  # seconds of work: longer on a busy machine (timing.py)
        while None in results and not budget.expired():
            for connection in multiprocessing.connection.wait(self.connections, timeout=1):
                index = self.connections.index(connection)
                try:
                    results[index] = connection.recv()
                except EOFError:
                    results[index] = (False, "the rank process died")
            if any(result is not None and not result[0] for result in results):
                break  # the others may wait for it in a collective until their timeout
        if all(result is not None and result[0] for result in results):
            return
        self.close()
        silent = f"no answer within {self.TIMEOUT_S} s of work" if None in results and budget.left <= 0 else ""
        logs = "\n".join(
            f"--- rank {rank}:\n{result[1] if result else silent or 'stopped: another rank failed'}"
            for rank, result in enumerate(results)
        )
        raise RuntimeError(f"DDP ranks failed\n{logs}")

    def close(self) -> None:
        for pid, connection in zip(self.pids, self.connections, strict=True):
            connection.close()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.pids, self.connections = [], []


_RANKS: RankProcesses | None = None


def _rank_processes(world_size: int) -> RankProcesses:
    global _RANKS
    if _RANKS is None or not _RANKS.pids:  # none yet, or closed after a failure
        _RANKS = RankProcesses(world_size)
    return _RANKS


def _reached(summary: dict[str, Any], run: TaskRun) -> bool:
    """Whether the run's best epoch (or, for a metric other than the one that picks best, its last) reached the bar."""
    higher = run.metric not in ("val_loss", "val_mae", "val_rmse", "val_bits_per_byte")
    if summary["best_metric_name"] == run.metric:
        value = summary["best_metric"]
    else:
        value = summary["final_metrics"][run.metric]
    return value >= run.bar if higher else value <= run.bar


def _check_outputs(model_module: Any, cfg: Any, run: TaskRun | None) -> dict[str, Any]:
    """Finite loss, >= 2 optimiser steps, summary.json, a checkpoint that loads back into the model, and
    ``run``'s bar reached (None: a smoke run, no bar)."""
    import torch

    out = Path(cfg.output_dir)
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise AssertionError(f"no summary.json in {out}")
    summary = json.loads(summary_path.read_text())
    if not math.isfinite(summary["final_train_loss"]):
        raise AssertionError(f"training loss is not finite: {summary['final_train_loss']}")
    if summary["global_step"] < 2:
        raise AssertionError(f"only {summary['global_step']} optimiser steps")
    if run is not None and not _reached(summary, run):
        raise AssertionError(f"{run.metric} did not reach {run.bar} with {' '.join(run.learn)}: {summary}")
    last = out / "checkpoints" / "last.pt"
    if last.is_file():
        state = torch.load(last, weights_only=True)
        model_state = state["model"]
    else:  # FSDP: a checkpoint directory; state.pt holds the data description, model.pt the full model
        state = torch.load(last.with_suffix("") / "state.pt", weights_only=True)
        model_state = torch.load(last.with_suffix("") / "model.pt", weights_only=True)
    model_module.build_model(cfg.model, model_module.DataInfo.from_dict(state["data"])).load_state_dict(model_state)
    return summary


def run_one(index: int, answers: dict[str, Any], project: Path) -> Outcome:
    """Render; unless another combination claimed the same tree first, train and check it."""
    outcome = Outcome(answers, index)
    started = time.perf_counter()
    try:
        render(_TEMPLATE, project, answers)
        outcome.render_s = time.perf_counter() - started
        first = _CLAIMS.setdefault(tree_digest(project), index)
        if first != index:
            outcome.same_tree_as = first
            return outcome
        package = answers["package_name"]
        out = project / "runs" / "matrix"
        run = task_run(answers)
        learning = _TIER == "pairwise-learning" or (
            _TIER == "pairwise" and answers.get("task", "classification") not in SLOW_LEARNERS
        )
        if learning:  # the task's embedded data: an imagefolder render has the digits too
            amp = filter(None, [CPU_AMP.get(answers.get("amp"))])
            overrides = ("log.progress_bar=false", *run.learn, *amp, f"output_dir={out}")
        else:
            overrides = (*MATRIX_OVERRIDES, *run.smoke, *dataset_overrides(answers), f"output_dir={out}")
        started = time.perf_counter()
        ranks = DDP_WORLD_SIZE if answers.get("parallelism") in ("ddp", "fsdp") else 1
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            outcome.summary = _fit(project, package, overrides, run if learning else None, ranks)
        outcome.train_s = time.perf_counter() - started
    except BaseException as err:  # noqa: BLE001 - every failure is reported with its combination
        if isinstance(err, KeyboardInterrupt):
            raise
        outcome.error = "".join(traceback.format_exception(err))[-3000:]
    return outcome


def _lint(projects: dict[Path, Outcome]) -> None:
    """One ruff check and one ruff format call for the whole batch; failures go to their combination."""
    if not projects:
        return
    paths = [str(path) for path in projects]
    for args in (["check", "--no-cache", "--output-format=concise"], ["format", "--check", "--no-cache"]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *args, *paths], capture_output=True, text=True, check=False
        )
        if result.returncode == 0:
            continue
        report = result.stdout + result.stderr
        for path, outcome in projects.items():
            lines = [line for line in report.splitlines() if str(path) + os.sep in line]
            if lines and outcome.error is None:
                outcome.error = f"ruff {args[0]}:\n" + "\n".join(lines[:20])
        if not any(str(path) + os.sep in report for path in projects):
            raise RuntimeError(f"ruff {args[0]} failed:\n{report}")
    for path, outcome in projects.items():
        if outcome.error is None:
            outcome.error = _byte_compile_error(path)


def _byte_compile_error(project: Path) -> str | None:
    """Whether every Python file of ``project`` compiles (a source compiled before in this worker, when
    linting or importing, is not compiled again)."""
    for path in sorted(project.rglob("*.py")):
        try:
            _compile(path.read_bytes(), str(path))
        except (SyntaxError, ValueError) as err:
            return f"byte-compile failed: {err}"
    return None


def run_batch(batch: list[tuple[int, dict[str, Any]]]) -> list[Outcome]:
    """Render, train and check ``batch`` (index, answers) in this worker; lint the batch's trained projects
    together."""
    # In memory where possible: every combination writes and deletes a project and its checkpoints.
    shm = Path("/dev/shm")
    workdir = Path(tempfile.mkdtemp(prefix="matrix-", dir=shm if os.access(shm, os.W_OK) else None))
    try:
        outcomes: dict[Path, Outcome] = {}
        for index, answers in batch:
            project = workdir / f"p{index}"
            outcomes[project] = run_one(index, answers, project)
        trained = {path: o for path, o in outcomes.items() if o.error is None and o.same_tree_as is None}
        _lint(trained)
        return list(outcomes.values())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --- driver side -----------------------------------------------------------------------------------


@dataclass
class MatrixResult:
    outcomes: list[Outcome]  # one per combination, in the order given
    wall_s: float

    @property
    def trained(self) -> list[Outcome]:
        """One outcome per distinct tree: the combination that trained it."""
        return [outcome for outcome in self.outcomes if outcome.same_tree_as is None]

    @property
    def failures(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome.error is not None]

    def _groups(self) -> dict[int, list[dict[str, Any]]]:
        groups = {outcome.index: [outcome.answers] for outcome in self.trained}
        for outcome in self.outcomes:
            if outcome.same_tree_as is not None:
                groups[outcome.same_tree_as].append(outcome.answers)
        return groups

    def trees(self) -> TreeGroups:
        """The combinations grouped by the tree they render, the trained one first in each group."""
        return TreeGroups(list(self._groups().values()), self.wall_s)

    def median_render_s(self) -> float:
        return statistics.median(outcome.render_s for outcome in self.outcomes) if self.outcomes else 0.0

    def median_train_s(self) -> float:
        return statistics.median(outcome.train_s for outcome in self.trained) if self.trained else 0.0

    def describe_failures(self, limit: int = 5) -> str:
        sharing = {index: len(group) - 1 for index, group in self._groups().items()}

        def also(outcome: Outcome) -> str:
            more = sharing.get(outcome.index, 0)
            return f" (the tree of {more} more combinations)" if more else ""

        return "\n\n".join(f"{outcome.answers}{also(outcome)}\n{outcome.error}" for outcome in self.failures[:limit])


def run_matrix(
    combos: list[dict[str, Any]],
    tier: str = "pairwise",
    workers: int | None = None,
    template: Path | None = None,
) -> MatrixResult:
    """Render every combination, and train, check and lint one per distinct tree, in ``workers`` long-lived
    processes (one per core)."""
    workers = workers or os.cpu_count() or 1
    started = time.perf_counter()
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="matrix-", dir=shm if os.access(shm, os.W_OK) else None) as scratch:
        template = template or snapshot_template(Path(scratch) / "template")
        # Strided batches, so each worker gets a mix of cheap and costly (e.g. DDP) combinations.
        count = max(1, math.ceil(len(combos) / BATCH_SIZE), min(len(combos), workers * 2))
        indexed = list(enumerate(combos))
        batches = [indexed[i::count] for i in range(count)]
        # spawn: a clean interpreter per worker (forking a process with torch's threads running is unsafe).
        context = multiprocessing.get_context("spawn")
        with (
            context.Manager() as manager,
            context.Pool(
                workers,
                initializer=_init_worker,
                initargs=(str(template), tier, scratch, manager.dict()),
                maxtasksperchild=BATCHES_PER_WORKER,
            ) as pool,
        ):
            outcomes = [outcome for batch in pool.imap_unordered(run_batch, batches) for outcome in batch]
    outcomes.sort(key=lambda outcome: outcome.index)
    return MatrixResult(outcomes, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", choices=("pairwise", "pairwise-learning", "exhaustive"), default="pairwise")
    parser.add_argument("--limit", type=int, default=None, help="run only the first N combinations")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    parser.add_argument("--count", action="store_true", help="render and group by tree only; train nothing")
    args = parser.parse_args(argv)
    combos = tier_combinations(args.tier)[: args.limit]
    if args.count:
        trees = group_by_tree(combos, args.workers)
        print(f"{args.tier}: {trees.describe()}; rendered and grouped in {trees.wall_s:.1f}s")
        return
    result = run_matrix(combos, args.tier, args.workers)
    print(f"{args.tier}: {result.trees().describe()}")
    print(
        f"{args.tier}: {len(result.outcomes)} combinations rendered, {len(result.trained)} distinct trees trained "
        f"in {result.wall_s:.1f}s, {len(result.failures)} failed"
    )
    if result.failures:
        print(result.describe_failures())
        sys.exit(1)


if __name__ == "__main__":
    main()
