"""From digits to your own project: image folders, torchvision models, pretrained weights, evaluate, predict.

Every picture is generated on the spot (tests/imagedata.py) and no weights are downloaded: torchvision's
published weights are tested through a file already in the torch cache, and offline without one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timing
import torch
from imagedata import CLASS_COLOURS, write_image_folder
from PIL import Image
from rendering import check, layered, project_env, render, run_module, run_python, train

CLASSES = sorted(CLASS_COLOURS)
QUICK = ("data.image_size=32", "data.batch_size=16", "log.progress_bar=false", "device=cpu")
RESNET18_STATE = """
import sys, torch, torchvision
torch.manual_seed(0)
torch.save(torchvision.models.resnet18().state_dict(), sys.argv[1])  # 1000 ImageNet classes, random weights
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """90 pictures of 3 classes, plus a transparent RGBA one, a greyscale one and a file that is no picture."""
    root = write_image_folder(tmp_path_factory.mktemp("images") / "pets", per_class=30, size=32)
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = CLASS_COLOURS["cat"], 255
    rgba[:4, :4, 3] = 0  # a transparent corner, composited onto white
    Image.fromarray(rgba, "RGBA").save(root / "cat" / "rgba.png")
    Image.fromarray(np.full((32, 32), 90, np.uint8), "L").save(root / "owl" / "grey.png")
    (root / "dog" / "notes.txt").write_text("not a picture: ignored")
    return root


@pytest.fixture(scope="module")
def project(template_dir, tmp_path_factory):
    return render(
        template_dir, tmp_path_factory.mktemp("own") / "project", {"dataset": "imagefolder", "pretrained": True}
    )


