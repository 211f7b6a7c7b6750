"""Tokens per second and validation loss of the rendered language model against nanoGPT's train.py, on CPU.

    python benchmarks/lm_bench.py --nanogpt PATH     # side by side, PATH a checkout of karpathy/nanoGPT
    python benchmarks/lm_bench.py --quick            # seconds, without nanoGPT: checks that the benchmark runs

Both train the same GPT (layers, heads, width, block size, biases, tied embeddings, no dropout) on the same
byte-level text: the rendered project tokenises it and splits it into training and validation text (its
``data.val_fraction``, chunks drawn from the seed), and nanoGPT reads those very tokens, written as its
``train.bin``/``val.bin`` with a ``meta.pkl`` of vocabulary 256. The same batch, optimiser (AdamW, the same
betas and weight decay, a constant learning rate, no gradient clipping) and number of optimiser steps; no
gradient accumulation, float32, no ``torch.compile``, the same thread count (``OMP_NUM_THREADS``), each run
a fresh process, the contenders interleaved over the repeats (the order alternates).

Figures, medians over the repeats:

- tokens per second of the training steps of the second half of the run (the first half warms up; the
  validations fall outside): the rendered loop's ``train_one_epoch`` timed (``harness.timed_fit``) over
  the second of two epochs, nanoGPT's per-iteration times over the same steps;
- the validation loss (nats per token) after the last step: the rendered project's on ``--val-batches``
  batches of its validation windows, nanoGPT's ``estimate_loss`` on as many random batches of the same text.

Windows differ in how they are drawn (the rendered project's are cut without overlap and drawn without
replacement each epoch, nanoGPT's start at random offsets), so the losses agree within noise, not exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import render_project, timed_fit

PACKAGE = "lm_bench_project"
# The rendered project's answers: no schedule (nanoGPT's decay_lr=False), no loggers (nanoGPT's wandb off).
ANSWERS = {"task": "language_model", "scheduler": "none", "loggers": [], "device": "cpu"}


def model_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd, "block_size": args.block_size}


def rendered_overrides(args: argparse.Namespace, text: Path, workdir: Path, output: Path) -> list[str]:
    """The rendered run: two epochs of half the steps each (the second is timed), validated at the end."""
    windows = args.steps // 2 * args.batch_size
    return [
        "data.dataset=text",
        f"data.path={text}",
        f"data.cache_dir={workdir / 'tokens'}",
        f"data.windows_per_epoch={windows}",
        f"data.batch_size={args.batch_size}",
        *(f"model.{key}={value}" for key, value in model_settings(args).items()),
        "model.dropout=0.0",
        f"optim.lr={args.lr}",
        f"optim.weight_decay={args.weight_decay}",
        f"optim.betas=[0.9,{args.beta2}]",
        f"val.batches={args.val_batches}",
        "epochs=2",
        "log.progress_bar=false",
        f"output_dir={output}",
    ]


def nanogpt_arguments(args: argparse.Namespace, data_dir: Path, output: Path) -> list[str]:
    """nanoGPT's train.py, configured as the rendered run: evaluated at step 0 and after the last step."""
    settings = {
        **model_settings(args),
        "dataset": str(data_dir),  # os.path.join("data", an absolute path) is that path
        "out_dir": str(output),
        "device": "cpu",
        "dtype": "float32",
        "compile": False,
        "dropout": 0.0,
        "bias": True,
        "batch_size": args.batch_size,
        "gradient_accumulation_steps": 1,
        "max_iters": args.steps,
        "eval_interval": args.steps,
        "eval_iters": args.val_batches,
        "log_interval": 1,
        "learning_rate": args.lr,
        "decay_lr": False,
        "weight_decay": args.weight_decay,
        "beta2": args.beta2,
        "grad_clip": 0.0,
        "always_save_checkpoint": False,
    }
    return [f"--{key}={value}" for key, value in settings.items()]


def token_files(project: Any, text: Path, workdir: Path, args: argparse.Namespace) -> Path:
    """Tokenise ``text`` as the rendered project does and write its split for nanoGPT; nanoGPT's data folder."""
    cfg = project.config.load_config(None, rendered_overrides(args, text, workdir, workdir / "unused"))
    splits = project.data.build_splits(cfg.data, cfg.seed, args.block_size)
    folder = workdir / "nanogpt-data"
    folder.mkdir(exist_ok=True)
    for split, windows in (("train", splits.train), ("val", splits.val.dataset)):
        np.asarray(windows.tokens, dtype=np.uint16).tofile(folder / f"{split}.bin")
    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": splits.info.vocab_size}))
    return folder


