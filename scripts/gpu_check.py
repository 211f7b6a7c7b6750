"""Render projects with Copier and train their CUDA paths on this machine's GPUs; print a PASS/FAIL table.

    python scripts/gpu_check.py

Each case in CASES renders one project, trains it for two short epochs on CUDA (with torchrun when the
case asks for processes) and checks that it ran on the GPU: no CPU-fallback warning, a summary, and a
checkpoint whose tensors load onto CUDA without a ``module.`` prefix. Adding a case is one line.
Without a CUDA GPU it prints "no GPU, skipped" and exits 0; otherwise it exits 1 when a case fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from rendering import SMOKE_OVERRIDES, project_answers, project_env, render, snapshot_template  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    answers: dict
    nproc: int = 0  # 0: plain `python -m <package>.train`; N: torchrun with up to N processes, one per GPU
    overrides: tuple[str, ...] = field(default=())


CASES = [
    Case("single GPU", {"device": "cuda"}),
    Case("DataParallel", {"device": "cuda", "parallelism": "dataparallel"}),
    Case("DDP nccl", {"device": "cuda", "parallelism": "ddp"}, nproc=2),
    Case("DDP nccl SyncBatchNorm", {"device": "cuda", "parallelism": "ddp", "sync_batchnorm": True}, nproc=2),
    Case("AMP bf16", {"device": "cuda", "amp": "bf16"}),
    Case("AMP fp16 + clip norm", {"device": "cuda", "amp": "fp16", "grad_clip": "norm"}),
    Case("AMP fp16 + OneCycle + EMA", {"device": "cuda", "amp": "fp16", "scheduler": "onecycle", "ema": True}),
    Case("compile (inductor)", {"device": "cuda", "compile": True}),
    Case("compile + AMP bf16", {"device": "cuda", "compile": True, "amp": "bf16"}),
    Case(
        "DDP nccl + compile + fp16 + accumulation",
        {"device": "cuda", "parallelism": "ddp", "compile": True, "amp": "fp16", "grad_accumulation": True},
        nproc=2,
    ),
]


def run_case(case: Case, template: Path, workdir: Path, gpus: int) -> tuple[bool, str]:
    answers = {"gpu_ids": ",".join(str(index) for index in range(gpus)), **case.answers}
    project = render(template, workdir / "project", answers)
    out = workdir / "run"
    module = f"{project_answers(project)['package_name']}.train"
    launcher = [sys.executable]
    if case.nproc:
        nproc = min(case.nproc, gpus)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [*launcher, "-m", module, *SMOKE_OVERRIDES, "epochs=2", f"output_dir={out}", *case.overrides]
    result = subprocess.run(command, cwd=project, env=project_env(project), capture_output=True, text=True)
    if result.returncode != 0:
        return False, f"exit {result.returncode}: {(result.stderr.strip().splitlines() or ['?'])[-1]}"
    if "warning:" in result.stderr:
        return False, next(line for line in result.stderr.splitlines() if "warning:" in line)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)  # tensors come back where saved
    devices = {tensor.device.type for tensor in state["model"].values()}
    if devices != {"cuda"}:
        return False, f"checkpoint tensors on {sorted(devices)}, expected cuda"
    if any(key.startswith("module.") for key in state["model"]):
        return False, "checkpoint keys carry the module. prefix"
    if any(key.startswith("_orig_mod.") for key in state["model"]):
        return False, "checkpoint keys carry the _orig_mod. prefix of a compiled module"
    summary = json.loads((out / "summary.json").read_text())
    detail = f"{summary['epochs_completed']} epochs, val_accuracy {summary['final_metrics']['val_accuracy']:.3f}"
    if "skipped_steps" in summary:  # fp16: a few skipped steps while the scale settles are normal
        detail += f", {summary['skipped_steps']} of {summary['global_step']} steps skipped by the scaler"
    return True, detail


def main() -> int:
    if not torch.cuda.is_available():
        print("no GPU, skipped: torch.cuda.is_available() is False on this machine")
        return 0
    gpus = torch.cuda.device_count()
    print(f"{gpus} GPU(s): {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        template = snapshot_template(Path(tmp) / "template")
        for index, case in enumerate(CASES):
            started = time.perf_counter()
            try:
                passed, detail = run_case(case, template, Path(tmp) / f"case-{index}", gpus)
            except Exception as err:  # a broken render or unreadable output is a failed case, not a crash
                passed, detail = False, f"{type(err).__name__}: {err}"
            rows.append((case.name, "PASS" if passed else "FAIL", f"{time.perf_counter() - started:.1f}s", detail))
    width = max(len(row[0]) for row in rows)
    for name, verdict, seconds, detail in rows:
        print(f"{name:<{width}}  {verdict}  {seconds:>7}  {detail}")
    return 0 if all(row[1] == "PASS" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
