"""GPU throughput of the rendered project with and without AMP and torch.compile, and DataLoader stall time.

    python benchmarks/gpu_bench.py             # needs a CUDA GPU; exits with a message without one
    python benchmarks/gpu_bench.py --quick     # tiny sizes, one repeat
    python benchmarks/gpu_bench.py --quick --cpu   # dry run of the same code on the CPU (no GPU figures)

One project is rendered per answer of the template's ``amp`` and ``compile`` questions (read from
copier.yml; a question the template does not ask is left out) and trained on a model wide enough to
load the GPU (``model.width``). Throughput is samples/s of the rendered ``train_one_epoch`` over the
epochs after the first (which holds the compile and cuDNN warm-up), synchronised with the GPU at both
ends of every timed epoch. Stall time is the time the loop spends waiting for ``next(batch)`` from the
training DataLoader, as a share of the epoch: the part of the epoch the GPU could have been busy.

Three more figures, on the bf16 + compile render (the fastest answers on a GPU that has bf16):
- **hand-written**: the same model, optimiser and loader in a plain loop (autocast bf16, ``torch.compile``,
  pinned batches copied with ``non_blocking=True``), the samples/s a careful engineer gets by hand;
- **unpinned**: the rendered loop with ``pin_memory`` turned off, so each copy to the GPU is synchronous;
- **host syncs per step**: ``torch.cuda.set_sync_debug_mode("warn")`` during the timed epochs of the
  rendered ``train_one_epoch`` counts every operation that waits for the GPU (the loop reads the device
  once per ``log.every_n_steps`` window; the dry run on the CPU counts the same reads by wrapping them).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from harness import EpochTimes, RenderedProject, count_host_reads, question_or_none, render_project, timed_fit
from torch.nn import functional as F


class TimedLoader:
    """Wraps a DataLoader; adds up the time spent waiting for each batch."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.wait_seconds = 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.wait_seconds += time.perf_counter() - start
            yield batch


def answer_space() -> list[dict[str, Any]]:
    """Every combination of the amp and compile answers the template offers."""
    axes = []
    for name in ("amp", "compile"):
        q = question_or_none(name)
        if q is not None:
            axes.append([(name, value) for value in q.options()])
    if not axes:
        print("the template asks neither amp nor compile: measuring the default project only")
    return [dict(combo) for combo in itertools.product(*axes)]


def measure(project: RenderedProject, overrides: list[str], synchronize: Callable[[], None]) -> dict[str, float]:
    """samples/s and stall share of the rendered loop, timed with the device synchronised."""
    train = project.train
    build_loaders = train.build_loaders
    loaders: list[TimedLoader] = []

    def timed_build_loaders(*args, **kwargs):
        train_loader, val_loader = build_loaders(*args, **kwargs)
        loaders.append(TimedLoader(train_loader))
        return loaders[-1], val_loader

    original = train.train_one_epoch

    @functools.wraps(original)  # timed_fit finds `progress` through the signature
    def synchronised_train_one_epoch(*args, **kwargs):
        synchronize()
        result = original(*args, **kwargs)
        synchronize()
        return result

    train.build_loaders, train.train_one_epoch = timed_build_loaders, synchronised_train_one_epoch
    try:
        times = timed_fit(project, overrides)
    finally:
        train.build_loaders, train.train_one_epoch = build_loaders, original
    batch_size = next(int(o.split("=")[1]) for o in overrides if o.startswith("data.batch_size="))
    # The stall is summed over all epochs; report it against all epochs' time so warm-up does not hide it.
    return {
        "samples_per_s": times.steps_per_second(skip=1) * batch_size,
        "stall_share": loaders[0].wait_seconds / sum(times.seconds),
    }


def common_overrides(args: argparse.Namespace, output_dir: Path, workers: str) -> list[str]:
    """The config of every timed run: synthetic data, ``--steps`` steps an epoch, one warm-up epoch."""
    return [
        f"epochs={1 + args.epochs}",
        f"output_dir={output_dir}",
        "data.dataset=synthetic",
        f"data.synthetic_size={round(args.steps * args.batch_size / 0.98) + args.batch_size}",
        "data.val_fraction=0.02",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={workers}",
        f"model.width={args.width}",
        "log.progress_bar=false",
        f"threads={torch.get_num_threads()}",  # the hand-written loop's: the rendered setup would apply its own rule
    ]


