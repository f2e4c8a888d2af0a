"""The sweep job: run every cell of a validated plan through `generate`, resumably, then write the table and figures.

Each cell is an ordinary run directory `<paths.runs>/sweeps/<sweep>/<cell>/` made by `generate.generate`, the code
path of `ads generate`. A cell that completed with the same resolved config (its config.yaml) is reused; an
incomplete one, or one whose config changed, is removed and run again (`force=True` reruns every cell). A cell
that fails is recorded with its error and the sweep goes on; Ctrl-C stops after writing the summary of what
finished, and the finished cells stay usable.

Under torchrun (docs/distributed.md) every rank walks the cells in the same order and runs each one distributed
(`generate.generate_on` in one process group); rank 0 alone writes the sweep folder, the cells' run directories and
the summary. A cell that fails where the ranks can agree on it (distributed/agreement.py) is recorded as in one
process; any other failure stops every rank with one line, after rank 0 has written the summary (that cell
failed, the rest not run).
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
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .. import distributed
from .. import generate as generate_job
from ..config import to_yaml
from ..data.store import StoreRequest, load_or_build_store
from ..devices import resolve_device
from ..distributed import Ranks
from ..distributed.agreement import Agreement, AgreedFailure
from ..distributed.group import collective
from ..errors import StudioError, one_line
from ..fileio import atomic_write_text, make_directory
from ..runs import INCOMPLETE
from .figures import save_agreement, save_comparison
from .report import CellOutcome, write_summary
from .spec import Cell, SweepPlan, check_sources

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


def _computed(metrics: dict) -> str:
    """How a finished cell was computed, from its metrics.json: in one process, or on K ranks with a strategy (a
    cell is reused across modes when its config is the same: `samples` equals one process bit for bit)."""
    if "distributed" not in metrics:
        return "by a version that did not record how"
    how = metrics["distributed"]
    return "in one process" if how is None else f"on {how['world_size']} ranks, distributed.strategy={how['strategy']}"


def _run_cell(cell: Cell) -> CellOutcome:
    """Run one cell into a fresh folder; a failure is returned, not raised (KeyboardInterrupt is raised)."""
    if cell.run_dir.exists():
        shutil.rmtree(cell.run_dir)
    try:
        result = generate_job.generate(cell.config)
    except Exception as exc:  # any failure of this cell's method or data: recorded, and the sweep goes on
        log.error("cell %s failed: %s", cell.name, one_line(exc))
        return CellOutcome(cell, "failed", error=one_line(exc))
    return CellOutcome(cell, "ran", result.metrics)


def _run_cell_on(cell: Cell, ranks: Ranks) -> CellOutcome:
    """Run one cell on every rank of the sweep's process group; a failure the ranks agree on is returned (rank 0's
    outcome holds the metrics; the others' none), any other is raised."""
    if ranks.is_writer and cell.run_dir.exists():
        shutil.rmtree(cell.run_dir)
    device = resolve_device(distributed.device_name(cell.config.experiment.device))
    agreement = Agreement(ranks, f"cell {cell.name}")
    try:
        with agreement.phase():  # the end of the cell: rank 0 has written its run directory
            result = generate_job.generate_on(cell.config, device, ranks, agreement)
    except AgreedFailure as exc:
        if ranks.is_writer:
            log.error("cell %s failed: %s", cell.name, exc)
        return CellOutcome(cell, "failed", error=str(exc))
    return CellOutcome(cell, "ran", result.metrics if result is not None else None)


def _check_distributed(plan: SweepPlan) -> tuple[str, float]:
    """The one distributed.strategy and timeout of every cell (one process group serves them all)."""
    settings = {(c.config.distributed.strategy, c.config.distributed.timeout_seconds) for c in plan.cells}
    if len(settings) > 1:
        raise StudioError("every cell of a sweep under torchrun needs the same distributed.strategy and "
                          "distributed.timeout_seconds; set them as overrides for every cell, not in the grid")
    return settings.pop()


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


