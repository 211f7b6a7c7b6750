"""Steps per second of the rendered training loop vs a hand-written loop and PyTorch Lightning, on CPU.

    python benchmarks/loop_bench.py              # full run (a few minutes on 2 cores)
    python benchmarks/loop_bench.py --quick      # seconds: checks that the benchmark still runs

One model per task the template offers (``--tasks``): classification's MLP and CNN (``--archs``) on
synthetic pictures, regression's MLP on a generated table (a CSV file, as a user's own), segmentation's
U-Net on the generated shapes. The raw loop computes each task's loss by hand.

Every contender trains the same model (the rendered ``build_model``), with the same optimiser (the
rendered ``build_optimizer``: AdamW by default), on the same in-memory synthetic data through the same
DataLoader (the rendered ``build_loaders``), batch size and torch thread count. Each run trains
``1 + --epochs`` epochs and only the epochs after the first (warm-up) are timed; validation and
checkpointing fall outside the timed window. Repeats are interleaved (raw, rendered..., Lightning, with
the order rotated every repeat) so that load from other processes hits all contenders alike; the
figures are medians over repeats, and ratios are medians of the per-repeat ratios against the raw loop
timed in the same repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from harness import (
    EpochTimes,
    NullTerminal,
    RenderedProject,
    count_host_reads,
    question_or_none,
    render_project,
    summarise,
    timed_fit,
)
from torch.nn import functional as F

VAL_FRACTION = 0.02  # the rendered fit() validates every epoch; keep that untimed work small
SERVICE_LOGGERS = {"wandb", "mlflow", "neptune", "comet", "aim", "clearml"}  # need an account or server


def logger_variants() -> dict[str, dict[str, Any]]:
    """Copier answers for loggers off and on, when the template asks which loggers to use.

    "On" means every logger that works offline with what is installed here (tensorboard only if
    the package is importable); loggers that need an account or a server are left out.
    """
    q = question_or_none("loggers")
    if q is None:
        return {"off": {}}

    def usable(choice: Any) -> bool:
        name = str(choice).lower()
        if name in SERVICE_LOGGERS or name in {"none", ""}:
            return False
        return name != "tensorboard" or importlib.util.find_spec("tensorboard") is not None

    if q.type == "bool":
        return {"off": {"loggers": False}, "on": {"loggers": True}}
    on = [c for c in q.choices if usable(c)]
    if q.multiselect:
        return {"off": {"loggers": []}, "on": {"loggers": on}} if on else {"off": {"loggers": []}}
    off = next((c for c in q.choices if str(c).lower() == "none"), None)
    variants = {} if off is None else {"off": {"loggers": off}}
    if on:
        variants["on"] = {"loggers": on[0]}
    return variants


# What each task trains in the benchmark: its models, and the loss the hand-written loop computes. The
# language model's loop is measured against nanoGPT's instead (lm_bench.py).
TASK_MODELS = {"classification": ["mlp", "cnn"], "regression": ["mlp"], "segmentation": ["unet"]}
RAW_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "classification": F.cross_entropy,
    "regression": F.mse_loss,
    "segmentation": lambda outputs, masks: F.cross_entropy(outputs, masks.long(), ignore_index=255),  # uint8 masks
}
TABLE_FEATURES = 16


def write_table(path: Path, rows: int) -> Path:
    """A regression table of ``rows`` rows: TABLE_FEATURES numeric columns and a noisy linear target ``y``."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(rows, TABLE_FEATURES, generator=generator)
    target = features @ torch.randn(TABLE_FEATURES, generator=generator) + 0.1 * torch.randn(rows, generator=generator)
    header = ",".join([*(f"x{i}" for i in range(TABLE_FEATURES)), "y"])
    lines = [",".join(f"{value:.5f}" for value in row) for row in torch.cat([features, target[:, None]], 1).tolist()]
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


def data_overrides(task: str, size: int, workdir: Path) -> list[str]:
    """The task's in-memory data of ``size`` samples."""
    if task == "regression":
        table = workdir / f"table-{size}.csv"
        if not table.exists():
            write_table(table, size)
        return ["data.dataset=csv", f"data.path={table}", "data.target=y"]
    if task == "segmentation":
        return ["data.dataset=shapes", f"data.shapes_count={size}"]
    return ["data.dataset=synthetic", f"data.synthetic_size={size}"]


