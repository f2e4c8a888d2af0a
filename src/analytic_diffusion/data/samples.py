"""Images to analyse, made by anything: a run directory, a sweep folder, a folder of image files, a tensor file.

Every input becomes float32 [N, C, H, W] in model space [-1, 1]: uint8 pixels are decoded exactly as the dataset
store decodes them (ToTensor then Normalize(0.5, 0.5)), so a PNG written by another program and the same pixels
as a uint8 tensor give identical values. Nothing is resized or channel-converted beyond what is lossless for image
files (an RGB file whose three channels are equal is grey; a grey file is RGB with equal channels); the caller
compares shapes with the training set.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import StudioError
from .pixels import decode_pixels
from .sources import IMAGE_SUFFIXES, open_image, describe_skipped, list_image_files

log = logging.getLogger("analytic_diffusion")

TENSOR_SUFFIXES = (".pt", ".pth", ".npy", ".npz")
FLOAT_LIMIT = 2.0  # model-space floats beyond this are not model space (0..255 or 0..1 pixels saved as floats)


@dataclass
class SampleInput:
    """One set of images found at the path given, not yet read."""

    kind: str  # run | folder | tensor
    path: Path
    files: list[Path] | None = None  # folder inputs: the image files, sorted

    @property
    def name(self) -> str:
        """The run directory's or folder's name, or the file's stem."""
        return self.path.stem if self.kind == "tensor" else self.path.name

    @property
    def config(self) -> Path | None:
        """A run directory's config.yaml (its dataset is the training set); None for other inputs."""
        return self.path / "config.yaml" if self.kind == "run" else None


@dataclass
class SampleSet:
    """One set of images to analyse."""

    input: SampleInput
    images: torch.Tensor  # [N, C, H, W] float32 model space
    files: list[str] | None = None  # folder inputs: each image's path relative to the folder


