"""What the local patch denoisers share (DESIGN.md §6): the patch-size schedule, fitting, and the diagnostics.

Each method (`local_score`, `els`, `pspc`) says how it cuts the query windows of x_t and which training windows
each one is compared with (`LocalPatchDenoiser.plan`); the streaming softmax itself is
`search.patch_softmax.patch_softmax`. The patch size is an odd integer, one size per sampling step, or a
calibration file written by `ads calibrate` ({"timesteps": [...], "patch_size": [...]}).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from ..data.store import DatasetStore
from ..errors import StudioError
from ..search.patch_softmax import (
    DISTINCT_BYTES,
    MIN_DEDUP_POSITIONS,
    PatchGroup,
    PatchSoftmaxResult,
    Scratch,
    WindowSpec,
    patch_softmax,
    unique_windows,
)
from .base import Denoised, Denoiser, NoiseLevel, check_chunk_size, check_temperature

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """A calibration.json written by `ads calibrate`: the patch size per timestep and what it was fitted for."""

    path: Path
    sizes: dict[int, int]  # {timestep: patch size}
    method: str | None = None  # the method, dataset and network it was fitted with; None where not recorded
    dataset: str | None = None
    checkpoint: str | None = None

    def reuse_warning(self, method: str, dataset: str) -> str | None:
        """A one-line warning when this calibration is used for another method or dataset than it was fitted for
        (deliberate reuse is allowed); None when they match or the file does not say."""
        fitted = [(self.method, method), (self.dataset, dataset)]
        if all(was is None or was == now for was, now in fitted):
            return None
        network = f" against {self.checkpoint}" if self.checkpoint else ""
        return (f"model.params.patch_size: {self.path} was calibrated for {self.method} on {self.dataset}{network}, "
                f"used here for {method} on {dataset}; run `ads calibrate` for {method} on {dataset} unless this "
                "reuse is deliberate")


def read_calibration(path: str | Path) -> Calibration:
    """The calibration.json written by `ads calibrate` at `path` (or in the folder `path`); a one-line StudioError
    otherwise."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "calibration.json"
    try:
        data = json.loads(path.read_text())
        sizes = {int(t): int(k) for t, k in zip(data["timesteps"], data["patch_size"], strict=True)}
        recorded = {key: None if data.get(key) is None else str(data[key])
                    for key in ("method", "dataset", "checkpoint")}
    except FileNotFoundError:
        raise StudioError(f"model.params.patch_size: no calibration file {path}; run `ads calibrate` or give a size") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StudioError(f"model.params.patch_size: {path} is not a calibration file from `ads calibrate` "
                          f"({type(exc).__name__}: {exc})") from None
    return Calibration(path, sizes, **recorded)


@dataclass
class LocalPatchParams:
    patch_size: Any = 3  # odd int; a list with one size per sampling step (in sampling order); or a calibration.json
    temperature: float = 1.0  # tau: logits are -||Q_k(x_t, p) - sqrt(ab_t) phi||^2 / (2 (1 - ab_t) tau)
    chunk_size: Optional[int] = None  # training images per streamed chunk; None = chosen from memory

    odd_sizes = True  # pspc takes any positive square size

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        check_chunk_size(self.chunk_size)
        if isinstance(self.patch_size, str):
            self.calibration = read_calibration(self.patch_size)
            for size in self.calibration.sizes.values():
                self.check_size(size)
        elif isinstance(self.patch_size, (list, tuple)) and self.patch_size:
            for size in self.patch_size:
                self.check_size(size)
        else:
            self.check_size(self.patch_size)

    def check_size(self, size: Any) -> None:
        parity = "an odd" if self.odd_sizes else "a"
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or (self.odd_sizes and size % 2 == 0):
            raise StudioError(f"model.params.patch_size must be {parity} positive integer, a list of them (one per "
                              f"sampling step) or the path of a calibration.json; got {size!r}")

    def sizes_for(self, timesteps: list[int]) -> dict[int, int]:
        """{timestep: patch size} for a sampling schedule; a list must have one size per step, and a calibration
        file must cover every timestep the schedule visits."""
        if isinstance(self.patch_size, int):
            return dict.fromkeys(timesteps, self.patch_size)
        if isinstance(self.patch_size, (list, tuple)):
            if len(self.patch_size) != len(timesteps):
                odd = "odd " if self.odd_sizes else ""
                raise StudioError(f"model.params.patch_size lists {len(self.patch_size)} sizes but sampling has "
                                  f"{len(timesteps)} steps (sampling.num_inference_steps); give one size per step "
                                  f"(model.params.patch_size=[...] with {len(timesteps)} {odd}sizes), a single size "
                                  f"(model.params.patch_size=<{odd}int>) or a calibration for this schedule "
                                  "(model.params.patch_size=<run>/calibration.json from `ads calibrate`)")
            return dict(zip(timesteps, self.patch_size))
        calibrated = self.calibration.sizes
        missing = [t for t in timesteps if t not in calibrated]
        if missing:
            raise StudioError(f"{self.patch_size} was calibrated at timesteps {sorted(calibrated, reverse=True)} "
                              f"but sampling visits {list(timesteps)} ({missing} not calibrated); rerun `ads calibrate` "
                              "with the same sampling settings")
        return {t: calibrated[t] for t in timesteps}


