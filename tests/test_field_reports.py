"""Bug reports from the field (issue 14), each example as a test: what a folder holds as a file browser shows it,
images as a viewer shows them, `~` and $VARIABLES in every path, torchvision near-miss layouts, third-party log
noise and failures, and schedules that start far from pure noise. (The noise level of each x_t is in test_sampler.)"""

from __future__ import annotations

import gzip
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from analytic_diffusion import generate as generate_module
from analytic_diffusion.cli import main
from analytic_diffusion.config import load_config
from analytic_diffusion.config.loader import PATH_KEYS
from analytic_diffusion.data.sources import MNIST_FILES
from analytic_diffusion.data.store import StoreRequest, load_or_build_store
from analytic_diffusion.errors import StudioError
from analytic_diffusion.sampling import SchedulerOptions, make_scheduler, start_warning

FAST = ["experiment.device=cpu", "sampling.num_samples=2", "sampling.num_inference_steps=3",
        "sampling.timestep_spacing=trailing"]


def _load(root: Path, **request):
    return load_or_build_store(StoreRequest(**request), root / "datasets", root / "cache")


def _png(path: Path, pixels: np.ndarray, **save) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **save)


def _colour_images(folder: Path, count: int = 5, size: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]
    for i, pixels in enumerate(images):
        _png(folder / ("cats" if i % 2 else "dogs") / f"{i:02d}.png", pixels)
    return images


@contextmanager
def fresh_process_logging():
    """The root logger as in a fresh `ads` process: no handlers (pytest's, added for each test phase, are put back
    afterwards, and whatever the CLI installed is dropped)."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers.clear()
    try:
        yield
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def _ads(argv: list[str]) -> int:
    """`ads ...` through the CLI entry, with logging as in a fresh process."""
    with fresh_process_logging():
        return main(argv)


def _tiny_array(tmp_path: Path, count: int = 30) -> str:
    path = tmp_path / "tiny.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (count, 6, 6), dtype=np.uint8))
    return str(path)


def _lines(text: str) -> list[str]:
    """Output lines without tqdm's progress bars (which redraw with carriage returns)."""
    return [part for line in text.splitlines() for part in line.split("\r") if part.strip() and "it/s]" not in part
            and "step/s]" not in part and "img/s]" not in part and "?" not in part[:40]]


# ---- 3. what the folder listing includes --------------------------------------------------------------------------

def _cluttered_folder(folder: Path) -> list[np.ndarray]:
    """5 images as a file browser shows them, plus what macOS, Jupyter, Windows and half-done copies leave beside."""
    images = _colour_images(folder)
    (folder / "dogs" / "._00.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")  # AppleDouble
    for i in range(3):
        _png(folder / "cats" / ".ipynb_checkpoints" / f"{i:02d}-checkpoint.png", images[i])
    (folder / "__MACOSX" / "dogs").mkdir(parents=True)
    (folder / "__MACOSX" / "dogs" / "._00.png").write_bytes(b"\x00\x05\x16\x07")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "notes.txt").write_text("shot on a phone\n")
    (folder / "cats" / "empty.png").write_bytes(b"")
    (folder / "cats" / "gone.png").symlink_to(folder / "nowhere.png")
    return images


def test_folder_uses_what_a_file_browser_shows_and_reports_the_rest(tmp_path):
    folder = tmp_path / "pics"
    images = _cluttered_folder(folder)
    store, info = _load(tmp_path, name="image_folder", path=str(folder))
    expected = [images[i] for i in (1, 3, 0, 2, 4)]  # cats/01, cats/03, dogs/00, dogs/02, dogs/04
    assert store.num_images == 5
    assert torch.equal(store.images, torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2))
    skipped = info["files"]["skipped"]
    assert info["files"]["used"] == 5
    assert {reason: entry["count"] for reason, entry in skipped.items()} == {
        "broken link": 1, "empty file": 1, "hidden": 3, "macOS zip metadata": 1, "not an image": 1, "system file": 1}
    assert skipped["hidden"]["examples"] == [".DS_Store", "cats/.ipynb_checkpoints/", "dogs/._00.png"]