def is_run_directory(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file() and (path / "samples.pt").is_file()


def find_sample_inputs(path: Path) -> list[SampleInput]:
    """The image sets at `path`: one for a run directory, folder or tensor file; one per run for a sweep folder
    (every run directory below it, in sorted order). Raises a one-line StudioError for anything unusable."""
    path = path.expanduser()
    if not path.exists():
        raise StudioError(f"{path} does not exist; pass a run directory, a sweep folder, a folder of images "
                          f"or a {'/'.join(TENSOR_SUFFIXES)} file")
    if path.is_file():
        if path.suffix.lower() not in TENSOR_SUFFIXES:
            raise StudioError(f"{path} is not a tensor file ({', '.join(TENSOR_SUFFIXES)}); pass one, or the folder "
                              "that holds image files")
        return [SampleInput("tensor", path)]
    if is_run_directory(path):
        return [SampleInput("run", path)]
    if (path / "config.yaml").is_file():
        raise StudioError(f"run directory {path} has no samples.pt (the run set output.tensors=false or did not "
                          f"finish); pass its images/ folder with -c {path / 'config.yaml'} instead")
    runs = sorted(p.parent for p in path.rglob("samples.pt") if is_run_directory(p.parent))
    cells = _sweep_cells(path)
    if cells is not None:  # an `ads sweep` folder: the cells of its last run, not those a changed grid left behind
        stale = [run for run in runs if run.parent == path and run.name not in cells]
        if stale:
            log.info("%s: left out %d run directories that are not cells of the sweep's last run (%s)", path,
                     len(stale), ", ".join(run.name for run in stale[:5]))
        runs = [run for run in runs if run not in stale]
    if runs:
        return [SampleInput("run", run) for run in runs]
    listing = list_image_files(path)  # what a file browser shows, as for dataset folders
    if listing.skipped:
        log.info("%s: left out %s", path, describe_skipped(listing.report()["skipped"]))
    files = listing.files
    if not files:
        raise StudioError(f"{path} holds no run directories and no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                          "pass a run directory, a sweep folder, a folder of images or a tensor file")
    return [SampleInput("folder", path, files)]


def _sweep_cells(path: Path) -> set[str] | None:
    """The cell names in the summary of an `ads sweep` folder (sweep.yaml and summary.csv), else None."""
    if not ((path / "sweep.yaml").is_file() and (path / "summary.csv").is_file()):
        return None
    with open(path / "summary.csv", newline="") as f:
        return {row["run"] for row in csv.DictReader(f) if row.get("run")}


def load_samples(found: SampleInput) -> SampleSet:
    """Read one input as model-space images [N, C, H, W]. Image files: grey (C = 1) when every file is grey or
    RGB with three equal channels, else colour with grey files repeated to RGB."""
    if found.kind == "run":
        return SampleSet(found, _model_space(_load_torch(found.path / "samples.pt"), found.path / "samples.pt"))
    if found.kind == "folder":
        return _image_folder(found)
    return _tensor_file(found)


def with_channels(samples: SampleSet, channels: int) -> SampleSet:
    """Grey image files as RGB (channels repeated, lossless) when the training set is colour; anything else as is
    (tensors are never converted; a mismatch is for the caller to report)."""
    if samples.input.kind == "folder" and samples.images.shape[1] == 1 and channels == 3:
        return SampleSet(samples.input, samples.images.repeat(1, 3, 1, 1), samples.files)
    return samples


def _load_torch(path: Path) -> np.ndarray | torch.Tensor:
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StudioError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                          "save the images with torch.save(tensor, path)") from None
    if not isinstance(value, torch.Tensor):
        raise StudioError(f"{path} holds a {type(value).__name__}, not a tensor; save the image tensor itself "
                          "([N, C, H, W]) with torch.save")
    return value


def _tensor_file(found: SampleInput) -> SampleSet:
    path = found.path
    if path.suffix.lower() in (".pt", ".pth"):
        value = _load_torch(path)
    else:
        try:
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                if not loaded.files:
                    raise ValueError("the .npz file holds no arrays")
                loaded = loaded["images" if "images" in loaded.files else loaded.files[0]]
            value = np.asarray(loaded)
        except Exception as exc:
            raise StudioError(f"cannot read {path}: {exc}; save the images with numpy.save") from None
    return SampleSet(found, _model_space(value, path))


def _model_space(value: np.ndarray | torch.Tensor, path: Path) -> torch.Tensor:
    """[N, C, H, W] float32 in model space from uint8 pixels or model-space floats, [N, H, W], [N, C, H, W] or
    (when unambiguous) [N, H, W, C] with C 1 or 3."""
    images = torch.as_tensor(value)
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
        images = images.permute(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise StudioError(f"{path} holds an array of shape {tuple(value.shape)}, not images; save them as "
                          "[N, C, H, W] (C 1 or 3), [N, H, W] or [N, H, W, C]")
    if images.shape[0] == 0:
        raise StudioError(f"{path} holds no images (shape {tuple(value.shape)}); nothing to analyse")
    if images.dtype == torch.uint8:
        return decode_pixels(images)
    if not images.is_floating_point():
        raise StudioError(f"{path} holds {images.dtype} values; save uint8 pixels (0..255) or model-space floats "
                          "in [-1, 1]")
    images = images.to(torch.float32).contiguous()
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        bad = int((~finite).flatten(1).any(1).sum())
        raise StudioError(f"{path} holds NaN or infinite values in {bad} of {images.shape[0]} images; "
                          "remove them or fix the program that wrote them")
    peak = float(images.abs().max())
    if peak > FLOAT_LIMIT:
        raise StudioError(f"{path} holds floats up to {peak:.4g}, far outside model space [-1, 1]; save uint8 "
                          "pixels, or floats as pixels / 127.5 - 1")
    return images


def _pixels(image: Image.Image, path: Path) -> np.ndarray:
    """uint8 [C, H, W] of a decoded file, opaque only: C = 1 for grey and for RGB with three equal channels, else 3."""
    if image.mode.startswith("I;16"):  # 16-bit grey, scaled 0..65535 -> 0..255 as the dataset store does
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().astype(np.uint8))
    if image.mode in ("I", "F"):
        raise StudioError(f"{path} has 32-bit pixels (PIL mode {image.mode}), which have no standard range; "
                          "save 8-bit images")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("LA", "RGBA", "PA"):
        alpha = np.asarray(image.getchannel("A"))
        if (alpha != 255).any():
            raise StudioError(f"{path} is transparent (alpha below 255 in {int((alpha != 255).sum())} pixels); "
                              "save opaque images")
    image = image.convert("L" if image.mode in ("1", "L", "LA") else "RGB")
    array = np.asarray(image, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return array[:1] if array.shape[0] == 3 and (array == array[:1]).all() else array


def _image_folder(found: SampleInput) -> SampleSet:
    """Every image file under the folder, recursively, in sorted path order, each decoded without resizing."""
    files, arrays = found.files or [], []
    for file in files:
        array = _pixels(open_image(file), file)
        if arrays and array.shape[1:] != arrays[0].shape[1:]:
            raise StudioError(f"{file} is {array.shape[2]}x{array.shape[1]} pixels but {files[0]} is "
                              f"{arrays[0].shape[2]}x{arrays[0].shape[1]}; the images of one folder must share a size")
        arrays.append(array)
    if any(a.shape[0] == 3 for a in arrays):
        arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]
    pixels = torch.from_numpy(np.stack(arrays))
    return SampleSet(found, decode_pixels(pixels), [str(f.relative_to(found.path)) for f in files])
