"""How close a method comes to a trained baseline (a UNet) from the same initial noise.

Two comparisons at every sampling step t, per sample:
- trajectory:  the method's x0_hat(t) on its own trajectory vs the baseline's x0_hat(t) on the baseline's own
  trajectory, both started from the same x_T;
- single step: the method's x0_hat(t) vs the baseline's x0_hat given the method's own x_t (the baseline's answer to
  the question the method was asked).
Each is scored with R^2 (baseline as the reference) and MSE; see `r2_per_sample` for the definition.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from .denoisers.base import Denoiser
from .fileio import atomic_write
from .noise import NoiseSource
from .sampling import Step, StepCallback, noise_level, sample

R2_DEFINITION = (
    "per sample: R2 = 1 - sum((x - y)^2) / (n * var(y)), y the baseline's x0_hat, x the method's, n = C*H*W, "
    "var the population variance of y's n values (so n * var(y) = sum((y - mean(y))^2)); averaged over samples"
)
METRICS = ("trajectory_r2", "trajectory_mse", "single_step_r2", "single_step_mse")
R2_PLOT_FLOOR = -1.0  # the R^2 axis stops here: far-off early steps would otherwise flatten the rest


def r2_per_sample(prediction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Coefficient of determination of `prediction` as an estimate of `reference`, one value per sample [B].

    R^2 = 1 - SS_res / SS_tot with SS_res = sum (x - y)^2 and SS_tot = n var(y) = sum (y - mean y)^2 over the n
    values of one sample: 1 is a perfect match, 0 is no better than the reference's own mean value, below 0 is
    worse. NaN where the reference is constant (SS_tot = 0). Computed in float64.
    """
    x = prediction.flatten(1).double()
    y = reference.flatten(1).double()
    ss_res = (x - y).square().sum(1)
    ss_tot = (y - y.mean(1, keepdim=True)).square().sum(1)
    r2 = torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp_min(torch.finfo(torch.float64).tiny), torch.nan)
    return r2.float()


