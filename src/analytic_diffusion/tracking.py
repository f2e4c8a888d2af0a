"""Optional Weights & Biases logging of a run (off by default, offline mode supported, never required)."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from omegaconf import OmegaConf

from .config import StudioConfig
from .errors import StudioError


def wandb_module(cfg: StudioConfig) -> ModuleType | None:
    """The wandb module when `logging.wandb` is on (checked before any work starts), else None."""
    if not cfg.logging.wandb:
        return None
    try:
        return importlib.import_module("wandb")
    except ImportError:
        raise StudioError("logging.wandb=true needs Weights & Biases: `pip install wandb`, or set logging.wandb=false") from None


def log_run(wandb: ModuleType, cfg: StudioConfig, run_dir: Path, metrics: dict[str, Any]) -> None:
    """One W&B run per studio run: the resolved config, per-step timings, the grid and the summary numbers."""
    run = wandb.init(project=cfg.logging.wandb_project, mode=cfg.logging.wandb_mode, dir=str(run_dir),
                     name=run_dir.name, group=cfg.experiment.name,
                     config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    try:
        for index, step in enumerate(metrics["steps"]):
            run.log({"step_seconds": step["seconds"], "timestep": step["timestep"]}, step=index)
        summary = {k: metrics[k] for k in ("fit_seconds", "sampling_seconds", "seconds_per_step", "dataset_size")}
        if (run_dir / "grid.png").exists():
            summary["grid"] = wandb.Image(str(run_dir / "grid.png"))
        run.log(summary)
    finally:
        run.finish()
