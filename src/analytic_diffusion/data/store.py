"""The dataset store: every image decoded once, kept in a compact dtype and memory-mapped from a cache.

The cache entry is a directory named by a fingerprint of everything the images were computed from (dataset,
split, resolution, channels, background where images can be transparent, subset and the source's own signature),
built under a temporary name and renamed into place in one step: a later run either finds a complete entry for
exactly its inputs or builds one.
A subset (the first `subset_size` images) of a dataset whose full store, or a larger subset's, is already cached
is a view of that entry's first images: nothing is decoded or copied, and it keeps its own fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageColor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..cache import touch
from ..errors import StudioError
from ..fileio import atomic_write_json, make_directory
from .pixels import decode_pixels
from .sources import ImageSource, SourceRequest, dataset_source, describe_skipped

log = logging.getLogger(__name__)

STORE_FORMAT = 1  # bump when preprocessing changes, so old cache entries are never reused
STALE_BUILD_SECONDS = 6 * 3600  # a killed build's temporary folder older than this is removed by the next build


@dataclass
class DatasetStore:
    """N preprocessed images [N, C, H, W]: uint8 for 8-bit sources, float32 model space otherwise."""

    name: str
    fingerprint: str
    images: torch.Tensor

    @classmethod
    def from_tensor(cls, images: torch.Tensor, name: str = "memory") -> DatasetStore:
        """An in-memory store (tests, notebooks): uint8 pixels or float images already in [-1, 1], on any device
        (a store lives in host memory; methods copy what they need to their own device)."""
        images = images.detach().cpu().contiguous()
        if not (images.dtype == torch.uint8 or images.is_floating_point()):
            raise StudioError(f"images of an in-memory store must be uint8 pixels or floats in [-1, 1], not {images.dtype}")
        if images.is_floating_point() and not _in_model_space(images):
            raise StudioError("float images of an in-memory store must be finite and in [-1, 1]; rescale them or pass uint8")
        digest = hashlib.sha256(images.numpy().tobytes() + str(tuple(images.shape)).encode()).hexdigest()
        return cls(name, digest[:16], images)

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def dim(self) -> int:
        """n = C * H * W, the length of a flattened image."""
        return int(np.prod(self.sample_shape))

    @property
    def is_uint8(self) -> bool:
        return self.images.dtype == torch.uint8

    def decode(self, raw: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Map stored values to model space [-1, 1], bit-identical to ToTensor() then Normalize(0.5, 0.5) on every
        device (`pixels.decode_pixels`)."""
        if raw.dtype != torch.uint8:
            return raw.to(dtype)
        return decode_pixels(raw, dtype)

    def model_space(
        self, start: int = 0, stop: int | None = None, device: torch.device | str = "cpu", dtype=torch.float32
    ) -> torch.Tensor:
        """Images [start, stop) in model space on `device`, decoded after the (compact) copy."""
        return self.decode(self.images[start:stop].to(device), dtype)

    def gather(self, indices: torch.Tensor, device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
        """Images at `indices` (any shape) in model space, shape [*indices.shape, C, H, W]."""
        picked = self.images[indices.cpu().reshape(-1)].to(device)
        return self.decode(picked, dtype).reshape(*indices.shape, *self.sample_shape)


@dataclass
class StoreRequest:
    """The dataset section of a config, as the store needs it."""

    name: str
    split: str = "train"
    download: bool = False
    path: str | None = None
    subset_size: int | None = None
    resolution: int | None = None
    channels: int | None = None
    background: str = "white"
    batch_size: int = 256
    num_workers: int = 0


def _in_model_space(images: torch.Tensor) -> bool:
    """True if float images are finite and within [-1, 1] (up to float rounding of the normalisation)."""
    return bool(images.isfinite().all() and images.abs().max() <= 1.0 + 1e-6)


def background_rgb(colour: str) -> tuple[int, int, int]:
    """dataset.background as 8-bit RGB: a colour name PIL knows (white, black, grey, ...) or #rrggbb."""
    try:
        rgb = ImageColor.getrgb(colour)
    except ValueError:
        raise StudioError(f"dataset.background must be a colour such as white, black or #808080, not '{colour}'") from None
    return rgb[:3]


def _flatten_alpha(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """A transparent image composited onto `background`, as a viewer shows it on that colour; others unchanged.

    Covers alpha channels (RGBA, LA, PA, premultiplied RGBa, La) and palette or colour-key transparency (tRNS)."""
    if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in image.info:
        return image
    canvas = Image.new("RGBA", image.size, (*background, 255))
    return Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")


def _to_chw_uint8(
    item: Image.Image | np.ndarray, resolution: int | None, channels: int, background: tuple[int, int, int] = (255, 255, 255)
) -> np.ndarray:
    """One image as uint8 [C, H, W]: transparency composited onto `background`, channel conversion, shorter side
    resized to `resolution`, centre crop."""
    if isinstance(item, np.ndarray):
        if item.ndim == 3 and item.shape[0] in (1, 3) and item.shape[-1] not in (1, 3):
            item = item.transpose(1, 2, 0)
        item = Image.fromarray(item.squeeze(-1) if item.ndim == 3 and item.shape[-1] == 1 else item)
    if item.mode.startswith("I;16"):  # 16-bit grey PNG: convert("L") would clip at 255, so scale 0..65535 to 0..255
        item = Image.fromarray((np.asarray(item, dtype=np.float64) / 257).round().astype(np.uint8))
    if item.mode in ("I", "F"):  # 32-bit integer or float pixels: no standard range to map to 0..255
        raise ValueError(f"32-bit images (PIL mode {item.mode}) have no standard range; save them with 8 or 16 bits")
    image = _flatten_alpha(item, background).convert("L" if channels == 1 else "RGB")
    if resolution is not None and image.size != (resolution, resolution):
        image = TF.center_crop(TF.resize(image, resolution, antialias=True), [resolution, resolution])
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _to_chw_float(item: np.ndarray, resolution: int | None, channels: int, background=None) -> np.ndarray:
    """One float image [C, H, W] in model space, resized bilinearly and channel-converted like the uint8 path."""
    tensor = torch.as_tensor(np.asarray(item, dtype=np.float32))
    if not _in_model_space(tensor):
        raise ValueError("float images must be finite and in [-1, 1]; rescale them or save uint8")
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.shape[0] != channels:
        if tensor.shape[0] == 1:
            tensor = tensor.expand(channels, -1, -1)
        else:
            weights = torch.tensor([0.299, 0.587, 0.114])[:, None, None]
            tensor = (tensor * weights).sum(0, keepdim=True)
    if resolution is not None and tuple(tensor.shape[1:]) != (resolution, resolution):
        tensor = TF.center_crop(TF.resize(tensor, resolution, antialias=True), [resolution, resolution])
    return tensor.numpy()


def _native_channels(item: Image.Image | np.ndarray) -> int:
    if isinstance(item, Image.Image):
        return 1 if item.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    if item.ndim == 2:
        return 1
    if item.ndim == 3 and item.shape[0] in (1, 3) and item.shape[-1] not in (1, 3):
        return item.shape[0]
    return item.shape[-1] if item.ndim == 3 else 1


class _Preprocessed(Dataset):
    """Decodes and preprocesses source images; errors come back as strings so workers cannot garble them."""

    def __init__(self, source: ImageSource, count: int, resolution: int | None, channels: int, floating: bool,
                 background: tuple[int, int, int]):
        self.source, self.count, self.resolution, self.channels = source, count, resolution, channels
        self.background = background
        self.convert = _to_chw_float if floating else _to_chw_uint8

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> np.ndarray | str:
        try:
            return self.convert(self.source.get(index), self.resolution, self.channels, self.background)
        except StudioError as exc:
            return str(exc)
        except Exception as exc:
            return f"cannot preprocess image {index} of {self.source.describe}: {str(exc) or type(exc).__name__}"


def _collate(batch: list[np.ndarray | str]) -> list[np.ndarray | str]:
    return batch


def store_fingerprint(request: StoreRequest, source: ImageSource, channels: int | str, floating: bool) -> str:
    """Hash of everything the stored images depend on (the background only where images can be transparent)."""
    key: dict = {
        "format": STORE_FORMAT,
        "dataset": request.name,
        "split": request.split,
        "resolution": request.resolution,
        "channels": channels,
        "subset_size": request.subset_size,
        "float": floating,
        "source": source.signature,
    }
    if source.may_have_alpha:
        key["background"] = background_rgb(request.background)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _check_subset(request: StoreRequest, length: int) -> int:
    if request.subset_size is None:
        return length
    if request.subset_size < 1:
        raise StudioError(f"dataset.subset_size must be at least 1, got {request.subset_size}")
    if request.subset_size > length:  # silently fewer images would mislabel every result (and every sweep cell)
        raise StudioError(f"dataset.subset_size={request.subset_size} but {request.name} ({request.split}) has "
                          f"{length} images; use at most {length}, or dataset.subset_size=null for all of them")
    return request.subset_size


def _build(path: Path, source: ImageSource, request: StoreRequest, count: int, channels: int, floating: bool) -> None:
    """Decode `count` images into `path/images.npy` (written in place: `path` is a private temporary folder)."""
    dataset = _Preprocessed(source, count, request.resolution, channels, floating, background_rgb(request.background))
    first = dataset[0]
    if isinstance(first, str):
        raise StudioError(first)
    out = np.lib.format.open_memmap(path / "images.npy", mode="w+", dtype=first.dtype, shape=(count, *first.shape))
    loader = DataLoader(dataset, batch_size=request.batch_size, num_workers=request.num_workers, collate_fn=_collate)
    start = 0
    with tqdm(total=count, desc=f"decoding {request.name}", unit="img", leave=False) as bar:
        for batch in loader:
            for item in batch:
                if isinstance(item, str):
                    raise StudioError(item)
                if item.shape != first.shape:
                    raise StudioError(
                        f"image {start} of {source.describe} has shape {item.shape}, expected {first.shape}; "
                        "set dataset.resolution to resize all images to one size"
                    )
                out[start] = item
                start += 1
            bar.update(len(batch))
    out.flush()
    del out


def _source_kind(source: ImageSource) -> bool:
    """True when the source holds float images (stored as float32 model space) rather than 8-bit pixels."""
    item = source.first()
    if isinstance(item, np.ndarray) and item.dtype != np.uint8:
        if not np.issubdtype(item.dtype, np.floating):
            raise StudioError(f"images of {source.describe} have dtype {item.dtype}; use uint8 pixels or floats in [-1, 1]")
        if item.min() < -1.0 - 1e-6 or item.max() > 1.0 + 1e-6 or not np.isfinite(item).all():
            raise StudioError(f"float images of {source.describe} must be finite and in [-1, 1]; rescale them or save uint8")
        return True
    return False


def _remove_stale_builds(final: Path) -> None:
    """Delete leftovers of builds of this entry that were killed (SIGKILL, power cut) more than
    STALE_BUILD_SECONDS ago; younger ones may belong to a build still running in another process."""
    for leftover in final.parent.glob(f".building-{final.name}-*"):
        try:
            if time.time() - leftover.stat().st_mtime > STALE_BUILD_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:  # removed meanwhile by its own process
            pass


def _voted_channels(counts: dict[int, int]) -> int:
    """Colour wins: one colour file among grey ones makes the store colour (grey files are repeated over RGB)."""
    return 3 if counts.get(3) else 1


def _files_report(source: ImageSource, count: int, meta: dict) -> dict:
    """The source's used/skipped report (folders), with images beyond dataset.subset_size and the channel vote."""
    report = {"used": count, "skipped": dict(source.report["skipped"])}
    if count < source.report["used"]:
        report["skipped"]["beyond dataset.subset_size"] = {"count": source.report["used"] - count, "examples": []}
        report["skipped"] = dict(sorted(report["skipped"].items()))
    counts = meta.get("channel_counts")
    if counts:
        report["channels"] = {"grey_files": counts.get("1", 0), "colour_files": counts.get("3", 0),
                              "stored": 3 if counts.get("3") else 1}
    return report


def files_sentence(files: dict) -> str:
    """'Dataset files: 5 used; left out: 2 hidden (...)', with the grey/colour vote when files were mixed."""
    sentence = f"Dataset files: {files['used']} used"
    if files["skipped"]:
        sentence += f"; left out: {describe_skipped(files['skipped'])}"
    channels = files.get("channels")
    if channels and channels["grey_files"] and channels["colour_files"]:
        sentence += (f"; {channels['grey_files']} grey and {channels['colour_files']} colour files, stored in colour "
                     "(set dataset.channels=1 for grey)")
    return sentence


def _cached_superset(stores: Path, name: str, base: str, count: int) -> Path | None:
    """A complete cached store of the same images as `base` (the full dataset's fingerprint) holding at least
    `count` of them, the smallest such; None when there is none. Subsets are the first images, so the first
    `count` images of any such store are the requested subset."""
    found = []
    for meta_path in stores.glob(f"{name}-*/meta.json"):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        full = meta_path.parent.name == f"{name}-{base}"  # stores written before "base" was recorded
        if (full or meta.get("base") == base) and meta.get("count", 0) >= count and (meta_path.parent / "images.npy").is_file():
            found.append((meta["count"], meta_path.parent))
    return min(found)[1] if found else None


def load_or_build_store(request: StoreRequest, datasets_root: Path, cache_root: Path) -> tuple[DatasetStore, dict]:
    """Return the store for `request`, decoding it only if no complete cache entry for its fingerprint exists
    and, for a subset, no cached store of the same dataset holds at least as many images (then the subset is a
    view of that store's first images)."""
    started = time.perf_counter()
    source = dataset_source(SourceRequest(request.name, request.split, request.download, request.path, datasets_root))
    background_rgb(request.background)
    floating = _source_kind(source)
    vote = request.channels is None and source.channel_counts is not None
    channels = request.channels or (None if vote else _native_channels(source.first()))
    if channels not in (1, 3, None):
        if request.channels is None:  # only arrays have other channel counts of their own
            raise StudioError(
                f"images of {source.describe} have {channels} channels (the first has shape {source.first().shape}); "
                "set dataset.channels=1 or 3 to convert them, or save arrays as [N, H, W], [N, H, W, C] or "
                "[N, C, H, W] with C 1 or 3"
            )
        raise StudioError(f"dataset.channels must be 1 or 3, got {channels}")
    if request.resolution is not None and request.resolution < 1:
        raise StudioError(f"dataset.resolution must be a positive number of pixels, got {request.resolution}")
    count = _check_subset(request, source.length)
    key_channels = "vote" if vote else channels
    fingerprint = store_fingerprint(request, source, key_channels, floating)
    base = store_fingerprint(dataclasses.replace(request, subset_size=None), source, key_channels, floating)
    final = cache_root / "stores" / f"{request.name}-{fingerprint}"
    path = final
    if not (final / "images.npy").is_file() and request.subset_size is not None:
        path = _cached_superset(final.parent, request.name, base, count) or final
        if path != final:
            log.info("dataset %s: the first %d images of the cached store %s", request.name, count, path)
    built = not (path / "images.npy").is_file()
    if built:
        tmp = final.parent / f".building-{final.name}-{uuid.uuid4().hex[:8]}"
        make_directory(final.parent, "paths.cache")
        _remove_stale_builds(final)
        make_directory(tmp, "paths.cache", exist_ok=False)
        try:
            meta = {"fingerprint": fingerprint, "count": count, "source": source.describe}
            if vote:  # the files' headers decide, read only when the store is built
                counts = source.channel_counts(count)
                meta["channel_counts"] = {str(c): n for c, n in sorted(counts.items())}
                channels = _voted_channels(counts)
            _build(tmp, source, request, count, channels, floating)
            meta["base"] = base
            atomic_write_json(tmp / "meta.json", meta)
            try:
                tmp.rename(final)
            except OSError:  # another process finished the same entry first; theirs is as good as ours
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    array = np.load(path / "images.npy", mmap_mode="c")[:count]  # a view: a superset's first images, no copy
    touch(path)
    store = DatasetStore(request.name, fingerprint, torch.from_numpy(array))
    info = {"fingerprint": fingerprint, "built": built, "path": str(path), "seconds": time.perf_counter() - started}
    if source.report:
        info["files"] = _files_report(source, count, json.loads((path / "meta.json").read_text()))
    return store, info
