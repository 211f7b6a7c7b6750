"""Images/s of the rendered imagefolder training loader against a plain ImageFolder + DataLoader loop.

    python benchmarks/loader_bench.py                 # 3 classes x 300 pictures of 96x96, crops of 64
    python benchmarks/loader_bench.py --workers 0,2,4 --epochs 4
    python benchmarks/loader_bench.py --quick         # smoke run, seconds

Both read the same generated folder of PNGs with the same training transform (the rendered
``images.train_transform``: random resized crop, flip, float, normalise) and batch size, for each
``num_workers``; the loop only takes each batch (no model), so the figures are the loader's ceiling.
The plain loop is what one writes from the torchvision docs: ``ImageFolder`` and ``DataLoader(shuffle=True,
num_workers=N)``, whose workers start again every epoch. The rendered loader keeps its workers
(``persistent_workers``), lets each prepare ``prefetch_factor`` batches ahead and draws its order from
``EpochSampler``. The first epoch (worker start-up included) is reported apart from the later ones.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from harness import render_project
from imagedata import write_image_folder


def time_epochs(make_epoch: Callable[[int], Iterable], epochs: int) -> list[float]:
    """Images/s of each epoch: every batch taken, nothing computed."""
    rates = []
    for epoch in range(epochs):
        started, images = time.perf_counter(), 0
        for inputs, _ in make_epoch(epoch):
            images += len(inputs)
        rates.append(images / (time.perf_counter() - started))
    return rates


def rendered_loader(project, root: Path, workers: int, image_size: int, batch_size: int):
    overrides = [f"data.root={root}", f"data.image_size={image_size}", f"data.batch_size={batch_size}"]
    cfg = project.config.load_config(None, [*overrides, f"data.num_workers={workers}", "data.val_fraction=0.01"])
    splits = project.data.build_splits(cfg.data, cfg.seed)
    train_loader, _ = project.loaders.build_loaders(cfg.data, splits, cfg.seed)

    def epoch(number: int):
        train_loader.sampler.set_epoch(number)
        train_loader.generator.manual_seed(cfg.seed + number)
        return train_loader

    return epoch, cfg


def plain_loader(project, cfg, root: Path, workers: int):
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(root), transform=project.images.train_transform(cfg.data))
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=True, num_workers=workers, drop_last=True)
    return lambda number: (torch.manual_seed(number), loader)[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="0,2", help="num_workers values to compare (comma-separated)")
    parser.add_argument("--per-class", type=int, default=300, help="pictures per class (3 classes)")
    parser.add_argument("--picture-size", type=int, default=96, help="side of the generated PNGs")
    parser.add_argument("--image-size", type=int, default=64, help="data.image_size: side of the crops")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per loader; the first is reported apart")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.per_class, args.picture_size, args.image_size, args.batch_size, args.epochs = 12, 32, 16, 8, 2

    with tempfile.TemporaryDirectory(prefix="loader-bench-") as scratch:
        workdir = Path(scratch)
        project = render_project(workdir, "loader_bench", {"dataset": "imagefolder"})
        root = write_image_folder(workdir / "pictures", per_class=args.per_class, size=args.picture_size)
        print(
            f"{3 * args.per_class} PNGs of {args.picture_size}x{args.picture_size}, crops of {args.image_size}, "
            f"batch {args.batch_size}, {args.epochs} epochs per loader"
        )
        print(f"{'loader':<26}{'workers':>8}{'first epoch':>14}{'later epochs':>15}   images/s")
        for workers in (int(value) for value in args.workers.split(",")):
            epoch, cfg = rendered_loader(project, root, workers, args.image_size, args.batch_size)
            contenders = {
                "rendered build_loaders": epoch,
                "plain ImageFolder": plain_loader(project, cfg, root, workers),
            }
            for name, make_epoch in contenders.items():
                rates = time_epochs(make_epoch, args.epochs)
                later = statistics.median(rates[1:]) if len(rates) > 1 else float("nan")
                print(f"{name:<26}{workers:>8}{rates[0]:>14.0f}{later:>15.0f}", flush=True)


if __name__ == "__main__":
    main()
