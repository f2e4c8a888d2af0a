"""Load a run configuration: a YAML file with a `defaults:` list, dot-list overrides, and validation.

Every key is checked against the schema before any work starts; a typo or an unknown name raises a
one-line StudioError that names the closest valid key or name.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ..data.sources import DATASETS
from ..data.store import background_rgb
from ..denoisers import denoiser_class
from ..errors import StudioError, closest, unknown_name
from ..fileio import user_path
from .schema import StudioConfig

log = logging.getLogger(__name__)

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
CHOICES = {
    "sampling.timestep_spacing": ("leading", "trailing", "linspace"),
    "logging.level": ("debug", "info", "warning", "error"),
    "logging.wandb_mode": ("offline", "online"),
    "memorization.reference": ("auto", "test", "leave_one_out"),
}
# Every key that names a file or folder: `~` and $VARIABLES are expanded in each (model.params: PATH_PARAMS)
PATH_KEYS = ("paths.root", "paths.datasets", "paths.cache", "paths.runs", "dataset.path", "baseline.checkpoint",
             "training.output_dir")
PATH_PARAMS = ("checkpoint", "path")  # method parameters that are paths, and any ending in _path, _dir or _file


INSTALLED_CONFIGS = Path(__file__).resolve().parents[3] / "configs"  # the source tree's (an editable install)


def configs_dir() -> Path:
    """Where named configs live: $ADS_CONFIGS, else the installed configs/ folder of this source tree; ./configs in
    the working directory only where the install has none (a non-editable install run from a checkout). A
    ./configs folder never replaces the installed configs unasked: pass its files by path, or ADS_CONFIGS=./configs."""
    if os.environ.get("ADS_CONFIGS"):
        return Path(os.environ["ADS_CONFIGS"])
    local = Path.cwd() / "configs"
    if not (INSTALLED_CONFIGS / "defaults.yaml").is_file() and (local / "defaults.yaml").is_file():
        return local
    return INSTALLED_CONFIGS


SWEEPS = "sweeps"  # configs/sweeps/ holds sweep specifications (`ads sweep -c sweeps/<name>`), not run configs


def available_configs(kind: str = "run") -> list[str]:
    """Names relative to configs/, without the .yaml suffix: run configs (`kind="run"`) or sweep files ("sweep")."""
    root = configs_dir()
    names = sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))
    return [n for n in names if n.startswith(f"{SWEEPS}/") == (kind == "sweep")]


def resolve_config_path(name: str | os.PathLike) -> Path:
    """An absolute path as given; a relative one under configs/ (the .yaml suffix optional), else from the cwd."""
    path = user_path(name, "--config")
    candidates = [path] if path.is_absolute() else [configs_dir() / path, configs_dir() / f"{path}.yaml", path]
    for candidate in candidates:
        if candidate.is_file():
            _note_local_copy(candidate)
            return candidate
    hint = closest(str(path.with_suffix("")) if path.suffix == ".yaml" else str(path),
                   available_configs("run") + available_configs("sweep"))
    raise StudioError(f"config '{name}' not found in {configs_dir()}{hint}; `ads list` shows the available configs")


def _note_local_copy(used: Path) -> None:
    """Warn when a config taken by name from configs_dir() has a different namesake under ./configs, which
    earlier versions read instead (a user who edited that copy learns it is not the one used, and how to use it)."""
    root = configs_dir()
    if not used.is_relative_to(root):
        return
    name = used.relative_to(root)
    local = Path.cwd() / "configs" / name
    if local.is_file() and local.resolve() != used.resolve() and local.read_bytes() != used.read_bytes():
        log.warning("warning: config %s is %s (names are looked up in %s), not ./configs/%s; pass -c ./configs/%s "
                    "for the local file (or ADS_CONFIGS=<folder> for a complete configs folder of your own: it "
                    "replaces %s, defaults.yaml and datasets/ included)", name.with_suffix(""), used, root, name, name,
                    root)


def _default_entry_path(entry: str, including: Path) -> Path:
    """A `defaults:` entry: an absolute file, a name under configs/, or else a file beside the including config."""
    entry = str(user_path(entry, f"the defaults list of {including}"))
    if Path(entry).is_absolute():
        return resolve_config_path(entry)
    beside = including.parent / entry
    for candidate in (configs_dir() / entry, configs_dir() / f"{entry}.yaml", beside, Path(f"{beside}.yaml")):
        if candidate.is_file():
            return candidate
    return resolve_config_path(entry)


def read_mapping(path: Path, what: str, shape: str) -> DictConfig:
    """The YAML mapping in `path`; a file that does not parse, or holds something else, is a one-line StudioError
    ("cannot parse <what> <path>: ...", "<what> <path> must be <shape>")."""
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:
        raise StudioError(f"cannot parse {what} {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, DictConfig):
        raise StudioError(f"{what} {path} must be {shape}")
    return raw


def _load_file(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """A config file merged on top of the files its `defaults:` list names (in order)."""
    if path in seen:
        raise StudioError(f"config {path} includes itself through its defaults list")
    raw = read_mapping(path, "config", "a mapping of sections, not a list")
    defaults = raw.pop("defaults", [])
    if not isinstance(defaults, (ListConfig, list)):
        raise StudioError(f"config {path}: `defaults:` must be a list of config names (e.g. [defaults, datasets/mnist5k]), "
                          f"not {defaults!r}")
    merged = OmegaConf.create()
    for entry in defaults:
        if str(entry) == "_self_":
            continue
        merged = OmegaConf.merge(merged, _load_file(_default_entry_path(str(entry), path), (*seen, path)))
    return OmegaConf.merge(merged, raw)


def _schema_error(exc: OmegaConfBaseException) -> StudioError:
    key = getattr(exc, "full_key", None) or "?"
    if isinstance(exc, ConfigKeyError):
        parent = key.rpartition(".")[0]
        node = OmegaConf.structured(StudioConfig)
        valid = list(OmegaConf.select(node, parent).keys()) if parent else list(node.keys())
        where = f"in section '{parent}'" if parent else "at the top level"
        full = [f"{parent}.{name}" if parent else name for name in valid]
        return StudioError(f"unknown config key '{key}'{closest(key, full)}; valid keys {where}: {', '.join(valid)}")
    if isinstance(exc, ValidationError):
        message = str(getattr(exc, "msg", None) or exc).splitlines()[0]
        if key == "?":  # a whole section replaced by a value, e.g. `sampling=3`
            return StudioError(f"invalid config: {message}; a section holds keys, set one of them "
                               "(e.g. sampling.num_samples=16, not sampling=16)")
        return StudioError(f"bad value for config key '{key}': {message}")
    return StudioError(f"invalid config: {str(exc).splitlines()[0]}")


def _merge_overrides(base: DictConfig, overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise StudioError(f"override '{item}' is not of the form key=value (e.g. sampling.num_samples=16)")
    return OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))


def method_params(name: str, given: Any) -> Any:
    """The method's Params dataclass filled from `given`, rejecting unknown keys and wrong types."""
    cls = denoiser_class(name).Params
    valid = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(given, (DictConfig, dict)) and given is not None:
        raise StudioError(f"model.params must be a mapping of the method's parameters (e.g. model.params.<name>=value), "
                          f"not {given!r}; parameters of '{name}': {', '.join(valid) if valid else 'none'}")
    given = OmegaConf.to_container(given, resolve=True) if isinstance(given, DictConfig) else dict(given or {})
    for key in given:
        if key not in valid:
            listing = ", ".join(valid) if valid else "none"
            raise StudioError(
                f"unknown config key 'model.params.{key}' for method '{name}'{closest(key, valid)}; "
                f"its parameters: {listing}"
            )
    try:
        typed = OmegaConf.merge(OmegaConf.structured(cls), given)
    except ValidationError as exc:
        raise StudioError(f"bad value for 'model.params.{exc.full_key}': {str(exc.msg).splitlines()[0]}") from None
    return OmegaConf.to_object(typed)


