"""Segmentation renders: the rendered defaults learn the generated shapes, evaluate and predict write what
they say, bad masks stop with one line, and torchvision's segmentation models build and train offline.

Every picture and mask is generated on the spot; nothing is downloaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from rendering import check, render, run_module, train

QUICK = ("log.progress_bar=false", "device=cpu")


@pytest.fixture(scope="module")
def project(template_dir, tmp_path_factory):
    return render(template_dir, tmp_path_factory.mktemp("segmentation") / "project", {"task": "segmentation"})


@pytest.fixture(scope="module")
def trained(project, tmp_path_factory):
    """The rendered defaults, on the shapes, for 3 epochs (the cosine schedule spans them): the run directory."""
    out = tmp_path_factory.mktemp("trained")
    train(project, *QUICK, "epochs=3", f"output_dir={out}")
    return out


def write_pairs(root, count=6, size=(40, 30)):
    """``count`` pictures in root/images with their masks in root/masks (3 classes, named in classes.txt)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        mask = rng.integers(0, 3, size[::-1]).astype(np.uint8)
        Image.fromarray(mask * 100).convert("RGB").save(root / "images" / f"street-{index}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"street-{index}.png")
    (root / "classes.txt").write_text("sky\nroad\ncar\n")
    return root


def test_the_rendered_defaults_learn_the_shapes_to_a_miou_above_0_7(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["best_metric_name"] == "val_miou"
    assert summary["best_metric"] >= 0.7, summary
    assert set(summary["final_metrics"]) >= {"val_pixel_accuracy", "val_iou_circle", "val_iou_triangle"}


def test_evaluate_prints_iou_per_class_and_writes_overlays(project, trained):
    best = trained / "checkpoints" / "best.pt"
    result = check(run_module(project, "evaluate", str(best), "--device=cpu"), "evaluate", project)
    folder = trained / "evaluations" / "best-val"
    evaluation = json.loads((folder / "evaluation.json").read_text())
    assert evaluation["miou"] >= 0.7 and evaluation["per_class_iou"].keys() == {
        "background",
        "circle",
        "square",
        "triangle",
    }
    assert len(list(folder.glob("overlay-*.png"))) == 6
    assert "  circle      IoU " in result.stdout and "miou" in result.stdout


def test_predict_writes_a_mask_and_an_overlay_the_size_of_each_picture(project, trained, tmp_path):
    sizes = {"wide": (45, 33), "tall": (20, 64)}
    rng = np.random.default_rng(1)
    for name, (width, height) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    out = tmp_path / "masks"
    pictures = [str(tmp_path / f"{name}.png") for name in sizes]
    result = check(
        run_module(project, "predict", str(trained / "checkpoints" / "best.pt"), *pictures, f"--output={out}"),
        "predict",
        project,
    )
    assert result.stderr.strip() == f"wrote 2 mask(s) and overlay(s) to {out}"
    assert len(result.stdout.splitlines()) == 2
    for name, size in sizes.items():
        mask = Image.open(out / f"{name}.png")
        assert (mask.size, mask.mode) == (size, "P")
        assert np.asarray(mask).max() <= 3  # class indices
        assert Image.open(out / f"{name}_overlay.png").size == size


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda root: (root / "masks" / "street-2.png").unlink(), "street-2.jpg has no mask: "),
        (
            lambda root: Image.new("L", (40, 20)).save(root / "masks" / "street-1.png"),
            "street-1.png is 40x20 pixels but its picture",
        ),
        (
            lambda root: Image.new("L", (40, 30), 3).save(root / "masks" / "street-3.png"),
            "street-3.png holds class index 3, but",
        ),
    ],
    ids=["picture without a mask", "mask of another size", "class index out of range"],
)
def test_bad_masks_stop_training_with_one_line_naming_the_file(project, tmp_path, damage, expected):
    root = write_pairs(tmp_path / "data")
    damage(root)
    out = tmp_path / "run"
    result = run_module(project, "train", *QUICK, "data.dataset=folders", f"data.root={root}", f"output_dir={out}")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not out.exists()  # refused before anything was written


def test_folders_train_on_a_sample_folder_until_data_root_is_set(project):
    result = check(
        run_module(project, "train", *QUICK, "data.dataset=folders", "debug.fast_run=true"), "train", project
    )
    assert "data.root is not set: using a sample folder of generated shapes and their masks" in result.stdout
    sample = project / "data" / "sample-segmentation"
    assert len(list((sample / "masks").glob("*.png"))) == len(list((sample / "images").glob("*.png"))) == 512
    assert (sample / "classes.txt").read_text().split() == ["background", "circle", "square", "triangle"]


def test_a_torchvision_segmentation_model_trains_offline(project):
    # Random weights for the model and its backbone: nothing is downloaded.
    overrides = (
        "model.arch=lraspp_mobilenet_v3_large",
        "data.shapes_count=64",
        "data.batch_size=8",
        "debug.fast_run=true",
    )
    result = check(run_module(project, "train", *QUICK, *overrides), "train", project)
    assert "fast_run passed" in result.stdout
