"""How close a method comes to a trained baseline (a UNet) from the same initial noise.

Two comparisons at every sampling step t, per sample:
- trajectory:  the method's x0_hat(t) on its own trajectory vs the baseline's x0_hat(t) on the baseline's own
  trajectory, both started from the same x_T;
- single step: the method's x0_hat(t) vs the baseline's x0_hat given the method's own x_t (the baseline's answer to
  the question the method was asked).
Each is scored with the five agreement metrics of `metrics.agreement` (DESIGN.md §8), the baseline as reference.
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
from .metrics import agreement
from .sampling import Step, StepCallback, epsilon_from_x0, noise_level, sample
from .figures import pyplot

KINDS = ("trajectory", "single_step")
METRICS = tuple(f"{kind}_{name}" for kind in KINDS for name in agreement.NAMES)
DEFINITIONS = {
    "r2": "1 - sum((a - u)^2) / (n * var(u)), var unbiased (Lukoianov et al., the reference framework); mean over samples",
    "mse": "mean((a - u)^2) over the n = C*H*W values",
    "pearson_r": "correlation of the centred a and u (Kamb & Ganguli, whose figures call it r^2); they quote the median",
    "explained_variance": "1 - ||a - u||^2 / ||u||^2 (Wang & Vastola)",
    "eps_cosine": "cosine similarity of the two models' eps, each at its own x_t (Kamb & Ganguli's calibration criterion)",
}
R2_PLOT_FLOOR = -1.0  # r2 and explained_variance axes stop here: far-off early steps would otherwise flatten the rest


def _rounded(values: torch.Tensor) -> list:
    return [None if math.isnan(v) else float(f"{v:.6g}") for v in values.tolist()]


@dataclass
class ComparisonResult:
    """Every metric of every step (rows, in sampling order) and sample (columns), a the method's x0_hat, u the
    baseline's; `tables` is keyed `trajectory_<m>` and `single_step_<m>` for m in agreement.NAMES."""

    timesteps: list[int]
    tables: dict[str, torch.Tensor]  # [S, N] each
    method_images: torch.Tensor  # [N, C, H, W] the method's final x0_hat
    baseline_images: torch.Tensor  # [N, C, H, W] the baseline's final x0_hat from the same x_T

    def metrics(self) -> dict[str, torch.Tensor]:
        """The [S, N] tables by name, in METRICS order."""
        return {name: self.tables[name] for name in METRICS}

    def summary(self) -> dict:
        """JSON-ready: definitions, the last step's mean and median over samples, per-step means, medians and values.

        NaN values (a constant reference) are left out of means and medians and written as null."""
        result: dict = {"definitions": DEFINITIONS, "timesteps": self.timesteps, "final": {}, "final_median": {},
                        "per_step": {}}
        for name, values in self.metrics().items():
            means, medians = _rounded(values.nanmean(dim=1)), _rounded(values.nanmedian(dim=1).values)
            result["final"][name] = means[-1]
            result["final_median"][name] = medians[-1]
            result["per_step"][name] = {"mean": means, "median": medians, "per_sample": [_rounded(row) for row in values]}
        return result


def _eps(step: Step, scheduler: DDIMScheduler) -> torch.Tensor:
    """The noise a step's x0_hat implies at its own x_t (what the sampler steps with)."""
    return epsilon_from_x0(step.x_t, step.x0_hat, scheduler.alphas_cumprod[step.timestep].to(step.x_t.device))


