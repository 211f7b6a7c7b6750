"""Transfer learning: freezing, frozen BatchNorm and gradual unfreezing, proven on short CPU runs.

Each snippet runs the rendered project's own ``fit`` in a subprocess, spying on ``build_optimizer``
to capture the model and optimiser that training uses, and prints its findings as JSON.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from rendering import SMOKE_OVERRIDES, render, run_module, run_project_tests, run_python, train

QUICK = [*SMOKE_OVERRIDES, "deterministic=true"]

SPY = """
import json, sys
import torch
from my_project import train
from my_project.config import load_config

captured = {}
build_optimizer = train.build_optimizer


def spy(model, *args, **kwargs):
    captured["model"] = model
    captured["initial"] = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    captured["optimizer"] = build_optimizer(model, *args, **kwargs)
    return captured["optimizer"]


train.build_optimizer = spy
calibrate_batchnorm = getattr(train, "calibrate_batchnorm", None)


def calibrate_then_capture(model, *args):
    calibrate_batchnorm(model, *args)  # frozen BatchNorm starts from the data's statistics: capture after
    captured["initial"] = {name: tensor.clone() for name, tensor in model.state_dict().items()}


if calibrate_batchnorm is not None:
    train.calibrate_batchnorm = calibrate_then_capture
"""


@pytest.fixture(scope="module")
def frozen_run(template_dir, tmp_path_factory):
    """Freeze block1.* by pattern with freeze_bn, train two epochs, report what moved."""
    root = tmp_path_factory.mktemp("frozen")
    project = render(template_dir, root / "project", {"freezing": "patterns", "freeze_bn": True})
    overrides = [*QUICK, "epochs=2", "freeze.patterns=[block1.*]", f"output_dir={root / 'run'}"]
    code = (
        SPY
        + f"""
train.fit(load_config(None, {overrides!r}))
model, initial, optimizer = captured["model"], captured["initial"], captured["optimizer"]
final = model.state_dict()
in_optimizer = {{id(p) for group in optimizer.param_groups for p in group["params"]}}
params = dict(model.named_parameters())
batchnorms = [name for name, module in model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)]
model.train()
model(torch.randn(4, 1, 8, 8))
print(json.dumps({{
    "unchanged": sorted(name for name in final if torch.equal(final[name], initial[name])),
    "requires_grad": {{name: p.requires_grad for name, p in params.items()}},
    "in_optimizer": {{name: id(p) in in_optimizer for name, p in params.items()}},
    "numel": {{name: p.numel() for name, p in params.items()}},
    "batchnorms": batchnorms,
    "bn_training_after_train_call": any(dict(model.named_modules())[name].training for name in batchnorms),
    "after_extra_forward": sorted(name for name, t in model.state_dict().items() if not torch.equal(t, final[name])),
}}))
"""
    )
    result = run_python(project, code)
    return json.loads(result.stdout.splitlines()[-1]), result.stdout


def _is_bn(name: str, batchnorms: list[str]) -> bool:
    return any(name.startswith(f"{bn}.") for bn in batchnorms)


def test_frozen_params_unchanged_bit_for_bit_and_trainable_ones_changed(frozen_run):
    report, _ = frozen_run
    params = report["requires_grad"]
    frozen = {name for name, trainable in params.items() if not trainable}
    pattern_frozen = {name for name in params if name.startswith("block1.")}
    assert pattern_frozen <= frozen
    for name in params:
        if name in frozen:
            assert name in report["unchanged"], f"frozen {name} changed"
        else:
            assert name not in report["unchanged"], f"trainable {name} did not change"
    assert any(name.startswith("head.") for name in params if name not in frozen)


def test_frozen_params_are_not_in_the_optimiser(frozen_run):
    report, _ = frozen_run
    for name, trainable in report["requires_grad"].items():
        assert report["in_optimizer"][name] == trainable, name


def test_trainable_and_frozen_counts_are_logged(frozen_run):
    report, stdout = frozen_run
    trainable = sum(n for name, n in report["numel"].items() if report["requires_grad"][name])
    frozen = sum(n for name, n in report["numel"].items() if not report["requires_grad"][name])
    assert f"parameters: {trainable:,} trainable, {frozen:,} frozen" in stdout


def test_freeze_bn_keeps_running_stats_and_affine_params_across_model_train(frozen_run):
    report, _ = frozen_run
    batchnorms = report["batchnorms"]
    assert len(batchnorms) == 3
    for bn in batchnorms:
        for suffix in ("weight", "bias"):
            assert not report["requires_grad"][f"{bn}.{suffix}"]
        for buffer in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias"):
            assert f"{bn}.{buffer}" in report["unchanged"], f"{bn}.{buffer} moved during training"
    # model.train() then a forward pass: the layers are back in eval mode and their statistics still fixed.
    assert not report["bn_training_after_train_call"]
    assert report["after_extra_forward"] == []


def test_first_n_freezes_the_first_child_modules(render_project, tmp_path):
    project = render_project(freezing="first_n")
    code = (
        SPY
        + f"""
