"""Optimisation features do what PyTorch does, at the right granularity, and survive a resume.

Schedules are compared with PyTorch's own schedulers built directly; clipping, accumulation, EMA,
early stopping and the non-finite guard are checked from the checkpoints and summaries they leave.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from rendering import INTERRUPTED_RUN, SMOKE_OVERRIDES, run_package_code, train
from torch.optim import lr_scheduler

EPOCHS = 4
STEPS_PER_EPOCH = 6  # synthetic_size=256 -> 204 training samples -> 6 full batches of 32
FAST = (*SMOKE_OVERRIDES, "model.arch=mlp", "deterministic=true", f"epochs={EPOCHS}")


def epoch_lrs(stdout: str) -> list[float]:
    return [float(value) for value in re.findall(r"^epoch \d+/\d+ .*\| lr ([0-9.e+-]+) \|", stdout, re.M)]


def epoch_accuracies(stdout: str) -> list[float]:
    return [float(value) for value in re.findall(r"\| val_accuracy ([0-9.]+)", stdout)]


def reference_lrs(scheduler_name: str, warmup: str | None, base_lr: float, stdout: str) -> list[float]:
    """The LR each epoch trains with (and, for OneCycle, the LR after the epoch's last step), from PyTorch.

    ``warmup``: None, or the method of two epochs of warmup from 0.1 * lr: linear or constant."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    decay_epochs = EPOCHS - 2 if warmup else EPOCHS
    build = {
        "step": lambda: lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5),
        "multistep": lambda: lr_scheduler.MultiStepLR(optimizer, milestones=[1, 3], gamma=0.1),
        "exponential": lambda: lr_scheduler.ExponentialLR(optimizer, gamma=0.7),
        "cosine": lambda: lr_scheduler.CosineAnnealingLR(optimizer, T_max=decay_epochs, eta_min=1e-4),
        "lambda": lambda: lr_scheduler.LambdaLR(optimizer, lambda epoch: max(1 - epoch / decay_epochs, 0) ** 2),
        "onecycle": lambda: lr_scheduler.OneCycleLR(
            optimizer, max_lr=base_lr, total_steps=EPOCHS * STEPS_PER_EPOCH, pct_start=0.3
        ),
        "plateau": lambda: lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=0),
    }
    scheduler = build[scheduler_name]()
    if warmup == "constant":  # torchvision's --lr-warmup-method constant
        warm = lr_scheduler.ConstantLR(optimizer, factor=0.1, total_iters=2)
    elif warmup == "linear":
        warm = lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=2)
    if warmup:
        scheduler = lr_scheduler.SequentialLR(optimizer, [warm, scheduler], milestones=[2])
    lrs = []
    for accuracy in epoch_accuracies(stdout):
        if scheduler_name == "onecycle":
            for _ in range(STEPS_PER_EPOCH):
                optimizer.step()
                scheduler.step()
            lrs.append(optimizer.param_groups[0]["lr"])
            continue
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step(accuracy) if scheduler_name == "plateau" else scheduler.step()
    return lrs


SCHEDULES = {
    # name: (answers, schedule overrides)
    "step": ({"scheduler": "step"}, ["schedule.step_size=1", "schedule.gamma=0.5"]),
    "multistep": ({"scheduler": "multistep"}, ["schedule.milestones=[1, 3]", "schedule.gamma=0.1"]),
    "exponential+bf16": ({"scheduler": "exponential", "amp": "bf16"}, ["schedule.gamma=0.7"]),
    "cosine": ({"scheduler": "cosine"}, ["schedule.min_lr=1e-4"]),
    "cosine+warmup": ({"scheduler": "cosine", "warmup": True}, ["schedule.min_lr=1e-4"]),
    "lambda+warmup": ({"scheduler": "lambda", "warmup": True}, ["schedule.power=2"]),
    "step+constant warmup": (
        {"scheduler": "step", "warmup": True},
        ["schedule.warmup_method=constant", "schedule.step_size=1", "schedule.gamma=0.5"],
    ),
    "onecycle+fp16": ({"scheduler": "onecycle", "amp": "fp16"}, []),
    "plateau": ({"scheduler": "plateau"}, ["schedule.patience=0", "schedule.factor=0.5"]),
}


# Beside the ones kept in the plain run (step with constant warmup, cosine with and without warmup,
# exponential, OneCycle, plateau), these repeat the same epoch-stepped path: `pytest -m slow` runs them.
SLOW_SCHEDULES = ("step", "multistep", "lambda+warmup")


