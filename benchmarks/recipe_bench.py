"""Samples per second, validation top-1 and peak memory of the rendered image classifier against torchvision's
reference training script (``references/classification/train.py``), on CPU.

    python benchmarks/recipe_bench.py --torchvision-references PATH   # side by side, PATH a torchvision checkout
    python benchmarks/recipe_bench.py --quick                         # seconds, the rendered side only

Both train the same torchvision model (``--model``, resnet18 by default, from scratch) on the same image
folders: the scikit-learn digits written as PNGs of ``--image-px`` pixels, ``root/train/<digit>`` and
``root/val/<digit>`` (torchvision's layout, which the rendered project reads as its own split). The same
epochs, batch, ``num_workers``, SGD (lr, momentum, weight decay; no Nesterov; biases and normalisation
parameters without decay, the rendered rule, given to torchvision as ``--norm-weight-decay 0
--bias-weight-decay 0``), cosine schedule after a linear warmup (torchvision's ``SequentialLR`` of
``LinearLR`` and ``CosineAnnealingLR``, stepped per epoch, as the rendered one), and augmentation: a random
resized crop of 8-100% of the area to ``--crop-px`` and a horizontal flip (torchvision's default preset; the
rendered ``data.augment`` with ``data.crop_scale=0.08``), validation resized to ``--resize-px`` and
centre-cropped. torchvision's transforms run as v2 on tensors (``--backend tensor --use-v2``), as the
rendered ones do. float32, no AMP, no compile, no EMA, one process; ``OMP_NUM_THREADS=--threads`` for both;
every run a fresh process, the two interleaved over the repeats (the order alternates).

The recipe (``--recipe modern``: label smoothing, MixUp/CutMix, TrivialAugment, random erasing, ...) goes
to both sides only where the rendered config has the key (read from its ``configs/schema.json``);
otherwise neither side gets it, so every comparison is like for like, and the output lists what was left
out.

Figures, medians over the repeats:

- samples/s of the training epochs after the first (the first warms up and starts the loader's workers):
  the wall time of each epoch's ``train_one_epoch`` call, on both sides the same clock around the same
  function (``harness.timed_fit`` for the rendered project; torchvision's ``train_one_epoch`` wrapped the
  same way in this script's ``--torchvision-worker`` mode). Data loading is inside the window on both
  sides (torchvision's workers start again every epoch, the rendered ones persist); validation,
  checkpoints and start-up are outside. torchvision's own ``img/s`` meter is not used: it times each
  step from after the batch has arrived, so it leaves data loading out. Beside it, samples per CPU-second
  of the same epochs, counting the whole process tree (``process_tree_cpu_s``: loader workers included):
  steadier than the wall clock on a shared machine.
- validation top-1 after the last epoch (torchvision's ``evaluate``, the rendered ``val_accuracy``).
- peak memory: the largest resident set (``ru_maxrss``) of the run's process and of its loader workers, as
  ``wait4`` reports it for the whole process tree when the run ends.
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from harness import EpochTimes, render_project, summarise, timed_fit
from PIL import Image

PACKAGE = "recipe_bench_project"
# SGD with a cosine schedule after a linear warmup (torchvision's --opt sgd --lr-scheduler cosineannealinglr
# --lr-warmup-method linear); no loggers (torchvision's script writes none).
ANSWERS = {
    "task": "classification",
    "dataset": "imagefolder",
    "optimizer": "sgd",
    "scheduler": "cosine",
    "warmup": True,
    "loggers": [],
    "device": "cpu",
}
RESULT = "recipe-bench-result "  # the worker's figures: the line that starts with this, as JSON
WARMUP_START = 0.01  # torchvision's --lr-warmup-decay default


@dataclass(frozen=True)
class Setting:
    """One training setting: the rendered config's key and value, and torchvision's train.py flags for it."""

    key: str
    value: Any
    flags: tuple[str, ...] = ()

    def override(self) -> str:
        value = self.value
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        return f"{self.key}={text}"


def base_settings(args: argparse.Namespace) -> list[Setting]:
    """What both sides need and today's rendered config has: the comparison is void without any of them."""
    return [
        Setting("model.arch", args.model, ("--model", args.model)),
        Setting("epochs", args.epochs, ("--epochs", str(args.epochs))),
        Setting("data.batch_size", args.batch_size, ("--batch-size", str(args.batch_size))),
        Setting("data.num_workers", args.workers, ("--workers", str(args.workers))),
        Setting("optim.lr", args.lr, ("--lr", str(args.lr))),
        Setting("optim.momentum", args.momentum, ("--momentum", str(args.momentum))),
        Setting("optim.weight_decay", args.weight_decay, ("--weight-decay", str(args.weight_decay))),
        Setting("optim.nesterov", False, ("--opt", "sgd")),
        Setting("schedule.min_lr", 0.0, ("--lr-scheduler", "cosineannealinglr", "--lr-min", "0.0")),
        Setting("schedule.warmup_epochs", args.warmup_epochs, ("--lr-warmup-epochs", str(args.warmup_epochs))),
        # the rendered warmup is linear (until schedule.warmup_method says otherwise); torchvision's default is constant
        Setting(
            "schedule.warmup_start_factor",
            WARMUP_START,
            ("--lr-warmup-decay", str(WARMUP_START), "--lr-warmup-method", "linear"),
        ),
        Setting("data.augment", True),  # random resized crop and flip: torchvision's default preset
        Setting("data.crop_scale", 0.08),  # torchvision's RandomResizedCrop scale (0.08, 1)
    ]


