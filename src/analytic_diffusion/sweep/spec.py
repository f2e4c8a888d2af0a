"""A sweep's specification (methods x datasets x grid, plus overrides for every cell) and its cells.

A specification comes from a YAML file under configs/sweeps/ and/or the command line (which wins); `plan_sweep`
turns it into cells, each with its fully resolved run config, and checks all of them before anything runs, so a
bad method, dataset, key or value is one error and nothing is written.

    name: default                 # the sweep folder: <paths.runs>/sweeps/<name>/
    methods: [optimal, wiener]    # configs/<method>/<dataset>.yaml must exist for each pair
    datasets: [mnist5k]
    grid:                         # every combination; a model.params key a method lacks is skipped for it
      model.params.temperature: [0.5, 1, 2]
    overrides:                    # dot-list overrides applied to every cell
      - sampling.num_samples=8
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import ListConfig, OmegaConf

from .. import distributed
from ..config import StudioConfig, load_config
from ..config.loader import SWEEPS, configs_dir, read_mapping, resolve_config_path
from ..data.sources import DATASETS, SourceRequest, dataset_source
from ..denoisers import denoiser_class
from ..errors import StudioError, closest, unknown_name
from ..sampling import make_scheduler
from ..backbones import load_backbone
from ..runs import SWEEPS_FOLDER

log = logging.getLogger("analytic_diffusion")

DEFAULT_SWEEP = f"{SWEEPS}/default"
DEFAULT_METHODS = ("nearest_dataset", "optimal", "scfdm", "wiener", "pca_locality")  # every analytic method
DEFAULT_DATASETS = ("mnist5k",)
SPEC_KEYS = ("name", "methods", "datasets", "grid", "overrides")
BACKBONE_METHOD = "unet"  # the denoiser that samples `baseline.checkpoint` for the backbone row
PARAMS = "model.params."
SEEDS = "sampling.per_sample_seeds"
# Keys the sweep sets itself: each cell's folder, and per-sample seeds so that every cell of a dataset starts
# from the same x_T whatever its batch size or its method's own random draws.
SWEEP_KEYS = {
    "experiment.name": "the sweep folder is --name (or the file's name:)",
    "experiment.run_name": "the sweep names its cells",
    "experiment.append_timestamp": "a cell's folder has no timestamp, so that a rerun finds it",
    "model.name": "choose methods with --methods",
    "dataset.name": "choose datasets with --datasets",
    "output.tensors": "the sweep reads every cell's samples.pt",
}
SAFE_NAME = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclass
class SweepSpec:
    """What to run: every method on every dataset, at every combination of the grid's values."""

    name: str
    methods: list[str]
    datasets: list[str]
    grid: dict[str, list[str]]  # dot-list key -> values as dot-list text
    overrides: list[str] = field(default_factory=list)


@dataclass
class Cell:
    """One run of the sweep: a method on a dataset at one combination of the grid values that apply to it."""

    name: str  # its folder under the sweep folder
    method: str
    dataset: str
    grid: dict[str, str]  # the grid values of this cell (keys that apply to its method)
    config: StudioConfig
    backbone: bool = False  # the trained network of baseline.checkpoint, sampled like a method

    @property
    def label(self) -> str:
        """'optimal  temperature=0.5' - the method (or 'backbone') and its grid values, for figures."""
        values = "  ".join(f"{_short(k, self.grid)}={_shown(v)}" for k, v in self.grid.items())
        return f"{'backbone' if self.backbone else self.method}  {values}".strip()

    @property
    def run_dir(self) -> Path:
        return Path(self.config.paths.runs) / self.config.experiment.name / self.name


@dataclass
class SweepPlan:
    """A validated sweep: its folder, the cells in order, and the grid keys (columns of the summary)."""

    spec: SweepSpec
    folder: Path
    cells: list[Cell]
    grid_keys: list[str]
    baseline: bool  # a backbone was given: agreement columns and figures


