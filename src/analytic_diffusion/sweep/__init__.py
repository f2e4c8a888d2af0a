"""`ads sweep`: every method on every dataset over a parameter grid, from the same initial noise, in one folder
with one comparison figure and one table (spec -> plan -> runs -> summary)."""

from .job import SweepResult, cell_state, run_sweep, summary
from .spec import Cell, SweepPlan, SweepSpec, load_spec, plan_sweep

__all__ = ["Cell", "SweepPlan", "SweepResult", "SweepSpec", "cell_state", "load_spec", "plan_sweep", "run_sweep",
           "summary"]
