"""Device handling that a CPU can check: the float32 precision guard of the exact kernels (TF32 / bfloat16 modes
set globally by a user's script must not leak into them, and must not break them) and device arguments honoured."""

from __future__ import annotations

import pytest
import torch

from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.denoisers.base import Denoised, Denoiser, NoiseLevel
from analytic_diffusion.devices import _precision_flags, full_precision, reduced_precision_matmul
from analytic_diffusion.search.knn import KnnIndex

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture(autouse=True)
def _restore_precision_flags():
    """Every test here changes process-global switches; put them back as they were (through the API that can read
    them whatever was used before)."""
    flags = _precision_flags()
    saved = [flag.fp32_precision for flag in flags]
    legacy = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    default = getattr(torch.backends, "fp32_precision", None)
    yield
    if default is not None:
        torch.backends.fp32_precision = default
    torch.set_float32_matmul_precision(legacy[0])  # the legacy string first: it also sets the flags below
    torch.backends.cudnn.allow_tf32 = legacy[1]
    for flag, value in zip(flags, saved):
        flag.fp32_precision = value


def _set_legacy_high() -> None:
    torch.set_float32_matmul_precision("high")


def _set_legacy_allow_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = True


def _set_new_api_tf32() -> None:
    if not _precision_flags():
        pytest.skip("this torch has no fp32_precision flags")
    torch.backends.cuda.matmul.fp32_precision = "tf32"


SETTERS = [_set_legacy_high, _set_legacy_allow_tf32, _set_new_api_tf32]


@pytest.mark.parametrize("setter", SETTERS)
def test_full_precision_turns_tf32_off_inside_and_restores_it(setter):
    setter()
    before = [flag.fp32_precision for flag in _precision_flags()]
    assert reduced_precision_matmul(CUDA)
    with full_precision():
        assert not reduced_precision_matmul(CUDA) and not reduced_precision_matmul(CPU)
    assert reduced_precision_matmul(CUDA)
    assert [flag.fp32_precision for flag in _precision_flags()] == before


def test_full_precision_restores_after_an_exception():
    _set_legacy_high()
    with pytest.raises(ValueError), full_precision():
        raise ValueError("inside")
    assert reduced_precision_matmul(CUDA)


def test_legacy_getters_still_work_after_the_guard():
    """A script that uses only the legacy switches can read them after a kernel ran under the guard."""
    _set_legacy_allow_tf32()
    with full_precision():
        pass
    assert torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"


class _Probe(Denoiser):
    """Records whether reduced-precision products were allowed while it denoised."""

    def denoise(self, x_t, level, noise=None):
        self.seen = reduced_precision_matmul(CUDA)
        return Denoised(x_t)


class _LooseProbe(_Probe):
    exact_float32 = False


def test_denoisers_run_in_full_precision_unless_they_opt_out():
    _set_legacy_high()
    x_t, level = torch.zeros(1, 1, 2, 2), NoiseLevel(500, 0.5)
    exact, loose = _Probe(), _LooseProbe()
    exact(x_t, level)
    loose(x_t, level)
    assert exact.seen is False and loose.seen is True


@pytest.mark.parametrize("setter", SETTERS)
def test_float_scorer_search_under_global_tf32_settings(setter):
    """A float store uses the float scorer on the CPU too. Under the new API the legacy getter used to raise inside
    KnnIndex; and an index built while TF32 was on kept its loose bound (2^-8 input rounding) for every later search.
    The bound now belongs to the search, which runs in full precision: identical to an index built with TF32 off."""
    generator = torch.Generator().manual_seed(0)
    store = DatasetStore.from_tensor(torch.rand(300, 1, 6, 6, generator=generator) * 2 - 1)
    queries = torch.rand(7, 1, 6, 6, generator=generator) * 2 - 1
    plain = KnnIndex(store, scorer="float")
    setter()
    index = KnnIndex(store, scorer="float")
    found = index.search(queries, k=3)
    flat = queries.reshape(7, -1).double()
    distances = torch.cdist(flat, store.images.reshape(300, -1).double())
    assert torch.equal(found.indices, distances.topk(3, largest=False).indices)
    x = flat.to(torch.float64)
    with full_precision():
        assert torch.equal(index.scorer.prepare(x).error, plain.scorer.prepare(x).error)


def test_store_from_tensor_takes_images_that_require_grad():
    """from_tensor copies its images to host memory (a CUDA tensor or one in an autograd graph is accepted)."""
    images = (torch.rand(4, 1, 3, 3) * 2 - 1).requires_grad_()
    store = DatasetStore.from_tensor(images)
    assert store.images.device.type == "cpu" and not store.images.requires_grad
    assert torch.equal(store.images, images.detach())