def _short(key: str, grid: dict[str, Any]) -> str:
    """The last part of a dot-list key, or the whole key when two grid keys end alike."""
    tail = key.rsplit(".", 1)[-1]
    return tail if sum(k.rsplit(".", 1)[-1] == tail for k in grid) == 1 else key


def _shown(value: Any) -> str:
    """A grid value as cell names and figure labels show it: a path by its last two parts (a calibration.json in
    its run folder), anything else as written."""
    text = str(value)
    if "/" not in text:
        return text
    parts = Path(text).parts
    return "/".join(parts[-2:])


def _text(value: Any) -> str:
    """A YAML value as dot-list text: true, null, 0.5, name."""
    return value if isinstance(value, str) else json.dumps(value)


def _names(value: Any, what: str) -> list[str]:
    """A list of names from a YAML list or a comma-separated string."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple, ListConfig)):
        items = [str(v).strip() for v in value]
    else:
        raise StudioError(f"sweep {what} must be a list of names or a comma-separated string, not {value!r}")
    if not items or any(not v for v in items):
        raise StudioError(f"sweep {what} has an empty name in {value!r}; separate names with commas: a,b")
    return list(dict.fromkeys(items))


def parse_grid_argument(text: str) -> tuple[str, list[str]]:
    """'model.params.temperature=0.5,1,2' -> (key, ['0.5', '1', '2'])."""
    key, sep, values = text.partition("=")
    items = [v.strip() for v in values.split(",")]
    if not sep or not key.strip() or any(not v for v in items):
        raise StudioError(f"--grid '{text}' is not of the form key=value1,value2,... (e.g. model.params.temperature=0.5,1,2)")
    return key.strip(), items


def _read_file(config: str) -> tuple[dict[str, Any], str]:
    """The YAML mapping of a sweep file (by name under configs/, e.g. sweeps/default, or a path) and its stem."""
    try:
        path = resolve_config_path(config)
    except StudioError:
        if (configs_dir() / SWEEPS / f"{config}.yaml").is_file():
            path = configs_dir() / SWEEPS / f"{config}.yaml"
        else:
            raise
    data = OmegaConf.to_container(read_mapping(path, "sweep file", f"a mapping with keys {', '.join(SPEC_KEYS)}"))
    for key in data:
        if key not in SPEC_KEYS:
            raise StudioError(f"unknown key '{key}' in sweep file {path}{closest(str(key), SPEC_KEYS)}; "
                              f"a sweep file has {', '.join(SPEC_KEYS)}")
    return data, path.stem


def load_spec(config: str | None = None, methods: str | None = None, datasets: str | None = None,
              grid: list[str] = (), overrides: list[str] = (), name: str | None = None) -> SweepSpec:
    """The sweep file (default: configs/sweeps/default.yaml) with the command line's choices on top: --methods and
    --datasets replace the file's, each --grid key replaces the file's values or override for that key, and a
    command-line override replaces the file's grid over its key; overrides come last."""
    data, stem = _read_file(config or DEFAULT_SWEEP)
    file_grid = data.get("grid") or {}
    if not isinstance(file_grid, dict):
        raise StudioError(f"sweep grid must map keys to lists of values (model.params.temperature: [0.5, 1]), not {file_grid!r}")
    values: dict[str, list[str]] = {}
    for key, items in file_grid.items():
        items = items if isinstance(items, list) else [items]
        if not items:
            raise StudioError(f"sweep grid key '{key}' has no values")
        values[str(key)] = [_text(v) for v in items]
    command_line_overrides = _override_keys(list(overrides))
    for key in [k for k in values if k in command_line_overrides]:  # the command line wins over the file's grid
        del values[key]
    command_line_grid = set()
    for text in grid:
        key, items = parse_grid_argument(text)
        values[key] = items
        command_line_grid.add(key)
    file_overrides = data.get("overrides") or []
    if not isinstance(file_overrides, list):
        raise StudioError(f"sweep overrides must be a list of key=value strings, not {file_overrides!r}")
    # ... and over the file's overrides: a --grid key replaces the file's fixed value of that key
    file_overrides = [o for o in map(str, file_overrides) if o.partition("=")[0].strip() not in command_line_grid]
    return SweepSpec(
        name=name or str(data.get("name") or stem),
        methods=_names(methods if methods is not None else data.get("methods", list(DEFAULT_METHODS)), "methods"),
        datasets=_names(datasets if datasets is not None else data.get("datasets", list(DEFAULT_DATASETS)), "datasets"),
        grid=values,
        overrides=_last_of_each_key([*file_overrides, *overrides]),
    )


