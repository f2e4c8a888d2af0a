"""The calibrate job: the patch size of a local patch method per sampling step, fitted to a trained network
(Kamb & Ganguli's k(t); DESIGN.md §6).

Along the network's own DDIM trajectory from S seeds, at every step of the sampling schedule and for every
candidate size k, the cosine between the method's eps and the network's eps at the network's x_t; per sample the
best k, per step the median over samples. Calibration and sampling visit exactly the same timesteps, and the
method answers the same x_t the network was given (not one step off).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import StudioConfig, to_yaml
from .data.store import StoreRequest, load_or_build_store
from .denoisers import denoiser_class
from .denoisers.local_patch import LocalPatchDenoiser
from .denoisers.unet import UNetDenoiser, UNetParams
from .devices import resolve_device
from .errors import StudioError
from .fileio import atomic_write
from .metrics.agreement import eps_cosine
from .noise import batch_noise_sources
from .runs import RunDirectory
from .sampling import Step, epsilon_from_x0, make_scheduler, noise_level, sample, start_warning
from .figures import pyplot

log = logging.getLogger("analytic_diffusion")


def default_candidates(sample_shape: tuple[int, int, int], odd: bool = True) -> list[int]:
    """3, 5, ..., up to the image size (every size from 2 for methods that take even sizes too)."""
    side = min(sample_shape[1:])
    return list(range(3, side + 1, 2)) if odd else list(range(2, side + 1))


@dataclass
class CalibrationResult:
    run_dir: Path
    timesteps: list[int]
    candidates: list[int]
    chosen: list[int]  # patch size per step
    cosine: torch.Tensor  # [steps, candidates, samples]


def choose_sizes(cosine: torch.Tensor, candidates: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Per sample the candidate with the largest cosine [steps, samples]; per step the median of those (the lower
    of the two middle values for an even number of samples, so it is always a candidate)."""
    best = torch.tensor(candidates)[cosine.argmax(1)]
    return best, [int(v) for v in best.median(1).values]


