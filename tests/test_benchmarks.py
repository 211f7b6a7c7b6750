"""The benchmark scripts still run end to end (tiny sizes; nothing here is timed or compared)."""

from __future__ import annotations

import json
import re
import sys

import pytest
import timing
from questionnaire import TEMPLATE_ROOT, choice_questions, question, questions

BENCHMARKS = TEMPLATE_ROOT / "benchmarks"


def test_loop_benchmark_quick_mode_measures_every_contender(tmp_path):
    out = tmp_path / "figures.json"
    result = timing.run(
        [sys.executable, str(BENCHMARKS / "loop_bench.py"), "--quick", "--no-lightning", "--json", str(out)], 240
    )
    assert result.returncode == 0, result.stdout + result.stderr
    every = json.loads(out.read_text())
    # One model per task: classification's MLP, and each other task's model under its task's name. The
    # language model's loop is lm_bench.py's, against nanoGPT.
    tasks = question("task").options() if "task" in choice_questions() else ["classification"]
    tasks = [task for task in tasks if task != "language_model"]
    models = ["mlp", *(f"{task}/{'unet' if task == 'segmentation' else 'mlp'}" for task in tasks[1:])]
    assert set(models) <= set(every), sorted(every)
    for figures in (every[model] for model in models):
        for clock in ("wall_steps_per_s", "steps_per_cpu_s"):
            rates = figures[clock]
            names = {name.split(", loggers")[0] for name in rates}
            assert {"raw loop", "rendered, bar off", "rendered, bar on"} <= names
            assert all(len(values) == 1 and values[0] > 0 for values in rates.values())
    # Each rendered epoch is paired with a raw one, run before it in one epoch and after it in the next.
    figures = every["mlp"]
    for clock in ("paired_wall_ratios", "paired_cpu_ratios"):
        rendered = {name: pairs for name, pairs in figures[clock].items() if name != "raw loop"}
        assert rendered and all(
            [len(raw_first), len(rendered_first)] == [1, 1] for raw_first, rendered_first in rendered.values()
        )
    # The loss is read back once per log.every_n_steps (50) steps, at each epoch's end and after the first
    # step (which times the steps), never per step.
    reads = figures["host_reads"]
    assert 0 < reads["reads"] <= reads["steps"] // 50 + reads["epochs"] + 1


def test_loader_benchmark_quick_mode_times_both_loaders_for_each_worker_count():
    result = timing.run([sys.executable, str(BENCHMARKS / "loader_bench.py"), "--quick"], 300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("rendered", "plain"))]
    assert len(rows) == 4 and all(float(row[-1]) > 0 and float(row[-2]) > 0 for row in rows)