def _last_of_each_key(overrides: list[str]) -> list[str]:
    """The overrides with each key once, its last value (the one a dot-list applies), in the order they came: the
    command line's after the file's. sweep.yaml then lists every key once."""
    kept: dict[str, str] = {}
    for item in overrides:
        key = item.partition("=")[0].strip()
        kept.pop(key, None)
        kept[key] = item
    return list(kept.values())


def _override_keys(overrides: list[str]) -> dict[str, str]:
    keys = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StudioError(f"override '{item}' is not of the form key=value (e.g. sampling.num_samples=16)")
        keys[key.strip()] = value.strip()
    return keys


def _check_spec(spec: SweepSpec) -> None:
    """Names, keys and the sweep's own keys, before any config is loaded."""
    if not spec.name.strip() or spec.name in (".", "..") or SAFE_NAME.sub("", spec.name) != spec.name:
        raise StudioError(f"sweep name '{spec.name}' must be one folder name (letters, digits, . _ = + -)")
    for method in spec.methods:
        denoiser_class(method)
    for dataset in spec.datasets:
        if dataset not in DATASETS:
            raise unknown_name("dataset", dataset, DATASETS)
    overrides = _override_keys(spec.overrides)
    for key in [*overrides, *spec.grid]:
        if key in SWEEP_KEYS:
            raise StudioError(f"a sweep sets '{key}' itself ({SWEEP_KEYS[key]}); remove it")
    if overrides.get(SEEDS, "true").lower() != "true" or SEEDS in spec.grid:
        raise StudioError(f"a sweep always uses per-sample seeds (every cell of a dataset from the same x_T); remove {SEEDS}")
    for key in spec.grid:
        if key.startswith("paths."):
            raise StudioError(f"grid key '{key}': every cell of a sweep uses the same paths; set it as an override")
        if key in overrides:
            raise StudioError(f"'{key}' is both a grid key and an override; keep one")
        if key.startswith(PARAMS):
            param = key[len(PARAMS):].split(".")[0]
            if not any(param in _param_names(m) for m in spec.methods):
                raise StudioError(f"grid key '{key}' is a parameter of none of the methods {', '.join(spec.methods)}"
                                  f"; `ads config -c <method>/<dataset>` lists each method's parameters")


def _param_names(method: str) -> list[str]:
    return [f.name for f in dataclasses.fields(denoiser_class(method).Params)]


def _applies(key: str, method: str | None) -> bool:
    """Whether a grid key varies this method (None: the backbone, which has no method parameters)."""
    if not key.startswith(PARAMS):
        return True
    return method is not None and key[len(PARAMS):].split(".")[0] in _param_names(method)


def _cell_name(method: str, dataset: str, grid: dict[str, str]) -> str:
    parts = [method, dataset, *(f"{_short(k, grid)}={_shown(v)}" for k, v in grid.items())]
    return SAFE_NAME.sub("-", "_".join(parts))


def _forced(spec: SweepSpec, cell_name: str) -> list[str]:
    """What the sweep sets in every cell: its folder (with paths.runs, see _load_cell), no timestamp, per-sample
    seeds, samples.pt."""
    return [f"experiment.name={spec.name}", f"experiment.run_name={cell_name}", "experiment.append_timestamp=false",
            f"{SEEDS}=true", "output.tensors=true"]