train.fit(load_config(None, {[*QUICK, "epochs=1", "freeze.first_n=3", f"output_dir={tmp_path / 'run'}"]!r}))
model = captured["model"]
print(json.dumps({{name: p.requires_grad for name, p in model.named_parameters()}}))
"""
    )
    requires_grad = json.loads(run_python(project, code).stdout.splitlines()[-1])
    for name, trainable in requires_grad.items():
        assert trainable == name.startswith("head."), name


def test_freezing_everything_or_a_pattern_matching_nothing_is_a_config_error(render_project, tmp_path):
    patterns = render_project(freezing="patterns")
    result = run_module(patterns, "train", *QUICK, "freeze.patterns=[blok1.*]", f"output_dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert "freeze.patterns: 'blok1.*' matches no parameter" in result.stderr
    assert "block1, block2, block3, head" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_module(patterns, "train", *QUICK, "freeze.patterns=['*']", f"output_dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert "no trainable parameter" in result.stderr


def test_gradual_unfreezing_adds_params_at_the_epoch_and_resume_across_it_is_exact(render_project, tmp_path):
    # An exponential schedule decays every epoch whatever the run's length, so a 1-epoch run resumed
    # to 3 epochs must match a straight 3-epoch run; it must also decay the released parameters' rate.
    project = render_project(freezing="first_n", scheduler="exponential")
    overrides = [*QUICK, "freeze.first_n=2", "freeze.unfreeze_epoch=2"]
    code = (
        SPY
        + f"""
import shutil
QUICK = {overrides!r}


def run(epochs, out, resume=False):
    extra = [f"epochs={{epochs}}", f"output_dir={{out}}"] + (["resume=auto"] if resume else [])
    train.fit(load_config(None, QUICK + extra))
    return torch.load(f"{{out}}/checkpoints/last.pt", weights_only=True)


def same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


out = {str(tmp_path)!r}
one = run(1, f"{{out}}/split_early")
initial = captured["initial"]
# parameters only: without freeze_bn, BatchNorm running statistics of frozen blocks still update
frozen_names = [name for name, _ in captured["model"].named_parameters() if name.startswith(("block1.", "block2."))]
two = run(2, f"{{out}}/split_late")
straight = run(3, f"{{out}}/straight")
early = run(3, f"{{out}}/split_early", resume=True)  # resumes before the unfreeze epoch
late = run(3, f"{{out}}/split_late", resume=True)  # resumes after it, with the released parameters
print(json.dumps({{
    "group_sizes": [[len(g["params"]) for g in state["optimizer"]["param_groups"]] for state in (one, two)],
    "group_lrs": [g["lr"] for g in straight["optimizer"]["param_groups"]],
    "unfrozen": [one["progress"]["unfrozen"], two["progress"]["unfrozen"]],
    "frozen_after_epoch_1": all(torch.equal(one["model"][n], initial[n]) for n in frozen_names),
    "moved_after_epoch_2": [n for n in frozen_names if not torch.equal(two["model"][n], one["model"][n])],
    "early_exact": same(straight["model"], early["model"]) and same(straight["optimizer"], early["optimizer"]),
    "late_exact": same(straight["model"], late["model"]) and same(straight["optimizer"], late["optimizer"]),
}}))
"""
    )
    result = run_python(project, code)
    report = json.loads(result.stdout.splitlines()[-1])
    # The same two groups (decay, no decay) before and after: the released parameters join them.
    (decay_1, no_decay_1), (decay_2, no_decay_2) = report["group_sizes"]
    assert decay_2 > decay_1 and no_decay_2 > no_decay_1
    lr, gamma = 0.002, 0.9  # the rendered config's optim.lr and schedule.gamma: three epochs of decay
    assert report["group_lrs"] == pytest.approx([lr * gamma**3] * 2)
    assert report["unfrozen"] == [False, True]
    assert report["frozen_after_epoch_1"]
    assert any(name.endswith("weight") for name in report["moved_after_epoch_2"])
    assert "epoch 2: released" in result.stdout
    assert report["early_exact"]
    assert report["late_exact"]


PARTIAL_CHECKPOINT = """
import json, sys
import torch
from my_project.config import ModelConfig
from my_project.data import DIGITS_INFO
from my_project.model import build_model

