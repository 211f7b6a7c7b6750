"""The rendered README documents every setting its project has: each config key appears in it."""

from __future__ import annotations

import json

import pytest
from rendering import run_package_code

MAXIMAL = {
    "parallelism": "ddp",
    "sync_batchnorm": True,
    "scheduler": "cosine",
    "warmup": True,
    "layer_lr": True,
    "grad_clip": "norm",
    "grad_accumulation": True,
    "ema": True,
    "early_stopping": True,
    "freezing": "patterns",
    "freeze_bn": True,
    "pretrained": True,
    "amp": "fp16",
    "compile": True,
    "loggers": ["csv", "tensorboard", "wandb", "mlflow"],
    "weight_init": "normal",
}
OTHERS = {
    "parallelism": "dataparallel",
    "device": "cpu",
    "optimizer": "sgd",
    "scheduler": "plateau",
    "grad_clip": "value",
    "freezing": "first_n",
    "loggers": [],
}
# FSDP with what it changes: its own section and keys, checkpoint directories, EMA and accumulation notes.
FSDP = {**MAXIMAL, "parallelism": "fsdp", "sync_batchnorm": False, "dataset": "imagefolder", "sweeps": True}
CASES = {"default": {}, "maximal": MAXIMAL, "others": OTHERS, "fsdp": FSDP}
for scheduler in ("step", "multistep", "exponential", "lambda", "onecycle", "none"):
    CASES[scheduler] = {"scheduler": scheduler}

CONFIG_KEYS = """
import json
from pydantic import BaseModel
config = importlib.import_module(pkg + ".config")

def keys(section, prefix=""):
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            yield from keys(value, f"{prefix}{name}.")
        else:
            yield prefix + name

print(json.dumps(list(keys(config.Config()))))
"""


@pytest.mark.parametrize("case", CASES)
def test_every_config_key_of_a_render_is_documented_in_its_readme(render_project, case):
    project = render_project(**CASES[case])
    keys = json.loads(run_package_code(project, CONFIG_KEYS).stdout)
    readme = (project / "README.md").read_text()
    missing = [key for key in keys if f"`{key}" not in readme]
    assert not missing, f"config keys missing from the README of the {case} render: {missing}"