def hand_written(project: RenderedProject, overrides: list[str], device: str, synchronize: Callable[[], None]) -> float:
    """samples/s of a plain bf16 + compile loop on the project's model, optimiser and pinned loader."""
    cfg = project.config.load_config(None, overrides)
    torch.manual_seed(cfg.seed)
    splits = project.data.build_splits(cfg.data, cfg.seed)
    loader, _ = project.loaders.build_loaders(cfg.data, splits, cfg.seed, pin_memory=device == "cuda")
    info = splits.info
    model = project.model.build_model(cfg.model, info).to(device)
    optimizer = project.optim.build_optimizer(model, cfg.optim)
    step = torch.compile(model, backend=cfg.compile_backend)
    times = EpochTimes()
    steps = [0]
    for _ in range(cfg.epochs):
        synchronize()
        with times.epoch(lambda: steps[0]):
            for inputs, targets in loader:
                inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                with torch.autocast(device, dtype=torch.bfloat16):
                    loss = F.cross_entropy(step(inputs), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps[0] += 1
            synchronize()
    return times.steps_per_second(skip=1) * cfg.data.batch_size


def unpinned(project: RenderedProject, overrides: list[str], synchronize: Callable[[], None]) -> float:
    """samples/s of the rendered loop with the training loader's pin_memory turned off."""
    train = project.train
    build_loaders = train.build_loaders
    train.build_loaders = lambda *args, **kwargs: build_loaders(*args, **{**kwargs, "pin_memory": False})
    try:
        return measure(project, overrides, synchronize)["samples_per_s"]
    finally:
        train.build_loaders = build_loaders


def host_syncs_per_step(project: RenderedProject, overrides: list[str]) -> float:
    """Synchronising CUDA calls per optimiser step in the rendered train_one_epoch, after its first epoch."""
    train = project.train
    original = train.train_one_epoch
    counts = {"epochs": 0, "syncs": 0, "steps": 0}

    @functools.wraps(original)
    def counted(state, *args, **kwargs):
        counts["epochs"] += 1
        if counts["epochs"] == 1:  # warm-up: compilation and cuDNN autotuning synchronise by design
            return original(state, *args, **kwargs)
        before = state.progress.global_step
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = original(state, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts["syncs"] += sum("synchronizing" in str(warning.message) for warning in caught)
        counts["steps"] += state.progress.global_step - before
        return result

    train.train_one_epoch = counted
    try:
        timed_fit(project, overrides)
    finally:
        train.train_one_epoch = original
    return counts["syncs"] / max(counts["steps"], 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256, help="model.width (SmallCNN channels)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per run, after one warm-up epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="0,4", help="data.num_workers values to compare (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="dry run on the CPU: the same rendering, wrapping and timing, compile with the eager backend; "
        "checks the script, gives no GPU figures",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.batch_size, args.steps, args.epochs, args.repeats, args.workers = 16, 64, 5, 1, 1, "0"
    if args.cpu:
        device, synchronize, compile_overrides = "cpu", lambda: None, ["compile_backend=eager"]
        print(f"device: CPU (dry run, not GPU figures); torch {torch.__version__}")
    elif torch.cuda.is_available():
        device, synchronize, compile_overrides = "cuda", torch.cuda.synchronize, []
        print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print("gpu_bench: no CUDA GPU visible, nothing to measure (run it on a machine with one, or pass --cpu)")
        return
    print(f"model.width={args.width}, batch {args.batch_size}, {args.steps} steps/epoch, {args.repeats} repeats")

    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        workdir = Path(tmp)
        projects = {}  # label: (project, its own config overrides)
        for n, answers in enumerate(answer_space()):
            label = ", ".join(f"{k}={v}" for k, v in answers.items()) or "default"
            project = render_project(workdir, f"bench_gpu_{n}", {"device": device, **answers})
            projects[label] = project, compile_overrides if answers.get("compile") else []
        runs = itertools.count()
        rows: dict[tuple[str, str], list[dict[str, float]]] = {}
        for _ in range(args.repeats):
            for (label, (project, own)), workers in itertools.product(projects.items(), args.workers.split(",")):
                overrides = [*common_overrides(args, workdir / f"run-{next(runs)}", workers), *own]
                rows.setdefault((label, workers), []).append(measure(project, overrides, synchronize))
        baseline = statistics.median(r["samples_per_s"] for r in next(iter(rows.values())))
        print(f"\n{'answers':32s} {'workers':>7s} {'samples/s':>10s} {'speed-up':>8s} {'stall':>6s}")
        for (label, workers), results in rows.items():
            rate = statistics.median(r["samples_per_s"] for r in results)
            stall = statistics.median(r["stall_share"] for r in results)
            print(f"{label:32s} {workers:>7s} {rate:10.0f} {rate / baseline:7.2f}x {stall:6.1%}")

        label = "amp=bf16, compile=True"
        if label not in projects:
            print(f"\nno {label} render (the template does not offer it): no hand-written, unpinned or sync figures")
            return
        project, own = projects[label]
        workers = args.workers.split(",")[0]

        def overrides() -> list[str]:
            return [*common_overrides(args, workdir / f"run-{next(runs)}", workers), *own]

        rendered = statistics.median(result["samples_per_s"] for result in rows[label, workers])
        repeats = range(args.repeats)
        by_hand = statistics.median(hand_written(project, overrides(), device, synchronize) for _ in repeats)
        plain = statistics.median(unpinned(project, overrides(), synchronize) for _ in repeats)
        print(f"\n{label}, data.num_workers={workers}:")
        print(f"  rendered loop      {rendered:10.0f} samples/s")
        print(f"  hand-written loop  {by_hand:10.0f} samples/s  (rendered / hand-written: {rendered / by_hand:.3f})")
        print(f"  rendered, unpinned {plain:10.0f} samples/s  (pinned / unpinned: {rendered / plain:.3f})")
        if device == "cuda":
            syncs = host_syncs_per_step(project, overrides())
            print(f"  host syncs per step in train_one_epoch (torch.cuda.set_sync_debug_mode): {syncs:.3f}")
        else:
            reads, steps = count_host_reads(project, overrides())
            print(f"  host reads per step in train_one_epoch (CPU dry run, wrapped reads): {reads / steps:.3f}")


if __name__ == "__main__":
    sys.exit(main())
