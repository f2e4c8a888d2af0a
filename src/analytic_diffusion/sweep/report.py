"""The sweep's table: one row per cell, read from the cell's metrics.json (the run's own numbers, never recomputed).

Columns: method, dataset, the grid values, status, seconds_per_step, fit_seconds, memorized_fraction and d1_median
(from `metrics["memorization"]`), with a backbone the final r2, pearson_r and mse along the two models' own
trajectories (from `metrics["baseline"]["final"]`), the cell's folder (only where it exists: a cell that failed
before its run directory was made, e.g. on a dataset check, has none) and its error. A value the run did not
report is left empty in summary.csv and written n/a in summary.md.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any

from ..fileio import atomic_write_text
from .spec import Cell, SweepPlan

MEMORIZATION = ("memorized_fraction", "d1_median")
AGREEMENT = {"r2": "trajectory_r2", "pearson_r": "trajectory_pearson_r", "mse": "trajectory_mse"}


@dataclass
class CellOutcome:
    """How a cell of this invocation ended: ran, reused (complete with the same config), failed or not run."""

    cell: Cell
    status: str
    metrics: dict[str, Any] | None = None
    error: str = ""


def columns(plan: SweepPlan) -> list[str]:
    agreement = list(AGREEMENT) if plan.baseline else []
    return ["method", "dataset", *plan.grid_keys, "status", "seconds_per_step", "fit_seconds", *MEMORIZATION,
            *agreement, "run", "error"]


def row(outcome: CellOutcome, plan: SweepPlan) -> dict[str, Any]:
    """One summary row; metrics the run did not report are None."""
    metrics = outcome.metrics or {}
    cell = outcome.cell
    values: dict[str, Any] = {"method": "backbone" if cell.backbone else cell.method, "dataset": cell.dataset}
    values.update({key: cell.grid.get(key) for key in plan.grid_keys})
    values.update(status=outcome.status, seconds_per_step=metrics.get("seconds_per_step"),
                  fit_seconds=metrics.get("fit_seconds"))
    memorization = metrics.get("memorization") or {}
    values.update({key: memorization.get(key) for key in MEMORIZATION})
    if plan.baseline:
        final = (metrics.get("baseline") or {}).get("final") or {}
        values.update({column: final.get(key) for column, key in AGREEMENT.items()})
    values.update(run=cell.name if cell.run_dir.is_dir() else None, error=outcome.error)
    return values


def _number(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return "n/a" if value is None else str(value)


def write_summary(plan: SweepPlan, outcomes: list[CellOutcome]) -> None:
    """summary.csv (machine-readable, full precision) and summary.md (a Markdown table) in the sweep folder."""
    names = columns(plan)
    rows = [row(o, plan) for o in outcomes]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    atomic_write_text(plan.folder / "summary.csv", buffer.getvalue())
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in rows:
        cells = [str(r[k]) if k == "error" else _number(r[k]) for k in names]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    atomic_write_text(plan.folder / "summary.md", "\n".join(lines) + "\n")
