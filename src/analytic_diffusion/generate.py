"""The generate job: config -> store -> denoiser.fit -> sample -> artifacts, in one direction."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .backbones import timestep_mapping
from .compare import BaselineComparison, plot_comparison, save_side_by_side
from .config import StudioConfig, to_yaml
from .data.store import DatasetStore, StoreRequest, files_sentence, load_or_build_store
from .denoisers import Denoised, Denoiser, NoiseLevel, denoiser_class
from .denoisers.unet import UNetDenoiser, UNetParams
from .errors import StudioError
from .devices import resolve_device, synchronize
from . import distributed
from .distributed import Ranks
from .distributed.agreement import Agreement
from .distributed.dataset import ShardedDataset, build_sharded_denoiser, check_sharded_method
from .distributed.samples import check_samples_strategy, gather_batches, idle_ranks_warning
from .noise import batch_noise_sources
from .runs import RunDirectory, records_before_run, save_grid, save_images, save_tensor
from .mask_images import default_mask_pixels, save_mask_images
from .patch_images import save_patch_figure, top_patch_images
from .metrics.memorization import memorization_metrics, summarize
from .sampling import Step, make_scheduler, noise_level, sample, start_warning
from .search import knn_search
from .tracking import log_run, wandb_module

log = logging.getLogger("analytic_diffusion")


@dataclass
class TrajectoryRecorder:
    """Sampler callback: per-step wall time and diagnostics, and (optionally) x_t and x0_hat of every step."""

    device: torch.device
    keep_images: bool = False
    progress: tqdm | None = None
    x_t: list[torch.Tensor] = field(default_factory=list)
    x0_hat: list[torch.Tensor] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    diagnostics: list[dict[str, torch.Tensor]] = field(default_factory=list)
    final_x_t: torch.Tensor | None = None  # the input of the last step seen (for the patch figure)
    _last: float = field(default_factory=time.perf_counter)

    def restart_clock(self) -> None:
        synchronize(self.device)
        self._last = time.perf_counter()

    def __call__(self, step: Step) -> None:
        if not torch.isfinite(step.x0_hat).all():
            raise StudioError(
                f"the denoiser returned NaN or inf at timestep {step.timestep}; check the dataset for NaNs "
                "and the method's parameters (e.g. a temperature of 0)"
            )
        synchronize(self.device)
        now = time.perf_counter()
        self.timesteps.append(step.timestep)
        self.seconds.append(now - self._last)
        self.diagnostics.append({k: v.detach().cpu() for k, v in step.diagnostics.items()})
        self.final_x_t = step.x_t.detach()
        if self.keep_images:
            self.x_t.append(step.x_t.detach().cpu())
            self.x0_hat.append(step.x0_hat.detach().cpu())
        if self.progress is not None:
            self.progress.update(1)
        self._last = now


@dataclass
class GenerateResult:
    """What a finished run produced."""

    run_dir: Path
    samples: torch.Tensor  # [N, C, H, W] model space, on the CPU
    metrics: dict[str, Any]


def build_denoiser(cfg: StudioConfig, store: DatasetStore, device: torch.device) -> tuple[Denoiser, float]:
    """Instantiate and fit the configured method; returns it and the fit time in seconds."""
    denoiser = denoiser_class(cfg.model.name)(cfg.model.params, device)
    denoiser.cache_dir = Path(cfg.paths.cache)
    started = time.perf_counter()
    denoiser.fit(store)
    synchronize(device)
    return denoiser, time.perf_counter() - started


def load_baseline(cfg: StudioConfig, store: DatasetStore, device: torch.device) -> UNetDenoiser | None:
    """The configured baseline (`baseline.checkpoint`, any backbone format), loaded and checked against the dataset;
    None when off. Runs before the run directory exists, so a wrong file leaves nothing behind (the `unet` method's
    own `model.params.checkpoint` is loaded by its fit, which also runs before)."""
    if not cfg.baseline.checkpoint:
        return None
    return UNetDenoiser(UNetParams(cfg.baseline.checkpoint, cfg.baseline.use_ema), device).fit(store)


def build_comparison(cfg: StudioConfig, baseline: UNetDenoiser | None, scheduler) -> BaselineComparison | None:
    """The comparison of the run's method with its baseline; None without one."""
    if baseline is None:
        return None
    eta = cfg.sampling.eta if cfg.baseline.eta is None else cfg.baseline.eta
    return BaselineComparison(baseline, scheduler, eta)