@pytest.mark.parametrize(
    "case", [pytest.param(case, marks=pytest.mark.slow) if case in SLOW_SCHEDULES else case for case in SCHEDULES]
)
def test_schedule_matches_pytorch_each_epoch_and_resumes_bit_exact(render_project, tmp_path, case):
    answers, overrides = SCHEDULES[case]
    project = render_project(**answers)
    common = (*FAST, *overrides)
    straight = train(project, *common, f"output_dir={tmp_path / 'straight'}")

    method = "constant" if "schedule.warmup_method=constant" in overrides else "linear"
    expected = reference_lrs(answers["scheduler"], method if answers.get("warmup") else None, 0.002, straight.stdout)
    assert len(expected) == EPOCHS
    assert epoch_lrs(straight.stdout) == pytest.approx(expected, rel=6e-3)  # the line prints 3 digits
    final = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    assert "scheduler" in final

    split_dir = tmp_path / "split"
    interrupted = run_package_code(project, INTERRUPTED_RUN, *common, f"output_dir={split_dir}")
    assert interrupted.returncode == 0, interrupted.stderr
    assert "received SIGUSR1" in interrupted.stdout
    train(project, *common, "resume=auto", f"output_dir={split_dir}")
    resumed = torch.load(split_dir / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["progress"]["global_step"] == final["progress"]["global_step"] == EPOCHS * STEPS_PER_EPOCH
    for key, tensor in final["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key
    assert resumed["scheduler"] == final["scheduler"]
    assert resumed["optimizer"]["param_groups"] == final["optimizer"]["param_groups"]
    if answers.get("amp") == "fp16":
        assert resumed["scaler"] == final["scaler"]
        summary = json.loads((split_dir / "summary.json").read_text())
        assert summary["skipped_steps"] == resumed["progress"]["skipped_steps"]


def _initial_and_final_weights(project, output_dir):
    """The weights fit() starts from (same seed, same construction order) and those it saved."""
    code = """
    import sys, torch
    train = importlib.import_module(pkg + ".train")
    cfg = importlib.import_module(pkg + ".config").load_config("configs/default.yaml", sys.argv[1:-1])
    train.seed_everything(cfg.seed, cfg.deterministic)
    info = importlib.import_module(pkg + ".data").build_splits(cfg.data, cfg.seed).info
    model = importlib.import_module(pkg + ".model").build_model(cfg.model, info)
    torch.save(model.state_dict(), sys.argv[-1])
    """
    initial_path = output_dir / "initial.pt"
    result = run_package_code(project, code, *FAST, str(initial_path))
    assert result.returncode == 0, result.stderr
    final = torch.load(output_dir / "checkpoints" / "last.pt", weights_only=True)
    return torch.load(initial_path, weights_only=True), final


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_clip_norm_bounds_the_update_in_unscaled_units(render_project, tmp_path, amp):
    # Plain SGD on one batch: the update is exactly -lr * clipped gradient, so its norm is lr * max_norm.
    # Clipping the loss-scaled fp16 gradients instead would leave an update 1024 times smaller.
    project = render_project(optimizer="sgd", grad_clip="norm", amp=amp, scheduler="none")
    overrides = ["epochs=1", "data.synthetic_size=40", "optim.momentum=0", "optim.weight_decay=0"]
    overrides += ["optim.lr=1.0", "optim.max_grad_norm=0.01", f"output_dir={tmp_path}"]
    if amp == "fp16":
        overrides.append("amp.init_scale=1024")
    train(project, *FAST, *overrides)
    initial, final = _initial_and_final_weights(project, tmp_path)
    assert final["progress"]["global_step"] == 1
    params = [key for key in initial if "running" not in key and "num_batches" not in key]
    update = torch.cat([(final["model"][key] - initial[key]).flatten() for key in params])
    assert update.norm().item() == pytest.approx(0.01, rel=1e-3)


def test_accumulating_micro_batches_equals_one_large_batch(render_project, tmp_path):
    project = render_project(optimizer="sgd", grad_accumulation=True, scheduler="none")
    common = (*FAST, "epochs=1", "model.dropout=0", "optim.momentum=0", "optim.weight_decay=0")
    common += ("data.synthetic_size=200",)  # 160 training samples: 5 batches of 32, 20 of 8
    train(project, *common, "data.batch_size=8", "optim.accumulation_steps=4", f"output_dir={tmp_path / 'acc'}")
    train(project, *common, "data.batch_size=32", "optim.accumulation_steps=1", f"output_dir={tmp_path / 'big'}")
    accumulated = torch.load(tmp_path / "acc" / "checkpoints" / "last.pt", weights_only=True)
    big = torch.load(tmp_path / "big" / "checkpoints" / "last.pt", weights_only=True)
    assert accumulated["progress"]["global_step"] == big["progress"]["global_step"] == 5
    for key, tensor in big["model"].items():
        torch.testing.assert_close(accumulated["model"][key], tensor, rtol=1e-5, atol=1e-6)

    # A short final group still steps: 176 samples -> 22 micro-batches -> 5 full groups and one of 2.
    tail_overrides = ("data.synthetic_size=220", "data.batch_size=8", "optim.accumulation_steps=4")
    tail = train(project, *common, *tail_overrides, f"output_dir={tmp_path / 'tail'}")
    assert "epoch 1/1" in tail.stdout
    assert torch.load(tmp_path / "tail" / "checkpoints" / "last.pt", weights_only=True)["progress"]["global_step"] == 6


def test_ema_is_evaluated_and_checkpointed(render_project, tmp_path):
    project = render_project(ema=True)
    train(project, *FAST, "epochs=2", "optim.ema_decay=0.9", f"output_dir={tmp_path}")
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert int(state["ema"]["n_averaged"]) == state["progress"]["global_step"]
    differing = [key for key in state["model"] if not torch.equal(state["model"][key], state["ema"][f"module.{key}"])]
    assert differing, "EMA weights equal the raw weights"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0.0 <= summary["final_metrics"]["ema_val_accuracy"] <= 1.0


def test_early_stopping_stops_on_patience_and_records_why(render_project, tmp_path):
    project = render_project(early_stopping=True)
    # min_delta=1 makes every epoch after the first a non-improvement: patience 2 stops after epoch 3.
    train(
        project, *FAST, "epochs=6", "early_stopping.patience=2", "early_stopping.min_delta=1", f"output_dir={tmp_path}"
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs_completed"] == 3
    assert summary["stop_reason"].startswith("early stopping: val_accuracy did not improve")


def test_nonfinite_loss_stops_naming_step_and_epoch_and_keeps_last_checkpoint(render_project, tmp_path):
    project = render_project(nonfinite_guard=True)
    train(project, *FAST, "epochs=1", f"output_dir={tmp_path}")
    last = tmp_path / "checkpoints" / "last.pt"
    good_bytes = last.read_bytes()
    # Resume from a copy whose weights are NaN: the first forward pass of epoch 2 yields a NaN loss.
    state = torch.load(last, weights_only=True)
    state["model"] = {key: torch.full_like(value, float("nan")) for key, value in state["model"].items()}
    poisoned = tmp_path / "poisoned.pt"
    torch.save(state, poisoned)

    result = run_package_code(
        project,
        "import sys; importlib.import_module(pkg + '.train').main(sys.argv[1:])",
        *FAST,
        "epochs=2",
        f"resume={poisoned}",
        f"output_dir={tmp_path}",
    )
    assert result.returncode != 0
    # A process reads the loss back after its first step (which times the steps): the error names that step.
    assert f"loss became nan in step {STEPS_PER_EPOCH + 1} (epoch 2)" in result.stderr
    assert last.read_bytes() == good_bytes


def test_layer_lr_multipliers_set_group_rates_and_spare_biases_from_decay(render_project, tmp_path):
    project = render_project(layer_lr=True, scheduler="none")
    train(project, *FAST, "epochs=1", "optim.lr_multipliers={head.*: 10.0}", f"output_dir={tmp_path}")
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    groups = {
        (group["lr"], group["weight_decay"]): len(group["params"]) for group in state["optimizer"]["param_groups"]
    }
    # MLP: body weight + bias at lr, head weight + bias at 10 * lr; 1-D tensors never decay.
    assert groups == {(0.002, 0.01): 1, (0.002, 0.0): 1, (0.02, 0.01): 1, (0.02, 0.0): 1}


def test_fp16_counts_the_steps_the_scaler_skips(render_project, tmp_path):
    # CPU autocast in float16: a loss scale of 2**24 overflows the float16 activation gradients until the
    # scaler has halved it enough, so the first steps are skipped and the rest are taken. With growth out
    # of reach, every skipped step halved the scale exactly once.
    project = render_project(amp="fp16", scheduler="none")
    init_scale = 2.0**24
    overrides = ["epochs=2", f"amp.init_scale={init_scale}", "amp.growth_interval=1000", f"output_dir={tmp_path}"]
    result = train(project, *FAST, *overrides)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    skipped = state["progress"]["skipped_steps"]
    assert 0 < skipped < state["progress"]["global_step"] == 2 * STEPS_PER_EPOCH
    assert state["scaler"]["scale"] == init_scale / 2**skipped
    assert json.loads((tmp_path / "summary.json").read_text())["skipped_steps"] == skipped
    assert f"skipped_steps {skipped} |" in result.stdout


def test_compiled_model_trains_saves_plain_keys_and_resumes_eagerly(render_project, tmp_path):
    # The real inductor backend (it generates C++ for the CPU), on the smallest model, for one epoch.
    project = render_project(compile=True, scheduler="none")
    out = tmp_path / "run"
    train(project, *FAST, "epochs=1", "model.width=8", f"output_dir={out}", timeout=600)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"]["global_step"] == STEPS_PER_EPOCH
    assert not any(key.startswith("_orig_mod.") for key in state["model"])
    # The compiled run's checkpoint resumes with compilation switched off.
    resumed = train(project, *FAST, "epochs=2", "model.width=8", "compile=false", "resume=auto", f"output_dir={out}")
    assert "resumed from" in resumed.stdout
    assert json.loads((out / "summary.json").read_text())["epochs_completed"] == 2


@pytest.mark.parametrize("scheduler", ["onecycle", "cosine"])
def test_resuming_with_other_epochs_than_the_schedule_spans_is_refused_or_warned(render_project, tmp_path, scheduler):
    project = render_project(scheduler=scheduler)
    train(project, *FAST, "epochs=1", f"output_dir={tmp_path}")
    last = tmp_path / "checkpoints" / "last.pt"
    before = last.read_bytes()
    result = run_package_code(
        project,
        "import sys; importlib.import_module(pkg + '.train').main(sys.argv[1:])",
        *FAST,
        "epochs=2",
        "resume=auto",
        f"output_dir={tmp_path}",
    )
    if scheduler == "onecycle":  # OneCycleLR cannot step past its last step: refused before training
        assert result.returncode != 0
        assert "epochs=2, but the resumed OneCycle schedule spans 1 epochs" in result.stderr
        assert last.read_bytes() == before
    else:  # a cosine schedule goes on by its formula, with a warning
        assert result.returncode == 0, result.stderr
        assert "warning: the resumed schedule spans the 1 epochs it was built for" in result.stderr


def test_resuming_with_another_warmup_method_is_refused(render_project, tmp_path):
    project = render_project(scheduler="cosine", warmup=True)
    train(project, *FAST, "epochs=1", "schedule.warmup_method=constant", f"output_dir={tmp_path}")
    last = tmp_path / "checkpoints" / "last.pt"
    before = last.read_bytes()
    result = run_package_code(
        project,
        "import sys; importlib.import_module(pkg + '.train').main(sys.argv[1:])",
        *FAST,
        "resume=auto",
        f"output_dir={tmp_path}",
    )
    assert result.returncode != 0
    assert "schedule.warmup_method=linear, but the resumed run warms up with constant" in result.stderr
    assert last.read_bytes() == before


# Each parameter's (LR, weight decay) in the optimiser, by name, for several settings of the decays: on
# the CNN (conv weight, BatchNorm weight and bias, linear weight and bias), its first block frozen where
# the render freezes, and again once the frozen block is released into the optimiser.
GROUPS_SNIPPET = """
import json
config = importlib.import_module(pkg + ".config")
models = importlib.import_module(pkg + ".model")
optim = importlib.import_module(pkg + ".optim")
results = {}
for name, overrides in CASES.items():
    cfg = config.load_config(None, ["optim.weight_decay=0.01", *overrides])
    torch.manual_seed(0)
    model = models.SmallCNN(3, 10, width=4)
    frozen = []
    if FREEZING:
        freezing = importlib.import_module(pkg + ".freezing")
        frozen = freezing.freeze_first_children(model, 1)
    optimizer = optim.build_optimizer(model, cfg.optim)
    def settings():
        by_param = {id(p): [g["lr"], g["weight_decay"]] for g in optimizer.param_groups for p in g["params"]}
        return {key: by_param.get(id(param)) for key, param in model.named_parameters()}
    results[name] = {"built": settings(), "groups": len(optimizer.param_groups)}
    if frozen:
        freezing.release(model, frozen, optimizer, cfg.optim)
        results[name]["released"] = settings()
print(json.dumps(results))
"""

DECAY_CASES = {
    # name: (overrides, the decays of (weights, norm, bias))
    "default": ((), (0.01, 0.0, 0.0)),
    "null": (("optim.norm_weight_decay=null", "optim.bias_weight_decay=null"), (0.01, 0.01, 0.01)),
    "numbers": (("optim.norm_weight_decay=0.003", "optim.bias_weight_decay=0.002"), (0.01, 0.003, 0.002)),
    "norm null, bias number": (("optim.norm_weight_decay=null", "optim.bias_weight_decay=0.5"), (0.01, 0.01, 0.5)),
}


@pytest.mark.parametrize(
    "answers", [{}, {"layer_lr": True}, {"freezing": "first_n"}], ids=["plain", "layer_lr", "first_n"]
)
def test_norm_and_bias_weight_decays_set_their_parameters_groups(render_project, answers):
    project = render_project(scheduler="none", **answers)
    layer_lr = answers.get("layer_lr", False)
    cases = {
        name: [*overrides, *(["optim.lr_multipliers={head.*: 10.0}"] if layer_lr else [])]
        for name, (overrides, _) in DECAY_CASES.items()
    }
    code = f"import torch\nCASES = {cases!r}\nFREEZING = {'freezing' in answers}\n" + GROUPS_SNIPPET
    result = run_package_code(project, code)
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    for name, (_, (weights, norm, bias)) in DECAY_CASES.items():
        kinds = {
            "block1.0.weight": weights,  # the first convolution
            "block1.1.weight": norm,  # its BatchNorm
            "block1.1.bias": bias,  # a norm layer's bias is a bias, as in torchvision's references
            "head.1.weight": weights,
            "head.1.bias": bias,
        }
        expected = {
            key: [0.02 if layer_lr and key.startswith("head.") else 0.002, decay] for key, decay in kinds.items()
        }
        # The groups are laid out by kind, norm parameters and biases together while their decays are equal
        # (as in checkpoints from before they had their own): a resume with other decays fits the saved
        # optimiser. Each kind once, or with layer_lr once per multiplier (the head has no norm layer).
        kinds_apart = 3 if norm != bias else 2
        assert results[name]["groups"] == (kinds_apart + 2 if layer_lr else kinds_apart), name
        built = {key: results[name]["built"][key] for key in expected}
        if "freezing" in answers:  # the frozen first block is left out until it is released
            assert built == {key: None if key.startswith("block1.") else value for key, value in expected.items()}
            assert {key: results[name]["released"][key] for key in expected} == expected, name
        else:
            assert built == expected, name


def test_ema_every_n_steps_updates_at_multiples_with_decay_to_the_power_n_and_resumes_bit_exact(
    render_project, tmp_path
):
    project = render_project(ema=True, scheduler="none")
    every = 4  # steps 4, 8, ...: a run of 6 steps per epoch is interrupted one step into epoch 2, between updates
    # Read back every step, so the stop signal sent in epoch 1's validation is acted on one step into epoch 2.
    common = (*FAST, "optim.ema_decay=0.5", f"optim.ema_every_n_steps={every}", "log.every_n_steps=1")
    train(project, *common, f"output_dir={tmp_path / 'straight'}")
    final = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    assert final["progress"]["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert int(final["ema"]["n_averaged"]) == EPOCHS * STEPS_PER_EPOCH // every

    interrupted = run_package_code(project, INTERRUPTED_RUN, *common, f"output_dir={tmp_path / 'split'}")
    assert interrupted.returncode == 0, interrupted.stderr
    saved = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["progress"]["global_step"] % every != 0  # saved between two updates
    assert int(saved["ema"]["n_averaged"]) == saved["progress"]["global_step"] // every
    train(project, *common, "resume=auto", f"output_dir={tmp_path / 'split'}")
    resumed = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    for key, tensor in final["ema"].items():
        assert torch.equal(tensor, resumed["ema"][key]), key

    # The decay of one update: min(ema_decay, (1 + n) / (10 + n)) ** N, n the steps averaged so far.
    code = """
import torch
config = importlib.import_module(pkg + ".config")
optim = importlib.import_module(pkg + ".optim")
cfg = config.load_config(None, ["optim.ema_decay=0.5", "optim.ema_every_n_steps=3"])
model = torch.nn.Linear(1, 1, bias=False)
torch.nn.init.zeros_(model.weight)
ema = optim.ema_model(model, cfg.optim)
averages = []
for _ in range(5):
    ema.update_parameters(model)  # the first update copies the weights
    averages.append(ema.module.weight.item())
    torch.nn.init.ones_(model.weight)
print(averages)
"""
    result = run_package_code(project, code)
    assert result.returncode == 0, result.stderr
    average, expected = 0.0, [0.0]
    for update in range(1, 5):
        steps = 3 * update
        decay = min(0.5, (1 + steps) / (10 + steps)) ** 3
        average = decay * average + (1 - decay) * 1.0
        expected.append(average)
    assert json.loads(result.stdout) == pytest.approx(expected, rel=1e-6)