def overrides_for(
    task: str, arch: str, steps: int, batch_size: int, epochs: int, output_dir: Path, bar: bool
) -> list[str]:
    size = round((steps * batch_size + batch_size // 2) / (1 - VAL_FRACTION))
    return [
        "device=cpu",
        f"epochs={epochs}",
        f"output_dir={output_dir}",
        *data_overrides(task, size, output_dir.parent),
        f"data.val_fraction={VAL_FRACTION}",
        f"data.batch_size={batch_size}",
        "data.num_workers=0",
        f"model.arch={arch}",
        f"log.progress_bar={str(bar).lower()}",
    ]


def raw_epoch(model, loader, optimizer, device: torch.device, times: EpochTimes, loss_fn=F.cross_entropy) -> None:
    """One epoch of the minimal hand-written loop, timed into ``times``."""
    model.train()
    steps = 0
    with times.epoch(lambda: steps):
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad()
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
            steps += 1


def raw_loop(project: RenderedProject, overrides: list[str], loss_fn=F.cross_entropy) -> EpochTimes:
    """The hand-written loop on the rendered project's model, optimiser and data, on its own.

    Between epochs it validates and saves a checkpoint, untimed, as fit() does: an epoch that follows
    that work runs ~2% slower than one run straight after another (caches), which would favour the raw loop.
    """
    cfg = project.config.load_config(None, overrides)
    torch.manual_seed(cfg.seed)
    splits = project.data.build_splits(cfg.data, cfg.seed)
    train_loader, val_loader = project.loaders.build_loaders(cfg.data, splits, cfg.seed)
    info = splits.info
    model = project.model.build_model(cfg.model, info)
    optimizer = project.optim.build_optimizer(model, cfg.optim)
    checkpoint = Path(cfg.output_dir) / "raw.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    times = EpochTimes()
    for epoch in range(cfg.epochs):
        train_loader.generator.manual_seed(cfg.seed + epoch)
        raw_epoch(model, train_loader, optimizer, torch.device("cpu"), times, loss_fn)
        model.eval()
        with torch.no_grad():
            val_loss = sum(loss_fn(model(inputs), targets) for inputs, targets in val_loader)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "val_loss": val_loss}, checkpoint)
    return times


def paired_fit(
    project: RenderedProject, overrides: list[str], bar: bool, loss_fn=F.cross_entropy
) -> tuple[EpochTimes, EpochTimes]:
    """The rendered fit(), each of its epochs paired with one raw epoch on the very same objects.

    The pairs differ only in the loop code: same model, optimiser state, loader and memory, a second
    apart, so most of the noise of a shared machine cancels in the per-pair ratio. The raw epoch runs
    after the rendered one and before it in turn: whichever runs first follows fit()'s validation and
    checkpoint and runs ~2% slower (2026-11-24: 0.978x rendered-first, 0.997x raw-first for the MLP).
    """
    raw = EpochTimes()

    def beside_epoch(arguments: dict[str, Any]) -> None:
        state = arguments["state"]
        raw_epoch(state.train_model, arguments["loader"], state.optimizer, state.device, raw, loss_fn)

    return timed_fit(project, overrides, terminal=bar, beside_epoch=beside_epoch), raw