def calibrate(cfg: StudioConfig) -> CalibrationResult:
    """Run the calibration and write calibration.json, calibration.png and the resolved config to a run directory."""
    cls = denoiser_class(cfg.model.name)
    if not issubclass(cls, LocalPatchDenoiser):
        raise StudioError(f"ads calibrate fits the patch size of local_score, els or pspc, not '{cfg.model.name}'")
    if not cfg.baseline.checkpoint:
        raise StudioError("ads calibrate needs the trained network: baseline.checkpoint=<checkpoint file or folder>")
    device = resolve_device(cfg.experiment.device)
    store, _ = load_or_build_store(StoreRequest(**asdict(cfg.dataset)), Path(cfg.paths.datasets), Path(cfg.paths.cache))
    candidates = cfg.calibration.candidates
    if candidates is not None and len(candidates) == 0:
        raise StudioError("calibration.candidates is empty: list the patch sizes to try (e.g. [3,5,7]) or leave it "
                          "unset for 3, 5, ... up to the image size")
    candidates = candidates or default_candidates(store.sample_shape, cls.Params.odd_sizes)
    params = replace(cfg.model.params, patch_size=candidates[0])  # validates the sizes; the run sets its own
    for size in candidates:
        try:
            params.check_size(size)
        except StudioError:
            parity = "odd " if cls.Params.odd_sizes else ""
            raise StudioError(f"calibration.candidates must be {parity}positive integers (patch sizes of "
                              f"{cfg.model.name}); got {size!r} in {list(candidates)}") from None
    for size in candidates:
        cls.check_fits(params, size, store.sample_shape)  # e.g. circular ELS beyond the image: before the run dir
    method = cls(params, device).fit(store)
    network = UNetDenoiser(UNetParams(cfg.baseline.checkpoint, cfg.baseline.use_ema), device).fit(store)  # any backbone format, checked
    scheduler = make_scheduler(cfg.sampling)
    timesteps = scheduler.timesteps.tolist()
    warning = start_warning(scheduler)
    if warning:
        log.warning("warning: %s", warning)
    run = RunDirectory.create(Path(cfg.paths.runs), cfg.experiment.name,
                              cfg.experiment.run_name or f"calibrate_{cfg.model.name}_{cfg.dataset.name}",
                              cfg.experiment.append_timestamp)
    handler = run.attach_log(log)
    try:
        run.write_text("config.yaml", to_yaml(cfg))
        cosine = _cosine_table(cfg, method, network, scheduler, candidates, store.sample_shape, device)
        best, chosen = choose_sizes(cosine, candidates)
        run.write_json("calibration.json", {
            "method": cfg.model.name,
            "dataset": cfg.dataset.name,
            "checkpoint": cfg.baseline.checkpoint,
            "num_seeds": cfg.calibration.num_seeds,
            "timesteps": timesteps,
            "patch_size": chosen,
            "candidates": candidates,
            "criterion": "eps_cosine: cosine of the method's and the network's eps at the network's x_t",
            "eps_cosine_mean": cosine.mean(2).tolist(),  # [step][candidate]
            "best_per_sample": best.tolist(),  # [step][sample]
            "eps_cosine": cosine.tolist(),  # [step][candidate][sample]
        })
        plot_calibration(cosine, candidates, timesteps, chosen, run.path / "calibration.png", cfg.model.name)
        run.mark_complete()
    except BaseException as exc:
        run.mark_failed(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
    return CalibrationResult(run.path, timesteps, candidates, chosen, cosine)


def _cosine_table(cfg, method, network, scheduler, candidates, sample_shape, device) -> torch.Tensor:
    """eps_cosine [steps, candidates, seeds] along the network's own trajectories."""
    sources = batch_noise_sources(cfg.experiment.seed, cfg.calibration.num_seeds, cfg.sampling.batch_size,
                                  sample_shape, device, cfg.sampling.per_sample_seeds)
    batches = []
    total = len(sources) * len(scheduler.timesteps) * len(candidates)
    with tqdm(total=total, desc=f"calibrating {cfg.model.name}", unit="eval") as progress:
        for noise in sources:
            rows: list[torch.Tensor] = []

            def score(step: Step) -> None:
                level = noise_level(scheduler, step.timestep)
                alpha_bar = torch.tensor(level.alpha_bar, dtype=step.x_t.dtype)
                target = epsilon_from_x0(step.x_t, step.x0_hat, alpha_bar)
                row = []
                for size in candidates:
                    x0_hat = method.denoise_at_size(step.x_t, level, size).x0_hat
                    row.append(eps_cosine(epsilon_from_x0(step.x_t, x0_hat, alpha_bar), target).cpu())
                    progress.update(1)
                rows.append(torch.stack(row))

            sample(network, scheduler, noise.randn(), noise, cfg.sampling.eta, score)
            batches.append(torch.stack(rows))  # [steps, candidates, batch]
    return torch.cat(batches, dim=2)


def plot_calibration(cosine: torch.Tensor, candidates: list[int], timesteps: list[int], chosen: list[int],
                     path: Path, method: str) -> None:
    """Mean eps_cosine against patch size, one curve per step, the chosen size marked."""
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    colours = plt.cm.viridis(torch.linspace(0, 1, len(timesteps)).numpy())
    mean = cosine.mean(2)
    for i, t in enumerate(timesteps):
        axis.plot(candidates, mean[i].tolist(), "-o", color=colours[i], markersize=3, label=f"t={t}")
        axis.plot([chosen[i]], [mean[i, candidates.index(chosen[i])].item()], "k*", markersize=8)
    axis.set_xticks(candidates)  # whole patch sizes, not fractional ticks
    axis.set_xlabel("patch size")
    axis.set_ylabel("eps_cosine (mean over seeds)")
    axis.set_title(f"{method}: agreement with the network per step (* = chosen, median of per-seed best)", fontsize=9)
    axis.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)


def summary(result: CalibrationResult) -> str:
    """What `ads calibrate` prints: the chosen sizes and the override that uses them."""
    sizes = ", ".join(f"t={t}: {k}" for t, k in zip(result.timesteps, result.chosen))
    return (f"Calibrated patch sizes per step ({sizes}); table and plot in {result.run_dir}. Use them with:\n"
            f"  model.params.patch_size={result.run_dir / 'calibration.json'}")