def test_summary_and_metrics_say_how_many_files_were_used_and_skipped(tmp_path, capsys):
    folder = tmp_path / "pics"
    _cluttered_folder(folder)
    assert _ads(["generate", *FAST, "dataset.name=image_folder", f"dataset.path={folder}", "dataset.subset_size=4"]) == 0
    out = capsys.readouterr().out
    assert "Dataset files: 4 used; left out: 1 beyond dataset.subset_size, 1 broken link (cats/gone.png)" in out
    assert "3 hidden (.DS_Store, cats/.ipynb_checkpoints/, dogs/._00.png)" in out
    run_dir = Path(out.split("Outputs in ")[1].split(":")[0])
    files = json.loads((run_dir / "metrics.json").read_text())["store"]["files"]
    assert files["used"] == 4 and files["skipped"]["empty file"] == {"count": 1, "examples": ["cats/empty.png"]}
    assert files["skipped"]["beyond dataset.subset_size"]["count"] == 1


def test_linked_folders_are_followed_once(tmp_path):
    folder, elsewhere = tmp_path / "pics", tmp_path / "elsewhere"
    _colour_images(folder, 2)
    _colour_images(elsewhere, 1)
    (folder / "linked").symlink_to(elsewhere)
    (folder / "dogs" / "loop").symlink_to(folder)  # a link back up the tree
    store, info = _load(tmp_path, name="image_folder", path=str(folder))
    assert store.num_images == 3 and info["files"]["skipped"] == {}


def test_hidden_clutter_does_not_invalidate_the_store(tmp_path):
    """The fingerprint covers the files used: a .DS_Store appearing later reuses the store."""
    folder = tmp_path / "pics"
    _colour_images(folder, 3)
    store, info = _load(tmp_path, name="image_folder", path=str(folder))
    (folder / ".DS_Store").write_bytes(b"Bud1")
    again, info = _load(tmp_path, name="image_folder", path=str(folder))
    assert not info["built"] and again.fingerprint == store.fingerprint