def crop_settings(args: argparse.Namespace, keys: set[str]) -> list[Setting]:
    """The rendered crop sizes: ``data.image_size`` and ``data.crop_fraction`` (validation resized to
    image_size / crop_fraction), and the separate train and validation sizes where the config has them.
    torchvision gets its three sizes in any case (``torchvision_arguments``)."""
    settings = [
        Setting("data.image_size", args.crop_px),
        Setting("data.crop_fraction", args.crop_px / args.resize_px),
        Setting("data.train_crop_size", args.crop_px),
        Setting("data.val_resize_size", args.resize_px),
        Setting("data.val_crop_size", args.crop_px),
    ]
    present = [setting for setting in settings if setting.key in keys]
    given = {setting.key for setting in present}
    if not (
        {"data.image_size", "data.crop_fraction"} <= given or {"data.train_crop_size", "data.val_resize_size"} <= given
    ):
        raise SystemExit(
            "the rendered config has no crop sizes (data.image_size and data.crop_fraction, or "
            "data.train_crop_size, data.val_resize_size and data.val_crop_size)"
        )
    return present


# torchvision's ResNet "new recipe" (its classification README), the parts that act in one CPU process.
MODERN_RECIPE = [
    Setting("loss.label_smoothing", 0.1, ("--label-smoothing", "0.1")),
    Setting("data.mixup_alpha", 0.2, ("--mixup-alpha", "0.2")),
    Setting("data.cutmix_alpha", 1.0, ("--cutmix-alpha", "1.0")),
    Setting("data.auto_augment", "trivialaugment", ("--auto-augment", "ta_wide")),
    Setting("data.random_erase", 0.1, ("--random-erase", "0.1")),
    Setting("data.interpolation", "bilinear", ("--interpolation", "bilinear")),
]
# The recipe's other keys, set to what both sides do here anyway, so that no default of theirs can differ.
NEUTRAL = [
    Setting("optim.norm_weight_decay", 0.0),  # torchvision gets --norm-weight-decay 0 in any case
    Setting("optim.bias_weight_decay", 0.0),  # and --bias-weight-decay 0
    Setting("schedule.warmup_method", "linear"),  # and --lr-warmup-method linear
    Setting("channels_last", False),  # torchvision's script has no channels_last
    Setting("data.repeated_augmentations", 1),  # torchvision's RA sampler acts only when distributed
    Setting("data.randaugment_magnitude", 9, ("--ra-magnitude", "9")),  # unused unless randaugment
    Setting("data.augmix_severity", 3, ("--augmix-severity", "3")),  # unused unless augmix
]
RECIPES = {"modern": MODERN_RECIPE + NEUTRAL, "plain": NEUTRAL}