def _compared(recorder: TrajectoryRecorder, compare_step) -> Callable[[Step], None]:
    """The method's callback with the baseline comparison added, its time kept out of the method's step timings."""

    def callback(step: Step) -> None:
        recorder(step)
        compare_step(step)
        recorder.restart_clock()

    return callback


def _merge_batches(recorders: list[TrajectoryRecorder]) -> dict[str, Any]:
    """Per-step records of all batches: seconds summed over batches, diagnostics concatenated over samples."""
    first = recorders[0]
    steps = []
    for i, t in enumerate(first.timesteps):
        diagnostics = {k: torch.cat([r.diagnostics[i][k] for r in recorders]) for k in first.diagnostics[i]}
        steps.append({
            "timestep": t,
            "seconds": sum(r.seconds[i] for r in recorders),
            "diagnostics": {k: v.tolist() for k, v in diagnostics.items()},
        })
    return {"steps": steps}


def _sample_records(
    samples: torch.Tensor, store: DatasetStore, final: dict[str, torch.Tensor], threshold: float,
    sharded: ShardedDataset | None = None,
) -> tuple[list[dict], dict | None]:
    """Per sample: the nearest training image of the final sample (provenance), its memorization statistics (d2,
    ratio = d1/d2, memorized, nn_cosine, second_train_index; None with a one-image dataset) and the method's final
    diagnostics; and their summary over samples. One exact k = 2 search (over the shards, merged, when sharded)."""
    found = sharded.search(samples, k=2) if sharded is not None else knn_search(samples, store, k=2)
    memorization = None
    if found.indices.shape[1] == 2:
        nearest = (sharded or store).gather(found.indices[:, 0], samples.device)
        memorization = memorization_metrics(samples, nearest, found.distances, found.indices, threshold)
    records = []
    for i in range(samples.shape[0]):
        record = {
            "sample": i,
            "nearest_train_index": int(found.indices[i, 0]),
            "nearest_train_distance": float(found.distances[i, 0]),
            "second_train_index": int(memorization["second_index"][i]) if memorization else None,
            **{key: memorization[key][i].item() if memorization else None
               for key in ("d2", "ratio", "memorized", "nn_cosine")},
        }
        record.update({k: v[i].item() for k, v in final.items()})
        records.append(record)
    if memorization is None:
        return records, None
    totals = summarize(memorization, threshold)
    return records, {key: totals[key] for key in ("threshold", "memorized_fraction", "d1_median", "ratio_median")}


def _save_intermediates(recorders: list[TrajectoryRecorder], folder: Path, save_tensors: bool) -> None:
    """One strip per sample: x_t on the top row and x0_hat below, one column per step."""
    x_t = torch.cat([torch.stack(r.x_t, 1) for r in recorders])  # [N, S, C, H, W]
    x0_hat = torch.cat([torch.stack(r.x0_hat, 1) for r in recorders])
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(x_t.shape[0]):
        save_grid(torch.cat([x_t[i], x0_hat[i]]), folder / f"sample_{i:04d}.png", columns=x_t.shape[1])
    if save_tensors:
        save_tensor({"timesteps": recorders[0].timesteps, "x_t": x_t, "x0_hat": x0_hat}, folder / "trajectory.pt")


def _save_masks(denoiser: Denoiser, scheduler, path: Path, count: int = 5) -> None:
    """The locality masks of a few pixels at up to `count` timesteps of the schedule, spread evenly."""
    timesteps = scheduler.timesteps.tolist()
    picked = sorted({timesteps[round(i * (len(timesteps) - 1) / max(1, count - 1))] for i in range(count)}, reverse=True)
    save_mask_images(denoiser, [noise_level(scheduler, t) for t in picked], None, path)