@dataclass
class Plan:
    """One method's query windows and dictionary at one patch size, and how means become x0_hat."""

    window: WindowSpec
    groups: list[PatchGroup]


class LocalPatchDenoiser(Denoiser):
    """Common machinery: subclasses implement `plan(size)`, `queries(x_t, size)` and, when the values are not the
    centre pixels, `assemble`."""

    Params = LocalPatchParams
    merge = None  # the store is one shard of a distributed run: patch_softmax's merge (distributed/dataset.py)

    def fit(self, store: DatasetStore) -> LocalPatchDenoiser:
        """Keep the compact images on the working device; nothing else is precomputed. A calibration file fitted
        for another method or dataset is used, with a warning."""
        calibration: Calibration | None = getattr(self.params, "calibration", None)
        warning = calibration.reuse_warning(self.name, store.name) if calibration is not None else None
        if warning:
            log.warning("warning: %s", warning)
        self.store = store
        self.images = store.images.to(self.device)
        self.timestep_sizes: dict[int, int] | None = calibration.sizes if calibration is not None else None
        self._plans: dict[int, Plan] = {}
        self.scratch = Scratch(self.device)  # the kernel's temporaries, reused from step to step
        return self

    @classmethod
    def check_schedule(cls, params: LocalPatchParams, timesteps: list[int],
                       sample_shape: tuple[int, int, int] | None) -> None:
        sizes = set(params.sizes_for(timesteps).values())
        for size in sizes if sample_shape is not None else ():
            cls.check_fits(params, size, sample_shape)

    @classmethod
    def check_fits(cls, params: LocalPatchParams, size: int, sample_shape: tuple[int, int, int]) -> None:
        """Refuse a patch size this method cannot use on images of this shape (default: every size works)."""

    def use_schedule(self, timesteps: list[int]) -> None:
        """Map sampling timesteps to patch sizes (needed for a list of sizes, one per step)."""
        self.timestep_sizes = self.params.sizes_for(timesteps)

    def patch_size(self, level: NoiseLevel) -> int:
        """The patch size at this noise level."""
        if isinstance(self.params.patch_size, int):
            return self.params.patch_size
        if self.timestep_sizes is None:
            raise StudioError("a list of patch sizes needs the sampling schedule: call use_schedule(timesteps) first")
        if level.timestep not in self.timestep_sizes:
            raise StudioError(f"no patch size for timestep {level.timestep}; sizes are set for "
                              f"{sorted(self.timestep_sizes, reverse=True)}")
        return self.timestep_sizes[level.timestep]

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel, noise=None) -> Denoised:
        return self.denoise_at_size(x_t, level, self.patch_size(level))

    def denoise_at_size(self, x_t: torch.Tensor, level: NoiseLevel, size: int) -> Denoised:
        """x0_hat [B, C, H, W] with patch size `size`, and per-sample diagnostics: the size, and the effective
        number of patches 1 / sum w^2 averaged over the query locations."""
        result = self.softmax(x_t, level, size)
        x0_hat = self.assemble(result, x_t.shape, size).to(x_t.dtype)
        batch = x_t.shape[0]
        diagnostics = {
            "patch_size": torch.full((batch,), size, dtype=torch.int64),
            "effective_patches": result.effective_count.mean(1).to(torch.float32),
        }
        return Denoised(x0_hat, diagnostics)

    def softmax(self, x_t: torch.Tensor, level: NoiseLevel, size: int, locations: torch.Tensor | None = None,
                track_top: bool = False) -> PatchSoftmaxResult:
        """The patch softmax of every query location (or only `locations`) at this size."""
        if not hasattr(self, "store"):
            raise RuntimeError("call fit(store) before denoising")
        if tuple(x_t.shape[1:]) != self.store.sample_shape:
            raise ValueError(f"x_t has shape {tuple(x_t.shape[1:])}, the dataset's images {self.store.sample_shape}")
        plan = self.cached_plan(size)
        groups = plan.groups if locations is None else restrict(plan.groups, locations)
        queries = self.queries(x_t, size)
        if locations is not None:  # query columns in the order asked, the groups' locations renumbered to match
            column = {loc: i for i, loc in enumerate(locations.tolist())}
            queries = queries[:, :, locations.to(queries.device)]
            groups = [replace(g, locations=torch.tensor([column[loc] for loc in g.locations.tolist()]))
                      for g in groups]
        return patch_softmax(queries, self.store, self.images, plan.window, groups, level.signal_scale,
                             self.params.temperature, level.noise_variance, self.params.chunk_size, track_top, x_t,
                             self.merge, self.scratch)

    def cached_plan(self, size: int) -> Plan:
        """The plan at this size, its shared dictionaries deduplicated (once per size; kept for later calls)."""
        if size not in self._plans:
            self.params.check_size(size)
            self.check_fits(self.params, size, self.store.sample_shape)
            plan = self.plan(size)
            merged = [g for g in plan.groups if g.shared and g.positions.shape[1] >= MIN_DEDUP_POSITIONS]
            uniques = unique_windows(self.store, self.images, plan.window, [g.positions for g in merged],
                                     DISTINCT_BYTES) if merged else []
            found = {id(g): u for g, u in zip(merged, uniques)}
            groups = [replace(g, unique=found.get(id(g))) for g in plan.groups]
            self._plans[size] = Plan(plan.window, groups)
        return self._plans[size]

    def top_patches(self, x_t: torch.Tensor, level: NoiseLevel, locations: torch.Tensor) -> dict[str, torch.Tensor]:
        """For query `locations` (long [L]): the training window of largest weight, as image index and window
        position [B, L], its top-left corner in its image [B, L, 2] (row, column; negative where zero-padded) and
        the window itself [B, L, C, kh, kw] (model space)."""
        size = self.patch_size(level)
        plan = self.cached_plan(size)
        # several pixels can share one query location (PSPC's large squares): each distinct location once, then
        # back to the order asked (a repeated location would leave its other columns unfilled)
        distinct, back = torch.unique(locations, return_inverse=True)
        result = self.softmax(x_t, level, size, distinct, track_top=True)
        image, position = result.top_image[:, back], result.top_position[:, back]  # [B, L]
        kh, kw = plan.window.size
        picked = self.training_images(image.reshape(-1)).to(x_t.device)  # [B*L, C, H, W]
        unfolded = torch.nn.functional.unfold(picked, (kh, kw), padding=plan.window.padding)  # [B*L, D, P]
        index = position.reshape(-1, 1, 1).expand(-1, unfolded.shape[1], 1)
        windows = unfolded.gather(2, index).reshape(*image.shape, self.store.sample_shape[0], kh, kw)
        grid_width = plan.window.grid_shape(self.store.sample_shape)[1]
        top_left = torch.stack([position // grid_width, position % grid_width], -1)
        return {"image": image, "position": position, "window": windows, "size": size,
                "top_left": top_left - plan.window.padding}

    def training_images(self, indices: torch.Tensor) -> torch.Tensor:
        """The training images at `indices` [M] of the whole dataset (also when the store is one shard: then a
        collective), [M, C, H, W] model space on the CPU."""
        return (self.store if self.merge is None else self.merge).gather(indices)

    def pixel_location(self, row: int, column: int, size: int) -> int:
        """The query location that denoises pixel (row, column): the pixel itself for centre-pixel methods."""
        return row * self.store.sample_shape[2] + column

    def plan(self, size: int) -> Plan:
        raise NotImplementedError

    def queries(self, x_t: torch.Tensor, size: int) -> torch.Tensor:
        raise NotImplementedError

    def assemble(self, result: PatchSoftmaxResult, shape: torch.Size, size: int) -> torch.Tensor:
        """Centre-pixel methods: the means [B, H*W, C] are x0_hat."""
        batch, channels, height, width = shape
        return result.mean.transpose(1, 2).reshape(batch, channels, height, width)


def restrict(groups: list[PatchGroup], locations: torch.Tensor) -> list[PatchGroup]:
    """The groups cut down to the given query locations (for looking at a few pixels only)."""
    wanted = set(locations.tolist())
    out = []
    for group in groups:
        keep = torch.tensor([loc in wanted for loc in group.locations.tolist()], dtype=torch.bool)
        if keep.any():  # several runs become one run per location
            positions = group.positions if group.shared else group.positions.repeat_interleave(group.run, 0)[keep]
            out.append(replace(group, locations=group.locations[keep], positions=positions))
    return out