def config_keys(project_dir: Path) -> set[str]:
    """Every key of the rendered config, dotted (``data.batch_size``), from its ``configs/schema.json``."""
    schema = json.loads((project_dir / "configs" / "schema.json").read_text())
    definitions = schema.get("$defs", {})
    keys: set[str] = set()

    def walk(node: dict[str, Any], prefix: str) -> None:
        if "$ref" in node:
            node = definitions[node["$ref"].rsplit("/", 1)[1]]
        for option in node.get("anyOf", []):  # an optional section: {"$ref": ...} or null
            walk(option, prefix)
        for name, child in node.get("properties", {}).items():
            keys.add(prefix + name)
            walk(child, f"{prefix}{name}.")

    walk(schema, "")
    return keys


@dataclass
class Plan:
    """The settings both sides get, and the recipe's that neither gets because the rendered config lacks them."""

    settings: list[Setting]
    left_out: list[Setting]

    def overrides(self) -> list[str]:
        return [setting.override() for setting in self.settings]

    def flags(self) -> list[str]:
        return [flag for setting in self.settings for flag in setting.flags]


def plan(args: argparse.Namespace, keys: set[str]) -> Plan:
    """What both sides get: the base settings, the crop sizes and the recipe's keys that the config has."""
    base = base_settings(args)
    missing = [setting.key for setting in base if setting.key not in keys]
    if missing:
        raise SystemExit(f"the rendered config lacks {', '.join(missing)}: nothing to pair with torchvision's flags")
    recipe = RECIPES[args.recipe]
    present = [setting for setting in recipe if setting.key in keys]
    left_out = [setting for setting in recipe if setting.key not in keys and setting in MODERN_RECIPE]
    return Plan([*base, *crop_settings(args, keys), *present], left_out)


def rendered_overrides(plan_: Plan, root: Path, output: Path) -> list[str]:
    return [*plan_.overrides(), f"data.root={root}", "log.progress_bar=false", f"output_dir={output}"]


def torchvision_arguments(plan_: Plan, root: Path, output: Path, args: argparse.Namespace) -> list[str]:
    steps = args.train_images // args.batch_size
    return [
        *plan_.flags(),
        f"--train-crop-size={args.crop_px}",
        f"--val-resize-size={args.resize_px}",
        f"--val-crop-size={args.crop_px}",
        "--norm-weight-decay=0.0",  # the rendered rule: biases and normalisation parameters never decay
        "--bias-weight-decay=0.0",
        "--backend=tensor",  # decode with PIL, transform tensors with v2: the rendered pipeline
        "--use-v2",
        "--device=cpu",
        f"--data-path={root}",
        f"--output-dir={output}",
        f"--print-freq={max(steps, 1)}",  # one line an epoch: the rendered run prints none within an epoch
    ]


def write_digit_folders(root: Path, train: int, val: int, side: int, seed: int = 0) -> Path:
    """``root/train/<digit>/`` and ``root/val/<digit>/``: the scikit-learn digits as ``side``-pixel PNGs, dark
    ink on white paper, as many pictures of each digit in a split, drawn from ``seed``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    classes = sorted(set(digits.target.tolist()))
    for split, count in (("train", train), ("val", val)):
        if count % len(classes):
            raise SystemExit(f"{split}: {count} pictures do not split evenly into {len(classes)} digits")
    per_train, per_val = train // len(classes), val // len(classes)
    for label in classes:
        order = rng.permutation(np.flatnonzero(digits.target == label))
        for split, indices in (("train", order[:per_train]), ("val", order[per_train : per_train + per_val])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for index in indices:
                ink = Image.fromarray((255 - digits.images[index] * 255 / 16).astype(np.uint8), "L")
                ink.resize((side, side), Image.Resampling.BICUBIC).convert("RGB").save(folder / f"{index:04d}.png")
    return root


@dataclass
class Run:
    """What came back from one run's process."""

    output: str
    seconds: float
    cpu_seconds: float  # user + system, of the process and its reaped children
    peak_rss_mib: float