def generate(cfg: StudioConfig) -> GenerateResult | None:
    """Run the configured method and write the run directory; the directory stays marked incomplete on failure.

    Under torchrun (docs/distributed.md) every rank runs this; rank 0 writes the one run directory and returns the
    result, the other ranks return None."""
    name = distributed.device_name(cfg.experiment.device) if distributed.launched() else cfg.experiment.device
    device = resolve_device(name)
    ranks = distributed.start(cfg.distributed.strategy, cfg.distributed.timeout_seconds, device)
    if ranks is None:
        return generate_on(cfg, device, None)
    with distributed.failures_published(ranks):
        result = generate_on(cfg, device, ranks)
        distributed.finish(ranks)
    return result


def check_distributed_run(cfg: StudioConfig, ranks: Ranks) -> None:
    """What a run under torchrun needs, checked by every rank alike before its store is opened (and by a sweep for
    every cell before anything is written): `samples`: per-sample seeds; `dataset`: a
    method with a sharded form."""
    if ranks.strategy == "samples":
        check_samples_strategy(cfg.sampling.per_sample_seeds)
    else:
        check_sharded_method(cfg.model.name)


def _phase(agreement: Agreement | None, recoverable: bool = True) -> AbstractContextManager:
    """A phase of the run that the ranks agree on at its end (agreement.py); nothing in one `ads generate`."""
    return nullcontext() if agreement is None else agreement.phase(recoverable)


def generate_on(cfg: StudioConfig, device: torch.device, ranks: Ranks | None,
                agreement: Agreement | None = None) -> GenerateResult | None:
    """The generate job on `device`, in this process alone (ranks None) or on every rank of a started process
    group; rank 0 returns the result, the others None. With an `agreement` (a sweep's cell), the ranks agree at
    the end of the checks, of the run directory's creation and (samples strategy) of sampling, so that a failure
    there fails the run on every rank alike and the process group stays usable (distributed/agreement.py)."""
    writer = ranks is None or ranks.is_writer
    distributed.quiet_unless_speaking(log)  # rank 0 reports for every rank
    with records_before_run(log) as early, _phase(agreement):  # the records go to run.log once it exists
        wandb = wandb_module(cfg)  # checked on every rank alike; rank 0 logs the run
        if ranks is not None:
            check_distributed_run(cfg, ranks)
        scheduler = make_scheduler(cfg.sampling)
        method = denoiser_class(cfg.model.name)
        method.check_schedule(cfg.model.params, scheduler.timesteps.tolist(), None)  # before a store is built
        torch.manual_seed(cfg.experiment.seed)
        request = StoreRequest(**asdict(cfg.dataset))
        store, store_info = _open_store(request, cfg, ranks)
        baseline = load_baseline(cfg, store, device)  # a wrong file stops the run before its directory exists
        method.check_schedule(cfg.model.params, scheduler.timesteps.tolist(), store.sample_shape)  # sizes fit
        # The method meets the dataset before the run directory exists: a fit that cannot work (a FAISS index with
        # more lists than images, a baseline for other images) stops here and leaves nothing behind.
        sharded = None
        if ranks is not None and ranks.strategy == "dataset":
            denoiser, fit_seconds, sharded = build_sharded_denoiser(cfg, store, device, ranks)
        else:
            denoiser, fit_seconds = build_denoiser(cfg, store, device)
        denoiser.use_schedule(scheduler.timesteps.tolist())
        # `samples`: each rank compares its own batches, rank 0 gathers them; `dataset`: every rank holds the same
        # x_t, rank 0 alone compares (the baseline has no collective)
        comparison = build_comparison(cfg, baseline, scheduler) if writer or ranks.strategy == "samples" else None
    with _phase(agreement):  # rank 0 alone creates it; had that failed, the others would wait for rank 0
        if writer:
            run_name = cfg.experiment.run_name or f"{cfg.model.name}_{cfg.dataset.name}"
            run = RunDirectory.create(Path(cfg.paths.runs), cfg.experiment.name, run_name,
                                      cfg.experiment.append_timestamp)
    if not writer:
        return _generate_into(None, cfg, store, store_info, device, denoiser, fit_seconds, scheduler, comparison, ranks,
                              sharded, agreement)
    handler = run.attach_log(log, early)
    try:
        result = _generate_into(run, cfg, store, store_info, device, denoiser, fit_seconds, scheduler, comparison,
                                ranks, sharded, agreement)
        if wandb is not None:
            log_run(wandb, cfg, run.path, result.metrics)
    except BaseException as exc:
        run.mark_failed(f"{type(exc).__name__}: {exc}")
        run.log_only(handler, f"run failed: {type(exc).__name__}: {exc}")  # the CLI prints the error itself, once
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
    return result