def _expand_paths(cfg: StudioConfig) -> None:
    """Expand `~` and environment variables in every path key, in place (see PATH_KEYS)."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None:
            setattr(getattr(cfg, section), name, str(user_path(value, key)))
    if dataclasses.is_dataclass(cfg.model.params):
        for f in dataclasses.fields(cfg.model.params):
            value = getattr(cfg.model.params, f.name)
            if isinstance(value, str) and (f.name in PATH_PARAMS or f.name.endswith(("_path", "_dir", "_file"))):
                setattr(cfg.model.params, f.name, str(user_path(value, f"model.params.{f.name}")))


def _validate(cfg: StudioConfig) -> None:
    if cfg.dataset.name not in DATASETS:
        raise unknown_name("dataset", cfg.dataset.name, DATASETS)
    if not DEVICE_PATTERN.match(cfg.experiment.device):
        raise StudioError(f"experiment.device must be auto, cpu, cuda, cuda:N or mps, not '{cfg.experiment.device}'")
    structured = OmegaConf.structured(cfg)  # built once: OmegaConf takes ~0.1 s per structured config
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(structured, key)
        if value not in allowed:
            raise StudioError(f"config key '{key}' must be one of {', '.join(allowed)}, not '{value}'{closest(value, allowed)}")
    positive = {
        "sampling.num_samples": cfg.sampling.num_samples,
        "sampling.batch_size": cfg.sampling.batch_size,
        "sampling.num_inference_steps": cfg.sampling.num_inference_steps,
        "dataset.batch_size": cfg.dataset.batch_size,
        "calibration.num_seeds": cfg.calibration.num_seeds,
        "memorization.num_neighbors": cfg.memorization.num_neighbors,
        "memorization.figure_samples": cfg.memorization.figure_samples,
        "memorization.reference_size": cfg.memorization.reference_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise StudioError(f"config key '{key}' must be at least 1, got {value}")
    if cfg.sampling.num_inference_steps > cfg.sampling.num_train_timesteps:
        raise StudioError(
            f"sampling.num_inference_steps ({cfg.sampling.num_inference_steps}) cannot exceed "
            f"sampling.num_train_timesteps ({cfg.sampling.num_train_timesteps})"
        )
    for key, name in (("experiment.name", cfg.experiment.name), ("experiment.run_name", cfg.experiment.run_name)):
        if name is not None and (not name.strip() or name in (".", "..") or "/" in name or "\\" in name):
            raise StudioError(f"{key} names one folder under paths.runs: no '/', '\\', '.' or '..'; got '{name}'")
    if not 0 <= cfg.experiment.seed < 2**64:  # what torch.Generator.manual_seed and the per-sample seeds accept
        raise StudioError(f"experiment.seed must be in [0, 2**64), got {cfg.experiment.seed}")
    if not 0 <= cfg.sampling.eta < math.inf:  # NaN and inf included
        raise StudioError(f"sampling.eta must be a finite number >= 0 (0: deterministic DDIM, 1: DDPM-like), got "
                          f"{cfg.sampling.eta}")
    if cfg.baseline.eta is not None and not 0 <= cfg.baseline.eta < math.inf:
        raise StudioError(f"baseline.eta must be a finite number >= 0 or null (the run's sampling.eta), got "
                          f"{cfg.baseline.eta}")
    start, end = cfg.sampling.beta_start, cfg.sampling.beta_end
    if not 0 < start <= end < 1:  # the linear beta schedule: each beta_t is a noise variance in (0, 1)
        raise StudioError(f"sampling.beta_start and sampling.beta_end must satisfy 0 < beta_start <= beta_end < 1 "
                          f"(the linear schedule's first and last noise variances; default 1e-4 and 0.02), got "
                          f"{start} and {end}")
    if cfg.output.grid_columns is not None and cfg.output.grid_columns < 1:
        raise StudioError(f"output.grid_columns must be a positive number of columns or null (about square), "
                          f"got {cfg.output.grid_columns}")
    background_rgb(cfg.dataset.background)
    if not 0 < cfg.memorization.threshold <= 1:
        raise StudioError(f"memorization.threshold bounds d1 / d2, which lies in [0, 1]: choose a value in (0, 1] "
                          f"(Gu et al. use 1/3), got {cfg.memorization.threshold}")
    if cfg.dataset.num_workers < 0:
        raise StudioError(f"dataset.num_workers must be >= 0, got {cfg.dataset.num_workers}")


def load_config(
    config: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    bases: list[str] | tuple[str, ...] = (),
) -> StudioConfig:
    """Schema defaults, then the `bases` config files in order (e.g. ["defaults", "datasets/cifar10"], for a config
    composed without a file of its own), then the config file (and its defaults list), then overrides; validated
    and resolved.

    `model.params` comes back as the method's Params dataclass.
    """
    merged: DictConfig = OmegaConf.structured(StudioConfig)
    try:
        for name in (*bases, *([config] if config is not None else [])):
            merged = OmegaConf.merge(merged, _load_file(resolve_config_path(name)))
        merged = _merge_overrides(merged, list(overrides))
        OmegaConf.resolve(merged)
        cfg: StudioConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _schema_error(exc) from None
    except TypeError as exc:  # OmegaConf's "Cannot merge incompatible container types": a list where a mapping is
        raise StudioError(f"invalid config: {exc}; model.params and every section take keys "
                          "(e.g. model.params.temperature=2), not a list") from None
    cfg.model.params = method_params(cfg.model.name, cfg.model.params)
    _expand_paths(cfg)
    _validate(cfg)
    return cfg


def to_yaml(cfg: StudioConfig) -> str:
    """The resolved configuration as YAML, method parameters included with their defaults."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
