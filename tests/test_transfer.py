"""Transfer learning: freezing, frozen BatchNorm and gradual unfreezing, proven on short CPU runs.

Each snippet runs the rendered project's own ``fit`` in a subprocess, spying on ``build_optimizer``
to capture the model and optimiser that training uses, and prints its findings as JSON.
"""

from __future__ import annotations

import json

import pytest
from rendering import SMOKE_OVERRIDES, render, run_module, run_python

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
train.fit(load_config(None, {[*QUICK, "epochs=1", "freeze.first_n=3", f"output_dir={tmp_path}"]!r}))
model = captured["model"]
print(json.dumps({{name: p.requires_grad for name, p in model.named_parameters()}}))
"""
    )
    requires_grad = json.loads(run_python(project, code).stdout.splitlines()[-1])
    for name, trainable in requires_grad.items():
        assert trainable == name.startswith("head."), name


def test_freezing_everything_or_a_pattern_matching_nothing_is_a_config_error(render_project, tmp_path):
    patterns = render_project(freezing="patterns")
    result = run_module(patterns, "train", *QUICK, "freeze.patterns=[blok1.*]", f"output_dir={tmp_path}")
    assert result.returncode != 0
    assert "freeze.patterns: 'blok1.*' matches no parameter" in result.stderr
    assert "block1, block2, block3, head" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_module(patterns, "train", *QUICK, "freeze.patterns=['*']", f"output_dir={tmp_path}")
    assert result.returncode != 0
    assert "no trainable parameter" in result.stderr


def test_gradual_unfreezing_adds_params_at_the_epoch_and_resume_across_it_is_exact(render_project, tmp_path):
    project = render_project(freezing="first_n")
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
late = run(3, f"{{out}}/split_late", resume=True)  # resumes after it: the released groups exist already
print(json.dumps({{
    "groups": [len(one["optimizer"]["param_groups"]), len(two["optimizer"]["param_groups"])],
    "unfrozen": [one["unfrozen"], two["unfrozen"]],
    "frozen_after_epoch_1": all(torch.equal(one["model"][n], initial[n]) for n in frozen_names),
    "moved_after_epoch_2": [n for n in frozen_names if not torch.equal(two["model"][n], one["model"][n])],
    "early_exact": same(straight["model"], early["model"]) and same(straight["optimizer"], early["optimizer"]),
    "late_exact": same(straight["model"], late["model"]) and same(straight["optimizer"], late["optimizer"]),
}}))
"""
    )
    result = run_python(project, code)
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["groups"] == [2, 4]  # decay/no-decay, then the released weights and biases/norms
    assert report["unfrozen"] == [False, True]
    assert report["frozen_after_epoch_1"]
    assert any(name.endswith("weight") for name in report["moved_after_epoch_2"])
    assert "epoch 2: released" in result.stdout
    assert report["early_exact"]
    assert report["late_exact"]