def run_rendered(project_dir: Path, overrides: list[str], threads: int, timeout: float) -> dict[str, float]:
    """The rendered run in a fresh process (this script's --worker mode): its tokens/s and final val_loss."""
    command = [sys.executable, __file__, "--worker", str(project_dir), *overrides]
    result = subprocess.run(command, capture_output=True, text=True, env=environment(threads), timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"the rendered run failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def worker(project_dir: Path, overrides: list[str]) -> None:
    """Train the rendered project in this process, timing its second epoch; print the figures as JSON."""
    sys.path.insert(0, str(project_dir / "src"))
    from harness import RenderedProject

    project = RenderedProject(project_dir, PACKAGE)
    times = timed_fit(project, overrides)
    cfg = project.config.load_config(None, overrides)
    summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    tokens = times.steps[-1] * cfg.data.batch_size * cfg.model.block_size
    figures = {"tokens_per_s": tokens / times.seconds[-1], "val_loss": summary["final_metrics"]["val_loss"]}
    print(json.dumps(figures))


ITERATION = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", re.MULTILINE)
EVALUATION = re.compile(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)", re.MULTILINE)


def run_nanogpt(nanogpt: Path, arguments: list[str], args: argparse.Namespace, timeout: float) -> dict[str, float]:
    """nanoGPT's train.py in a fresh process, from its checkout (configurator.py is read from there)."""
    command = [sys.executable, "train.py", *arguments]
    result = subprocess.run(
        command, cwd=nanogpt, capture_output=True, text=True, env=environment(args.threads), timeout=timeout
    )
    if result.returncode != 0:
        raise SystemExit(f"nanoGPT's train.py failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return parse_nanogpt(result.stdout, args)


def parse_nanogpt(output: str, args: argparse.Namespace) -> dict[str, float]:
    """Tokens/s over the iterations of the second half (as the rendered run's second epoch), and the val loss
    of the evaluation after the last step."""
    times = {int(step): float(ms) / 1000 for step, ms in ITERATION.findall(output)}
    timed = [times[step] for step in range(args.steps // 2, args.steps) if step in times]
    losses = {int(step): float(loss) for step, loss in EVALUATION.findall(output)}
    if not timed or args.steps not in losses:
        raise SystemExit(f"nanoGPT's output lacks its iteration times or its step-{args.steps} evaluation:\n{output}")
    return {"tokens_per_s": len(timed) * args.batch_size * args.block_size / sum(timed), "val_loss": losses[args.steps]}


def environment(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).parent)}


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace, text: Path) -> dict[str, Any]:
    """Print the medians (and each repeat's ratio against nanoGPT); return them for --json."""
    name = args.text or "the standard library"
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"text: {name} ({text.stat().st_size:,} bytes), {args.steps} steps of {args.batch_size} x {args.block_size} "
        f"tokens, GPT {args.n_layer} layers x {args.n_embd} wide, {args.threads} thread(s), {args.repeats} repeat(s)"
    )
    figures: dict[str, Any] = {}
    for name, runs in results.items():
        rates, losses = [run["tokens_per_s"] for run in runs], [run["val_loss"] for run in runs]
        figures[name] = {"tokens_per_s": rates, "val_loss": losses}
        spread = f"({min(rates) / statistics.median(rates) - 1:+.1%}/{max(rates) / statistics.median(rates) - 1:+.1%})"
        print(
            f"  {name:9} {statistics.median(rates):9.0f} tokens/s {spread:16}"
            f"  val_loss after step {args.steps}: {statistics.median(losses):.4f} ({listed(losses, '.4f')})"
        )
    if "nanoGPT" in results:
        pairs = list(zip(results["rendered"], results["nanoGPT"], strict=True))
        ratios = [rendered["tokens_per_s"] / nanogpt["tokens_per_s"] for rendered, nanogpt in pairs]
        gaps = [rendered["val_loss"] - nanogpt["val_loss"] for rendered, nanogpt in pairs]
        figures["ratio"], figures["val_loss_gap"] = ratios, gaps
        print(f"  rendered / nanoGPT tokens/s: {statistics.median(ratios):.3f} (per repeat: {listed(ratios, '.3f')})")
        print(f"  val_loss rendered - nanoGPT: {statistics.median(gaps):+.4f} (per repeat: {listed(gaps, '+.4f')})")
    return figures


def listed(values: list[float], spec: str) -> str:
    return ", ".join(format(value, spec) for value in values)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, default=None, help="a checkout of karpathy/nanoGPT (its train.py)")
    parser.add_argument("--quick", action="store_true", help="a few steps on one small file, the rendered side only")
    parser.add_argument("--text", type=Path, default=None, help="the text (default: this Python's standard library)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--beta2", type=float, default=0.999)
    parser.add_argument("--val-batches", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.n_layer, args.n_embd, args.block_size, args.val_batches, args.repeats = 8, 1, 32, 32, 2, 1
        args.text = args.text or Path(argparse.__file__)
    if args.nanogpt is None and not args.quick:
        parser.error("--nanogpt PATH (a checkout of karpathy/nanoGPT) is needed, or --quick")
    if args.nanogpt is not None and not (args.nanogpt / "train.py").is_file():
        parser.error(f"--nanogpt {args.nanogpt}: no train.py there (a checkout of karpathy/nanoGPT?)")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(Path(argv[1]), argv[2:])
        return
    args = parse_args(argv)
    timeout = 600 + 2 * args.steps  # a hung run fails the benchmark rather than stalling it
    with tempfile.TemporaryDirectory(prefix="lm-bench-") as scratch:
        workdir = Path(scratch)
        project = render_project(workdir, PACKAGE, ANSWERS)
        text = args.text
        if text is None:  # the standard library as one file: what the rendered stdlib corpus reads
            text = workdir / "stdlib.txt"
            text.write_bytes(b"".join(content for _, content in project.data.stdlib_documents(None)))
        data_dir = token_files(project, text, workdir, args)
        results: dict[str, list[dict[str, float]]] = {"rendered": []} | ({"nanoGPT": []} if args.nanogpt else {})
        for repeat in range(args.repeats):
            order = list(results) if repeat % 2 == 0 else list(reversed(results))
            for name in order:
                output = workdir / f"run-{name}-{repeat}"
                started = time.perf_counter()
                if name == "rendered":
                    overrides = rendered_overrides(args, text, workdir, output)
                    figures = run_rendered(project.path, overrides, args.threads, timeout)
                else:
                    arguments = nanogpt_arguments(args, data_dir, output)
                    figures = run_nanogpt(args.nanogpt.resolve(), arguments, args, timeout)
                results[name].append(figures)
                rate, loss, seconds = figures["tokens_per_s"], figures["val_loss"], time.perf_counter() - started
                print(f"repeat {repeat + 1}, {name}: {rate:.0f} tokens/s, val_loss {loss:.4f}, {seconds:.0f}s")
        figures = report(results, args, text)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