torch.manual_seed(1)
source = build_model(ModelConfig(), DIGITS_INFO).state_dict()
del source["block3.0.1.running_var"]  # missing from the file
source["head.1.weight"] = torch.randn(5, 64)  # a head trained for 5 classes: shape mismatch
source["head.1.bias"] = torch.randn(5)
source["extra.weight"] = torch.randn(3)  # unexpected: the model has no such key
wrapped = {f"module.{key}": value for key, value in source.items()}  # saved from a DDP-wrapped model
torch.save({"model": wrapped, "epoch": 3}, sys.argv[1])
torch.save(wrapped, sys.argv[2])
torch.save({"model": {"a": 1}, "epoch": 3}, sys.argv[3])
"""


@pytest.fixture(scope="module")
def pretrained_project(template_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    project = render(template_dir, root / "project", {"pretrained": True})
    files = [root / "checkpoint.pt", root / "bare.pt", root / "not_tensors.pt"]
    run_python(
        project,
        PARTIAL_CHECKPOINT.replace("sys.argv[1]", repr(str(files[0])))
        .replace("sys.argv[2]", repr(str(files[1])))
        .replace("sys.argv[3]", repr(str(files[2]))),
    )
    return project, files


def test_partial_load_reports_loaded_missing_unexpected_and_skipped_keys(pretrained_project):
    project, (checkpoint, bare, _) = pretrained_project
    code = f"""
import json
import torch
from my_project.config import ModelConfig
from my_project.data import DIGITS_INFO
from my_project.model import build_model
from my_project.pretrained import load_pretrained

results = []
for path in {[str(checkpoint), str(bare)]!r}:
    torch.manual_seed(2)
    model = build_model(ModelConfig(), DIGITS_INFO)
    before = {{key: value.clone() for key, value in model.state_dict().items()}}
    report = load_pretrained(model, path, ["block1.*"])
    file = {{key.removeprefix("module."): value for key, value in torch.load(
        path, weights_only=True).get("model", torch.load(path, weights_only=True)).items()}}
    after = model.state_dict()
    results.append({{
        "loaded": sorted(report.loaded), "missing": sorted(report.missing),
        "unexpected": sorted(report.unexpected), "skipped": report.skipped,
        "loaded_equal_file": all(torch.equal(after[key], file[key]) for key in report.loaded),
        "others_untouched": all(torch.equal(after[key], before[key]) for key in after if key not in report.loaded),
    }})