def lightning_loop(project: RenderedProject, overrides: list[str], defaults: bool, workdir: Path) -> EpochTimes:
    """Lightning's Trainer on the same model, optimiser and loader; steps/s over the epochs after the first.

    ``defaults=False``: progress bar, logger, checkpointing and model summary off (like for like).
    ``defaults=True``: Trainer defaults (bar drawn into a null terminal, default logger, checkpoints).
    """
    import lightning as L

    cfg = project.config.load_config(None, overrides)

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = project.model.build_model(cfg.model, info)

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return F.cross_entropy(self.model(inputs), targets)

        def configure_optimizers(self):
            return project.optim.build_optimizer(self.model, cfg.optim)

    times = EpochTimes()

    class EpochTimer(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.timing = times.epoch(lambda: trainer.global_step)
            self.timing.__enter__()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.timing.__exit__(None, None, None)

    torch.manual_seed(cfg.seed)
    splits = project.data.build_splits(cfg.data, cfg.seed)
    train_loader, _ = project.loaders.build_loaders(cfg.data, splits, cfg.seed)
    info = splits.info
    module = Classifier()
    options: dict[str, Any] = {"default_root_dir": str(workdir)}
    if not defaults:
        options.update(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=cfg.epochs, num_sanity_val_steps=0, callbacks=[EpochTimer()], **options
    )
    stderr = NullTerminal() if defaults else sys.stderr
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(stderr):
        trainer.fit(module, train_dataloaders=train_loader)
    return times


def epoch_ratios(steps: list[int], seconds: list[float], raw_steps: list[int], raw_seconds: list[float]):
    """Per-epoch rate ratios of rendered to raw, leaving out the warm-up epoch: (raw first, rendered first)."""
    ratios = [
        (n / t) / (raw_n / raw_t)
        for n, t, raw_n, raw_t in zip(steps[1:], seconds[1:], raw_steps[1:], raw_seconds[1:], strict=True)
    ]
    return ratios[0::2], ratios[1::2]


def order_balanced(pairs: tuple[list[float], list[float]]) -> float:
    """The geometric mean of the two orders' median ratios: the order's own bias cancels."""
    raw_first, rendered_first = pairs
    return math.sqrt(statistics.median(raw_first) * statistics.median(rendered_first))


def paired_ratio(rates: dict[str, list[float]], name: str) -> float:
    return statistics.median(value / raw for value, raw in zip(rates[name], rates["raw loop"], strict=True))


def lightning_available() -> bool:
    if importlib.util.find_spec("lightning") is None:
        return False
    import lightning  # noqa: F401  (sets its loggers' levels on import: quieten them after)

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    return True


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    lightning = ""
    if importlib.util.find_spec("lightning") is not None:
        import lightning

        lightning = f", lightning {lightning.__version__}"
    return (
        f"{model}, {os.cpu_count()} logical CPUs; python {platform.python_version()}, torch {torch.__version__}"
        f"{lightning}; torch threads {torch.get_num_threads()}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=None, help="tasks to benchmark, comma-separated (default: every task)")
    parser.add_argument("--archs", default="mlp,cnn", help="classification's model.arch values (comma-separated)")
    parser.add_argument("--steps", type=int, default=0, help="optimiser steps per epoch (default: 150 mlp, 20 others)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per run, after one warm-up epoch")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats; figures are medians")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every contender")
    parser.add_argument("--no-lightning", action="store_true", help="skip Lightning even when installed")
    parser.add_argument("--json", type=Path, help="also write the raw per-repeat figures here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat, one model a task (a smoke run)")
    args = parser.parse_args(argv)
    task_question = question_or_none("task")
    offered = [str(task) for task in task_question.options()] if task_question else ["classification"]
    args.tasks = offered if args.tasks is None else args.tasks.split(",")
    if unknown := [task for task in args.tasks if task not in offered]:
        parser.error(f"--tasks: {', '.join(unknown)} not among the template's tasks ({', '.join(offered)})")
    if args.quick:
        args.archs, args.steps, args.repeats, args.epochs = "mlp", 8, 1, 2
    if args.epochs < 2:
        parser.error("--epochs must be 2 or more: the paired raw epoch runs first in one, second in the next")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    use_lightning = not args.no_lightning and lightning_available()
    print(f"machine: {machine()}")
    print(f"batch size {args.batch_size}, {args.repeats} repeats, 1 warm-up + {args.epochs} timed epoch(s) per run")
    if not use_lightning:
        print("lightning: skipped (install it with: pip install -r benchmarks/requirements.txt)")

    results: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="loop-bench-") as tmp:
        workdir = Path(tmp)
        loggers = logger_variants()
        runs = iter(range(1_000_000))
        models = [(task, arch) for task in args.tasks for arch in TASK_MODELS.get(task, [])]
        models = [(task, arch) for task, arch in models if task != "classification" or arch in args.archs.split(",")]
        for task, arch in models:
            steps = args.steps or (150 if arch == "mlp" else 20)
            task_answer = {"task": task} if len(args.tasks) > 1 or task != "classification" else {}
            # A smoke run times the loggers' variants on classification alone: the loop around them is the same.
            variants = {"off": loggers["off"]} if args.quick and task != "classification" else loggers
            projects = {
                name: render_project(workdir, f"bench_{task}_loggers_{name}", {**task_answer, **answers})
                for name, answers in variants.items()
            }
            baseline, loss_fn = projects["off"], RAW_LOSSES[task]
            key = arch if task == "classification" else f"{task}/{arch}"

            def overrides(bar: bool, task=task, arch=arch, steps=steps) -> list[str]:
                out = workdir / f"run-{next(runs)}"
                threads = f"threads={args.threads}"  # else the rendered setup applies its own rule (cores less one)
                return [*overrides_for(task, arch, steps, args.batch_size, 1 + args.epochs, out, bar), threads]

            contenders: dict[str, Callable[[], EpochTimes]] = {
                "raw loop": lambda b=baseline, o=overrides, f=loss_fn: raw_loop(b, o(False), f)
            }
            for logger_name, project in projects.items():
                for bar in (False, True):
                    label = f"rendered, bar {'on' if bar else 'off'}, loggers {logger_name}"
                    if len(projects) == 1:
                        label = f"rendered, bar {'on' if bar else 'off'}"
                    contenders[label] = lambda p=project, b=bar, o=overrides, f=loss_fn: paired_fit(p, o(b), b, f)
            if use_lightning and task == "classification":
                contenders["lightning, bar/logger/ckpt off"] = lambda b=baseline, o=overrides: lightning_loop(
                    b, o(False), False, workdir / f"pl-{next(runs)}"
                )
                contenders["lightning, Trainer defaults"] = lambda b=baseline, o=overrides: lightning_loop(
                    b, o(False), True, workdir / f"pl-{next(runs)}"
                )

            wall: dict[str, list[float]] = {name: [] for name in contenders}
            cpu: dict[str, list[float]] = {name: [] for name in contenders}
            # Per-epoch ratios of each paired contender: (raw epoch first, rendered epoch first).
            paired_wall: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in contenders}
            paired_cpu: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in contenders}
            outside_ms: dict[str, list[float]] = {name: [] for name in contenders}
            names = list(contenders)
            for repeat in range(args.repeats):
                shift = repeat % len(names)
                for name in names[shift:] + names[:shift]:
                    times = contenders[name]()
                    if isinstance(times, tuple):  # rendered, with its paired raw epochs
                        times, raw = times
                        for pairs, clock, raw_clock in (
                            (paired_wall, times.seconds, raw.seconds),
                            (paired_cpu, times.cpu_seconds, raw.cpu_seconds),
                        ):
                            for ordered, ratios in zip(
                                pairs[name], epoch_ratios(times.steps, clock, raw.steps, raw_clock), strict=True
                            ):
                                ordered += ratios
                        outside = times.fit_seconds - sum(times.seconds) - sum(raw.seconds)
                        outside_ms[name].append(1000 * outside / len(times.seconds))
                    wall[name].append(times.steps_per_second(skip=1))
                    cpu[name].append(times.steps_per_cpu_second(skip=1))
                    if torch.get_num_threads() != args.threads:
                        raise RuntimeError(f"{name} changed torch's thread count to {torch.get_num_threads()}")

            print(f"\n{key}: {steps} steps/epoch. Medians over repeats (spread: min/max against the median).")
            print("  ratio: median of the per-repeat ratios to the raw loop run in the same repeat;")
            print("  paired: rendered / raw epoch run next to it on the same objects, the geometric mean of the")
            print("  medians with the raw epoch run first and with it run second")
            header = f"{'steps/s (wall)':>26s} {'ratio':>6s} {'paired':>6s}"
            print(f"  {'':38s} {header}   {header.replace('steps/s (wall)', 'steps per CPU-s')}")
            for name in names:
                columns = []
                for rates, pairs in ((wall, paired_wall), (cpu, paired_cpu)):
                    paired = f"{order_balanced(pairs[name]):6.3f}" if pairs[name][0] else f"{'':6s}"
                    columns.append(f"{summarise(rates[name]):>26s} {paired_ratio(rates, name):6.3f} {paired}")
                print(f"  {name:38s} {'   '.join(columns)}")
            reads, read_steps = count_host_reads(baseline, overrides(False))
            print(
                f"  host reads per step in the rendered train_one_epoch (item/tolist/bool/float/int/cpu from the "
                f"project's code, an untimed run): {reads / read_steps:.3f} ({reads} in {read_steps} steps)"
            )
            print("  rendered fit() outside the timed loop (setup, validation, checkpoints, loggers), per epoch:")
            for name, values in outside_ms.items():
                if values:
                    print(f"    {name:36s} {statistics.median(values):7.1f} ms (wall)")
            results[key] = {
                "steps_per_epoch": steps,
                "wall_steps_per_s": wall,
                "steps_per_cpu_s": cpu,
                "paired_wall_ratios": paired_wall,
                "paired_cpu_ratios": paired_cpu,
                "outside_loop_ms_per_epoch": outside_ms,
                "host_reads": {"reads": reads, "steps": read_steps, "epochs": 1 + args.epochs},
            }

    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
