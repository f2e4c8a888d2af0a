"""Run directories and the artifacts written into them.

A run directory is created with an INCOMPLETE marker that is removed only when every artifact is written,
so a run that fails or is interrupted part-way is always recognisable as such.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import make_grid, save_image

from .errors import StudioError
from .fileio import atomic_write, atomic_write_json, atomic_write_text, make_directory

INCOMPLETE = "INCOMPLETE"
LEGIBLE_SIDE = 64  # figures show every image at least this many pixels on its shorter side
SWEEPS_FOLDER = "sweeps"  # under paths.runs: the folder of every `ads sweep` (<runs>/sweeps/<sweep>/<cell>)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] to displayable [0, 1], clamped."""
    return ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)


def legible(images: torch.Tensor, min_side: int = LEGIBLE_SIDE) -> torch.Tensor:
    """Images [..., H, W] enlarged by the smallest whole factor that makes min(H, W) >= `min_side`, each pixel
    repeated (nearest neighbour, no blur); images that are large enough come back unchanged."""
    factor = math.ceil(min_side / min(images.shape[-2:]))
    if factor <= 1:
        return images
    return images.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


def save_grid(images: torch.Tensor, path: Path, columns: int | None = None) -> None:
    """Save model-space images [N, C, H, W] as one grid PNG, about square unless `columns` is given; small images
    are enlarged (`legible`) so that a 28-pixel digit is not a speck."""
    columns = columns or math.ceil(math.sqrt(images.shape[0]))
    grid = make_grid(legible(to_unit_range(images)), nrow=columns, padding=2, pad_value=1.0)
    atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))


def save_images(images: torch.Tensor, folder: Path, prefix: str = "sample") -> None:
    """Save each model-space image as <folder>/<prefix>_0000.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(to_unit_range(images)):
        atomic_write(folder / f"{prefix}_{i:04d}.png", lambda tmp, image=image: save_image(image, tmp, format="png"))


def save_tensor(value: Any, path: Path) -> None:
    """torch.save, atomically."""
    atomic_write(path, lambda tmp: torch.save(value, tmp))


class RunDirectory:
    """<runs>/<experiment>/<run_name>[_<timestamp>]/ holding one run's config, artifacts, metrics and log."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls, runs_root: Path, experiment: str, run_name: str, append_timestamp: bool) -> RunDirectory:
        """Make a fresh directory (never reuse one) and mark it incomplete."""
        name = f"{run_name}_{datetime.now():%Y%m%d-%H%M%S}" if append_timestamp else run_name
        path = runs_root / experiment / name
        suffix = 1
        while path.exists():
            if not append_timestamp:
                raise StudioError(
                    f"run directory {path} already exists; choose another experiment.run_name "
                    "or set experiment.append_timestamp=true"
                )
            path = runs_root / experiment / f"{name}-{suffix}"
            suffix += 1
        make_directory(path, "paths.runs", exist_ok=False)
        (path / INCOMPLETE).write_text("run started; not finished\n")
        return cls(path)

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text)

    def write_json(self, name: str, data: Any) -> None:
        atomic_write_json(self.path / name, data)

    def attach_log(self, logger: logging.Logger) -> logging.Handler:
        """Send `logger`'s records to <run>/run.log as well."""
        handler = logging.FileHandler(self.path / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        return handler

    @staticmethod
    def log_only(handler: logging.Handler, message: str) -> None:
        """Write an ERROR record to the run's log file only (not to the console, where the caller reports it)."""
        handler.handle(logging.LogRecord("analytic_diffusion", logging.ERROR, __file__, 0, message, None, None))

    def mark_failed(self, reason: str) -> None:
        """Record why the run stopped; the INCOMPLETE marker stays."""
        (self.path / INCOMPLETE).write_text(f"run failed: {reason}\n")

    def mark_complete(self) -> None:
        (self.path / INCOMPLETE).unlink(missing_ok=True)
