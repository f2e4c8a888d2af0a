"""The memorization job: images from anything -> the training set's exact nearest neighbours -> a report.

For every input set (a run directory, each run of a sweep folder, a folder of images, a tensor file) the training
set is the dataset section of the run's own config.yaml or of the config given (-c), with overrides. Every input,
config, store and reference split is read and checked before the analysis folder exists, so a bad input leaves
nothing behind. One exact k-NN search per set (k = max(2, num_neighbors)) gives d1, d2, the indices and the
neighbours of the figure; the same statistics of held-out real images come beside them (metrics/memorization.py).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import distributed
from .config import StudioConfig, load_config
from .data.samples import SampleInput, SampleSet, find_sample_inputs, load_samples, with_channels
from .data.sources import DATASETS_WITH_TEST_SPLIT
from .data.store import DatasetStore, StoreRequest, load_or_build_store
from .devices import resolve_device
from .errors import StudioError
from .figures.memorization import save_distance_histograms, save_neighbours
from .fileio import atomic_write_text
from .metrics.memorization import exclude_self, memorization_metrics, summarize
from .runs import SWEEPS_FOLDER, RunDirectory
from .distributed import Ranks
from .distributed.dataset import ShardedDataset
from .distributed.samples import SplitQueries
from .search import KnnResult, knn_search

log = logging.getLogger("analytic_diffusion")

CSV_COLUMNS = ("d1", "d2", "ratio", "memorized", "nn_cosine", "nearest_index", "second_index")
EXPERIMENT = "memorization"  # analysis folders live in <paths.runs>/memorization/


@dataclass
class Reference:
    """Held-out real images analysed like the samples: the test split, or training images left out one at a time."""

    kind: str  # test_split | leave_one_out
    source_indices: torch.Tensor  # [m] their indices in the test split, or in the training set
    metrics: dict[str, torch.Tensor]

    @property
    def label(self) -> str:
        return "held-out test images" if self.kind == "test_split" else "training images, leave-one-out"


@dataclass
class _Prepared:
    """One input set, read and checked against its training set, before anything is written."""

    samples: SampleSet
    cfg: StudioConfig
    store: DatasetStore
    store_info: dict
    reference_store: DatasetStore | None  # the test split; None for leave-one-out


@dataclass
class Analysis:
    """The analysis of one input set."""

    name: str
    folder: Path
    summary: dict  # what memorization.json holds


@dataclass
class MemorizationResult:
    out_dir: Path
    analyses: list[Analysis]


def evenly_spaced(count: int, wanted: int) -> torch.Tensor:
    """min(count, wanted) distinct indices spread evenly over range(count), first and last included."""
    return torch.linspace(0, count - 1, min(count, wanted)).round().long().unique()


def _reference_kind(cfg: StudioConfig) -> str:
    held_out = cfg.dataset.name in DATASETS_WITH_TEST_SPLIT and cfg.dataset.split == "train"
    kind = cfg.memorization.reference
    if kind == "test" and not held_out:
        raise StudioError(f"dataset '{cfg.dataset.name}' (split '{cfg.dataset.split}') has no held-out test split "
                          f"here (only {', '.join(DATASETS_WITH_TEST_SPLIT)} with split=train); set "
                          "memorization.reference=leave_one_out")
    return "test_split" if kind == "test" or (kind == "auto" and held_out) else "leave_one_out"


def _check_shape(samples: SampleSet, store: DatasetStore, cfg: StudioConfig) -> None:
    shape, expected = tuple(samples.images.shape[1:]), store.sample_shape
    if shape == expected:
        return
    fix = "pass -c with the config of the dataset the samples were made from"
    if shape[1] == shape[2]:
        fix += f", or set dataset.resolution={shape[1]} dataset.channels={shape[0]} to convert the training set"
    raise StudioError(f"{samples.input.path}: the samples are {'x'.join(map(str, shape))} (C x H x W) but the "
                      f"training set '{cfg.dataset.name}' holds {'x'.join(map(str, expected))} images; {fix} "
                      "(samples are never resized silently)")


def _prepare(found: SampleInput, config: str | None, fallback: str, overrides: list[str]) -> _Prepared:
    cfg = load_config(config or found.config or fallback, overrides)
    samples = load_samples(found)  # bad files stop here, before the (slower) dataset
    store, info = load_or_build_store(StoreRequest(**asdict(cfg.dataset)), Path(cfg.paths.datasets),
                                      Path(cfg.paths.cache))
    samples = with_channels(samples, store.sample_shape[0])
    _check_shape(samples, store, cfg)
    reference_store = None
    if _reference_kind(cfg) == "test_split":
        request = StoreRequest(**{**asdict(cfg.dataset), "split": "test", "subset_size": None})
        reference_store, _ = load_or_build_store(request, Path(cfg.paths.datasets), Path(cfg.paths.cache))
    return _Prepared(samples, cfg, store, info, reference_store)


class _OneProcess:
    """Exact k-NN and image look-up over a store in this process (the distributed forms: ShardedDataset for
    distributed.strategy=dataset, SplitQueries for samples)."""

    def __init__(self, store: DatasetStore):
        self.store = store

    def search(self, queries: torch.Tensor, k: int = 1) -> KnnResult:
        return knn_search(queries, self.store, k)

    def gather(self, indices: torch.Tensor, device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
        return self.store.gather(indices, device, dtype)


def _neighbours(store: DatasetStore, ranks: Ranks | None, device: torch.device):
    """The searcher over `store` for this run: one process, the store's shards, or the queries split."""
    if ranks is None:
        return _OneProcess(store)
    if ranks.strategy == "dataset":
        return ShardedDataset(store, ranks, device)
    return SplitQueries(store, ranks)