def _open_store(request: StoreRequest, cfg: StudioConfig, ranks: Ranks | None) -> tuple[DatasetStore, dict]:
    """The dataset store; under torchrun rank 0 builds it (when not cached) before the others open it, and if it
    cannot, the others stop with rank 0's line."""
    return distributed.writer_first(
        ranks, "store", lambda: load_or_build_store(request, Path(cfg.paths.datasets), Path(cfg.paths.cache)))


def _peers_checked(recorder: TrajectoryRecorder) -> Callable[[Step], None]:
    """The recorder, then a look for another rank's failure: a rank that raised stops this one within a step."""

    def callback(step: Step) -> None:
        recorder(step)
        distributed.check_peers()

    return callback


def _last_step(recorders: list[TrajectoryRecorder], scheduler) -> tuple[torch.Tensor, NoiseLevel]:
    """x_t of every sample at the last sampling step, and its noise level."""
    return torch.cat([r.final_x_t for r in recorders]), noise_level(scheduler, recorders[0].timesteps[-1])


def _portable(batch: Denoised, recorder: TrajectoryRecorder, seconds: float, compared: tuple | None,
              comparison_seconds: float) -> tuple:
    """A finished batch as rank 0 receives it: tensors on the CPU, no progress bar; with the rank's sampling time,
    the batch's comparison with the baseline (BaselineComparison.batches) and the rank's comparison time."""
    recorder.progress = None
    if recorder.final_x_t is not None:
        recorder.final_x_t = recorder.final_x_t.cpu()
    cpu = Denoised(batch.x0_hat.detach().cpu(), {k: v.detach().cpu() for k, v in batch.diagnostics.items()})
    return cpu, recorder, seconds, compared, comparison_seconds


