"""A render describes only itself: its src/ names no feature, backend or file that its answers left out.

nanoGPT's comments are true for the one configuration they describe; so must a rendered project's be.
For each optional feature, the words that only that feature's code would use; a render whose answers lack
the feature must not contain them in any comment, docstring, message, constant or name under src/.
Checked on renders that together leave out every feature: the default project, a bare one (nothing
optional) and two that each lack what the other has.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from questionnaire import resolve_answers
from rendering import render

# feature: (present in these answers?, the words only its code uses)
FEATURES: dict[str, tuple[Callable[[dict], bool], str]] = {
    "fsdp": (lambda a: a["parallelism"] == "fsdp", r"fsdp|fully_shard|\bDCP\b|distributed checkpoint|\bshards?\b"),
    "ddp or fsdp": (
        lambda a: a["parallelism"] in ("ddp", "fsdp"),
        r"\bddp\b|DistributedDataParallel|torchrun|\bgloo\b|\bnccl\b|rendezvous|all_reduce",
    ),
    "dataparallel": (lambda a: a["parallelism"] == "dataparallel", r"(?<!Distributed)DataParallel"),
    "sync_batchnorm": (lambda a: a.get("sync_batchnorm", False), r"SyncBatchNorm"),
    "ema": (lambda a: a["ema"], r"\bema\b|moving average"),
    "sweeps": (lambda a: a["sweeps"], r"sweep|optuna"),
    "wandb": (lambda a: "wandb" in a["loggers"], r"wandb|weights & biases"),
    "mlflow": (lambda a: "mlflow" in a["loggers"], r"mlflow"),
    "tensorboard": (lambda a: "tensorboard" in a["loggers"], r"tensorboard"),
    "csv": (lambda a: "csv" in a["loggers"], r"metrics\.csv|csv_logger"),
    "image folders": (lambda a: a["dataset"] == "imagefolder", r"imagefolder|image folder|sample-images"),
    "data in folders": (lambda a: a["dataset"] == "imagefolder" or a.get("task") == "segmentation", r"data\.root"),
    "pretrained": (lambda a: a["pretrained"], r"pretrained"),
    "freezing": (lambda a: a["freezing"] != "none" or a["freeze_bn"], r"freez|unfreeze"),
    "schedule": (lambda a: a["scheduler"] != "none", r"lr_scheduler|cosine|warmup|schedule\.py|\bplateau\b"),
    "warmup": (lambda a: a.get("warmup", False) and a["scheduler"] != "plateau", r"warmup"),
    "grad_clip": (lambda a: a["grad_clip"] != "none", r"clip_grad|max_grad_norm|clip_value"),
    "grad_accumulation": (lambda a: a["grad_accumulation"], r"accumulation_steps|no_sync"),
    "early_stopping": (lambda a: a["early_stopping"], r"early.stopping"),
    "layer_lr": (lambda a: a["layer_lr"], r"lr_multipliers|layer_lr"),
    "model_summary": (lambda a: a["model_summary"], r"torchinfo"),
    # Each task's own vocabulary: what it predicts and how it is scored.
    "classification": (
        lambda a: a.get("task", "classification") == "classification",
        r"grad.cam|val_accuracy|per-class accuracy|top.k class",
    ),
    # Classification's metrics come from a confusion matrix, and so do segmentation's (pixels of a class
    # predicted as each class).
    "confusion matrix": (lambda a: a.get("task", "classification") in ("classification", "segmentation"), r"confusion"),
    "regression": (lambda a: a.get("task") == "regression", r"regression|\br2\b|R²|val_rmse|val_mae"),
    "segmentation": (lambda a: a.get("task") == "segmentation", r"segment|\bi_?o_?u\b|miou|\bmasks?\b|ignore_index"),
    "pictures": (
        lambda a: a.get("task") == "segmentation" or a.get("dataset") in ("digits", "synthetic", "imagefolder"),
        r"picture|pixel|\bimages?\b|\bPIL\b|Pillow|digits",
    ),
    "tables": (lambda a: a.get("dataset") in ("csv", "diabetes"), r"data\.target|one-hot|diabetes|\bwine\b"),
    "a file in data.path": (
        lambda a: a.get("dataset") in ("csv", "diabetes") or a.get("task") == "language_model",
        r"data\.path",
    ),
    "language_model": (
        lambda a: a.get("task") == "language_model",
        r"\btokens?\b|tokeni[sz]|\bGPT\b|perplexity|bits.per.byte|vocab|block_size|windows_per_epoch",
    ),
}

# torch.profiler's own vocabulary (its schedule's warmup, its TensorBoard trace writer) is not a feature.
PROFILER = re.compile(r"PROFILE_SCHEDULE|torch\.profiler")

RENDERS = {
    "defaults": {},
    "bare": {
        "device": "cpu",
        "scheduler": "none",
        "loggers": [],
        "nonfinite_guard": False,
    },
    "ddp-with-features": {
        "parallelism": "ddp",
        "scheduler": "onecycle",
        "grad_clip": "norm",
        "grad_accumulation": True,
        "ema": True,
        "loggers": ["tensorboard"],
        "model_summary": True,
    },
    "fsdp-on-image-folders": {
        "parallelism": "fsdp",
        "dataset": "imagefolder",
        "pretrained": True,
        "freezing": "patterns",
        "scheduler": "step",
        "warmup": True,
        "layer_lr": True,
        "early_stopping": True,
        "sweeps": True,
        "loggers": ["wandb", "mlflow"],
    },
    "regression-with-features": {
        "task": "regression",
        "parallelism": "ddp",
        "ema": True,
        "freeze_bn": True,
        "loggers": ["tensorboard"],
        "model_summary": True,
    },
    "language-model-with-features": {
        "task": "language_model",
        "dataset": "text",
        "parallelism": "fsdp",
        "pretrained": True,
        "freezing": "patterns",
        "ema": True,
        "early_stopping": True,
        "loggers": ["tensorboard", "csv"],
        "model_summary": True,
        "sweeps": True,
    },
    "classification-of-a-table": {"task": "classification", "dataset": "csv", "pretrained": True, "sweeps": True},
    "segmentation-with-features": {
        "task": "segmentation",
        "dataset": "folders",
        "parallelism": "fsdp",
        "pretrained": True,
        "freezing": "patterns",
        "scheduler": "plateau",
        "early_stopping": True,
        "loggers": ["csv", "wandb"],
    },
}


def test_every_feature_is_left_out_by_some_render():
    for feature, (present, _) in FEATURES.items():
        assert any(not present(resolve_answers(answers)) for answers in RENDERS.values()), feature


@pytest.mark.parametrize("answers", RENDERS.values(), ids=list(RENDERS))
def test_a_render_names_no_feature_it_lacks(template_dir, tmp_path, answers):
    project = render(template_dir, tmp_path / "project", answers)
    resolved = resolve_answers(answers)
    found = []
    for feature, (present, words) in FEATURES.items():
        if present(resolved):
            continue
        # A record of the answers that says the feature is absent ("ema": False) is true for the render.
        pattern = re.compile(rf"(?:{words})\w*+(?!\"\s*:\s*(?:False|\"none\"))", re.IGNORECASE)
        for path in sorted((project / "src").rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line) and not PROFILER.search(line):
                    found.append(f"{path.relative_to(project)}:{number}: [{feature}] {line.strip()}")
    assert not found, "the render names features it lacks:\n" + "\n".join(found)
