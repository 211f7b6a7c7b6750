"""Step time of DDP against FSDP: two CPU ranks (gloo), the same model, data and global batch.

Renders one project per ``parallelism`` answer (``ddp``, ``fsdp``; ``device=cpu``, other answers at
their defaults) and launches each with ``torchrun --standalone --nproc_per_node=2``. In every rank the
rendered ``train_one_epoch`` is wrapped and timed, so setup, validation and checkpoints fall outside the
timed window, as in ``loop_bench.py``. Launches alternate between the contenders; a step time is rank 0's
epoch time over its optimiser steps, median over the timed epochs of every repeat (each launch trains one
warm-up epoch first). Beside it: the parameter and optimiser-state bytes each rank holds between steps
(the whole model under DDP, about half of it under FSDP) and each rank's peak resident memory.

On a CPU this measures the communication pattern's cost (DDP: one all-reduce of the gradients per step;
FSDP: an all-gather of each block's parameters in the forward and again in the backward, a
reduce-scatter of its gradients) more than the memory FSDP exists to save, which counts on a GPU.

    python benchmarks/parallel_bench.py                       # mlp of width 512, 5 repeats
    python benchmarks/parallel_bench.py --width 1024 --repeats 9
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import render_project, summarise

# Run by torchrun in each rank: time every train_one_epoch, measure what the rank holds, write rank 0's.
RANK_SCRIPT = """
import importlib, json, os, resource, sys, time
import torch
package, out, threads, *overrides = sys.argv[1:]
torch.set_num_threads(int(threads))
train = importlib.import_module(package + ".train")
config = importlib.import_module(package + ".config")
original, epochs, held = train.train_one_epoch, [], {}

def local_bytes(tensors):
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

def timed(state, *args, **kwargs):
    before, start = state.progress.global_step, time.perf_counter()
    result = original(state, *args, **kwargs)
    epochs.append((state.progress.global_step - before, time.perf_counter() - start))
    held["parameters"] = local_bytes(list(state.model.parameters()))
    held["optimizer"] = local_bytes([v for s in state.optimizer.state.values() for v in s.values()])
    return result

train.train_one_epoch = timed
train.fit(config.load_config(None, overrides))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
rank = int(os.environ["RANK"])
with open(f"{out}.rank{rank}", "w") as file:
    json.dump({"epochs": epochs, "held": held, "peak_rss": peak}, file)
"""

CONTENDERS = {
    "ddp": ("ddp", []),
    "fsdp": ("fsdp", []),
    "fsdp, reshard_after_forward=false": ("fsdp", ["fsdp.reshard_after_forward=false"]),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mlp", help="model.arch (mlp, cnn)")
    parser.add_argument("--width", type=int, default=512, help="model.width")
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per launch, after one warm-up epoch")
    parser.add_argument("--repeats", type=int, default=5, help="launches per contender, interleaved")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (each rank gets half)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every rank")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.steps, args.epochs, args.repeats = 64, 6, 1, 1
    return args


def launch(project, rank_script: Path, out: Path, overrides: list[str], threads: int) -> list[dict]:
    """One torchrun launch of two ranks; each rank's figures."""
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
        *(str(rank_script), project.package, str(out), str(threads), *overrides),
    ]
    env = os.environ | {"PYTHONPATH": str(project.path / "src"), "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, cwd=project.path, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{project.package}: torchrun failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return [json.loads(Path(f"{out}.rank{rank}").read_text()) for rank in range(2)]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    size = round(args.steps * args.batch_size / 0.9) + 1  # 90 % for training
    common = [
        "device=cpu",
        f"epochs={1 + args.epochs}",
        "data.dataset=synthetic",
        f"data.synthetic_size={size}",
        "data.val_fraction=0.1",
        f"data.batch_size={args.batch_size}",
        "data.num_workers=0",
        f"model.arch={args.arch}",
        f"model.width={args.width}",
        "log.progress_bar=false",
    ]
    figures: dict[str, dict] = {name: {"step_ms": [], "held": {}, "peak_rss": []} for name in CONTENDERS}
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        rank_script = work / "rank.py"
        rank_script.write_text(RANK_SCRIPT)
        projects = {
            answer: render_project(work, f"bench_{answer}", {"device": "cpu", "parallelism": answer})
            for answer in ("ddp", "fsdp")
        }
        for repeat in range(args.repeats):
            for index, (name, (answer, extra)) in enumerate(CONTENDERS.items()):
                out = work / f"run-{repeat}-{index}"
                ranks = launch(projects[answer], rank_script, out, [*common, *extra, f"output_dir={out}"], args.threads)
                steps_and_seconds = ranks[0]["epochs"][1:]  # after the warm-up epoch
                figures[name]["step_ms"] += [1000 * seconds / steps for steps, seconds in steps_and_seconds]
                figures[name]["held"] = ranks[0]["held"]
                figures[name]["peak_rss"] += [rank["peak_rss"] for rank in ranks]

    import torch

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; "
        f"python {platform.python_version()}, torch {torch.__version__}; 2 ranks (gloo), torch threads {args.threads}"
    )
    print(
        f"model.arch={args.arch}, model.width={args.width}; global batch {args.batch_size}, {args.steps} steps/epoch, "
        f"{args.repeats} launch(es) per contender, 1 warm-up + {args.epochs} timed epoch(s) each"
    )
    ddp_ms = statistics.median(figures["ddp"]["step_ms"])
    header = f"{'step ms (median, spread)':>26s}  {'vs ddp':>7s}  {'params+optim per rank':>22s}  {'peak RSS':>9s}"
    print(f"{'':36s}{header}")
    for name, figure in figures.items():
        median = statistics.median(figure["step_ms"])
        held_mb = (figure["held"]["parameters"] + figure["held"]["optimizer"]) / 2**20
        rss_mb = max(figure["peak_rss"]) / 2**20
        held = f"{held_mb:19.2f} MB"
        print(f"{name:36s}{summarise(figure['step_ms']):>26s}  {median / ddp_ms:6.2f}x  {held}  {rss_mb:6.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
