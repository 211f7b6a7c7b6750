"""FSDP on CPU: 2 gloo ranks under torchrun, sharded checkpoint directories, exact resumes, model.pt.

A checkpoint of an FSDP project is a directory (checkpoints/saves/step-N) that the links ``last``,
``best`` and ``step-N`` point at: DCP shards of the model and optimiser tensors, state.pt (the rest)
and model.pt (the full model). The tests read the shards back without a process group through
``dcp_to_torch_save``. One render serves every test; it also has image folders, pretrained weights and
sweeps, so that the features of other questions are tested with FSDP: debug runs, a torchvision model,
evaluate, predict and ``pretrained.path`` on a checkpoint directory, a sweep's in-process trials.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timing
import torch
from imagedata import write_image_folder
from rendering import (
    SMOKE_OVERRIDES,
    check,
    layered,
    project_answers,
    project_env,
    render,
    run_module,
    run_package_code,
    torchrun,
    train,
)
from test_debug import NAN_IN_BACKWARD_RUN
from test_loop import assert_reads_bounded, counts_per_rank
from test_preemption import DDP_EPOCHS, assert_same_training_state, wait_for_line
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

# 85 synthetic samples: 68 to train (34 per rank, 4 steps of 8 each), 17 to validate: 9 on rank 0 and
# 8 on rank 1, so rank 0 runs one validation batch more and rank 1 must join its forward.
UNEVEN = ("data.dataset=synthetic", "data.synthetic_size=85", "data.batch_size=16", "log.progress_bar=false")
# About 50 steps per rank and epoch, as in test_preemption: a SIGTERM after epoch 1's line lands mid-epoch 2.
LONG_EPOCHS = DDP_EPOCHS


ANSWERS = {"parallelism": "fsdp", "device": "cpu", "dataset": "imagefolder", "pretrained": True, "sweeps": True}


@pytest.fixture(scope="module")
def fsdp_project(template_dir, tmp_path_factory) -> Path:
    return render(template_dir, tmp_path_factory.mktemp("fsdp") / "fsdp-project", ANSWERS)


def torchrun_command(project: Path, *args: str) -> list[str]:
    """torchrun with 2 CPU ranks; ``args`` start with ``-m <module>`` or a script path."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def run_torchrun(project: Path, *args: str) -> subprocess.CompletedProcess:
    return timing.run(torchrun_command(project, *layered(args)), 300, cwd=project, env=project_env(project))


def checkpoint_state(checkpoint: Path, scratch: Path) -> dict:
    """Everything a checkpoint directory holds: state.pt, with the full tensors of its shards merged in."""
    scratch.mkdir(parents=True, exist_ok=True)
    dcp_to_torch_save(checkpoint, scratch / "shards.pt")
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    shards = torch.load(scratch / "shards.pt", weights_only=True)
    state["model"], state["optimizer"]["state"] = shards["model"], shards["optimizer"]["state"]
    return state


# Restores the last checkpoint into a freshly sharded model on both ranks and compares its outputs with
# the model that evaluate and predict rebuild from the checkpoint directory alone (its model.pt), on rank 0.
SHARDED_AGAINST_MODEL_PT = """
import importlib, os, sys
from pathlib import Path
import torch
pkg, last = sys.argv[1], Path(sys.argv[2])
train = importlib.import_module(pkg + ".train")
distributed = importlib.import_module(pkg + ".distributed")
checkpoint = importlib.import_module(pkg + ".checkpoint")
cfg = importlib.import_module(pkg + ".config").load_config(None, sys.argv[3:])
device = distributed.setup(cfg)
info = importlib.import_module(pkg + ".data").DataInfo.from_dict(checkpoint.load_checkpoint(last)["data"])
state = train.build_state(cfg, device, 4, info)
train.restore(state, cfg, last)
inputs = torch.randn(6, *info.input_shape, generator=torch.Generator().manual_seed(0))
state.model.eval()
with torch.no_grad():
    sharded = state.model(inputs)
if distributed.is_main_process():
    for path in (last, last / "model.pt"):
        trained = checkpoint.load_trained_model(path, device="cpu")
        assert not trained.model.training
        with torch.no_grad():
            bare = trained.model(inputs)
        assert torch.equal(bare, sharded), (bare - sharded).abs().max()
    print("outputs equal")
del state, sharded  # freed by teardown's collection, as fit's are
distributed.teardown()
"""