def _load_cell(spec: SweepSpec, method: str | None, dataset: str, grid: dict[str, str],
               baseline: StudioConfig | None) -> Cell:
    """One cell with its config loaded (and so checked); method None is the backbone of `baseline`."""
    items = [f"{k}={v}" for k, v in grid.items()]
    if method is None:
        name = _cell_name("backbone", dataset, grid)
        extra = [f"model.name={BACKBONE_METHOD}", f"model.params.checkpoint={baseline.baseline.checkpoint}",
                 f"model.params.use_ema={str(baseline.baseline.use_ema).lower()}", "baseline.checkpoint=null"]
        cfg = load_config(None, [*spec.overrides, *items, *extra, *_forced(spec, name)],
                          bases=("defaults", f"datasets/{dataset}"))
    else:
        name = _cell_name(method, dataset, grid)
        config = f"{method}/{dataset}"
        if not (configs_dir() / f"{config}.yaml").is_file():
            raise StudioError(f"no config {config}.yaml in {configs_dir()} for method '{method}' on dataset '{dataset}'; "
                              "add one (see README, Adding a method) or leave the pair out")
        cfg = load_config(config, [*spec.overrides, *items, *_forced(spec, name)])
    cfg.paths.runs = str(Path(cfg.paths.runs) / SWEEPS_FOLDER)  # the cell's run directory: <runs>/sweeps/<sweep>/<cell>
    return Cell(name, method or BACKBONE_METHOD, dataset, dict(grid), cfg, method is None)


def _combinations(grid: dict[str, list[str]], method: str | None) -> list[dict[str, str]]:
    keys = [k for k in grid if _applies(k, method)]
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def check_sources(cells: list[Cell]) -> None:
    """Every dataset can be opened (downloaded, folder present) and every checkpoint exists, before any run."""
    seen = set()
    for cell in cells:
        d = cell.config.dataset
        key = (d.name, d.split, d.download, d.path, cell.config.paths.datasets)
        if key not in seen:
            seen.add(key)
            dataset_source(SourceRequest(d.name, d.split, d.download, d.path, Path(cell.config.paths.datasets)))
        for checkpoint in (cell.config.baseline.checkpoint, getattr(cell.config.model.params, "checkpoint", None)):
            if checkpoint and checkpoint not in seen:  # any backbone format; a bad file is one line, before any run
                seen.add(checkpoint)
                load_backbone(checkpoint, cell.config.baseline.use_ema)
        timesteps = make_scheduler(cell.config.sampling).timesteps.tolist()  # e.g. one patch size per step
        denoiser_class(cell.config.model.name).check_schedule(cell.config.model.params, timesteps, None)


def plan_sweep(spec: SweepSpec) -> SweepPlan:
    """Every cell's resolved config, loaded and checked; raises one StudioError before anything is written.

    Order: per dataset, the backbone cells (when baseline.checkpoint is set) and then each method's cells.
    A model.params grid key that a method does not have is skipped for that method (said once per key).
    Under torchrun the sources (datasets, checkpoints) are checked by run_sweep instead, rank 0 first: a dataset
    downloaded by every rank at once would race into the same files.
    """
    _check_spec(spec)
    cells: list[Cell] = []
    for dataset in spec.datasets:
        method_cells = [_load_cell(spec, m, dataset, g, None) for m in spec.methods for g in _combinations(spec.grid, m)]
        first = method_cells[0].config
        backbone = [_load_cell(spec, None, dataset, g, first) for g in _combinations(spec.grid, None)] \
            if first.baseline.checkpoint else []
        cells += backbone + method_cells
    if not distributed.launched():
        check_sources(cells)
    names = [c.name for c in cells]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise StudioError(f"two cells would share the folder {duplicates[0]}; give the grid distinct values")
    for key in spec.grid:
        skipped = [m for m in spec.methods if not _applies(key, m)]
        if skipped:
            log.warning("grid key %s is not a parameter of %s: skipped for %s", key, ", ".join(skipped),
                        "it" if len(skipped) == 1 else "them")
    folder = Path(cells[0].config.paths.runs) / spec.name
    return SweepPlan(spec, folder, cells, list(spec.grid), any(c.config.baseline.checkpoint for c in cells))
