"""One loader for every trained network the studio accepts, recognised from the path itself (DESIGN.md §7).

- `ddpm_unet`: the reference framework's baselines, a DDPM-UNet state dict (../shared/formats/), bare or as
  `{"model_state_dict": ...}`; every hyper-parameter is read off the tensors (ddpm_unet.infer_config).
- `pytorch_ddpm`: the original pytorch-ddpm training checkpoint `{"net_model", "ema_model", ...}` (EMA weights by
  default, `use_ema=False` for the raw ones); a DataParallel `module.` prefix is removed.
- `diffusers`: a `UNet2DModel` folder (config.json + weights, optional scheduler_config.json beside it) or a pipeline
  folder (`unet/` and `scheduler/`, e.g. google/ddpm-cifar10-32), loaded by diffusers from local files only.
- `studio`: a checkpoint (or its folder) written by `ads train-unet`.
Files are read with torch.load(weights_only=True): a pickled module or any other code is refused, never run.
Anything else is a one-line StudioError naming these formats.
"""

from __future__ import annotations

import importlib.util

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import StudioError
from .backbone import Backbone, DiffusersEps
from .ddpm_unet import DDPMUNet, infer_config, is_ddpm_state_dict
from .schedule import linear_alphas_cumprod, scheduler_alphas_cumprod

log = logging.getLogger(__name__)

RECOGNISED = (
    "a DDPM-UNet state dict (bare or {'model_state_dict': ...}), a pytorch-ddpm checkpoint ({'net_model', "
    "'ema_model', ...}), a diffusers UNet2DModel or pipeline folder (unet/ + scheduler/), or the output of `ads "
    "train-unet`; see docs/backbones.md"
)
DDPM_SCHEDULE = "linear betas 1e-4..0.02 over 1000 steps (the DDPM UNet formats' schedule)"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].split(". ")[0][:140] if text else type(exc).__name__