print(json.dumps(results))
"""
    with_entry, bare_dict = json.loads(run_python(project, code).stdout.splitlines()[-1])
    assert with_entry == bare_dict  # a training checkpoint and a bare state dict load the same way
    assert with_entry["missing"] == ["block3.0.1.running_var"]
    assert with_entry["unexpected"] == ["extra.weight"]
    block1 = [
        "block1.0.weight",
        *(f"block1.1.{n}" for n in ("bias", "num_batches_tracked", "running_mean", "running_var", "weight")),
    ]
    assert sorted(with_entry["skipped"]) == sorted([*block1, "head.1.bias", "head.1.weight"])
    assert all(with_entry["skipped"][key] == "matches pretrained.skip" for key in block1)
    assert with_entry["skipped"]["head.1.weight"] == "shape (5, 64) != model (10, 64)"
    assert len(with_entry["loaded"]) == 20 - len(block1) - 2 - 1  # 20 model keys
    assert not any(key.startswith(("module.", "block1.", "head.")) for key in with_entry["loaded"])
    assert with_entry["loaded_equal_file"] and with_entry["others_untouched"]


def test_training_from_a_partial_checkpoint_prints_the_report(pretrained_project, tmp_path):
    project, (checkpoint, _, _) = pretrained_project
    result = train(
        project, *QUICK, "epochs=1", f"pretrained.path={checkpoint}", "pretrained.skip=[]", f"output_dir={tmp_path}"
    )
    assert f"pretrained weights from {checkpoint}: loaded 17, missing 1 (block3.0.1.running_var), " in result.stdout
    assert "unexpected 1 (extra.weight), skipped 2 (head.1.weight: shape (5, 64) != model (10, 64)" in result.stdout


def test_a_file_that_is_not_a_checkpoint_exits_with_one_clear_error(pretrained_project, tmp_path):
    project, (_, _, not_tensors) = pretrained_project
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    foreign = tmp_path / "foreign.pt"  # tensors, none of which the model has: it would train from scratch
    torch.save({"encoder.weight": torch.zeros(4, 4), "head.1.weight": torch.zeros(10, 64)}, foreign)
    for path, message in [
        (text, f"error: pretrained.path {text} is not a PyTorch checkpoint or state dict"),
        (not_tensors, f"error: pretrained.path {not_tensors} holds no state dict"),
        (foreign, f"error: pretrained.path {foreign}: none of its 2 tensors loads into this model (loaded 0, "),
        (tmp_path / "absent.pt", f"error: pretrained.path {tmp_path / 'absent.pt'} does not exist"),
    ]:
        result = run_module(project, "train", *QUICK, f"pretrained.path={path}", f"output_dir={tmp_path / 'run'}")
        assert result.returncode != 0
        lines = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]  # CPU fallback
        assert len(lines) == 1 and lines[0].startswith(message), result.stderr
        assert "Traceback" not in result.stderr


def test_model_summary_is_printed_by_torchinfo_and_leaves_training_unchanged(render_project, default_project, tmp_path):
    project = render_project(model_summary=True)
    assert '"torchinfo>=1.8"' in (project / "pyproject.toml").read_text()
    assert "torchinfo" not in (default_project / "pyproject.toml").read_text()
    common = (*QUICK, "epochs=1")
    result = train(project, *common, f"output_dir={tmp_path / 'summary'}")
    train(default_project, *common, f"output_dir={tmp_path / 'plain'}")

    assert result.stdout.count("Layer (type:depth-idx)") == 1
    assert "SmallCNN" in result.stdout and "Conv2d: 2-1" in result.stdout
    # Units as torchinfo means them (M: millions of mult-adds), not its enum's Python name.
    assert "Total mult-adds (M): " in result.stdout and "Units." not in result.stdout, result.stdout
    with_summary = torch.load(tmp_path / "summary/checkpoints/last.pt", weights_only=True)["model"]
    plain = torch.load(tmp_path / "plain/checkpoints/last.pt", weights_only=True)["model"]
    assert (
        f"Total params: {sum(t.numel() for k, t in plain.items() if 'running' not in k and 'num_batches' not in k):,}"
        in result.stdout
    )
    # The summary's forward pass draws no random numbers and moves no BatchNorm statistics.
    assert all(torch.equal(with_summary[key], plain[key]) for key in plain)


INIT_STATS = """
import json
import torch
from torch import nn
from my_project.config import load_config
from my_project.data import DIGITS_INFO
from my_project.model import build_model

torch.manual_seed(0)
model = build_model(load_config(None, OVERRIDES).model, DIGITS_INFO)
layers = []
for name, module in model.named_modules():
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(module.weight)
        layers.append({"name": name, "std": module.weight.std().item(), "mean": module.weight.mean().item(),
                       "numel": module.weight.numel(), "fan_in": fan_in, "fan_out": fan_out,
                       "bias_zero": module.bias is None or bool((module.bias == 0).all())})
    elif isinstance(module, nn.BatchNorm2d):
        layers.append({"name": name, "bn_identity": bool((module.weight == 1).all() and (module.bias == 0).all())})
print(json.dumps(layers))
"""


@pytest.mark.parametrize("scheme", ["normal", "xavier", "kaiming"])
def test_weight_init_gives_the_expected_statistics(render_project, scheme):
    project = render_project(weight_init=scheme)
    overrides = ["model.width=64"] + (["model.init_std=0.05"] if scheme == "normal" else [])
    layers = json.loads(run_python(project, INIT_STATS.replace("OVERRIDES", repr(overrides))).stdout.splitlines()[-1])
    weights = [layer for layer in layers if "std" in layer]
    assert len(weights) == 4 and all(layer["bias_zero"] for layer in weights)
    assert all(layer["bn_identity"] for layer in layers if "bn_identity" in layer)
    for layer in weights:
        expected = {
            "normal": 0.05,
            "xavier": math.sqrt(2 / (layer["fan_in"] + layer["fan_out"])),
            "kaiming": math.sqrt(2 / layer["fan_in"]),
        }[scheme]
        tolerance = 4 / math.sqrt(2 * layer["numel"])  # about 4 standard errors of a sample std
        assert abs(layer["std"] / expected - 1) < tolerance, layer
        assert abs(layer["mean"]) < 4 * expected / math.sqrt(layer["numel"]), layer


def test_rendered_fine_tuning_project_passes_its_own_tests(render_project):
    project = render_project(freezing="patterns", freeze_bn=True, pretrained=True)
    result = run_project_tests(project, "tests/test_freezing.py", "tests/test_pretrained.py")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "3 passed" in result.stdout