@pytest.fixture(scope="module")
def trained(project, images, tmp_path_factory):
    """A small CNN trained for 3 epochs on the pictures: the run directory."""
    out = tmp_path_factory.mktemp("trained")
    train(project, *QUICK, f"data.root={images}", "epochs=3", f"output_dir={out}")
    return out


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and expected in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_imagefolder_project_learns_the_pictures_and_checkpoints_describe_the_data(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["best_metric"] >= 0.9
    data = torch.load(trained / "checkpoints" / "best.pt", weights_only=True)["data"]
    assert data["dataset"] == "imagefolder"
    assert data["classes"] == CLASSES
    assert list(data["input_shape"]) == [3, 32, 32]
    assert data["mean"] == pytest.approx([0.485, 0.456, 0.406]) and data["std"] == pytest.approx([0.229, 0.224, 0.225])


def test_one_render_trains_digits_synthetic_and_image_folders(project, trained, tmp_path):
    for dataset in ("digits", "synthetic"):
        result = train(
            project, f"data.dataset={dataset}", "epochs=1", "log.progress_bar=false", f"output_dir={tmp_path / dataset}"
        )
        assert "epoch 1/1 |" in result.stdout
        shape = torch.load(tmp_path / dataset / "checkpoints" / "last.pt", weights_only=True)["data"]["input_shape"]
        assert list(shape) == [1, 8, 8]


def test_torchvision_resnet18_trains_one_epoch_and_its_coarse_cam_is_warned_of_once(project, images, tmp_path):
    result = train(project, *QUICK, f"data.root={images}", "model.arch=resnet18", "epochs=1", f"output_dir={tmp_path}")
    assert "epoch 1/1 |" in result.stdout
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["model"]["fc.weight"].shape == (3, 512)

    # 32 px pictures through resnet18's 32-fold downsampling: a 1x1 map, said once for the run, not per batch.
    pictures = [str(images / name / "000.png") for name in CLASSES]
    args = (str(tmp_path / "checkpoints" / "last.pt"), *pictures, "--batch-size=2", f"--cam={tmp_path / 'cams'}")
    predicted = check(run_module(project, "predict", *args), "predict", project)
    warning = "warning: the Grad-CAM map is 1x1 cells for 32x32 pictures, too coarse to show which part of a picture"
    assert predicted.stderr.count(warning) == 1, predicted.stderr
    assert "train with data.image_size=224 or more for 7x7" in predicted.stderr
    assert len(list((tmp_path / "cams").glob("000_cam*.png"))) == 3


def test_an_unknown_model_is_refused_with_close_matches(project, images, tmp_path):
    result = run_module(
        project, "train", *QUICK, f"data.root={images}", "model.arch=resnet81", f"output_dir={tmp_path}"
    )
    assert_one_line_error(result, "model.arch: unknown model 'resnet81'; did you mean resnet18")
    assert not tmp_path.joinpath("checkpoints").exists()


SPLITS_AND_SIZES = """
import collections, contextlib, io
from pathlib import Path
import torch
from my_project import data, loaders, pictures
from my_project.config import DataConfig

def val_counts(labels, seed=0, fraction=0.2):
    train, val = loaders.split_dataset(range(len(labels)), fraction, seed, labels)
    assert sorted([*train.indices, *val.indices]) == list(range(len(labels)))
    return [collections.Counter(labels[i] for i in val.indices)[c] for c in sorted(set(labels))], list(val.indices)

balanced = [0] * 60 + [1] * 60 + [2] * 60
counts, chosen = val_counts(balanced)
assert counts == [12, 12, 12], counts
assert val_counts(balanced)[1] == chosen and val_counts(balanced, seed=1)[1] != chosen  # the seed decides
# Uneven classes: 3 of 14 held out by largest remainders; a class of 2 keeps one in each split, a class of 1 trains.
assert val_counts([0] * 10 + [1] * 2 + [2] * 1)[0] == [2, 1, 0]
assert val_counts([0] * 40 + [1] * 2, fraction=0.1)[0] == [3, 1]  # round(4.2) = 4: one for the small class

digits = data.digits_splits(DataConfig(dataset="digits"), seed=0)
sizes = collections.Counter(data.digits_dataset().tensors[1].tolist())
held = collections.Counter(digits.val.dataset.tensors[1][digits.val.indices].tolist())
assert len(digits.val) == round(0.2 * 1797) and all(abs(held[c] - 0.2 * sizes[c]) < 1 for c in sizes), held

for root, expected in ((BALANCED, 12), (PETS, 6)):
    cfg = DataConfig(dataset="imagefolder", root=root)
    with contextlib.redirect_stdout(io.StringIO()) as said:
        splits = data.build_splits(cfg, seed=0)
    labels = [splits.val.dataset.samples[i][1] for i in splits.val.indices]
    assert sorted(collections.Counter(labels).values()) == [expected] * 3, (root, labels)
    assert cfg.image_size is None, cfg  # the loaded config keeps null; the size is in the data description
    print(splits.info.input_shape[1], said.getvalue().strip())

sides = {Path(f"{n}.png"): side for n, side in enumerate([375] * 5 + [100] * 6)}
assert pictures.derived_image_size([(path, 0) for path in sides], sides.get) == (96, 100, 11)
assert pictures.derived_image_size([(Path("big.png"), 0)], lambda path: 3000)[0] == 224
assert pictures.derived_image_size([(Path("half.png"), 0)], lambda path: 40)[0] == 48  # halves round up
"""


def test_validation_splits_are_stratified_and_image_size_comes_from_the_pictures(project, images, tmp_path):
    balanced = write_image_folder(tmp_path / "balanced", per_class=60, size=8)
    code = f"BALANCED, PETS = {str(balanced)!r}, {str(images)!r}\n" + SPLITS_AND_SIZES
    lines = run_python(project, code).stdout.strip().splitlines()
    # 8 px pictures are enlarged to the 16 px floor; 32 px ones keep their size. Said in one line each.
    said = "derived from the pictures (median shorter side 8 px of 64 pictures); set data.image_size to choose"
    assert lines[0] == f"16 data.image_size=16 {said}"
    assert lines[1].startswith("32 data.image_size=32 derived from the pictures (median shorter side 32 px of ")


SAMPLE_LINE = (
    "data.root is not set: using a sample image folder made from the scikit-learn digits (data/sample-images); "
    "set data.root=path/to/your/images for your own"
)


def test_an_imagefolder_render_trains_as_rendered_on_a_sample_folder_made_once(project, tmp_path):
    sample = project / "data" / "sample-images"
    quick = ("log.progress_bar=false", "device=cpu", "data.num_workers=0")  # no loader process to start
    result = train(project, *quick, "epochs=1", f"output_dir={tmp_path}")
    assert result.stdout.count(SAMPLE_LINE) == 1
    assert "data.image_size=16 derived from the pictures (median shorter side 16 px of 64 pictures)" in result.stdout
    assert sorted(path.name for path in sample.iterdir()) == [".gitignore", *map(str, range(10))]
    assert len(list(sample.glob("*/*.png"))) == 1797 and (sample / ".gitignore").read_text().endswith("\n*\n")
    assert not list(sample.parent.glob(".sample-images-*"))  # the temporary folder was renamed into place
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_metric"] > 0.2, summary  # ten classes: chance is 0.1
    checkpoint = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    # The config is saved as written (null); the derived size is in the data description.
    assert list(checkpoint["data"]["input_shape"]) == [3, 16, 16] and checkpoint["config"]["data"]["image_size"] is None

    # evaluate rebuilds the same stratified split from the same folder, left as it was, at the saved size.
    written = (sample / "0" / "0000.png").stat().st_mtime_ns
    evaluated = run_module(project, "evaluate", str(tmp_path / "checkpoints" / "best.pt"), "data.num_workers=0")
    check(evaluated, "evaluate", project)
    assert SAMPLE_LINE in evaluated.stdout and "derived" not in evaluated.stdout
    assert "359 samples of the val split" in evaluated.stdout
    assert (sample / "0" / "0000.png").stat().st_mtime_ns == written


@pytest.mark.slow
def test_the_sample_folder_is_learned_with_the_rendered_defaults(project, tmp_path):
    """What the rendered README says: about 0.95 validation accuracy in the default 20 epochs (about a minute)."""
    train(project, "log.progress_bar=false", f"output_dir={tmp_path}", timeout=900)
    assert json.loads((tmp_path / "summary.json").read_text())["best_metric"] >= 0.9


@pytest.fixture(scope="module")
def imagenet_resnet18(project, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "resnet18-imagenet.pt"
    run_python(project, RESNET18_STATE.replace("sys.argv[1]", repr(str(path))))
    return path


FC_SKIPPED = "skipped 2 (fc.weight: shape (1000, 512) != model (3, 512), fc.bias: shape (1000,) != model (3,))"


def test_a_1000_class_resnet18_loads_into_a_3_class_model_skipping_fc(project, images, imagenet_resnet18, tmp_path):
    overrides = (f"data.root={images}", "model.arch=resnet18", f"pretrained.path={imagenet_resnet18}", "epochs=1")
    result = train(project, *QUICK, *overrides, f"output_dir={tmp_path}")
    assert f"pretrained weights from {imagenet_resnet18}: loaded 120, missing 0, unexpected 0, " in result.stdout
    assert FC_SKIPPED in result.stdout


def run_offline(project, torch_home, *args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """Train (or run ``code``) with the torch cache in ``torch_home``, every download failing at once (a dead proxy)."""
    env = {**project_env(project), "TORCH_HOME": str(torch_home)}
    env.update({name: "http://127.0.0.1:9" for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")})
    command = [sys.executable, *(["-c", code] if code else ["-m", "my_project.train"]), *layered(args)]
    return timing.run(command, 300, cwd=project, env=env)


# Train with ResNet18_Weights.IMAGENET1K_V1 published under the name given first: the cache holds
# random weights, not ImageNet's, so the name must carry their own hash for them to be read.
PUBLISHED_AS = """
import sys
import torchvision
from my_project import train

torchvision.models.ResNet18_Weights.IMAGENET1K_V1.value.url = "https://download.pytorch.org/models/" + sys.argv.pop(1)
train.main(sys.argv[1:])
"""


def test_weights_by_name_come_from_the_torch_cache_and_fail_offline_in_one_line(
    project, images, imagenet_resnet18, tmp_path
):
    common = (*QUICK, f"data.root={images}", "model.arch=resnet18", "pretrained.weights=DEFAULT", "epochs=1")
    offline = run_offline(project, tmp_path / "torch", *common, f"output_dir={tmp_path / 'offline'}")
    assert_one_line_error(offline, "cannot download ResNet18_Weights.IMAGENET1K_V1")
    assert "or set pretrained.path to a local file" in offline.stderr
    assert not (tmp_path / "offline").exists()

    unknown = run_offline(
        project, tmp_path / "torch", *common, "pretrained.weights=IMAGENET9K", f"output_dir={tmp_path / 'x'}"
    )
    assert_one_line_error(unknown, "ResNet18_Weights has no 'IMAGENET9K'; choose one of IMAGENET1K_V1, DEFAULT")

    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)  # the failed download made it
    name = f"resnet18-{hashlib.sha256(imagenet_resnet18.read_bytes()).hexdigest()[:8]}.pth"
    shutil.copy(imagenet_resnet18, cache / name)
    cached = run_offline(
        project, tmp_path / "torch", name, *common, f"output_dir={tmp_path / 'cached'}", code=PUBLISHED_AS
    )
    check(cached, "training from cached weights", project)
    assert "pretrained weights DEFAULT of resnet18: loaded 120, missing 0, unexpected 0, " in cached.stdout
    assert FC_SKIPPED in cached.stdout


# Files planted in the torch cache under a published weights' name: random weights under torchvision's
# name for them, then a pickle that would touch MARKER when unpickled, named with its own hash.
PLANTED = """
import hashlib, shutil
from pathlib import Path
import torch, torchvision
from my_project.checkpoint import CheckpointError
from my_project.config import ModelConfig
from my_project.data import DataInfo
from my_project.model import build_model
from my_project.pretrained import load_torchvision_weights

marker, cache = Path(MARKER), Path(torch.hub.get_dir()) / "checkpoints"  # in $TORCH_HOME
cache.mkdir(parents=True)
info = DataInfo("imagefolder", ["a", "b"], (3, 32, 32), [0.5] * 3, [0.5] * 3)
model = build_model(ModelConfig(arch="resnet18"), info)


def outcome():
    try:
        return str(load_torchvision_weights(model, "resnet18", "DEFAULT", []))
    except CheckpointError as err:
        return str(err)


shutil.copy(WEIGHTS, cache / "resnet18-f37072fd.pth")
print(outcome())


class Payload:
    def __reduce__(self):
        return (Path.touch, (marker,))


crafted = cache / "crafted.pth"
torch.save({"fc.weight": Payload()}, crafted)
crafted = crafted.rename(cache / f"resnet18-{hashlib.sha256(crafted.read_bytes()).hexdigest()[:8]}.pth")
torchvision.models.ResNet18_Weights.IMAGENET1K_V1.value.url = f"https://download.pytorch.org/models/{crafted.name}"
print(outcome())
print(f"marker: {marker.exists()}")
"""


def test_a_file_planted_in_the_torch_cache_is_read_only_with_the_published_hash_and_never_unpickled(
    project, imagenet_resnet18, tmp_path
):
    code = PLANTED.replace("MARKER", repr(str(tmp_path / "unpickled"))).replace("WEIGHTS", repr(str(imagenet_resnet18)))
    result = check(run_offline(project, tmp_path / "torch", code=code), "planted files", project)
    wrong_hash, pickled, marker = result.stdout.strip().splitlines()[-3:]
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert wrong_hash.startswith(f"{cache / 'resnet18-f37072fd.pth'} is not ResNet18_Weights.IMAGENET1K_V1: ")
    assert "its SHA-256 does not begin with f37072fd" in wrong_hash and "remove it to download it again" in wrong_hash
    assert "holds more than tensors and plain values: refused, not unpickled" in pickled, pickled
    assert marker == "marker: False"


# 16-bit greyscale pictures, the smallest pictures torchvision's models take, and pretrained.path
# with pretrained.weights, each checked in the project's own functions.
PICTURES_AND_SIZES = """
import numpy as np
import torch
from PIL import Image
from my_project import train
from my_project.config import ConfigError, load_config
from my_project.pictures import DataInfo, read_image
from my_project.model import check_input_size

grey = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
Image.fromarray(grey).save(PATH)
picture = np.asarray(read_image(PATH))
print(Image.open(PATH).mode, picture.shape, picture.min(), picture.max(), round(float(picture.mean()), 1))
for arch, side in [("inception_v3", 32), ("inception_v3", 75), ("vit_b_16", 30), ("vit_b_16", 32), ("resnet18", 8)]:
    try:
        check_input_size(arch, side, side)
        print("ok")
    except ConfigError as err:
        print(err)
cfg = load_config(None, ["model.arch=resnet18", "pretrained.path=weights.pt", "pretrained.weights=DEFAULT"])
info = DataInfo("imagefolder", ["a", "b"], (3, 32, 32), [0.5] * 3, [0.5] * 3)
try:
    train.build_state(cfg, torch.device("cpu"), 1, info)
except ConfigError as err:
    print(err)
"""


def test_16_bit_pictures_small_pictures_and_two_pretrained_sources_are_handled_before_training(project, tmp_path):
    code = PICTURES_AND_SIZES.replace("PATH", repr(str(tmp_path / "grey16.png")))
    picture, *sizes, both = run_python(project, code).stdout.strip().splitlines()[-7:]
    # 0..65535 scaled to 0..255, not clipped to white.
    assert picture == "I;16 (64, 64, 3) 0 255 127.5", picture
    assert sizes == [
        "model.arch=inception_v3 takes pictures of at least 75x75 pixels, not 32x32: set data.image_size=75 or more",
        "ok",
        "model.arch=vit_b_16 cuts pictures into 16x16 patches: data.image_size must be a multiple of 16 (32, say), "
        "not 30",
        "ok",
        "ok",
    ]
    assert both == "pretrained.path and pretrained.weights are both set: keep one, set the other to null"


@pytest.fixture(scope="module")
def split_images(tmp_path_factory):
    """train/, val/ and test/ folders of class folders."""
    root = tmp_path_factory.mktemp("splits") / "pets"
    write_image_folder(root / "train", per_class=20, size=32, seed=1)
    write_image_folder(root / "val", per_class=5, size=32, seed=2)
    write_image_folder(root / "test", per_class=7, size=32, seed=3)
    return root


def test_evaluate_writes_a_confusion_matrix_over_the_test_split_and_never_overwrites(project, split_images, tmp_path):
    train(project, *QUICK, f"data.root={split_images}", "epochs=2", f"output_dir={tmp_path}")
    checkpoint = tmp_path / "checkpoints" / "best.pt"
    result = check(run_module(project, "evaluate", str(checkpoint)), "evaluate", project)
    assert "21 samples of the test split" in result.stdout
    assert "optimistic" not in result.stdout  # pictures training never saw
    assert all(name in result.stdout for name in CLASSES)
    folder = tmp_path / "evaluations" / "best-test"
    report = json.loads((folder / "evaluation.json").read_text())
    assert sum(map(sum, report["confusion_matrix"])) == report["samples"] == 3 * 7
    assert report["classes"] == CLASSES and set(report["per_class_accuracy"]) == set(CLASSES)
    assert (folder / "confusion_matrix.png").stat().st_size > 0

    # The validation split, with the data moved: an override points at them; a second evaluation of
    # the same split goes to a new folder; an existing --output is refused unless --overwrite.
    moved = tmp_path / "moved"
    shutil.copytree(split_images, moved)
    check(run_module(project, "evaluate", str(checkpoint), f"data.root={moved}", "--split=val"), "evaluate", project)
    result = run_module(project, "evaluate", str(checkpoint), f"data.root={moved}", "--split=val")
    assert "15 samples of the val split" in check(result, "evaluate", project).stdout
    note = "note: training chose this checkpoint by its val_accuracy on this split, so the figures are optimistic"
    assert note in result.stdout and "a test/ folder of class folders beside train/ and val/" in result.stdout
    assert f"wrote {tmp_path / 'evaluations' / 'best-val-2' / 'evaluation.json'} and " in result.stdout
    assert json.loads((tmp_path / "evaluations" / "best-val-2" / "evaluation.json").read_text())["samples"] == 15
    refused = run_module(project, "evaluate", str(checkpoint), f"--output={folder}")
    assert_one_line_error(refused, "already exists; pass --overwrite")
    check(run_module(project, "evaluate", str(checkpoint), f"--output={folder}", "--overwrite"), "evaluate", project)


def test_predict_prints_top_k_writes_csv_and_one_cam_per_picture(project, trained, split_images, tmp_path):
    pictures = split_images / "test"
    out_csv, cams = tmp_path / "predictions.csv", tmp_path / "cams"
    args = (
        str(trained / "checkpoints" / "best.pt"),
        str(pictures),
        "--top-k=2",
        f"--output={out_csv}",
        f"--cam={cams}",
    )
    result = check(run_module(project, "predict", *args), "predict", project)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 21
    said = f"wrote 21 prediction(s) to {out_csv}\nwrote 21 Grad-CAM map(s) to {cams}"
    assert result.stderr.strip() == said  # the cnn's 16x16 map at 32 px is fine enough: no warning
    written = out_csv.read_bytes()
    refused = run_module(project, "predict", *args[:2], f"--output={out_csv}")
    assert_one_line_error(refused, f"{out_csv} already exists; pass --overwrite")
    assert out_csv.read_bytes() == written
    right = sum(line.split()[0].split("/")[-2] == line.split()[1] for line in lines)  # .../test/<class>/<n>.png
    assert right >= 19
    assert len(out_csv.read_text().splitlines()) == 22
    assert out_csv.read_text().splitlines()[0] == "path,class_1,probability_1,class_2,probability_2"
    assert len(list(cams.glob("*.png"))) == 21  # same file names in three folders: none overwritten
    width, height = Image.open(cams / "000_cam.png").size
    assert height > 256 and width > height  # the 32 px picture scaled to 256, a caption, a colour bar


def test_cam_is_refused_for_a_model_without_convolutions(project, images, tmp_path):
    train(project, *QUICK, f"data.root={images}", "model.arch=mlp", "epochs=1", f"output_dir={tmp_path}")
    picture = str(images / "cat" / "000.png")
    cams = tmp_path / "cams"
    result = run_module(project, "predict", str(tmp_path / "checkpoints" / "last.pt"), picture, f"--cam={cams}")
    assert_one_line_error(result, "--cam needs a convolutional layer; model.arch=mlp has none")
    assert not cams.exists()


def corrupt(root):
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


def single_class(root):
    for name in ("dog", "owl"):
        shutil.rmtree(root / name)


def empty_class(root):
    for picture in (root / "owl").iterdir():
        picture.unlink()


def split_without_val(root):
    (root / "train").mkdir()
    for name in CLASSES:
        (root / name).rename(root / "train" / name)


@pytest.mark.parametrize(
    ("damage", "root_override", "expected"),
    [
        (None, "data.root={root}/absent", "absent does not exist"),
        (lambda root: [shutil.rmtree(root / name) for name in CLASSES], None, "holds no folders"),
        (empty_class, None, "owl holds no images"),
        (single_class, None, "has 1 class folder(s) ['cat']; a classifier needs at least 2"),
        (split_without_val, None, "holds train: give it train/ and val/"),
        (corrupt, None, "broken.png is not a readable image (cannot identify image file"),
    ],
    ids=["missing", "empty", "class-without-images", "one-class", "train-without-val", "corrupt"],
)
def test_bad_data_stops_with_one_line_and_writes_nothing(project, images, tmp_path, damage, root_override, expected):
    root = shutil.copytree(images, tmp_path / "pets")
    if damage is not None:
        damage(root)
    override = (root_override or "data.root={root}").format(root=root)
    out = tmp_path / "run"
    result = run_module(project, "train", *QUICK, override, "epochs=1", f"output_dir={out}")
    assert_one_line_error(result, expected)
    if damage is corrupt:
        assert "stopping: fix or remove the file" in result.stderr
    if damage is not corrupt:  # a picture found corrupt mid-epoch stops the run before anything is saved
        assert not out.exists()
    assert not (out / "checkpoints").exists()


def test_evaluate_and_predict_refuse_another_projects_checkpoint_and_missing_inputs(
    project, trained, default_project, tmp_path
):
    foreign = trained / "checkpoints" / "best.pt"  # its config has data.root, which the digits project lacks
    result = run_module(default_project, "evaluate", str(foreign), f"--output={tmp_path / 'eval'}")
    assert_one_line_error(result, "comes from another project: its config does not fit this one")
    assert not (tmp_path / "eval").exists()
    result = run_module(default_project, "predict", str(foreign), str(tmp_path))
    assert_one_line_error(result, "comes from another project")

    not_a_checkpoint = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, not_a_checkpoint)
    result = run_module(project, "predict", str(not_a_checkpoint), str(tmp_path))
    assert_one_line_error(result, "is not a training checkpoint of this project")

    result = run_module(
        project, "predict", str(foreign), str(tmp_path / "absent.png"), f"--output={tmp_path / 'p.csv'}"
    )
    assert_one_line_error(result, "absent.png does not exist")
    assert not (tmp_path / "p.csv").exists()
    assert os.listdir(tmp_path) == ["weights.pt"]
