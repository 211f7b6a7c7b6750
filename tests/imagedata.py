"""Generated image folders for tests and benchmarks: small, learnable, written on the spot (no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Each class is a colour: learnable in a few epochs from any crop, flip or resize of its pictures.
CLASS_COLOURS = {"cat": (200, 60, 60), "dog": (60, 180, 60), "owl": (60, 60, 200)}


def write_image_folder(root: Path, per_class: int = 30, size: int = 32, seed: int = 0) -> Path:
    """``root/<class>/<n>.png``: ``per_class`` noisy ``size`` x ``size`` RGB pictures of each class colour."""
    rng = np.random.default_rng(seed)
    for name, colour in CLASS_COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index:03d}.png")
    return root