def run_sweep(plan: SweepPlan, force: bool = False) -> SweepResult | None:
    """Run the plan's cells in order (one outer progress bar over cells, above each run's own bar) and write
    sweep.yaml, summary.csv, summary.md and the figures into the sweep folder.

    Under torchrun every rank runs this; rank 0 writes everything and returns the result, the others None. Every
    cell is checked for the distributed run (generate.check_distributed_run) before anything is written."""
    if not distributed.launched():
        return _run_cells(plan, force, None)
    strategy, timeout_seconds = _check_distributed(plan)
    device = resolve_device(distributed.device_name(plan.cells[0].config.experiment.device))
    ranks = distributed.start(strategy, timeout_seconds, device)
    with distributed.failures_published(ranks):
        for cell in plan.cells:
            generate_job.check_distributed_run(cell.config, ranks)
        distributed.writer_first(ranks, "sources", lambda: check_sources(plan.cells))  # a download: rank 0 alone
        result = _run_cells(plan, force, ranks)
        distributed.finish(ranks)
    return result


def _states(plan: SweepPlan, force: bool, ranks: Ranks | None) -> dict[str, str]:
    """Each cell's state (cell_state) as rank 0 sees it, on every rank (rank 0 may already be rewriting cells
    when a slower rank would look)."""
    states = [{cell.name: "absent" if force else cell_state(cell) for cell in plan.cells}
              if ranks is None or ranks.is_writer else None]
    if ranks is not None:
        collective(dist.broadcast_object_list, states, src=0)
    return states[0]


def _run_cells(plan: SweepPlan, force: bool, ranks: Ranks | None) -> SweepResult | None:
    """run_sweep's walk over the cells, in one process (ranks None) or on every rank of the sweep's group."""
    started = time.perf_counter()
    writer = ranks is None or ranks.is_writer
    distributed.quiet_unless_speaking(log)  # rank 0 reports for every rank
    states = _states(plan, force, ranks)
    if writer:
        _prepare_stores([c for c in plan.cells if states[c.name] != "complete"])  # a bad dataset fails before any write
        make_directory(plan.folder, "paths.runs")
        spec_yaml, spec_file = _spec_yaml(plan), plan.folder / "sweep.yaml"
        if spec_file.exists() and spec_file.read_text() != spec_yaml:  # the folder held another sweep
            log.warning("warning: %s held a different sweep (its sweep.yaml differs): its summary and sweep.yaml are "
                        "replaced by this sweep's, its other cells stay in the folder unlisted; give each sweep its "
                        "own folder with --name NAME", plan.folder)
        atomic_write_text(spec_file, spec_yaml)
    outcomes: list[CellOutcome] = []
    with logging_redirect_tqdm(), tqdm(total=len(plan.cells), desc=f"sweep {plan.spec.name}", unit="cell",
                                       position=0, disable=not writer) as bar:
        try:
            for cell in plan.cells:
                bar.set_postfix_str(cell.name)
                if states[cell.name] == "complete":
                    metrics = _read_metrics(cell) if writer else None
                    if metrics is not None:
                        log.info("cell %s reused (the same config), computed %s", cell.name, _computed(metrics))
                    outcomes.append(CellOutcome(cell, "reused", metrics))
                else:
                    if states[cell.name] in ("changed", "incomplete"):
                        log.info("cell %s is %s: running it again", cell.name, states[cell.name])
                    outcomes.append(_run_cell(cell) if ranks is None else _run_cell_on(cell, ranks))
                bar.update(1)
        except KeyboardInterrupt:
            rest = plan.cells[len(outcomes):]
            outcomes += [CellOutcome(c, "interrupted" if i == 0 else "not run") for i, c in enumerate(rest)]
            if writer:
                _write_outputs(plan, outcomes)
            raise
        except Exception as exc:  # under torchrun: a failure the ranks could not agree on stops the sweep
            rest = plan.cells[len(outcomes):]
            outcomes += [CellOutcome(c, "failed", error=one_line(exc)) if i == 0 else CellOutcome(c, "not run")
                         for i, c in enumerate(rest)]
            if writer:
                _write_outputs(plan, outcomes)
            raise
    if not writer:
        return None
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