def test_fsdp_trains_on_two_ranks_writes_checkpoint_directories_resumes_and_model_pt_is_the_sharded_model(
    fsdp_project, tmp_path
):
    out = tmp_path / "run"
    result = torchrun(fsdp_project, *UNEVEN, "epochs=2", f"output_dir={out}")

    assert result.stdout.count("epoch 2/2 |") == 1, result.stdout  # rank 0 alone prints
    assert "Traceback" not in result.stderr and "UserWarning" not in result.stderr, result.stderr[-4000:]
    checkpoints = out / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["best", "last", "saves"]
    assert (checkpoints / "last").readlink() == Path("saves/step-000000008")  # relative: the run can move
    # Only what best and last point to is kept (epoch 1's step, unless it is the best).
    in_use = sorted({(checkpoints / name).readlink().name for name in ("best", "last")})
    assert sorted(path.name for path in (checkpoints / "saves").iterdir()) == in_use
    last = checkpoints / "last"
    assert sorted(path.name for path in last.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "model.pt",
        "state.pt",
    ]
    state = torch.load(last / "state.pt", weights_only=True)
    assert state["progress"]["global_step"] == 8 and len(state["rng"]) == 2  # every rank's random state
    # model.pt: the full model with plain keys, for the bare model.
    model = torch.load(last / "model.pt", weights_only=True)
    assert not any(key.startswith(("module.", "_orig_mod.", "_fsdp")) for key in model)

    resumed = torchrun(fsdp_project, *UNEVEN, "epochs=3", "resume=auto", f"output_dir={out}")
    assert f"resumed from {last} at step 8 (2 epochs completed)" in resumed.stdout
    assert json.loads((out / "summary.json").read_text())["epochs_completed"] == 3

    script = tmp_path / "compare.py"
    script.write_text(SHARDED_AGAINST_MODEL_PT)
    package = project_answers(fsdp_project)["package_name"]
    result = run_torchrun(fsdp_project, str(script), package, str(last), *UNEVEN, f"output_dir={out}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "outputs equal" in result.stdout


# Out of the default run: on 2026-11-24, one of five full-suite runs saw rank 1 of the resumed run abort
# ("terminate called without an active exception", no Python traceback); eight resumes of the same
# checkpoint on a quiet machine and four runs of this test passed. A fresh-clone CI run saw the same abort
# at the exit of the compare script above: gloo work objects freed at interpreter exit (PyTorch PR
# #179291), which distributed.teardown now prevents by collecting the run's cycles first. This test
# returns to the default run once runs have shown the abort gone.
@pytest.mark.slow
def test_sigterm_to_the_launcher_mid_epoch_then_resume_auto_matches_an_uninterrupted_run_bit_for_bit(
    fsdp_project, tmp_path
):
    package = project_answers(fsdp_project)["package_name"]
    straight = tmp_path / "straight"
    result = run_torchrun(fsdp_project, "-m", f"{package}.train", *LONG_EPOCHS, f"output_dir={straight}")
    assert result.returncode == 0, result.stderr[-4000:]

    # Through scripts/train_single_node.sh (torchrun by way of preemption.py, 2 CPU ranks), as a user launches.
    out = tmp_path / "run"
    launcher = subprocess.Popen(
        [str(fsdp_project / "scripts" / "train_single_node.sh"), *LONG_EPOCHS, f"output_dir={out}"],
        cwd=fsdp_project,
        env=project_env(fsdp_project)
        | {"PYTHONUNBUFFERED": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_line(launcher, "epoch 1/2 |")
    launcher.send_signal(signal.SIGTERM)  # as a scheduler does: torchrun passes it on to every rank
    stdout, stderr = timing.communicate(launcher, 300)
    assert launcher.returncode == 75, stdout + stderr[-4000:]  # preempted: saved, resumable
    assert re.search(r"received SIGTERM on ranks? [\d, ]+: saved", stdout), stdout + stderr[-4000:]
    assert "exit status 75 (preempted)" in stderr and "its workers saved last at step" in stderr, stderr[-4000:]
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr, stderr[-4000:]
    stopped = torch.load(out / "checkpoints/last/state.pt", weights_only=True)["progress"]
    assert stopped["epoch"] == 1 and stopped["batch_in_epoch"] >= 1
    assert not (out / "summary.json").exists()

    resumed = run_torchrun(fsdp_project, "-m", f"{package}.train", *LONG_EPOCHS, f"output_dir={out}", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"at step {stopped['global_step']} (epoch 2, {stopped['batch_in_epoch']} batches in)" in resumed.stdout
    expected = checkpoint_state(straight / "checkpoints/last", tmp_path / "a")
    assert_same_training_state(expected, checkpoint_state(out / "checkpoints/last", tmp_path / "b"))
    assert expected["model"].keys() == torch.load(out / "checkpoints/last/model.pt", weights_only=True).keys()


# Rank 0 is killed with SIGKILL in its second save, after every rank has written its shards and before
# the directory is published: the moment a half-written checkpoint would be most likely to be taken.
KILLED_IN_SECOND_SAVE = """
import importlib, os, signal, sys
package = sys.argv.pop(1)
checkpoint = importlib.import_module(package + ".checkpoint")
publish, saves = checkpoint.publish_checkpoint_dir, []
def publish_or_die(*args, **kwargs):
    saves.append(1)
    if len(saves) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return publish(*args, **kwargs)
checkpoint.publish_checkpoint_dir = publish_or_die
importlib.import_module(package + ".train").main(sys.argv[1:])
"""


def test_a_kill_9_during_a_save_leaves_the_previous_checkpoint_as_last_and_it_resumes(fsdp_project, tmp_path):
    package = project_answers(fsdp_project)["package_name"]
    script = tmp_path / "killed.py"
    script.write_text(KILLED_IN_SECOND_SAVE)
    out = tmp_path / "run"
    overrides = (*UNEVEN, "epochs=3", f"output_dir={out}")
    killed = run_torchrun(fsdp_project, str(script), package, *overrides)
    assert killed.returncode != 0
    checkpoints = out / "checkpoints"
    # The second save's shards are all on disk, under a temporary name that nothing points at.
    assert [path.name for path in (checkpoints / "saves").glob(".*.tmp")] == [".step-000000008.tmp"]
    assert (checkpoints / "last").resolve().name == "step-000000004"
    assert torch.load(checkpoints / "last/state.pt", weights_only=True)["progress"]["epoch"] == 1

    resumed = run_torchrun(fsdp_project, "-m", f"{package}.train", *overrides, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout and "at step 4 (1 epochs completed)" in resumed.stdout
    assert not list((checkpoints / "saves").glob(".*.tmp"))  # the next save removed the leftover
    assert json.loads((out / "summary.json").read_text())["epochs_completed"] == 3


# In one process (a world of one), main() four times: the disk fills after the first checkpoint (torch's
# writer, which DCP uses too, then fails as on a full disk: a RuntimeError); a resume from a truncated
# shard, from a missing one, and from a single file. Each prints main's exit message.
CHECKPOINT_FAULTS = """
import shutil, sys
from pathlib import Path
import torch
train = importlib.import_module(pkg + ".train")
checkpoint = importlib.import_module(pkg + ".checkpoint")
out, overrides = Path(sys.argv[1]), sys.argv[2:]
save, publish, full = torch.save, checkpoint.publish_checkpoint_dir, []


def publish_then_fill_the_disk(*args, **kwargs):
    full.append(True)
    return publish(*args, **kwargs)


def full_disk(obj, file, *args, **kwargs):
    if not full:
        return save(obj, file, *args, **kwargs)
    file.write(b"PK" + bytes(600))
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def run(*extra):
    try:
        train.main([*overrides, f"output_dir={out}", *extra])
    except SystemExit as exit:
        print(exit.code, flush=True)


torch.save, checkpoint.publish_checkpoint_dir = full_disk, publish_then_fill_the_disk
run("epochs=2")
torch.save, checkpoint.publish_checkpoint_dir = save, publish
last = out / "checkpoints" / "last"
print(sorted(path.name for path in last.parent.joinpath("saves").iterdir()), last.resolve().name, flush=True)
shutil.copy(last / "model.pt", out.parent / "last.pt")
shard = last / "__0_0.distcp"
shard.write_bytes(shard.read_bytes()[:1000])
run("epochs=2", "resume=auto")
shard.unlink()
run("epochs=2", "resume=auto")
run("epochs=2", f"resume={out.parent / 'last.pt'}")
"""


def test_a_full_disk_and_damaged_or_foreign_checkpoints_end_in_one_line_each(fsdp_project, tmp_path):
    """DCP raises CheckpointException, a BaseException that ``except Exception`` would let through."""
    out = tmp_path / "run"
    result = run_package_code(fsdp_project, CHECKPOINT_FAULTS, str(out), *UNEVEN)
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    full, saves, truncated, missing, single_file = result.stdout.strip().splitlines()[-5:]
    last = out / "checkpoints" / "last"
    assert re.fullmatch(
        rf"error: cannot write checkpoint {out}/checkpoints/saves/\.step-\d+\.tmp \(RuntimeError: unexpected pos "
        rf"704 vs 598; [\d.]+ MiB free there: is the disk full\?\); {last} was left as it was",
        full,
    ), full
    # The failed save's temporary directory is gone; last is the first epoch's checkpoint.
    assert re.fullmatch(r"\['(step-\d+)'\] \1", saves), saves
    damaged = f"error: checkpoint {last} is damaged or does not fit this run"
    assert truncated.startswith(f"{damaged} (RuntimeError: PytorchStreamReader failed reading zip archive"), truncated
    assert missing == f"{damaged} (FileNotFoundError: [Errno 2] No such file or directory: '{last}/__0_0.distcp')"
    assert single_file.startswith(
        f"error: checkpoint {tmp_path / 'last.pt'} is a file, but a checkpoint of this FSDP project is a directory"
    ), single_file


STEPPED = (*SMOKE_OVERRIDES, "epochs=3", "deterministic=true", "checkpoint.every_n_steps=4", "log.every_n_steps=3")


def test_step_checkpoint_links_keep_the_newest_and_each_resumes_bit_for_bit(fsdp_project, tmp_path):
    """One process: a world of one runs the same sharding and checkpoint code."""
    straight = tmp_path / "straight"
    train(fsdp_project, *STEPPED, "checkpoint.keep_last=2", f"output_dir={straight}")
    checkpoints = straight / "checkpoints"
    assert sorted(path.name for path in checkpoints.glob("step-*")) == ["step-000000012", "step-000000016"]
    in_use = {path.resolve() for path in checkpoints.iterdir() if path.is_symlink()}
    assert {path.resolve() for path in (checkpoints / "saves").iterdir()} == in_use  # nothing else kept
    assert (checkpoints / "best").is_dir() and (checkpoints / "last").resolve().name == "step-000000018"

    resumed = tmp_path / "from-12"
    result = train(fsdp_project, *STEPPED, f"resume={checkpoints / 'step-000000012'}", f"output_dir={resumed}")
    assert f"resumed from {checkpoints / 'step-000000012'} at step 12" in result.stdout
    expected = checkpoint_state(checkpoints / "last", tmp_path / "a")
    assert_same_training_state(expected, checkpoint_state(resumed / "checkpoints/last", tmp_path / "b"))


def test_activation_checkpointing_trains_the_same_weights_and_batchnorm_statistics(fsdp_project, tmp_path):
    """The recomputation in the backward pass gives the same gradients and leaves running statistics alone.

    In a world of one: the recomputation wraps each block's forward the same way on any number of ranks.
    """
    overrides = (*UNEVEN, "epochs=1", "deterministic=true")
    for checkpointing in ("false", "true"):
        train(
            fsdp_project,
            *overrides,
            f"fsdp.activation_checkpointing={checkpointing}",
            f"output_dir={tmp_path / checkpointing}",
        )
    plain, recomputed = (
        torch.load(tmp_path / name / "checkpoints/last/model.pt", weights_only=True) for name in ("false", "true")
    )
    assert all(torch.equal(plain[key], recomputed[key]) for key in plain)  # num_batches_tracked included


@pytest.mark.slow
def test_debug_runs_work_on_sharded_ranks(fsdp_project, tmp_path):
    """fast_run writes nothing; overfit_batches with the profiler: a trace per rank; detect_anomaly names the op."""
    fast = train(fsdp_project, *UNEVEN, "debug.fast_run=true", f"output_dir={tmp_path / 'fast'}")  # a world of one
    assert "debug.fast_run passed" in fast.stdout and not (tmp_path / "fast").exists()

    out = tmp_path / "profiled"
    overrides = ("debug.profile=true", "debug.overfit_batches=1", "max_steps=6", f"output_dir={out}")
    profiled = torchrun(fsdp_project, *UNEVEN, *overrides)
    assert "debug.profile: trace written to" in profiled.stdout
    traces = sorted(trace.name.split(".")[0] for trace in (out / "profile").glob("*.pt.trace.json"))
    assert traces == ["rank0", "rank1"]
    assert json.loads((out / "summary.json").read_text())["global_step"] == 6

    anomaly = (*SMOKE_OVERRIDES, "epochs=1", "debug.detect_anomaly=true", f"output_dir={tmp_path / 'anomaly'}")
    result = run_package_code(fsdp_project, NAN_IN_BACKWARD_RUN, *anomaly)  # a world of one
    assert result.returncode != 0
    assert "Function 'SqrtBackward0' returned nan values" in result.stderr, result.stderr[-4000:]


@pytest.mark.slow
def test_a_torchvision_model_trains_sharded_and_its_checkpoint_directory_serves_evaluate_predict_and_pretrained(
    fsdp_project, tmp_path
):
    images = write_image_folder(tmp_path / "pets", per_class=12, size=16)
    data = ("data.dataset=imagefolder", f"data.root={images}", "data.image_size=16", "data.num_workers=0")
    out = tmp_path / "run"
    quick = (*data, "data.batch_size=8", "model.arch=resnet18", "log.progress_bar=false")
    torchrun(fsdp_project, *quick, "epochs=1", f"output_dir={out}")
    best = out / "checkpoints" / "best"
    assert len(list(best.glob("*.distcp"))) == 2

    evaluated = check(run_module(fsdp_project, "evaluate", str(best), "--device=cpu"), "evaluate", fsdp_project)
    assert "samples of the val split" in evaluated.stdout
    assert "note: training chose this checkpoint by its val_accuracy on this split" in evaluated.stdout
    assert json.loads((out / "evaluations" / "best-val" / "evaluation.json").read_text())["samples"] == 7
    pictures = [str(path) for path in sorted((images / "cat").glob("*.png"))[:3]]
    args = (str(best / "model.pt"), *pictures, "--top-k=2", f"--cam={tmp_path / 'cams'}", "--device=cpu")
    predicted = check(run_module(fsdp_project, "predict", *args), "predict", fsdp_project)
    assert len(predicted.stdout.strip().splitlines()) == 3 and len(list((tmp_path / "cams").glob("*.png"))) == 3
    assert predicted.stderr.count("warning: the Grad-CAM map is 1x1 cells for 16x16 pictures") == 1

    tuned = train(fsdp_project, *quick, f"pretrained.path={best}", "max_steps=1", f"output_dir={tmp_path / 'tuned'}")
    assert f"pretrained weights from {best}: loaded 122, missing 0, unexpected 0, skipped 0" in tuned.stdout


def test_a_sweep_trains_its_trials_in_one_process_each_a_world_of_one(fsdp_project, tmp_path):
    sweep_dir = tmp_path / "sweep"
    arguments = ("--trials", "2", "--dir", str(sweep_dir), "optim.lr=1e-3:1e-2", "epochs=1")
    result = check(run_module(fsdp_project, "sweep", *arguments, *SMOKE_OVERRIDES), "sweep", fsdp_project)
    assert "trial 1: " in result.stdout
    for trial in ("trial-0000", "trial-0001"):
        assert (sweep_dir / trial / "checkpoints" / "best" / "model.pt").is_file()


def test_each_fsdp_rank_reads_the_device_and_all_reduces_once_per_window(fsdp_project, tmp_path):
    """As for DDP (test_loop): FSDP's own all-gathers and reduce-scatters run inside torch, not counted here."""
    for counts in counts_per_rank(fsdp_project, tmp_path):
        assert_reads_bounded(counts, 50)
        assert counts["collectives"] == counts["reads"], counts
