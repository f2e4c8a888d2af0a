"""The sweep job: run every cell of a validated plan through `generate`, resumably, then write the table and figures.

Each cell is an ordinary run directory `<paths.runs>/sweeps/<sweep>/<cell>/` made by `generate.generate`, the code
path of `ads generate`. A cell that completed with the same resolved config (its config.yaml) is reused; an
incomplete one, or one whose config changed, is removed and run again (`force=True` reruns every cell). A cell
that fails is recorded with its error and the sweep goes on; Ctrl-C stops after writing the summary of what
finished, and the finished cells stay usable.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .. import generate as generate_job
from ..config import to_yaml
from ..data.store import StoreRequest, load_or_build_store
from ..errors import StudioError
from ..fileio import atomic_write_text, make_directory
from ..runs import INCOMPLETE
from .figures import save_agreement, save_comparison
from .report import CellOutcome, write_summary
from .spec import Cell, SweepPlan

log = logging.getLogger("analytic_diffusion")


@dataclass
class SweepResult:
    """What one invocation of the sweep did, cell by cell, and the files it wrote."""

    plan: SweepPlan
    outcomes: list[CellOutcome]
    seconds: float
    files: list[Path]


def cell_state(cell: Cell) -> str:
    """'complete' (finished with this very config), 'changed' (finished with another), 'incomplete' or 'absent'."""
    folder = cell.run_dir
    if not folder.is_dir():
        return "absent"
    if (folder / INCOMPLETE).exists() or not (folder / "metrics.json").is_file():
        return "incomplete"
    saved = folder / "config.yaml"
    if not saved.is_file() or saved.read_text() != to_yaml(cell.config):
        return "changed"
    return "complete"


def _read_metrics(cell: Cell) -> dict:
    return json.loads((cell.run_dir / "metrics.json").read_text())


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    return message if isinstance(exc, StudioError) else f"{type(exc).__name__}: {message}".rstrip(": ")


def _run_cell(cell: Cell) -> CellOutcome:
    """Run one cell into a fresh folder; a failure is returned, not raised (KeyboardInterrupt is raised)."""
    if cell.run_dir.exists():
        shutil.rmtree(cell.run_dir)
    try:
        result = generate_job.generate(cell.config)
    except Exception as exc:  # any failure of this cell's method or data: recorded, and the sweep goes on
        log.error("cell %s failed: %s", cell.name, _one_line(exc))
        return CellOutcome(cell, "failed", error=_one_line(exc))
    return CellOutcome(cell, "ran", result.metrics)


def _prepare_stores(cells: list[Cell]) -> None:
    """When cells about to run want several subsets of one dataset, build the largest first: the others are then
    views of it (data/store.py), not stores of their own."""
    groups: dict[tuple, list[StoreRequest]] = {}
    for cell in cells:
        request = StoreRequest(**asdict(cell.config.dataset))
        key = (repr(dataclasses.replace(request, subset_size=None)), cell.config.paths.datasets, cell.config.paths.cache)
        groups.setdefault(key, []).append(request)
    for (_, datasets, cache), requests in groups.items():
        sizes = {r.subset_size for r in requests}
        if len(sizes) > 1:
            largest = max(requests, key=lambda r: float("inf") if r.subset_size is None else r.subset_size)
            try:
                load_or_build_store(largest, Path(datasets), Path(cache))
            except StudioError as exc:  # each cell will report it in its own row
                log.warning("could not prepare the store of %s: %s", largest.name, exc)


def _write_outputs(plan: SweepPlan, outcomes: list[CellOutcome]) -> list[Path]:
    """summary.csv, summary.md and per dataset the comparison figure and, with a backbone, the agreement figure."""
    write_summary(plan, outcomes)
    files = [plan.folder / "sweep.yaml", plan.folder / "summary.csv", plan.folder / "summary.md"]
    finished = [o for o in outcomes if o.status in ("ran", "reused")]
    for dataset in plan.spec.datasets:
        mine = [o for o in finished if o.cell.dataset == dataset and (o.cell.run_dir / "samples.pt").is_file()]
        if mine:
            rows = [(o.cell.label, torch.load(o.cell.run_dir / "samples.pt", weights_only=True)) for o in mine]
            path = plan.folder / f"comparison_{dataset}.png"
            save_comparison(rows, path, f"{plan.spec.name} on {dataset}: the same initial noise in every column")
            files.append(path)
        curves = [(o.cell.label, o.metrics["baseline"]["timesteps"], o.metrics["baseline"]["per_step"]["trajectory_r2"]["mean"])
                  for o in mine if "baseline" in (o.metrics or {})]
        if curves:
            path = plan.folder / f"agreement_{dataset}.png"
            save_agreement(curves, path, f"{plan.spec.name} on {dataset}: agreement with the backbone")
            files.append(path)
    return files


def _spec_yaml(plan: SweepPlan) -> str:
    spec = plan.spec
    return OmegaConf.to_yaml({"name": spec.name, "methods": spec.methods, "datasets": spec.datasets,
                              "grid": spec.grid, "overrides": spec.overrides})


def run_sweep(plan: SweepPlan, force: bool = False) -> SweepResult:
    """Run the plan's cells in order (one outer progress bar over cells, above each run's own bar) and write
    sweep.yaml, summary.csv, summary.md and the figures into the sweep folder."""
    started = time.perf_counter()
    states = {cell.name: "absent" if force else cell_state(cell) for cell in plan.cells}
    _prepare_stores([c for c in plan.cells if states[c.name] != "complete"])  # a bad dataset fails before any write
    make_directory(plan.folder, "paths.runs")
    atomic_write_text(plan.folder / "sweep.yaml", _spec_yaml(plan))
    outcomes: list[CellOutcome] = []
    with logging_redirect_tqdm(), tqdm(total=len(plan.cells), desc=f"sweep {plan.spec.name}", unit="cell",
                                       position=0) as bar:
        try:
            for cell in plan.cells:
                bar.set_postfix_str(cell.name)
                if states[cell.name] == "complete":
                    outcomes.append(CellOutcome(cell, "reused", _read_metrics(cell)))
                else:
                    if states[cell.name] in ("changed", "incomplete"):
                        log.info("cell %s is %s: running it again", cell.name, states[cell.name])
                    outcomes.append(_run_cell(cell))
                bar.update(1)
        except KeyboardInterrupt:
            rest = plan.cells[len(outcomes):]
            outcomes += [CellOutcome(c, "interrupted" if i == 0 else "not run") for i, c in enumerate(rest)]
            _write_outputs(plan, outcomes)
            raise
    files = _write_outputs(plan, outcomes)
    return SweepResult(plan, outcomes, time.perf_counter() - started, files)


def summary(result: SweepResult) -> str:
    """The report printed at the end of `ads sweep`: counts, wall time, files, and the table."""
    counts = {status: sum(o.status == status for o in result.outcomes) for status in ("ran", "reused", "failed")}
    names = ", ".join(p.name for p in result.files)
    table = (result.plan.folder / "summary.md").read_text()
    return (f"Sweep {result.plan.spec.name}: {len(result.outcomes)} cells ({counts['ran']} ran, {counts['reused']} "
            f"reused, {counts['failed']} failed) in {result.seconds:.1f} s. Outputs in {result.plan.folder}: "
            f"{names}.\n\n{table}")