def _reference(prepared: _Prepared, device: torch.device, training) -> Reference:
    """The same statistics for held-out real images: the test split against the training set, or each picked
    training image against the training set minus itself (k = 3, its own index dropped; an exact duplicate stays
    a neighbour at distance 0)."""
    cfg, store = prepared.cfg, prepared.store
    threshold, wanted = cfg.memorization.threshold, cfg.memorization.reference_size
    if prepared.reference_store is not None:
        picks = evenly_spaced(prepared.reference_store.num_images, wanted)
        images = prepared.reference_store.gather(picks, device)
        found = training.search(images, k=2)
        distances, indices = found.distances, found.indices
        kind = "test_split"
    else:
        if store.num_images < 3:
            raise StudioError(f"leave-one-out needs at least 3 training images, '{cfg.dataset.name}' has "
                              f"{store.num_images}; use a larger dataset.subset_size")
        picks = evenly_spaced(store.num_images, wanted)
        images = training.gather(picks, device)
        found = training.search(images, k=3)
        distances, indices = exclude_self(found.distances, found.indices, picks.to(found.indices.device))
        kind = "leave_one_out"
    nearest = training.gather(indices[:, 0], device)
    metrics = memorization_metrics(images, nearest, distances, indices, threshold)
    return Reference(kind, picks, {key: value.cpu() for key, value in metrics.items()})


def _csv(metrics: dict[str, torch.Tensor], files: list[str] | None) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["sample", *(["file"] if files else []), *CSV_COLUMNS])
    columns = {key: metrics[key].tolist() for key in CSV_COLUMNS}
    for i in range(len(columns["d1"])):
        row = [repr(columns[key][i]) if isinstance(columns[key][i], float) else columns[key][i] for key in CSV_COLUMNS]
        writer.writerow([i, *([files[i]] if files else []), *row])
    return out.getvalue()


def _analyse(prepared: _Prepared, folder: Path | None, reference: Reference, device: torch.device,
             training) -> Analysis | None:
    """The analysis of one input set, written into `folder` (None: a rank that only takes part in the searches)."""
    cfg, store, samples = prepared.cfg, prepared.store, prepared.samples
    settings = cfg.memorization
    started = time.perf_counter()
    images = samples.images.to(device)
    found = training.search(images, k=max(2, settings.num_neighbors))
    metrics = memorization_metrics(images, training.gather(found.indices[:, 0], device), found.distances[:, :2],
                                   found.indices[:, :2], settings.threshold)
    seconds = time.perf_counter() - started
    metrics = {key: value.cpu() for key, value in metrics.items()}
    shown = min(settings.figure_samples, images.shape[0])
    k = min(settings.num_neighbors, store.num_images)
    shown_neighbours = training.gather(found.indices[:shown, :k])
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "memorization.csv", _csv(metrics, samples.files))
    save_neighbours(samples.images[:shown], shown_neighbours, found.distances[:shown, :k].cpu(),
                    found.indices[:shown, :k].cpu(), metrics["ratio"][:shown], metrics["memorized"][:shown],
                    folder / "neighbours.png", samples.files[:shown] if samples.files else None)
    save_distance_histograms(metrics, reference.metrics, settings.threshold, folder / "distances.png", reference.label)
    summary = {
        "input": {"path": str(samples.input.path), "kind": samples.input.kind,
                  "config": str(samples.input.config) if samples.input.config else None},
        "dataset": {"name": cfg.dataset.name, "split": cfg.dataset.split, "size": store.num_images,
                    "sample_shape": list(store.sample_shape), "fingerprint": store.fingerprint},
        "threshold": settings.threshold,
        "definition": "d1, d2: model-space l2 distances to the nearest and second-nearest training images (two "
                      "different indices); memorized: d1 / d2 < threshold (Gu et al., arXiv 2310.02664); "
                      "nn_cosine: cosine of sample and nearest image, each minus its mean (Kadkhodaie et al.)",
        "samples": summarize(metrics, settings.threshold),
        "reference": {"kind": reference.kind, "source_indices": reference.source_indices.tolist(),
                      **summarize(reference.metrics, settings.threshold)},
        "search_seconds": seconds,
        "device": str(device),
    }
    atomic_write_text(folder / "memorization.json", json.dumps(summary, indent=2) + "\n")
    return Analysis(samples.input.name, folder, summary)