@dataclass
class BaselineComparison:
    """Runs a baseline beside a method, batch by batch, and accumulates the step-by-step comparison.

    Per sampling batch: `callback = comparison.start_batch(x_T)` samples the baseline from the method's x_T and
    records its trajectory; pass `callback` to the method's `sample(...)`; then `comparison.finish_batch(final)`.
    At each step the method's (x0_hat, eps) is scored against the baseline's on the baseline's own trajectory
    (`trajectory_<m>`) and against the baseline given the method's x_t (`single_step_<m>`). The method's own random
    stream is never touched, so switching the comparison on does not change its samples.
    """

    baseline: Denoiser
    scheduler: DDIMScheduler  # the scheduler the method samples with
    eta: float = 0.0  # the baseline's own trajectory (baseline.eta)
    seconds: float = 0.0  # wall time spent on the baseline and the metrics (kept out of the method's timings)
    _rows: dict[str, list[list[torch.Tensor]]] = field(default_factory=dict)
    _method_images: list[torch.Tensor] = field(default_factory=list)
    _baseline_images: list[torch.Tensor] = field(default_factory=list)

    def start_batch(self, x_T: torch.Tensor, noise: NoiseSource | None = None) -> StepCallback:
        """Sample the baseline from x_T (`noise`: its scheduler noise when eta > 0) and return the method's callback."""
        started = time.perf_counter()
        trajectory: list[Step] = []
        final = sample(self.baseline, self.scheduler, x_T, noise, self.eta, callback=trajectory.append)
        self._baseline_images.append(final.x0_hat.cpu())
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in METRICS}

        def compare_step(step: Step) -> None:
            started = time.perf_counter()
            own = trajectory[step.index]
            answer = Step(step.index, step.timestep, step.x_t,
                          self.baseline(step.x_t, noise_level(self.scheduler, step.timestep)).x0_hat)
            eps = _eps(step, self.scheduler)
            for kind, reference in (("trajectory", own), ("single_step", answer)):
                scores = agreement.agreement(step.x0_hat, reference.x0_hat, eps, _eps(reference, self.scheduler))
                for name, values in scores.items():
                    rows[f"{kind}_{name}"].append(values.cpu())
            self.seconds += time.perf_counter() - started

        for name, values in rows.items():
            self._rows.setdefault(name, []).append(values)
        self.seconds += time.perf_counter() - started
        return compare_step

    def finish_batch(self, method_final: torch.Tensor) -> None:
        """Record the method's final images of the batch (the last x0_hat)."""
        self._method_images.append(method_final.cpu())

    def batches(self) -> list[tuple[dict[str, list[torch.Tensor]], torch.Tensor, torch.Tensor]]:
        """Per batch so far: its rows (per metric, one [B] tensor per step), the method's and the baseline's final
        images; what a rank of a distributed run sends to rank 0 (`adopt`)."""
        return [({name: batches[i] for name, batches in self._rows.items()}, self._method_images[i],
                 self._baseline_images[i]) for i in range(len(self._method_images))]

    def adopt(self, batches: list[tuple[dict[str, list[torch.Tensor]], torch.Tensor, torch.Tensor]],
              seconds: float) -> None:
        """Replace this comparison's batches with `batches` (every rank's `batches()`, in sample order) and its time
        with `seconds`: `result()` is then that of one process sampling them all."""
        self._rows = {name: [rows[name] for rows, _, _ in batches] for name in METRICS}
        self._method_images = [method for _, method, _ in batches]
        self._baseline_images = [baseline for _, _, baseline in batches]
        self.seconds = seconds

    def result(self) -> ComparisonResult:
        """Concatenate the batches: [S, N] per metric."""
        stacked = {name: torch.cat([torch.stack(rows) for rows in batches], dim=1) for name, batches in self._rows.items()}
        return ComparisonResult(
            timesteps=[int(t) for t in self.scheduler.timesteps.tolist()],
            tables=stacked,
            method_images=torch.cat(self._method_images),
            baseline_images=torch.cat(self._baseline_images),
        )


TITLES = {"r2": "r2 (1 = identical)", "mse": "mse", "pearson_r": "pearson_r", "explained_variance": "explained_variance",
          "eps_cosine": "eps_cosine"}


def plot_comparison(result: ComparisonResult, path: Path, method: str = "method", baseline: str = "UNet") -> None:
    """One PNG, one panel per agreement metric against the timestep (sampling order, left to right): the mean over
    samples of both comparisons (own trajectories, single step) and their per-sample range; mse on a log scale."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(agreement.NAMES), figsize=(4.2 * len(agreement.NAMES), 3.8))
    tables = result.metrics()
    labels = {"trajectory": "own trajectories", "single_step": f"{baseline} at {method}'s x_t"}
    for axis, metric in zip(axes, agreement.NAMES):
        for kind, label in labels.items():
            values = tables[f"{kind}_{metric}"]
            line = axis.plot(result.timesteps, values.nanmean(1), marker="o", ms=3, label=label)[0]
            filled = torch.where(values.isnan(), values.nanmean(1, keepdim=True), values)
            axis.fill_between(result.timesteps, filled.min(1).values, filled.max(1).values, color=line.get_color(), alpha=0.15)
        axis.set(xlabel="timestep t", title=TITLES[metric])
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
        values = torch.cat([tables[f"{kind}_{metric}"] for kind in KINDS], dim=1)
        if metric == "mse" and bool((values > 0).all()):
            axis.set_yscale("log")  # the first steps' errors are orders of magnitude above the last ones'
        if metric in ("r2", "explained_variance") and float(torch.nan_to_num(values, nan=1.0).min()) < R2_PLOT_FLOOR:
            axis.set_ylim(R2_PLOT_FLOOR, 1.05)
            axis.text(0.02, 0.02, f"values below {R2_PLOT_FLOOR} not shown", transform=axis.transAxes, fontsize=8)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"{method} vs {baseline}")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)


def save_side_by_side(result: ComparisonResult, path: Path, method: str = "method", baseline: str = "UNet",
                      columns: int | None = None) -> None:
    """One PNG: the method's final images (left) and the baseline's from the same noise (right), same order."""
    from torchvision.utils import make_grid

    plt = pyplot()
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