def _listing(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def load_backbone(path: str | Path, use_ema: bool = True, device: torch.device | str = "cpu") -> Backbone:
    """Recognise and load the network at `path` onto `device`, in eval mode with gradients off."""
    given = str(path)
    path = Path(path).expanduser()
    if not path.exists():
        raise StudioError(f"backbone checkpoint {given} not found; give {RECOGNISED}")
    if path.is_dir():
        backbone = _load_folder(path, use_ema)
    else:
        backbone = _load_file(path, use_ema)
    backbone.network.to(device).eval().requires_grad_(False)
    return backbone


def _load_folder(path: Path, use_ema: bool) -> Backbone:
    from ..unet.checkpoint import FILENAME

    if (path / FILENAME).is_file():  # a training folder: its checkpoint has both weight sets and the architecture
        return _load_file(path / FILENAME, use_ema)
    if (path / "config.json").is_file():
        scheduler = path / "scheduler_config.json"
        return _load_diffusers(path, None, scheduler if scheduler.is_file() else None)
    if (path / "unet" / "config.json").is_file():
        scheduler = path / "scheduler" / "scheduler_config.json"
        return _load_diffusers(path, "unet", scheduler if scheduler.is_file() else None)
    raise StudioError(
        f"folder {path} holds no model config (config.json, unet/config.json or {FILENAME}); give {RECOGNISED}"
    )


def _load_file(path: Path, use_ema: bool) -> Backbone:
    from ..unet.checkpoint import FORMAT, build_network, checkpoint_from_payload

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StudioError(
            f"cannot read {path} as a weights-only checkpoint ({_reason(exc)}): the file is corrupt, truncated or a "
            f"pickled module; give {RECOGNISED}"
        ) from None
    if not isinstance(payload, dict):
        raise StudioError(f"{path} holds a {type(payload).__name__}, not a checkpoint dict; give {RECOGNISED}")
    if payload.get("format") == FORMAT:
        checkpoint = checkpoint_from_payload(payload, path)
        channels, size, _ = checkpoint.image_shape
        return Backbone(
            network=build_network(checkpoint, path, use_ema),
            alphas_cumprod=checkpoint.schedule.alphas_cumprod(),
            channels=channels, resolution=size, format="studio", source=str(path),
            weights="ema" if use_ema else "raw", architecture=dict(vars(checkpoint.architecture)),
            schedule_source=f"the checkpoint's {checkpoint.schedule}",
        )
    if isinstance(payload.get("net_model"), dict) and isinstance(payload.get("ema_model"), dict):
        weights = payload["ema_model" if use_ema else "net_model"]
        return _ddpm_unet(_strip_module(weights), path, "pytorch_ddpm", "ema" if use_ema else "raw")
    if isinstance(payload.get("model_state_dict"), dict):
        return _ddpm_unet(_strip_module(payload["model_state_dict"]), path, "ddpm_unet", "only")
    if is_ddpm_state_dict(_strip_module(payload)):
        return _ddpm_unet(_strip_module(payload), path, "ddpm_unet", "only")
    keys = [str(k) for k in payload]
    raise StudioError(f"{path} is a dict of an unknown kind (keys {_listing(keys)}); give {RECOGNISED}")


def _strip_module(weights: dict) -> dict:
    """A DataParallel state dict without its `module.` prefix; others unchanged."""
    if weights and all(isinstance(k, str) and k.startswith("module.") for k in weights):
        return {k[len("module."):]: v for k, v in weights.items()}
    return weights


def _ddpm_unet(weights: dict, path: Path, kind: str, which: str) -> Backbone:
    if not is_ddpm_state_dict(weights) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise StudioError(f"{path} ({kind}) does not hold a DDPM-UNet state dict (no head.weight and time-embedding "
                          f"table); give {RECOGNISED}")
    try:
        config = infer_config(weights)
        network = DDPMUNet(config)
        network.load_state_dict(weights, strict=True)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise StudioError(f"{path} ({kind}) is not a complete DDPM UNet: {_reason(exc)}") from None
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise StudioError(f"{path} ({kind}) holds non-finite weights in {_listing(bad, 3)}")
    if config.out_channels != config.in_channels:
        raise StudioError(f"{path} ({kind}) maps {config.in_channels} to {config.out_channels} channels; an eps "
                          "prediction has the input's channels")
    return Backbone(
        network=network, alphas_cumprod=linear_alphas_cumprod(), channels=config.in_channels, resolution=None,
        format=kind, source=str(path), divisor=2 ** (len(config.ch_mult) - 1), weights=which,
        architecture=dict(vars(config)), schedule_source=DDPM_SCHEDULE,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StudioError(f"cannot read {path} ({_reason(exc)}); give {RECOGNISED}") from None
    if not isinstance(values, dict):
        raise StudioError(f"{path} is not a JSON object; give {RECOGNISED}")
    return values


def _load_diffusers(folder: Path, subfolder: str | None, scheduler_file: Path | None) -> Backbone:
    from diffusers import UNet2DModel

    model_dir = folder / subfolder if subfolder else folder
    config = _read_json(model_dir / "config.json")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise StudioError(f"{model_dir} holds a diffusers {config.get('_class_name')}, not an unconditional "
                          f"UNet2DModel; give {RECOGNISED}")
    try:
        # without accelerate, diffusers' default (low_cpu_mem_usage=True) prints a multi-line install notice
        unet = UNet2DModel.from_pretrained(folder, subfolder=subfolder, local_files_only=True,
                                           low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    except Exception as exc:
        raise StudioError(f"diffusers cannot load the UNet2DModel in {model_dir} ({_reason(exc)}); give "
                          f"{RECOGNISED}") from None
    if scheduler_file is not None:
        scheduler = _read_json(scheduler_file)
        prediction = scheduler.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise StudioError(f"{scheduler_file} says prediction_type={prediction}; the studio takes epsilon-"
                              "predicting networks only")
        alphas_cumprod, source = scheduler_alphas_cumprod(scheduler, str(scheduler_file)), str(scheduler_file)
    else:
        log.warning("%s has no scheduler config; assuming DDPM's linear betas 1e-4..0.02 over 1000 steps", folder)
        alphas_cumprod, source = linear_alphas_cumprod(), f"assumed: {DDPM_SCHEDULE} (no scheduler config)"
    size = unet.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    if not isinstance(size, int):
        raise StudioError(f"{model_dir} is a non-square UNet2DModel (sample_size {size}); the studio samples square images")
    if unet.config.out_channels != unet.config.in_channels:
        raise StudioError(f"{model_dir} maps {unet.config.in_channels} to {unet.config.out_channels} channels; an eps "
                          "prediction has the input's channels")
    keys = ("sample_size", "in_channels", "block_out_channels", "down_block_types", "up_block_types",
            "layers_per_block", "attention_head_dim", "norm_num_groups")
    return Backbone(
        network=DiffusersEps(unet), alphas_cumprod=alphas_cumprod, channels=int(unet.config.in_channels),
        resolution=size, format="diffusers", source=str(folder), weights="only",
        architecture={k: unet.config[k] for k in keys if k in unet.config}, schedule_source=source,
    )