def run_measured(command: list[str], cwd: Path | None, env: dict[str, str], timeout: float) -> Run:
    """Run ``command`` to its end: its output, wall time and peak RSS. ``wait4`` gives the rusage of the
    process and of every child it reaped (its loader workers): ``ru_maxrss`` is the largest of them, in KiB."""
    with tempfile.TemporaryFile("w+") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        timer = threading.Timer(timeout, process.kill)  # a hung run fails the benchmark rather than stalling it
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        seconds = time.perf_counter() - started
        log.seek(0)
        output = log.read()
    if process.returncode != 0:
        raise SystemExit(f"{command[2]} failed (exit status {process.returncode}):\n{output[-3000:]}")
    return Run(output, seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def figures_of(run: Run) -> dict[str, Any]:
    line = next((line for line in reversed(run.output.splitlines()) if line.startswith(RESULT)), None)
    if line is None:
        raise SystemExit(f"the run printed no figures:\n{run.output[-3000:]}")
    figures = json.loads(line[len(RESULT) :])
    return {**figures, "run_s": run.seconds, "run_cpu_s": run.cpu_seconds, "peak_rss_mib": run.peak_rss_mib}


def environment(threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": str(Path(__file__).parent),
        "PYTHONDONTWRITEBYTECODE": "1",  # nothing written into the torchvision checkout
    }


def process_tree_cpu_s() -> float:
    """CPU seconds so far of this process (all its threads), of the children it has reaped and of its live
    multiprocessing children (the loader workers that persist between epochs), read from /proc."""
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = time.process_time() + reaped.ru_utime + reaped.ru_stime
    for child in multiprocessing.active_children():
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # no /proc, or the child has just ended (then it counts among the reaped)
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def epoch_figures(times: EpochTimes, samples: list[int]) -> dict[str, Any]:
    """Samples per second and per CPU second over the epochs after the first (the only one if one)."""
    skip = 1 if len(samples) > 1 else 0
    timed = sum(samples[skip:])
    return {
        "samples_per_s": timed / sum(times.seconds[skip:]),
        "samples_per_cpu_s": timed / sum(times.cpu_seconds[skip:]),
        "epoch_s": times.seconds,
    }


def rendered_worker(project_dir: Path, overrides: list[str]) -> None:
    """Train the rendered project in this process, timing each ``train_one_epoch``; print the figures."""
    sys.path.insert(0, str(project_dir / "src"))
    from harness import RenderedProject

    project = RenderedProject(project_dir, PACKAGE)
    times = timed_fit(project, overrides, cpu_clock=process_tree_cpu_s)
    cfg = project.config.load_config(None, overrides)
    metrics = json.loads((Path(cfg.output_dir) / "summary.json").read_text())["final_metrics"]
    samples = [steps * cfg.data.batch_size for steps in times.steps]  # full batches only (drop_last)
    figures = {
        **epoch_figures(times, samples),
        "val_top1": 100 * metrics["val_accuracy"],
        "val_top5": 100 * metrics["val_top5_accuracy"] if "val_top5_accuracy" in metrics else None,
    }
    print(RESULT + json.dumps(figures), flush=True)


EVALUATION = re.compile(r"Acc@1 ([\d.]+) Acc@5 ([\d.]+)")


def torchvision_worker(references: Path, arguments: list[str]) -> None:
    """Run torchvision's ``train.main`` in this process with its ``train_one_epoch`` timed; print the figures."""
    sys.path.insert(0, str(references))
    import train as reference  # torchvision's references/classification/train.py

    original = reference.train_one_epoch
    signature = inspect.signature(original)
    times, samples = EpochTimes(cpu_clock=process_tree_cpu_s), []

    def timed_train_one_epoch(*args, **kwargs):
        loader = signature.bind(*args, **kwargs).arguments["data_loader"]
        with times.epoch(lambda: len(times.seconds)):
            result = original(*args, **kwargs)
        samples.append(len(loader.sampler))  # no drop_last: every picture, and the batches divide them
        return result

    reference.train_one_epoch = timed_train_one_epoch
    reference.main(reference.get_args_parser().parse_args(arguments))
    print(RESULT + json.dumps(epoch_figures(times, samples)), flush=True)


def run_rendered(project_dir: Path, overrides: list[str], args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", str(project_dir), *overrides]
    return figures_of(run_measured(command, None, environment(args.threads), timeout))


def run_torchvision(references: Path, arguments: list[str], args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """torchvision's train.py through this script's --torchvision-worker mode, from its own folder."""
    command = [sys.executable, __file__, "--torchvision-worker", str(references), *arguments]
    run = run_measured(command, references, environment(args.threads), timeout)
    evaluations = EVALUATION.findall(run.output)  # evaluate() prints "Test:  Acc@1 x Acc@5 y" every epoch
    if len(evaluations) != args.epochs:
        raise SystemExit(f"torchvision's output lacks its {args.epochs} evaluations:\n{run.output[-3000:]}")
    top1, top5 = evaluations[-1]
    return {**figures_of(run), "val_top1": float(top1), "val_top5": float(top5)}


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or platform.machine()
    import torch
    import torchvision

    return (
        f"{model}, {os.cpu_count()} logical CPUs; Python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}"
    )


def revision(references: Path) -> str:
    """The checkout's commit and its date, when it is a git checkout."""
    result = subprocess.run(
        ["git", "-C", str(references), "log", "-1", "--format=%h (%cs)"], capture_output=True, text=True
    )
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "not a git checkout"


def report(results: dict[str, list[dict[str, Any]]], plan_: Plan, args: argparse.Namespace) -> dict[str, Any]:
    """Print the medians (and each repeat's ratio); return the figures for --json."""
    print(machine())
    print(
        f"{args.model} from scratch; {args.train_images} training and {args.val_images} validation pictures of "
        f"{args.image_px} px (10 digits), crops of {args.crop_px} px (validation: resized to {args.resize_px}); "
        f"batch {args.batch_size}, {args.epochs} epochs ({args.warmup_epochs} of warmup), {args.workers} loader "
        f"worker(s), {args.threads} thread(s), {args.repeats} repeat(s)"
    )
    recipe = [setting.override() for setting in plan_.settings if setting in RECIPES[args.recipe]]
    print(f"  recipe '{args.recipe}', on both sides: {', '.join(recipe) or 'nothing beyond the base settings'}")
    if plan_.left_out:
        names = ", ".join(setting.key for setting in plan_.left_out)
        print(f"  left out on both sides (the rendered config has no such key yet): {names}")
    figures: dict[str, Any] = {"settings": plan_.overrides(), "left_out": [setting.key for setting in plan_.left_out]}
    print("  medians (spread: min/max against the median); the rates over the epochs after the first")
    print(
        f"  {'':11} {'samples/s (wall)':>24} {'samples per CPU-s':>24}  {'val top-1 % (each repeat)':27}"
        f"{'peak RSS':>10} {'whole run: wall, CPU':>22}"
    )
    for name, runs in results.items():
        figures[name] = each = {key: [run[key] for run in runs] for key in runs[0]}
        top1 = f"{statistics.median(each['val_top1']):5.1f} ({listed(each['val_top1'], '.1f')})"
        print(
            f"  {name:11} {summarise(each['samples_per_s']):>24} {summarise(each['samples_per_cpu_s']):>24}  "
            f"{top1:27}{statistics.median(each['peak_rss_mib']):6.0f} MiB "
            f"{statistics.median(each['run_s']):9.1f} s, {statistics.median(each['run_cpu_s']):5.1f} s"
        )
    outside = {
        name: statistics.median(run["run_s"] - sum(run["epoch_s"]) for run in runs) for name, runs in results.items()
    }
    print(
        "  whole run outside train_one_epoch (start-up, validation, checkpoints; wall): "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in outside.items())
    )
    if "torchvision" in results:
        for clock, key in (("wall", "samples_per_s"), ("CPU", "samples_per_cpu_s")):
            pairs = zip(results["rendered"], results["torchvision"], strict=True)
            ratios = [rendered[key] / reference[key] for rendered, reference in pairs]
            figures[f"ratio_{clock.lower()}"] = ratios
            print(
                f"  rendered / torchvision samples/s ({clock}): {statistics.median(ratios):.3f} "
                f"(per repeat: {listed(ratios, '.3f')})"
            )
        print(f"  torchvision's references: {revision(args.torchvision_references)}")
    return figures


def listed(values: list[float], spec: str) -> str:
    return ", ".join(format(value, spec) for value in values)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--torchvision-references",
        type=Path,
        default=None,
        help="a checkout of pytorch/vision, or its references/classification folder (train.py and its modules)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run of the rendered side only, seconds")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="modern", help="plain: the base settings only")
    parser.add_argument("--model", default="resnet18", help="a torchvision classification model, from scratch")
    parser.add_argument("--train-images", type=int, default=640, help="training pictures (a multiple of 10)")
    parser.add_argument("--val-images", type=int, default=320, help="validation pictures (a multiple of 10)")
    parser.add_argument("--image-px", type=int, default=40, help="the pictures' side")
    parser.add_argument("--crop-px", type=int, default=32, help="the side of training and validation crops")
    parser.add_argument("--resize-px", type=int, default=36, help="validation: the shorter side resized to this")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes, on both sides")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_images, args.val_images, args.image_px, args.crop_px, args.resize_px = 80, 40, 24, 16, 20
        args.epochs, args.batch_size, args.workers, args.repeats = 2, 16, 0, 1
    if args.torchvision_references is None and not args.quick:
        parser.error("--torchvision-references PATH (a checkout of pytorch/vision) is needed, or --quick")
    if args.torchvision_references is not None:
        args.torchvision_references = reference_folder(args.torchvision_references, parser)
    if args.train_images % args.batch_size:
        parser.error("--train-images must be a multiple of --batch-size (the rendered loader drops a partial batch)")
    return args


