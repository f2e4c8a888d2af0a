"""UNet checkpoints: weights together with everything needed to rebuild and check them.

A checkpoint stores the architecture, the image shape and noise schedule it was trained for, the dataset's
fingerprint, the raw and EMA weights, and (for resuming) the training state. Loading rebuilds the network from
the stored architecture and refuses, with a one-line StudioError, anything that does not fit exactly: a file that
cannot be read, missing/unexpected/mis-shaped tensors, non-finite weights, or another image shape. A network is
never returned with any weight left at its random initialisation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import StudioError
from ..fileio import atomic_write
from .model import UNetConfig
from .networks import build_unet
from .schedule import NoiseSchedule

FORMAT = "analytic-diffusion-unet"
VERSION = 1
FILENAME = "checkpoint.pt"  # the file inside a training folder; a folder can be given wherever a path is expected


@dataclass
class UNetCheckpoint:
    """The contents of one checkpoint file."""

    architecture: UNetConfig
    image_shape: tuple[int, int, int]  # (C, H, W) of the training images; H == W
    model: dict[str, torch.Tensor]  # the weights being trained
    ema: dict[str, torch.Tensor]  # their exponential moving average: what one samples with
    schedule: NoiseSchedule = NoiseSchedule()
    dataset: dict[str, Any] = field(default_factory=dict)  # name and fingerprint of the training store
    training: dict[str, Any] = field(default_factory=dict)  # optimizer, EMA step, epoch, step, RNG states, losses


def checkpoint_path(path: str | Path) -> Path:
    """The checkpoint file: `path` itself, or `path/checkpoint.pt` when `path` is a training folder."""
    path = Path(path).expanduser()
    return path / FILENAME if path.is_dir() else path


def save_checkpoint(path: Path, checkpoint: UNetCheckpoint) -> None:
    """Write atomically: an interrupted save leaves the previous checkpoint intact."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": dataclasses.asdict(checkpoint.architecture),
        "image_shape": list(checkpoint.image_shape),
        "schedule": dataclasses.asdict(checkpoint.schedule),
        "dataset": checkpoint.dataset,
        "model": checkpoint.model,
        "ema": checkpoint.ema,
        "training": checkpoint.training,
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _typed(cls: type, values: Any, what: str, path: Path) -> Any:
    """A dataclass from a stored dict, rejecting keys this version does not know."""
    valid = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(values, dict) or set(values) - valid:
        unknown = sorted(set(values) - valid) if isinstance(values, dict) else [type(values).__name__]
        raise StudioError(f"UNet checkpoint {path} stores an unknown {what} ({', '.join(unknown)}); it was written by another version")
    return cls(**values)


def existing_checkpoint(path: str | Path) -> Path:
    """The checkpoint file of `path` (see checkpoint_path); a one-line StudioError when there is none."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise StudioError(f"UNet checkpoint {path} not found; train one with `ads train-unet -c unet_train/<dataset>`")
    return path


def read_checkpoint(path: str | Path) -> UNetCheckpoint:
    """Read a checkpoint file onto the CPU, checking that it is one; no network is built yet."""
    path = existing_checkpoint(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc).strip()
        reason = text.splitlines()[0].split(". ")[0][:120] if text else type(exc).__name__  # its first sentence
        raise StudioError(f"cannot read UNet checkpoint {path}: the file is corrupt or truncated ({reason}); retrain it") from None
    return checkpoint_from_payload(payload, path)


def checkpoint_from_payload(payload: Any, path: Path) -> UNetCheckpoint:
    """The checkpoint in a loaded file's contents, checking that it is one."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise StudioError(f"{path} is not a UNet checkpoint written by `ads train-unet`")
    if payload.get("version") != VERSION:
        raise StudioError(f"UNet checkpoint {path} has format version {payload.get('version')}; this version reads {VERSION}")
    missing = [key for key in ("architecture", "image_shape", "model", "ema") if key not in payload]
    if missing:
        raise StudioError(f"UNet checkpoint {path} lacks {', '.join(missing)}; the file is incomplete, retrain it")
    shape = tuple(int(v) for v in payload["image_shape"])
    return UNetCheckpoint(
        architecture=_typed(UNetConfig, payload["architecture"], "architecture key", path),
        image_shape=shape,  # type: ignore[arg-type]
        model=payload["model"],
        ema=payload["ema"],
        schedule=_typed(NoiseSchedule, payload.get("schedule", {}), "schedule key", path),
        dataset=payload.get("dataset", {}),
        training=payload.get("training", {}),
    )


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def state_dict_problems(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and mis-shaped tensors of `given` against `expected`, as short phrases."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{k} (checkpoint {list(given[k].shape)}, model {list(expected[k].shape)})"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_listing(unexpected)}")
    if mismatched:
        problems.append(f"mismatched tensors {_listing(mismatched, 2)}")
    return problems


def build_network(
    checkpoint: UNetCheckpoint, path: str | Path, use_ema: bool = True, device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """The stored network in eval mode; a StudioError names every tensor that does not fit the architecture."""
    channels, height, width = checkpoint.image_shape
    if height != width:
        raise StudioError(f"UNet checkpoint {path} stores a non-square image shape {checkpoint.image_shape}")
    network = build_unet(checkpoint.architecture, channels, height)
    weights = checkpoint.ema if use_ema else checkpoint.model
    problems = state_dict_problems(network.state_dict(), weights)
    if problems:
        raise StudioError(f"UNet checkpoint {path} does not match its architecture: {'; '.join(problems)}")
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise StudioError(f"UNet checkpoint {path} holds non-finite weights in {_listing(bad)}; training diverged, retrain it")
    network.load_state_dict(weights, strict=True)
    return network.to(device).eval()


def load_unet(
    path: str | Path,
    device: torch.device | str = "cpu",
    use_ema: bool = True,
    image_shape: tuple[int, ...] | None = None,
) -> tuple[torch.nn.Module, NoiseSchedule]:
    """Load a trained UNet and its schedule, checking it was trained on images of `image_shape` (C, H, W)."""
    checkpoint = read_checkpoint(path)
    if image_shape is not None and tuple(image_shape) != tuple(checkpoint.image_shape):
        have = "x".join(map(str, checkpoint.image_shape))
        want = "x".join(map(str, image_shape))
        raise StudioError(
            f"UNet checkpoint {checkpoint_path(path)} was trained on {have} images (channels x height x width) but the "
            f"dataset gives {want}; use a checkpoint trained on this dataset's resolution and channels"
        )
    return build_network(checkpoint, checkpoint_path(path), use_ema, device), checkpoint.schedule