def mse_per_sample(prediction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over the n = C*H*W values of each sample [B] (model space [-1, 1])."""
    return (prediction.flatten(1).double() - reference.flatten(1).double()).square().mean(1).float()


@dataclass
class ComparisonResult:
    """Metrics of every step (rows, in sampling order) and every sample (columns)."""

    timesteps: list[int]
    trajectory_r2: torch.Tensor  # [S, N]
    trajectory_mse: torch.Tensor  # [S, N]
    single_step_r2: torch.Tensor  # [S, N]
    single_step_mse: torch.Tensor  # [S, N]
    method_images: torch.Tensor  # [N, C, H, W] the method's final x0_hat
    baseline_images: torch.Tensor  # [N, C, H, W] the baseline's final x0_hat from the same x_T

    def metrics(self) -> dict[str, torch.Tensor]:
        """The four [S, N] tables by name."""
        return {name: getattr(self, name) for name in METRICS}

    def summary(self) -> dict:
        """JSON-ready: the definition, the final-step means, and per-step means and per-sample values."""

        def rounded(values: torch.Tensor) -> list:
            return [None if math.isnan(v) else float(f"{v:.6g}") for v in values.tolist()]

        result: dict = {"r2_definition": R2_DEFINITION, "timesteps": self.timesteps, "final": {}, "per_step": {}}
        for name, values in self.metrics().items():
            means = rounded(values.nanmean(dim=1))  # samples without an R^2 (constant reference) are left out
            result["final"][name] = means[-1]
            result["per_step"][name] = {"mean": means, "per_sample": [rounded(row) for row in values]}
        return result


@dataclass
class BaselineComparison:
    """Runs a baseline beside a method, batch by batch, and accumulates the step-by-step comparison.

    Per sampling batch: `callback = comparison.start_batch(x_T)` samples the baseline from the method's x_T and
    records its trajectory; pass `callback` to the method's `sample(...)`; then `comparison.finish_batch(final)`.
    The method's own random stream is never touched, so switching the comparison on does not change its samples.
    """

    baseline: Denoiser
    scheduler: DDIMScheduler  # the scheduler the method samples with
    eta: float = 0.0
    seconds: float = 0.0  # wall time spent on the baseline and the metrics (kept out of the method's timings)
    _rows: dict[str, list[list[torch.Tensor]]] = field(default_factory=dict)
    _method_images: list[torch.Tensor] = field(default_factory=list)
    _baseline_images: list[torch.Tensor] = field(default_factory=list)

    def start_batch(self, x_T: torch.Tensor, noise: NoiseSource | None = None) -> StepCallback:
        """Sample the baseline from x_T (`noise`: its scheduler noise when eta > 0) and return the method's callback."""
        started = time.perf_counter()
        trajectory: list[torch.Tensor] = []
        final = sample(self.baseline, self.scheduler, x_T, noise, self.eta, callback=lambda s: trajectory.append(s.x0_hat))
        self._baseline_images.append(final.x0_hat.cpu())
        metrics: dict[str, list[torch.Tensor]] = {name: [] for name in METRICS}

        def compare_step(step: Step) -> None:
            started = time.perf_counter()
            reference = trajectory[step.index]
            answer = self.baseline(step.x_t, noise_level(self.scheduler, step.timestep)).x0_hat
            metrics["trajectory_r2"].append(r2_per_sample(step.x0_hat, reference).cpu())
            metrics["trajectory_mse"].append(mse_per_sample(step.x0_hat, reference).cpu())
            metrics["single_step_r2"].append(r2_per_sample(step.x0_hat, answer).cpu())
            metrics["single_step_mse"].append(mse_per_sample(step.x0_hat, answer).cpu())
            self.seconds += time.perf_counter() - started

        for name, rows in metrics.items():
            self._rows.setdefault(name, []).append(rows)
        self.seconds += time.perf_counter() - started
        return compare_step

    def finish_batch(self, method_final: torch.Tensor) -> None:
        """Record the method's final images of the batch (the last x0_hat)."""
        self._method_images.append(method_final.cpu())

    def result(self) -> ComparisonResult:
        """Concatenate the batches: [S, N] per metric."""
        stacked = {name: torch.cat([torch.stack(rows) for rows in batches], dim=1) for name, batches in self._rows.items()}
        return ComparisonResult(
            timesteps=[int(t) for t in self.scheduler.timesteps.tolist()],
            method_images=torch.cat(self._method_images),
            baseline_images=torch.cat(self._baseline_images),
            **stacked,
        )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_comparison(result: ComparisonResult, path: Path, method: str = "method", baseline: str = "UNet") -> None:
    """One PNG: R^2 and MSE (log scale) against the timestep (sampling order, left to right), mean and per-sample range."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    tables = result.metrics()
    kinds = {"trajectory": "own trajectories", "single_step": f"{baseline} at {method}'s x_t"}
    for axis, metric in zip(axes, ("r2", "mse")):
        for kind, label in kinds.items():
            values = tables[f"{kind}_{metric}"]
            line = axis.plot(result.timesteps, values.nanmean(1), marker="o", ms=3, label=label)[0]
            filled = torch.where(values.isnan(), values.nanmean(1, keepdim=True), values)
            axis.fill_between(result.timesteps, filled.min(1).values, filled.max(1).values, color=line.get_color(), alpha=0.15)
        title = "R² (1 = identical)" if metric == "r2" else "MSE"
        axis.set(xlabel="timestep t", ylabel=title.split()[0], title=f"{method} vs {baseline}: {title}")
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if all(bool((tables[f"{kind}_mse"] > 0).all()) for kind in kinds):
        axes[1].set_yscale("log")  # the first steps' errors are orders of magnitude above the last ones'
    lowest = min(float(torch.nan_to_num(tables[f"{kind}_r2"], nan=1.0).min()) for kind in kinds)
    if lowest < R2_PLOT_FLOOR:
        axes[0].set_ylim(R2_PLOT_FLOOR, 1.05)
        axes[0].text(0.02, 0.02, f"values below {R2_PLOT_FLOOR} not shown", transform=axes[0].transAxes, fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)


def save_side_by_side(result: ComparisonResult, path: Path, method: str = "method", baseline: str = "UNet",
                      columns: int | None = None) -> None:
    """One PNG: the method's final images (left) and the baseline's from the same noise (right), same order."""
    from torchvision.utils import make_grid

    plt = _pyplot()
    count = result.method_images.shape[0]
    columns = columns or max(1, math.ceil(math.sqrt(count)))
    grids = [make_grid(((images + 1) / 2).clamp(0, 1), nrow=columns, padding=2, pad_value=1.0)
             for images in (result.method_images, result.baseline_images)]
    height, width = grids[0].shape[1:]
    figure, axes = plt.subplots(1, 2, figsize=(10, 5 * height / width + 0.6))
    for axis, grid, title in zip(axes, grids, (method, f"{baseline} (same initial noise)")):
        axis.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")  # make_grid gives 3 channels
        axis.set_title(title)
        axis.axis("off")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=150))
    plt.close(figure)