def _sweep_summary(analyses: list[Analysis]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["run", "dataset", "samples", "memorized_fraction", "d1_median", "ratio_median",
                     "reference_kind", "reference_memorized_fraction", "reference_d1_median", "folder"])
    for a in analyses:
        s, r = a.summary["samples"], a.summary["reference"]
        writer.writerow([a.summary["input"]["path"], a.summary["dataset"]["name"], s["count"],
                         s["memorized_fraction"], s["d1_median"], s["ratio_median"], r["kind"],
                         r["memorized_fraction"], r["d1_median"], a.folder.name])
    return out.getvalue()


def memorization(images: str | Path, config: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                 fallback_config: str = "nearest_dataset/mnist5k") -> MemorizationResult | None:
    """Analyse the images at `images` and write a new analysis folder under <paths.runs>/memorization/.

    config: the training set's config for every input (default: a run's own config.yaml, else `fallback_config`).
    One input set: the folder holds memorization.csv, memorization.json, neighbours.png and distances.png. A sweep
    folder: one sub-folder per run with those files, and summary.csv with one row per run.

    Under torchrun (docs/distributed.md) the searches run on every rank, split by distributed.strategy (samples:
    the queries; dataset: the store's shards); rank 0 writes and returns the result, the others return None.
    """
    path = Path(images).expanduser()
    inputs = find_sample_inputs(path)
    first = load_config(config or inputs[0].config or fallback_config, list(overrides))
    launched = distributed.launched()
    device = resolve_device(distributed.device_name(first.experiment.device) if launched else first.experiment.device)
    ranks = distributed.start(first.distributed.strategy, first.distributed.timeout_seconds, device)
    if ranks is None:
        return _memorization(path, inputs, config, list(overrides), fallback_config, device, None)
    with distributed.failures_published(ranks):
        result = _memorization(path, inputs, config, list(overrides), fallback_config, device, ranks)
        distributed.finish(ranks)
    return result


def _memorization(path: Path, inputs: list[SampleInput], config: str | None, overrides: list[str],
                  fallback_config: str, device: torch.device, ranks: Ranks | None) -> MemorizationResult | None:
    writer = ranks is None or ranks.is_writer
    prepared = distributed.writer_first(  # rank 0 builds the stores that are not cached yet
        ranks, "stores", lambda: [_prepare(found, config, fallback_config, overrides) for found in inputs])
    first = prepared[0].cfg
    runs = Path(first.paths.runs)
    if runs.name == SWEEPS_FOLDER:  # a sweep cell's config: its runs folder is <paths.runs>/sweeps
        runs = runs.parent
    searchers: dict[str, object] = {}  # made first: a store that cannot be split stops before the folder exists
    for item in prepared:
        if item.store.fingerprint not in searchers:
            searchers[item.store.fingerprint] = _neighbours(item.store, ranks, device)
    run = None
    if writer:
        run = RunDirectory.create(runs, EXPERIMENT, prepared[0].samples.input.name if len(prepared) == 1 else path.name,
                                  append_timestamp=True)
    try:
        references: dict[tuple, Reference] = {}
        analyses = []
        for item in prepared:
            fingerprint = item.store.fingerprint
            training = searchers[fingerprint]
            key = (fingerprint, _reference_kind(item.cfg), item.cfg.memorization.reference_size,
                   item.cfg.memorization.threshold)
            if key not in references:
                references[key] = _reference(item, device, training)
            folder = None
            if run is not None:
                folder = run.path if len(prepared) == 1 else run.path / _sub_folder(item.samples.input.path, path)
            analysis = _analyse(item, folder, references[key], device, training)
            if analysis is not None:
                analyses.append(analysis)
                log.info("%s: %.1f%% of %d samples memorized", item.samples.input.path,
                         100 * analysis.summary["samples"]["memorized_fraction"], item.samples.images.shape[0])
        if run is not None and len(prepared) > 1:
            atomic_write_text(run.path / "summary.csv", _sweep_summary(analyses))
    except BaseException as exc:
        if run is not None:
            run.mark_failed(f"{type(exc).__name__}: {exc}")
        raise
    if run is None:
        return None
    run.mark_complete()
    return MemorizationResult(run.path, analyses)


def _sub_folder(run_path: Path, sweep: Path) -> str:
    return "__".join(run_path.relative_to(sweep).parts)


def summary(result: MemorizationResult) -> str:
    """The report printed at the end of `ads memorization`."""
    lines = []
    for a in result.analyses:
        s, r, d = a.summary["samples"], a.summary["reference"], a.summary["dataset"]
        reference = "test split" if r["kind"] == "test_split" else "leave-one-out training images"
        lines.append(
            f"{a.name}: {100 * s['memorized_fraction']:.1f}% of {s['count']} samples memorized (d1/d2 < "
            f"{a.summary['threshold']:.3g}) against {d['name']} ({d['size']} images); median d1 {s['d1_median']:.4g}, "
            f"median d1/d2 {s['ratio_median']:.3f}. Reference ({reference}, {r['count']} images): "
            f"{100 * r['memorized_fraction']:.1f}% memorized, median d1 {r['d1_median']:.4g}, median d1/d2 "
            f"{r['ratio_median']:.3f}."
        )
    files = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in result.out_dir.iterdir()))
    return "\n".join(lines) + f"\nOutputs in {result.out_dir}: {files}."