def reference_folder(path: Path, parser: argparse.ArgumentParser) -> Path:
    """The folder of torchvision's classification train.py: ``path``'s references/classification, or ``path``."""
    for folder in (path / "references" / "classification", path):
        if (folder / "train.py").is_file() and (folder / "presets.py").is_file():
            return folder.resolve()
    parser.error(f"--torchvision-references {path}: no references/classification/train.py there")
    raise AssertionError  # parser.error exits


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        rendered_worker(Path(argv[1]), argv[2:])
        return
    if argv[:1] == ["--torchvision-worker"]:
        torchvision_worker(Path(argv[1]), argv[2:])
        return
    args = parse_args(argv)
    timeout = 600 + args.epochs * (args.train_images + args.val_images) / 5  # 5 samples/s would be far too slow
    with tempfile.TemporaryDirectory(prefix="recipe-bench-") as scratch:
        workdir = Path(scratch)
        project = render_project(workdir, PACKAGE, ANSWERS)
        plan_ = plan(args, config_keys(project.path))
        root = write_digit_folders(workdir / "digits", args.train_images, args.val_images, args.image_px)
        results: dict[str, list[dict[str, Any]]] = {"rendered": []}
        if args.torchvision_references is not None:
            results["torchvision"] = []
        for repeat in range(args.repeats):
            order = list(results) if repeat % 2 == 0 else list(reversed(results))
            for name in order:
                output = workdir / f"run-{name}-{repeat}"
                if name == "rendered":
                    figures = run_rendered(project.path, rendered_overrides(plan_, root, output), args, timeout)
                else:
                    arguments = torchvision_arguments(plan_, root, output, args)
                    figures = run_torchvision(args.torchvision_references, arguments, args, timeout)
                results[name].append(figures)
                print(
                    f"repeat {repeat + 1}, {name}: {figures['samples_per_s']:.1f} samples/s, val top-1 "
                    f"{figures['val_top1']:.1f}%, peak RSS {figures['peak_rss_mib']:.0f} MiB, {figures['run_s']:.0f}s",
                    flush=True,
                )
        figures = report(results, plan_, args)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