def _generate_into(run: RunDirectory | None, cfg: StudioConfig, store: DatasetStore, store_info: dict, device,
                   denoiser: Denoiser, fit_seconds: float, scheduler, comparison: BaselineComparison | None,
                   ranks: Ranks | None = None, sharded: ShardedDataset | None = None,
                   agreement: Agreement | None = None) -> GenerateResult | None:
    if run is not None:
        run.write_text("config.yaml", to_yaml(cfg))
    log.info("run %s: %s on %s (%d images, %s) on %s", run.path if run else None, cfg.model.name, cfg.dataset.name,
             store.num_images, "x".join(map(str, store.sample_shape)), device)
    if ranks is not None:
        log.info("distributed: %d ranks (%s), strategy %s", ranks.world_size, ranks.backend, ranks.strategy)
    if "files" in store_info:
        log.info("%s", files_sentence(store_info["files"]))
    idle = None
    if ranks is not None and ranks.strategy == "samples":
        idle = idle_ranks_warning(-(-cfg.sampling.num_samples // cfg.sampling.batch_size), ranks)
    warnings = [w for w in (start_warning(scheduler), idle) if w]
    for warning in warnings:
        log.warning("warning: %s", warning)
    sources = batch_noise_sources(cfg.experiment.seed, cfg.sampling.num_samples, cfg.sampling.batch_size,
                                  store.sample_shape, device, cfg.sampling.per_sample_seeds)
    # The baseline's own copy of the run's noise: after x_T it supplies the scheduler noise when eta > 0.
    baseline_sources = batch_noise_sources(cfg.experiment.seed, cfg.sampling.num_samples, cfg.sampling.batch_size,
                                           store.sample_shape, device, cfg.sampling.per_sample_seeds)
    split = ranks is not None and ranks.strategy == "samples"
    chosen = ranks.share(len(sources)) if split else range(len(sources))
    recorders, batches = [], []
    total_steps = len(chosen) * len(scheduler.timesteps)
    started = time.perf_counter()
    # Agreed only under `samples` (no collective while sampling): under `dataset` a rank that fails leaves the
    # others inside the step's collectives, and every rank stops.
    with _phase(agreement, recoverable=split), \
            tqdm(total=total_steps, desc=f"sampling {cfg.model.name}", unit="step", disable=run is None) as progress:
        for index in chosen:
            noise, baseline_noise = sources[index], baseline_sources[index]
            recorder = TrajectoryRecorder(device, keep_images=cfg.output.intermediates, progress=progress)
            x_T = noise.randn()
            callback = recorder if ranks is None else _peers_checked(recorder)
            if comparison is not None:
                baseline_noise.randn()  # the baseline's x_T is the method's; skip its copy
                callback = _compared(recorder, comparison.start_batch(x_T, baseline_noise))
            recorder.restart_clock()
            batches.append(sample(denoiser, scheduler, x_T, noise, cfg.sampling.eta, callback))
            recorders.append(recorder)
            if comparison is not None:
                comparison.finish_batch(batches[-1].x0_hat)
    synchronize(device)
    sampling_seconds = time.perf_counter() - started - (comparison.seconds if comparison else 0.0)
    if split:
        compared = comparison.batches() if comparison is not None else [None] * len(batches)
        seconds = comparison.seconds if comparison is not None else 0.0
        gathered = gather_batches(ranks, [_portable(b, r, sampling_seconds, c, seconds)
                                          for b, r, c in zip(batches, recorders, compared)])
        if gathered is None:
            return None
        batches, recorders = [g[0] for g in gathered], [g[1] for g in gathered]
        sampling_seconds = max(g[2] for g in gathered)  # the slowest rank's wall time
        if comparison is not None:
            comparison.adopt([g[3] for g in gathered], max(g[4] for g in gathered))
    samples = torch.cat([b.x0_hat.detach().cpu() for b in batches])
    final = {k: torch.cat([b.diagnostics[k].detach().cpu() for b in batches]) for k in batches[0].diagnostics}
    records, memorization = _sample_records(samples, store, final, cfg.memorization.threshold, sharded)
    figure = cfg.output.patches and hasattr(denoiser, "top_patches")
    if run is None:  # dataset strategy: every rank took part in every step and search; rank 0 writes
        if figure:  # the figure's searches are collectives too: the same call as rank 0's save_patch_figure
            top_patch_images(denoiser, *_last_step(recorders, scheduler), default_mask_pixels(store.sample_shape, 4))
        return None

    if cfg.output.tensors:
        save_tensor(samples, run.path / "samples.pt")
    if cfg.output.grid:
        save_grid(samples, run.path / "grid.png", cfg.output.grid_columns)
    if cfg.output.images:
        save_images(samples, run.path / "images")
    if cfg.output.masks and hasattr(denoiser, "mask"):
        _save_masks(denoiser, scheduler, run.path / "masks.png")
    patches = None
    if figure:
        final_x_t, level = _last_step(recorders, scheduler)
        patches = save_patch_figure(denoiser, final_x_t, samples, level, run.path / "patches.png")
    if cfg.output.intermediates:
        _save_intermediates(recorders, run.path / "intermediates", cfg.output.tensors)
    trajectory = _merge_batches(recorders)
    metrics = {
        "method": cfg.model.name,
        "dataset": cfg.dataset.name,
        "dataset_size": store.num_images,
        "sample_shape": list(store.sample_shape),
        "store": {key: store_info[key] for key in ("fingerprint", "built", "seconds", "files") if key in store_info},
        "device": str(device),
        "distributed": None if ranks is None else {"world_size": ranks.world_size, "strategy": ranks.strategy,
                                                   "backend": ranks.backend},
        "num_samples": samples.shape[0],
        "num_inference_steps": len(scheduler.timesteps),
        "fit_seconds": fit_seconds,
        "sampling_seconds": sampling_seconds,
        "seconds_per_step": sampling_seconds / len(scheduler.timesteps),
        "samples": records,
        "memorization": memorization,
        **trajectory,
        "warnings": warnings,
    }
    if isinstance(denoiser, UNetDenoiser):  # the method is a backbone: which one, and how its timesteps were mapped
        levels = [(t, noise_level(scheduler, t).alpha_bar) for t in scheduler.timesteps.tolist()]
        metrics["backbone"] = {**denoiser.backbone.describe(),
                               "schedule": timestep_mapping(denoiser.backbone.alphas_cumprod, levels)}
    if patches is not None:
        metrics["top_patches"] = patches
    if comparison is not None:
        compared = comparison.result()
        plot_comparison(compared, run.path / "comparison.png", method=cfg.model.name)
        save_side_by_side(compared, run.path / "side_by_side.png", cfg.model.name, columns=cfg.output.grid_columns)
        levels = [(t, noise_level(scheduler, t).alpha_bar) for t in compared.timesteps]
        metrics["baseline"] = {"checkpoint": cfg.baseline.checkpoint, "use_ema": cfg.baseline.use_ema,
                               "eta": comparison.eta, "seconds": comparison.seconds,
                               "backbone": comparison.baseline.backbone.describe(),
                               "schedule": timestep_mapping(comparison.baseline.backbone.alphas_cumprod, levels),
                               **compared.summary()}
    run.write_json("metrics.json", metrics)
    run.mark_complete()
    log.info("finished: %d samples in %.2f s", samples.shape[0], sampling_seconds)
    return GenerateResult(run.path, samples, metrics)


def summary(result: GenerateResult) -> str:
    """The one-paragraph report printed at the end of `ads generate`."""
    m = result.metrics
    store = "built and cached" if m["store"]["built"] else "loaded from cache"
    outputs = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in result.run_dir.iterdir()))
    baseline = ""
    if "baseline" in m:
        mean = {k: "n/a" if v is None else f"{v:.4g}" for k, v in m["baseline"]["final"].items()}
        median = {k: "n/a" if v is None else f"{v:.4g}" for k, v in m["baseline"]["final_median"].items()}
        baseline = (" Against the baseline at the last step: " + "; ".join(
            f"r2 {mean[f'{kind}_r2']} (mean), pearson_r {median[f'{kind}_pearson_r']} (median) ({label})"
            for kind, label in (("trajectory", "own trajectories"), ("single_step", "single step")))
            + f"; the baseline took {m['baseline']['seconds']:.2f} s more (not in the sampling time); all five "
            "metrics in metrics.json, see comparison.png, side_by_side.png.")
    files = f" {files_sentence(m['store']['files'])}." if "files" in m["store"] else ""
    warnings = "".join(f" Warning: {w}." for w in m.get("warnings", []))
    memorized = ""
    if m["memorization"] is not None:
        share, count = m["memorization"]["memorized_fraction"], m["num_samples"]
        memorized = (f" Memorized: {round(share * count)} of {count} samples ({100 * share:.0f}%, d1/d2 < "
                     f"{m['memorization']['threshold']:.3g}; ads memorization <run directory> for the report).")
    return (
        f"Generated {m['num_samples']} samples with {m['method']} on {m['dataset']} "
        f"({m['dataset_size']} images of {'x'.join(map(str, m['sample_shape']))}) on {m['device']}: "
        f"sampling {m['sampling_seconds']:.2f} s ({m['num_inference_steps']} steps, "
        f"{m['seconds_per_step']:.3f} s/step), fit {m['fit_seconds']:.2f} s, dataset {store} in "
        f"{m['store']['seconds']:.2f} s.{files} Outputs in {result.run_dir}: {outputs}.{memorized}{baseline}{warnings}"
    )