def test_gpu_benchmark_exits_cleanly_without_a_gpu():
    result = timing.run([sys.executable, str(BENCHMARKS / "gpu_bench.py"), "--quick"], 120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_benchmark_dry_run_on_cpu_measures_every_amp_and_compile_answer():
    """--cpu runs the GPU script's own rendering, wrapping and timing code: one row per answer pair."""
    result = timing.run([sys.executable, str(BENCHMARKS / "gpu_bench.py"), "--quick", "--cpu"], 300)
    assert result.returncode == 0, result.stdout + result.stderr
    _, rest = result.stdout.split(" samples/s ", 1)
    table, extra = rest.split("\n\n", 1)
    table = table.strip().splitlines()[1:]  # the rows under the header
    by_question = {q.name: q.options() for q in questions()}
    expected = {f"amp={amp}, compile={compile}" for amp in by_question["amp"] for compile in by_question["compile"]}
    measured = {}
    for row in table:
        label, rest = row.split("  ", 1)
        workers, samples_per_s, speed_up, stall = rest.split()
        measured[label.strip()] = (float(samples_per_s), float(stall.rstrip("%")))
    assert set(measured) == expected
    assert all(rate > 0 and 0 <= stall < 100 for rate, stall in measured.values())
    figures = dict(
        re.findall(r"^  (rendered loop|hand-written loop|rendered, unpinned)\s+([\d.]+) samples/s", extra, re.M)
    )
    assert set(figures) == {"rendered loop", "hand-written loop", "rendered, unpinned"}, extra
    assert all(float(value) > 0 for value in figures.values())
    reads = re.search(r"host reads per step in train_one_epoch .*: ([\d.]+)", extra)
    assert reads is not None and float(reads.group(1)) <= 1, extra  # one read per window at most


@pytest.mark.slow  # two torchrun launches per contender: half a minute
def test_parallel_benchmark_quick_mode_times_ddp_and_fsdp_and_fsdp_ranks_hold_half(tmp_path):
    out = tmp_path / "figures.json"
    result = timing.run([sys.executable, str(BENCHMARKS / "parallel_bench.py"), "--quick", "--json", str(out)], 300)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    assert set(figures) == {"ddp", "fsdp", "fsdp, reshard_after_forward=false"}
    assert all(figure["step_ms"] and min(figure["step_ms"]) > 0 for figure in figures.values())
    held = {name: figure["held"]["parameters"] + figure["held"]["optimizer"] for name, figure in figures.items()}
    # Each of two FSDP ranks holds about half of the parameters and optimiser state that a DDP rank holds.
    assert 0.4 < held["fsdp"] / held["ddp"] < 0.6, held
    assert [line.split()[0] for line in result.stdout.splitlines()[-3:]] == ["ddp", "fsdp", "fsdp,"]


def test_language_model_benchmark_quick_mode_trains_and_validates_the_rendered_gpt(tmp_path):
    """The rendered side of lm_bench.py (nanoGPT is a checkout the user points to, not installed here)."""
    out = tmp_path / "figures.json"
    result = timing.run([sys.executable, str(BENCHMARKS / "lm_bench.py"), "--quick", "--json", str(out)], 120)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    assert list(figures) == ["rendered"]
    assert figures["rendered"]["tokens_per_s"][0] > 0 and 0 < figures["rendered"]["val_loss"][0] < 5.6  # ln 256


def test_language_model_benchmark_reads_nanogpts_step_times_and_final_evaluation():
    sys.path.insert(0, str(BENCHMARKS))
    import lm_bench

    output = "\n".join(
        [
            "step 0: train loss 5.5452, val loss 5.5451",
            *(f"iter {step}: loss 4.0000, time {100 + step:.2f}ms, mfu -100.00%" for step in range(4)),
            "step 4: train loss 3.1000, val loss 3.2000",
            "iter 4: loss 3.0000, time 900.00ms, mfu 1.00%",
        ]
    )
    args = lm_bench.parse_args(["--quick"])
    args.steps, args.batch_size, args.block_size = 4, 2, 8
    figures = lm_bench.parse_nanogpt(output, args)
    assert figures["val_loss"] == 3.2
    assert figures["tokens_per_s"] == pytest.approx(2 * 2 * 8 / (0.102 + 0.103))  # iterations 2 and 3


def test_recipe_benchmark_quick_mode_trains_the_rendered_classifier_on_image_folders(tmp_path):
    """The rendered side of recipe_bench.py (torchvision's references are a checkout the user points to)."""
    out = tmp_path / "figures.json"
    result = timing.run([sys.executable, str(BENCHMARKS / "recipe_bench.py"), "--quick", "--json", str(out)], 180)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    assert "torchvision" not in figures and "ratio" not in figures
    rendered = figures["rendered"]
    assert rendered["samples_per_s"][0] > 0 and len(rendered["epoch_s"][0]) == 2  # --quick: 2 epochs, 1 timed
    assert 0 <= rendered["val_top1"][0] <= 100
    assert rendered["peak_rss_mib"][0] > 50  # a process that imported torch and trained a ResNet
    assert {"model.arch=resnet18", "data.crop_scale=0.08", "optim.nesterov=false"} <= set(figures["settings"])


def recipe_bench_module():
    sys.path.insert(0, str(BENCHMARKS))
    import recipe_bench

    return recipe_bench


def test_recipe_benchmark_gives_a_recipe_setting_to_both_sides_only_where_the_rendered_config_has_its_key(tmp_path):
    recipe_bench = recipe_bench_module()
    args = recipe_bench.parse_args(["--quick"])
    today = {setting.key for setting in recipe_bench.base_settings(args)} | {"data.image_size", "data.crop_fraction"}
    args.recipe = "modern"

    before = recipe_bench.plan(args, today)
    assert not any(override.startswith("loss.label_smoothing") for override in before.overrides())
    assert "--label-smoothing" not in before.flags() and "--auto-augment" not in before.flags()
    assert {setting.key for setting in before.left_out} >= {"loss.label_smoothing", "data.auto_augment"}

    landed = today | {"loss.label_smoothing", "data.auto_augment", "data.train_crop_size", "data.val_resize_size"}
    after = recipe_bench.plan(args, landed | {"data.val_crop_size", "optim.norm_weight_decay"})
    assert {"loss.label_smoothing=0.1", "data.auto_augment=trivialaugment", "optim.norm_weight_decay=0.0"} <= set(
        after.overrides()
    )
    assert {"data.train_crop_size=16", "data.val_resize_size=20", "data.val_crop_size=16"} <= set(after.overrides())
    flags = recipe_bench.torchvision_arguments(after, tmp_path, tmp_path, args)
    assert flags[flags.index("--label-smoothing") + 1] == "0.1"
    assert flags[flags.index("--auto-augment") + 1] == "ta_wide"
    assert "data.mixup_alpha" in {setting.key for setting in after.left_out}
    assert "--mixup-alpha" not in flags
    # torchvision's crop sizes are given once, whichever keys the rendered config has
    assert [flag.split("=")[0] for flag in flags].count("--train-crop-size") == 1

    args.recipe = "plain"
    plain = recipe_bench.plan(args, landed)
    assert "--label-smoothing" not in plain.flags() and not plain.left_out


def test_recipe_benchmark_refuses_a_rendered_config_without_a_base_setting():
    recipe_bench = recipe_bench_module()
    args = recipe_bench.parse_args(["--quick"])
    keys = {setting.key for setting in recipe_bench.base_settings(args)} | {"data.image_size", "data.crop_fraction"}
    with pytest.raises(SystemExit, match="optim.momentum"):
        recipe_bench.plan(args, keys - {"optim.momentum"})


def test_recipe_benchmark_reads_nested_keys_from_a_schema_with_or_without_definitions(tmp_path):
    recipe_bench = recipe_bench_module()
    section = {"type": "object", "properties": {"label_smoothing": {"type": "number"}}}
    inline = {"properties": {"epochs": {"type": "integer"}, "loss": section}}
    referenced = {
        "$defs": {"LossConfig": section},
        "properties": {
            "epochs": {"type": "integer"},
            "loss": {"anyOf": [{"$ref": "#/$defs/LossConfig"}, {"type": "null"}]},
        },
    }
    for schema in (inline, referenced):
        (tmp_path / "configs").mkdir(exist_ok=True)
        (tmp_path / "configs" / "schema.json").write_text(json.dumps(schema))
        assert recipe_bench.config_keys(tmp_path) == {"epochs", "loss", "loss.label_smoothing"}