def test_a_folder_of_only_clutter_says_what_it_left_out(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07")
    with pytest.raises(StudioError, match=r"contains no images .*left out: 1 hidden \(\._a\.png\)") as info:
        _load(tmp_path, name="image_folder", path=str(folder))
    assert "\n" not in str(info.value)


# ---- 4. images as a viewer shows them -----------------------------------------------------------------------------

def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored landscape (2 x 4) with orientation 6 displays portrait (4 x 2), like the other file."""
    folder = tmp_path / "phone"
    rng = np.random.default_rng(3)
    upright = rng.integers(0, 256, (4, 2, 3), dtype=np.uint8)
    stored = rng.integers(0, 256, (2, 4, 3), dtype=np.uint8)
    _png(folder / "a_upright.png", upright)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    _png(folder / "b_phone.png", stored, exif=exif)
    store, _ = _load(tmp_path, name="image_folder", path=str(folder))
    assert store.sample_shape == (3, 4, 2)
    assert torch.equal(store.images[1], torch.from_numpy(np.rot90(stored, k=-1).copy()).permute(2, 0, 1))


def _transparent(colour: tuple[int, int, int]) -> np.ndarray:
    """A 4 x 4 RGBA image: left half an opaque pattern, right half transparent over `colour`, one pixel half-covered."""
    pixels = np.zeros((4, 4, 4), np.uint8)
    pixels[:, :2, :3] = [[10, 200, 30], [90, 40, 250]]
    pixels[:, :2, 3] = 255
    pixels[:, 2:, :3] = colour
    pixels[0, 0, 3] = 128
    return pixels


@pytest.mark.parametrize(("background", "value"), [(None, 255), ("black", 0), ("#808080", 128)])
def test_transparent_images_that_look_the_same_are_stored_the_same(tmp_path, background, value):
    folder = tmp_path / "logos"
    for name, colour in (("green", (0, 255, 0)), ("red", (255, 0, 0)), ("black", (0, 0, 0))):
        _png(folder / f"{name}.png", _transparent(colour))
    extra = {} if background is None else {"background": background}
    store, _ = _load(tmp_path, name="image_folder", path=str(folder), **extra)
    images = store.images
    assert torch.equal(images[0], images[1]) and torch.equal(images[1], images[2])
    assert (images[:, :, :, 2:] == value).all()  # the transparent half shows the background
    blended = np.round(np.array([10, 200, 30]) * 128 / 255 + value * 127 / 255)
    assert np.abs(images[0, :, 0, 0].numpy() - blended).max() <= 1


@pytest.mark.parametrize("mode", ["LA", "P", "RGB"])
def test_every_kind_of_transparency_is_composited(tmp_path, mode):
    """Grey + alpha, palette with a transparent index and an RGB colour key (tRNS) all show the background."""
    folder = tmp_path / "kinds"
    folder.mkdir()
    if mode == "LA":
        Image.fromarray(np.dstack([np.full((3, 3), 50, np.uint8), np.zeros((3, 3), np.uint8)]), "LA").save(folder / "a.png")
    elif mode == "P":
        image = Image.fromarray(np.zeros((3, 3), np.uint8), "P")
        image.putpalette([9, 9, 9] * 256)
        image.save(folder / "a.png", transparency=0)
    else:
        Image.fromarray(np.full((3, 3, 3), 7, np.uint8)).save(folder / "a.png", transparency=(7, 7, 7))
    store, _ = _load(tmp_path, name="image_folder", path=str(folder), channels=3, background="black")
    assert (store.images == 0).all()


def test_alpha_in_arrays_is_composited_and_background_keys_the_store(tmp_path):
    pixels = np.zeros((2, 5, 5, 4), np.uint8)
    pixels[..., :3] = 200  # fully transparent
    np.save(tmp_path / "rgba.npy", pixels)
    white, built_white = _load(tmp_path, name="array", path=str(tmp_path / "rgba.npy"), channels=3)
    black, built_black = _load(tmp_path, name="array", path=str(tmp_path / "rgba.npy"), channels=3, background="black")
    assert (white.images == 255).all() and (black.images == 0).all()
    assert built_black["built"] and white.fingerprint != black.fingerprint
    # Images that cannot be transparent keep their store whatever the background.
    grey = _tiny_array(tmp_path)
    digits, _ = _load(tmp_path, name="array", path=grey)
    same, info = _load(tmp_path, name="array", path=grey, background="black")
    assert not info["built"] and same.fingerprint == digits.fingerprint


def test_unknown_background_is_refused_with_the_config():
    with pytest.raises(StudioError, match="dataset.background must be a colour such as white"):
        load_config("nearest_dataset/mnist5k", ["dataset.background=see-through"])


# ---- 5. mixed channel counts --------------------------------------------------------------------------------------

def test_one_grey_scan_sorting_first_does_not_turn_a_colour_folder_grey(tmp_path, capsys):
    folder = tmp_path / "mixed"
    images = _colour_images(folder, 2)
    grey = np.random.default_rng(9).integers(0, 256, (6, 6), dtype=np.uint8)
    _png(folder / "a_scan.png", grey)
    store, info = _load(tmp_path, name="image_folder", path=str(folder))
    assert store.sample_shape == (3, 6, 6)
    assert torch.equal(store.images[0], torch.from_numpy(grey).expand(3, 6, 6))
    assert torch.equal(store.images[2], torch.from_numpy(images[0]).permute(2, 0, 1))  # dogs/00
    assert info["files"]["channels"] == {"grey_files": 1, "colour_files": 2, "stored": 3}
    again, info = _load(tmp_path, name="image_folder", path=str(folder))  # from the cache: the same report
    assert not info["built"] and info["files"]["channels"]["grey_files"] == 1
    grey_store, _ = _load(tmp_path, name="image_folder", path=str(folder), channels=1)
    assert grey_store.sample_shape == (1, 6, 6)


# ---- 6. ~ and $VARIABLES in every path ----------------------------------------------------------------------------

def test_every_path_key_expands_home_and_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ADS_TEST_DATA", str(tmp_path / "data"))
    for value, expected in (("~/{}", tmp_path / "home"), ("$ADS_TEST_DATA/{}", tmp_path / "data"),
                            ("${{oc.env:ADS_TEST_DATA}}/{}", tmp_path / "data")):
        cfg = load_config("nearest_dataset/mnist5k", [f"{key}={value.format(i)}" for i, key in enumerate(PATH_KEYS)])
        for i, key in enumerate(PATH_KEYS):
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) == str(expected / str(i)), key


def test_paths_below_root_follow_an_expanded_root_and_method_paths_expand(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config("nearest_dataset/mnist5k", ["paths.root=~/studio"])
    assert cfg.paths.runs == str(tmp_path / "studio" / "runs") and cfg.paths.cache == str(tmp_path / "studio" / "cache")
    cfg = load_config("unet/mnist5k", ["model.params.checkpoint=~/unet"])
    assert cfg.model.params.checkpoint == str(tmp_path / "unet")


def test_config_files_and_their_defaults_entries_expand_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "base.yaml").write_text("defaults:\n  - nearest_dataset/mnist5k\nsampling:\n  num_samples: 3\n")
    (tmp_path / "top.yaml").write_text("defaults:\n  - ~/base.yaml\nsampling:\n  batch_size: 2\n")
    cfg = load_config("~/top.yaml")
    assert (cfg.sampling.num_samples, cfg.sampling.batch_size) == (3, 2)


def test_an_unset_variable_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("ADS_NOT_SET", raising=False)
    with pytest.raises(StudioError, match="dataset.path=\\$ADS_NOT_SET/faces uses the environment variable ADS_NOT_SET"):
        load_config("nearest_dataset/mnist5k", ["dataset.path=$ADS_NOT_SET/faces"])


def test_celeba_hq_under_home_runs_and_no_folder_named_tilde_appears(monkeypatch, tmp_path, capsys):
    home, work = tmp_path / "home", tmp_path / "work"
    _colour_images(home / "faces", 3, size=8)
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert _ads(["generate", "-c", "nearest_dataset/celeba_hq", *FAST, "dataset.path=~/faces", "dataset.resolution=8",
                 "paths.root=~/studio"]) == 0
    assert (home / "studio" / "runs").is_dir() and not (work / "~").exists()


@pytest.mark.parametrize("name", ["celeba_hq", "afhq", "image_folder", "array", "mnist"])
def test_every_source_expands_home_when_called_without_a_config(monkeypatch, tmp_path, name):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(StudioError) as info:
        _load(tmp_path, name=name, path="~/absent")
    assert str(tmp_path / "absent") in str(info.value) and "~" not in str(info.value)


# ---- 7. torchvision files in a near-miss layout -------------------------------------------------------------------

def _mnist_files(folder: Path, gz: bool = False, names=MNIST_FILES) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(b"x"))
        else:
            (folder / name).write_bytes(b"x")


@pytest.mark.parametrize(("layout", "hint"), [
    (lambda p: _mnist_files(p / "raw"), r"4 of its 4 files are in {p}/raw/: move them into {p}/MNIST/raw/"),
    (lambda p: _mnist_files(p, names=MNIST_FILES[:3]),
     r"3 of its 4 files are in {p}/: move them into {p}/MNIST/raw/ and add the missing t10k-labels-idx1-ubyte"),
    (lambda p: _mnist_files(p / "MNIST" / "raw", gz=True), r"in {p}/MNIST/raw/ \(gzipped\): unpack the .gz files"),
    (lambda p: _mnist_files(p / "data" / "MNIST" / "raw"), r"in {p}/data/MNIST/raw/: set dataset.path={p}/data"),
    (lambda p: _mnist_files(p / "MNIST" / "raw"), r"they are all there but torchvision cannot read them"),
])
def test_mnist_near_miss_layouts_are_recognised(tmp_path, layout, hint):
    root = tmp_path / "mnist"
    layout(root)
    with pytest.raises(StudioError) as info:
        _load(tmp_path, name="mnist", path=str(root))
    message = str(info.value)
    assert f"torchvision reads {root}/MNIST/raw/ holding train-images-idx3-ubyte" in message and "\n" not in message
    assert __import__("re").search(hint.format(p=root), message), message


def test_a_dataset_path_pointing_into_the_layout_names_the_folder_to_use(tmp_path):
    root = tmp_path / "mnist"
    _mnist_files(root / "MNIST" / "raw")
    with pytest.raises(StudioError, match=f"set dataset.path={root}$|set dataset.path={root};"):
        _load(tmp_path, name="mnist", path=str(root / "MNIST" / "raw"))


def test_cifar_layout_is_named(tmp_path):
    with pytest.raises(StudioError, match=r"reads .*/cifar-10-batches-py/ holding data_batch_1, .*batches.meta"):
        _load(tmp_path, name="cifar10", path=str(tmp_path / "nothing"))


# ---- 8. only the studio's own records at INFO ---------------------------------------------------------------------

def test_faiss_loader_lines_do_not_show(tmp_path, monkeypatch, capfd):
    for module in [m for m in sys.modules if m == "faiss" or m.startswith("faiss.")]:
        monkeypatch.delitem(sys.modules, module)  # imported afresh during the run, so its loader logs again
    assert _ads(["generate", *FAST, "dataset.name=array", f"dataset.path={_tiny_array(tmp_path)}",
                 "model.params.backend=faiss"]) == 0
    err = capfd.readouterr().err
    assert "faiss" not in err.lower() and "ModuleNotFoundError" not in err
    assert "run " in err and "finished: 2 samples" in err  # the studio's own INFO records still show


def test_third_party_records_show_from_warning_on_and_everything_with_debug(capsys):
    from analytic_diffusion.cli import _setup_logging

    with fresh_process_logging():
        chatty = logging.getLogger("chatty_library")
        chatty.setLevel(logging.INFO)  # a library that turns its own logger up
        _setup_logging("info")
        chatty.info("loader detail")
        chatty.warning("library warning")
        logging.getLogger("analytic_diffusion").info("studio info")
        _setup_logging("info")  # a second main() in one process replaces the handler, never stacks it
        logging.getLogger("analytic_diffusion").info("once")
        err = capsys.readouterr().err
        assert "loader detail" not in err and "library warning" in err and "studio info" in err
        assert err.count("once") == 1
        _setup_logging("debug")
        chatty.info("loader detail")
        assert "loader detail" in capsys.readouterr().err
    chatty.setLevel(logging.NOTSET)


# ---- 9. third-party failures: one line, before the run directory exists; errors printed once ----------------------

def test_faiss_index_larger_than_the_dataset_is_one_line_before_the_run_directory(tmp_path, capfd, fresh_root):
    code = _ads(["generate", *FAST, "dataset.name=array", f"dataset.path={_tiny_array(tmp_path)}",
                 "model.params.backend=faiss", "model.params.faiss_index=IVF1024,Flat"])
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert _lines(err) == ["error: faiss cannot build index 'IVF1024,Flat' on 30 images: Number of training points "
                           "(30) should be at least as large as number of clusters (1024); use "
                           "model.params.faiss_index=Flat (exact) or fewer clusters (e.g. IVF1,Flat)"]
    assert not (fresh_root / "runs").exists()


def test_faiss_clustering_warning_is_the_studios_not_printed_by_faiss(tmp_path, capfd):
    assert _ads(["generate", *FAST, "dataset.name=array", f"dataset.path={_tiny_array(tmp_path)}",
                 "model.params.backend=faiss", "model.params.faiss_index=IVF4,Flat"]) == 0
    err = capfd.readouterr().err
    assert "WARNING clustering" not in err
    assert "warning: faiss_index=IVF4,Flat has 4 lists for 30 images" in err


def test_bad_faiss_index_string_is_one_line(tmp_path, capfd):
    assert _ads(["generate", *FAST, "dataset.name=array", f"dataset.path={_tiny_array(tmp_path)}",
                 "model.params.backend=faiss", "model.params.faiss_index=IVF4,Bogus"]) == 2
    err = capfd.readouterr().err
    assert "error: faiss cannot parse model.params.faiss_index='IVF4,Bogus'" in err and "Error in" not in err


def test_an_error_after_the_run_directory_exists_is_printed_once(tmp_path, monkeypatch, capfd, fresh_root):
    def full_disk(*args, **kwargs):
        raise StudioError("cannot write grid.png: no space left on device")

    monkeypatch.setattr(generate_module, "save_grid", full_disk)
    assert _ads(["generate", *FAST, "dataset.name=array", f"dataset.path={_tiny_array(tmp_path)}"]) == 2
    err = capfd.readouterr().err
    assert err.count("no space left on device") == 1 and "error: cannot write grid.png" in err
    run_dir = next((fresh_root / "runs").glob("*/*"))
    assert "run failed: StudioError: cannot write grid.png" in (run_dir / "run.log").read_text()
    assert "no space left" in (run_dir / "INCOMPLETE").read_text()


@pytest.mark.parametrize("failure", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nSee documentation for Memory Management"),
    MemoryError("Unable to allocate 9.3 GiB for an array")])
def test_running_out_of_memory_is_one_line_with_what_to_lower(tmp_path, monkeypatch, capfd, fresh_root, failure):
    def exhausted(*args, **kwargs):
        raise failure

    monkeypatch.setattr(generate_module, "build_denoiser", exhausted)
    assert _ads(["generate", *FAST, "dataset.name=array", f"dataset.path={_tiny_array(tmp_path)}"]) == 2
    lines = _lines(capfd.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: out of memory (") and "sampling.batch_size" in lines[0]
    assert not (fresh_root / "runs").exists()


# ---- 2. schedules that start far from pure noise ------------------------------------------------------------------

@pytest.mark.parametrize(("spacing", "steps", "first"), [
    ("leading", 1, 0), ("leading", 2, 500), ("leading", 3, 666), ("linspace", 1, 0)])
def test_schedules_far_from_pure_noise_are_named(spacing, steps, first):
    warning = start_warning(make_scheduler(SchedulerOptions(num_inference_steps=steps, timestep_spacing=spacing)))
    assert warning is not None and f"starts at timestep {first}," in warning
    assert "set sampling.timestep_spacing=trailing to start at timestep 999" in warning


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [4, 10, 50, 1000])
def test_schedules_that_start_near_pure_noise_are_quiet(spacing, steps):
    assert start_warning(make_scheduler(SchedulerOptions(num_inference_steps=steps, timestep_spacing=spacing))) is None
    assert start_warning(make_scheduler(SchedulerOptions(num_inference_steps=1, timestep_spacing="trailing"))) is None


def test_one_leading_step_warns_before_sampling_in_the_summary_and_in_metrics(tmp_path, capsys):
    array = _tiny_array(tmp_path)
    assert _ads(["generate", *FAST[:2], "sampling.num_inference_steps=1", "dataset.name=array", f"dataset.path={array}"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("warning: the schedule (1 step, leading spacing) starts at timestep 0") == 1
    assert "Warning: the schedule (1 step, leading spacing) starts at timestep 0" in captured.out
    run_dir = Path(captured.out.split("Outputs in ")[1].split(":")[0])
    warnings = json.loads((run_dir / "metrics.json").read_text())["warnings"]
    assert len(warnings) == 1 and "sampling.timestep_spacing=trailing" in warnings[0]
    assert _ads(["generate", *FAST, "dataset.name=array", f"dataset.path={array}"]) == 0
    captured = capsys.readouterr()
    assert "arning" not in captured.out and "warning" not in captured.err
