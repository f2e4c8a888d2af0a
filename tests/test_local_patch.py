"""The local patch denoisers (local_score, els circular/broken, pspc) equal a float64 brute force of DESIGN.md §6
read literally, whatever the chunking and batching, and meet the oracles of §6."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.denoisers import NoiseLevel, denoiser_class
from analytic_diffusion.denoisers.optimal import OptimalDenoiser, OptimalParams
from analytic_diffusion.errors import StudioError
from analytic_diffusion.sampling import SchedulerOptions, make_scheduler, noise_level

SCHEDULE = make_scheduler(SchedulerOptions())
LATE, MID, EARLY = (noise_level(SCHEDULE, t) for t in (0, 300, 900))
TOLERANCE = 1e-5


def make_store(channels: int, size: int = 8, count: int = 40, seed: int = 0) -> DatasetStore:
    """Blocky random images (runs of equal pixels, so that windows nearly repeat as in real data)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 256, (count, channels, size // 2 + 1, size // 2 + 1), generator=g, dtype=torch.uint8)
    images = coarse.repeat_interleave(2, -1).repeat_interleave(2, -2)[..., :size, :size]
    noise = torch.randint(0, 16, images.shape, generator=g, dtype=torch.uint8)
    images = images.contiguous() // 2 + noise
    images[..., : size // 2, :] = 0  # a background band: many windows repeat exactly, as in real data
    return DatasetStore.from_tensor(images)


def noisy(store: DatasetStore, level: NoiseLevel, batch: int, seed: int = 1) -> torch.Tensor:
    """x_t from held-out-like images: training images shifted by one pixel, plus noise."""
    g = torch.Generator().manual_seed(seed)
    clean = store.model_space()[:batch].roll(1, -1)
    return level.signal_scale * clean + math.sqrt(level.noise_variance) * torch.randn(clean.shape, generator=g)


# --- the brute force: DESIGN.md §6 read literally, float64, one pixel at a time --------------------------------


def padded(images: torch.Tensor, k: int, circular: bool) -> torch.Tensor:
    """Images [..., C, H, W] padded by r = k // 2 on every side: zeros, or wrapped around."""
    r = k // 2
    if not circular:
        return torch.nn.functional.pad(images, (r, r, r, r))
    rows = torch.arange(-r, images.shape[-2] + r) % images.shape[-2]
    cols = torch.arange(-r, images.shape[-1] + r) % images.shape[-1]
    return images[..., rows, :][..., cols]


def window(image: torch.Tensor, i: int, j: int, k: int, circular: bool) -> torch.Tensor:
    """Q_k(image, (i, j)): the C x k x k window centred at (i, j), zero or circular outside the image."""
    return padded(image.double(), k, circular)[..., i : i + k, j : j + k]


def posterior(query: torch.Tensor, patches: torch.Tensor, values: torch.Tensor, level: NoiseLevel, tau: float = 1.0):
    """softmax(-||q - sqrt(a) phi||^2 / (2 (1 - a) tau)) averaged values, from differences; q [B, D], phi [M, D]."""
    distances = (query[:, None, :] - level.signal_scale * patches[None]).square().sum(-1)
    weights = torch.softmax(-distances / (2 * level.noise_variance * tau), 1)
    return weights @ values, 1 / weights.square().sum(1)


def brute_local(x_t, images, level, k, rule):
    """LS / ELS (circular or broken) per DESIGN.md §6. rule(i, j) -> (query circular?, list of (i', j') centres)."""
    batch, channels, height, width = x_t.shape
    out = torch.zeros(x_t.shape, dtype=torch.float64)
    effective = torch.zeros(batch, dtype=torch.float64)
    training = padded(images, k, circular=False)
    for i in range(height):
        for j in range(width):
            circular, centres = rule(i, j)
            patches = torch.stack([training[:, :, a : a + k, b : b + k] for a, b in centres], 1).flatten(2).flatten(0, 1)
            values = torch.stack([images[:, :, a, b] for a, b in centres], 1).flatten(0, 1)
            queries = window(x_t, i, j, k, circular).flatten(1)
            out[:, :, i, j], count = posterior(queries, patches, values, level)
            effective += count / (height * width)
    return out, effective


def ls_rule(k, height, width):
    return lambda i, j: (False, [(i, j)])


def els_circular_rule(k, height, width):
    r = k // 2
    inside = [(a, b) for a in range(r, height - r) for b in range(r, width - r)]
    return lambda i, j: (True, inside)


def els_broken_rule(k, height, width):
    r = k // 2

    def rule(i, j):
        near = {"top": i < r, "bottom": i > height - 1 - r, "left": j < r, "right": j > width - 1 - r}
        count = sum(near.values())
        if count == 0:
            return False, [(a, b) for a in range(r, height - r) for b in range(r, width - r)]
        if count >= 2:
            return False, [(i, j)]
        if near["top"] or near["bottom"]:  # same distance from that edge, anywhere along it
            return False, [(i, b) for b in range(r, width - r)]
        return False, [(a, j) for a in range(r, height - r)]

    return rule


def brute_pspc(x_t, images, level, p):
    batch, channels, height, width = x_t.shape
    total = torch.zeros(x_t.shape, dtype=torch.float64)
    cover = torch.zeros(height, width, dtype=torch.float64)
    for a in range(height - p + 1):
        for b in range(width - p + 1):
            squares = images[:, :, a : a + p, b : b + p].flatten(1)
            mean, _ = posterior(x_t[:, :, a : a + p, b : b + p].double().flatten(1), squares, squares, level)
            total[:, :, a : a + p, b : b + p] += mean.reshape(batch, channels, p, p)
            cover[a : a + p, b : b + p] += 1
    return total / cover


RULES = {"local_score": ls_rule, "els": els_circular_rule, "broken": els_broken_rule}


def method(name: str, store: DatasetStore, **params):
    if name == "broken":
        name, params = "els", {**params, "boundary": "broken"}
    cls = denoiser_class(name)
    return cls(cls.Params(**params)).fit(store)


# --- equality with the brute force ------------------------------------------------------------------------------

CASES = [  # (method, channels, k, batch, level)
    ("local_score", 1, 1, 5, MID), ("local_score", 1, 3, 1, LATE), ("local_score", 3, 7, 5, EARLY),
    ("local_score", 1, 9, 5, MID), ("local_score", 3, 3, 1, MID),
    ("els", 1, 1, 5, MID), ("els", 1, 3, 5, LATE), ("els", 3, 3, 1, EARLY), ("els", 1, 7, 5, MID),
    ("els", 3, 5, 5, MID),
    ("broken", 1, 3, 5, MID), ("broken", 3, 3, 5, LATE), ("broken", 1, 5, 1, EARLY), ("broken", 1, 7, 5, MID),
    ("broken", 3, 9, 1, MID),
]


@pytest.mark.parametrize("name,channels,k,batch,level", CASES)
def test_local_methods_equal_brute_force(name, channels, k, batch, level):
    store = make_store(channels)
    x_t = noisy(store, level, batch)
    images = store.model_space(dtype=torch.float64)
    expected, effective = brute_local(x_t, images, level, k, RULES[name](k, 8, 8))
    out = method(name, store, patch_size=k)(x_t, level)
    assert out.x0_hat.shape == x_t.shape and out.x0_hat.dtype == x_t.dtype
    assert (out.x0_hat.double() - expected).abs().max().item() < TOLERANCE
    assert out.diagnostics["patch_size"].tolist() == [k] * batch
    torch.testing.assert_close(out.diagnostics["effective_patches"].double(), effective, rtol=1e-4, atol=1e-6)


def test_els_at_patch_size_equal_to_an_odd_image_size():
    """k = H exactly (7 x 7 images): the circular dictionary is the whole images, the broken machine is LS."""
    store = make_store(1, size=7, count=30)
    x_t = noisy(store, MID, 3)
    images = store.model_space(dtype=torch.float64)
    for name in ("els", "broken", "local_score"):
        expected, _ = brute_local(x_t, images, MID, 7, RULES[name](7, 7, 7))
        out = method(name, store, patch_size=7)(x_t, MID)
        assert (out.x0_hat.double() - expected).abs().max().item() < TOLERANCE, name


@pytest.mark.parametrize("channels,p,batch,level", [(1, 1, 5, MID), (1, 3, 5, LATE), (3, 4, 1, EARLY),
                                                    (3, 7, 5, MID), (1, 8, 1, MID)])
def test_pspc_equals_brute_force(channels, p, batch, level):
    store = make_store(channels)
    x_t = noisy(store, level, batch)
    expected = brute_pspc(x_t, store.model_space(dtype=torch.float64), level, p)
    out = method("pspc", store, patch_size=p)(x_t, level)
    assert (out.x0_hat.double() - expected).abs().max().item() < TOLERANCE


# --- invariances ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,k", [("local_score", 3), ("els", 3), ("broken", 5), ("pspc", 4)])
def test_results_do_not_depend_on_chunk_size(name, k):
    store = make_store(3, count=50)
    x_t = noisy(store, MID, 5)
    outs = [method(name, store, patch_size=k, chunk_size=c)(x_t, MID).x0_hat for c in (1, 7, None)]
    for out in outs[1:]:
        assert (out - outs[0]).abs().max().item() < 5e-6  # float32 rounding of the rescaling only


@pytest.mark.parametrize("name,k,level", [("local_score", 3, MID), ("els", 3, LATE), ("broken", 5, MID),
                                          ("pspc", 4, EARLY)])
def test_each_sample_is_bit_identical_whatever_its_batch(name, k, level):
    store = make_store(1, count=50)
    x_t = noisy(store, level, 5)
    denoiser = method(name, store, patch_size=k)
    together = denoiser(x_t, level)
    for n in range(5):
        alone = denoiser(x_t[n : n + 1], level)
        assert torch.equal(alone.x0_hat[0], together.x0_hat[n])
        assert torch.equal(alone.diagnostics["effective_patches"][0], together.diagnostics["effective_patches"][n])


# --- oracles (DESIGN.md §6) -------------------------------------------------------------------------------------


def optimal(store, x_t, level):
    return OptimalDenoiser(OptimalParams()).fit(store)(x_t, level).x0_hat


@pytest.mark.parametrize("channels,level", [(1, MID), (3, LATE), (1, EARLY)])
def test_ls_with_a_window_covering_the_image_and_pspc_of_the_whole_image_are_optimal(channels, level):
    store = make_store(channels)
    x_t = noisy(store, level, 4)
    expected = optimal(store, x_t, level)
    for out in (method("local_score", store, patch_size=15)(x_t, level),
                method("local_score", store, patch_size=17)(x_t, level),
                method("pspc", store, patch_size=8)(x_t, level)):
        assert (out.x0_hat - expected).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("channels", [1, 3])
def test_els_with_one_pixel_patches_is_the_per_pixel_value_posterior(channels):
    store = make_store(channels)
    x_t = noisy(store, MID, 3)
    values = store.model_space(dtype=torch.float64).permute(0, 2, 3, 1).reshape(-1, channels)  # every pixel value
    pixels = x_t.double().permute(0, 2, 3, 1).reshape(-1, channels)
    logits = -torch.cdist(pixels, MID.signal_scale * values).square() / (2 * MID.noise_variance)
    expected = (torch.softmax(logits, 1) @ values).reshape(3, 8, 8, channels).permute(0, 3, 1, 2)
    for boundary in ("circular", "broken"):
        out = method("els", store, patch_size=1, boundary=boundary)(x_t, MID)
        assert (out.x0_hat.double() - expected).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("k,level", [(9, MID), (11, LATE)])
def test_broken_els_with_patches_as_large_as_the_image_is_ls(k, level):
    store = make_store(3)
    x_t = noisy(store, level, 3)
    broken = method("broken", store, patch_size=k)(x_t, level).x0_hat
    local = method("local_score", store, patch_size=k)(x_t, level).x0_hat
    assert (broken - local).abs().max().item() < TOLERANCE


def test_one_image_dataset_returns_that_image():
    """LS, broken ELS near the corners and PSPC have one candidate per query: the image itself."""
    store = make_store(1, count=1)
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    image = store.model_space().expand(2, -1, -1, -1)
    for name, k in (("local_score", 3), ("pspc", 3), ("broken", 9)):
        torch.testing.assert_close(method(name, store, patch_size=k)(x_t, MID).x0_hat, image)


@pytest.mark.parametrize("k,level", [(3, LATE), (5, MID), (5, EARLY)])
def test_pspc_stays_in_the_data_range(k, level):
    """x0_hat is a convex combination of training values in [-1, 1]: the float32 sum of the square means over the
    squares covering a pixel made the band that is -1 in every image -1.0000001."""
    store = make_store(1)
    x0_hat = method("pspc", store, patch_size=k)(noisy(store, level, 4), level).x0_hat
    assert x0_hat.min().item() >= -1.0 and x0_hat.max().item() <= 1.0
    torch.testing.assert_close(x0_hat[..., :4, :], torch.full_like(x0_hat[..., :4, :], -1.0), rtol=0, atol=2e-7)


# --- patch sizes per step, top patches and errors --------------------------------------------------------------


def test_patch_size_per_step_from_a_list_and_a_calibration_file(tmp_path):
    store = make_store(1)
    timesteps = SCHEDULE.timesteps.tolist()
    sizes = [1, 1, 3, 3, 3, 5, 5, 5, 7, 7]
    listed = method("els", store, patch_size=sizes)
    with pytest.raises(StudioError, match="use_schedule"):
        listed(noisy(store, MID, 1), MID)
    listed.use_schedule(timesteps)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"timesteps": timesteps, "patch_size": sizes}))
    calibrated = method("els", store, patch_size=str(path))
    fixed = method("els", store, patch_size=5)
    x_t = noisy(store, noise_level(SCHEDULE, 400), 2)
    level = noise_level(SCHEDULE, 400)
    assert listed(x_t, level).diagnostics["patch_size"].tolist() == [5, 5]
    assert torch.equal(listed(x_t, level).x0_hat, fixed(x_t, level).x0_hat)
    assert torch.equal(calibrated(x_t, level).x0_hat, fixed(x_t, level).x0_hat)
    with pytest.raises(StudioError, match="one size per step"):
        calibrated.Params(patch_size=[3, 5]).sizes_for(timesteps)
    with pytest.raises(StudioError, match="sampling visits"):
        calibrated.Params(patch_size=str(path)).sizes_for(make_scheduler(SchedulerOptions(num_inference_steps=20)).timesteps.tolist())


def test_a_calibration_for_another_method_or_dataset_is_used_with_one_warning(tmp_path, caplog):
    timesteps = SCHEDULE.timesteps.tolist()
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"method": "els", "dataset": "memory", "checkpoint": "unet.pt",
                                "timesteps": timesteps, "patch_size": [3] * len(timesteps)}))
    store = make_store(1)  # named "memory"
    caplog.set_level(logging.WARNING, logger="analytic_diffusion")
    method("els", store, patch_size=str(path))
    assert caplog.records == []
    method("pspc", store, patch_size=str(path))
    (record,) = caplog.records
    assert f"{path} was calibrated for els on memory against unet.pt, used here for pspc on memory" in record.message
    caplog.clear()
    other = DatasetStore.from_tensor(store.images, name="cifar10")
    assert method("els", other, patch_size=str(path)).timestep_sizes == dict.fromkeys(timesteps, 3)  # still used
    (record,) = caplog.records
    assert "calibrated for els on memory against unet.pt, used here for els on cifar10" in record.message


def test_top_patch_is_the_window_of_largest_weight():
    store = make_store(1)
    images = store.model_space(dtype=torch.float64)
    x_t = noisy(store, LATE, 2)
    denoiser = method("els", store, patch_size=3)
    pixels = torch.tensor([9, 27, 0])  # interior pixels and a (circular) corner
    top = denoiser.top_patches(x_t, LATE, pixels)
    for n in range(2):
        for col, pixel in enumerate(pixels.tolist()):
            query = window(x_t[n], pixel // 8, pixel % 8, 3, circular=True)
            centres = [(a, b) for a in range(1, 7) for b in range(1, 7)]
            distances = torch.tensor([(query - LATE.signal_scale * window(y, a, b, 3, False)).square().sum().item()
                                      for y in images for a, b in centres])
            best = int(distances.argmin())
            image, (a, b) = best // len(centres), centres[best % len(centres)]
            assert top["image"][n, col].item() == image
            assert top["position"][n, col].item() == a * 8 + b
            torch.testing.assert_close(top["window"][n, col].double(), window(images[image], a, b, 3, False))


def test_top_patch_of_pixels_that_share_one_query_location():
    """PSPC with P = H has one square for every pixel: each asked pixel gets the image nearest to the whole x_t
    (repeated locations once filled only their first column, the others held uninitialised memory)."""
    store = make_store(1)
    images = store.model_space(dtype=torch.float64)
    x_t = noisy(store, LATE, 2)
    denoiser = method("pspc", store, patch_size=8)
    pixels = torch.tensor([denoiser.pixel_location(p // 8, p % 8, 8) for p in (0, 9, 63)])
    top = denoiser.top_patches(x_t, LATE, pixels)
    for n in range(2):
        nearest = int((x_t[n].double() - LATE.signal_scale * images).flatten(1).square().sum(1).argmin())
        assert top["image"][n].tolist() == [nearest] * 3 and top["position"][n].tolist() == [0] * 3
        torch.testing.assert_close(top["window"][n, 2].double(), images[nearest])


@pytest.mark.parametrize("name,params,message", [
    ("els", {"patch_size": 4}, "odd positive integer"),
    ("local_score", {"patch_size": [3, 0]}, "odd positive integer"),
    ("els", {"boundary": "circle"}, "did you mean 'circular'"),
    ("pspc", {"patch_size": 0}, "positive integer"),
    ("els", {"temperature": 0}, "temperature"),
    ("els", {"patch_size": "/nonexistent/calibration.json"}, "no calibration file"),
])
def test_bad_parameters_are_refused(name, params, message):
    with pytest.raises(StudioError, match=message):
        denoiser_class(name).Params(**params)


def test_impossible_sizes_are_refused(tmp_path):
    store = make_store(1)
    with pytest.raises(StudioError, match="boundary=broken"):
        method("els", store, patch_size=9)(noisy(store, MID, 1), MID)
    with pytest.raises(StudioError, match="image size"):
        method("pspc", store, patch_size=9)(noisy(store, MID, 1), MID)
    corrupt = tmp_path / "calibration.json"
    corrupt.write_text("{not json")
    with pytest.raises(StudioError, match="not a calibration file"):
        denoiser_class("els").Params(patch_size=str(corrupt))


@pytest.mark.parametrize("name", ["els", "broken"])
def test_repeated_windows_are_merged_and_change_nothing(name, monkeypatch):
    """Shared dictionaries keep each distinct window once with its count; the answer equals streaming every copy."""
    import analytic_diffusion.denoisers.local_patch as local_patch

    store = make_store(1, count=30)
    x_t = noisy(store, MID, 3)
    merged = method(name, store, patch_size=3)
    interior = merged.cached_plan(3).groups[0]
    assert interior.unique is not None and interior.unique.counts.sum().item() == 30 * 6 * 6
    assert interior.unique.windows.shape[0] < 0.9 * 30 * 6 * 6
    monkeypatch.setattr(local_patch, "DISTINCT_BYTES", 0)  # too little room: every copy is streamed
    every_copy = method(name, store, patch_size=3)
    assert every_copy.cached_plan(3).groups[0].unique is None
    a, b = merged(x_t, MID), every_copy(x_t, MID)
    assert (a.x0_hat - b.x0_hat).abs().max().item() < 1e-6
    torch.testing.assert_close(a.diagnostics["effective_patches"], b.diagnostics["effective_patches"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("k", [1, 3, 5, 7, 9])
def test_distinct_window_keys_count_the_distinct_windows(channels, k):
    """The integer keys of the quick pre-check count exactly the distinct windows of the unfold (equal windows,
    padding included, share a key; different ones here never collide), on images with many repeated windows
    (two grey levels) and on noise (every window distinct), at the interior's and at every position."""
    from analytic_diffusion.search.patch_softmax import WindowSpec, distinct_window_keys

    generator = torch.Generator().manual_seed(k)
    flat = torch.randint(0, 2, (12, channels, 8, 8), generator=generator).to(torch.uint8) * 255
    noise = torch.randint(0, 256, (12, channels, 8, 8), generator=generator).to(torch.uint8)
    window = WindowSpec((k, k), k // 2, "centre")
    grid = torch.arange(64)
    inside = torch.tensor([i * 8 + j for i in range(k // 2, 8 - k // 2) for j in range(k // 2, 8 - k // 2)],
                          dtype=torch.long)
    for images in (flat, noise):
        unfolded = torch.nn.functional.unfold(images.double() + 1, k, padding=k // 2)  # padding 0: no pixel + 1
        for positions in (inside, grid) if inside.numel() else (grid,):
            rows = unfolded[:, :, positions].transpose(1, 2).reshape(-1, channels * k * k)
            keys, total = distinct_window_keys(images, window, positions[None], (channels, 8, 8))
            assert (keys, total) == (torch.unique(rows, dim=0).shape[0], rows.shape[0])


def test_distinct_windows_operands_kept_between_steps_give_the_bits_of_fresh_ones():
    """The float32 operands of the distinct windows are built once per patch size and their bias row rewritten at
    every step: a step after another one (another bias scale) gives the bits a fresh denoiser gives."""
    store = make_store(1, count=30)
    x_t = noisy(store, MID, 2)
    used = method("els", store, patch_size=3)
    assert used.cached_plan(3).groups[0].unique is not None
    used(x_t, EARLY)
    assert used.cached_plan(3).groups[0].unique.operands  # kept from the first step
    again, fresh = used(x_t, MID), method("els", store, patch_size=3)(x_t, MID)
    assert torch.equal(again.x0_hat, fresh.x0_hat)
    assert torch.equal(again.diagnostics["effective_patches"], fresh.diagnostics["effective_patches"])


def test_window_sums_by_doubling_equal_direct_sums():
    """The aligned path's sliding sums (k = 1, powers of two, and sums of several powers such as 25 = 16 + 8 + 1)."""
    from analytic_diffusion.search.patch_softmax import window_sums

    z = torch.randn(3, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for size in (1, 2, 3, 4, 7, 8, 13, 25, 30):
        expected = torch.stack([z[:, i : i + size].sum(1) for i in range(30 - size + 1)], 1)
        torch.testing.assert_close(window_sums(z, size, 1), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,k,level", [("local_score", 3, LATE), ("pspc", 3, MID), ("broken", 9, MID)])
def test_aligned_path_split_into_sample_blocks_is_bit_identical(name, k, level, monkeypatch):
    """The aligned path batches samples in blocks within BUDGET_BYTES; blocks of 2, 2 and 1 samples give each
    sample the bits it gets alone (every operation is elementwise or a halving sum over the images)."""
    import analytic_diffusion.search.patch_softmax as patch_softmax

    store = make_store(1, count=50)
    x_t = noisy(store, level, 5)
    denoiser = method(name, store, patch_size=k)
    monkeypatch.setattr(patch_softmax, "aligned_chunk_images", lambda *args: 100)  # chunks of 50, 2 samples
    together = denoiser(x_t, level)
    for n in range(5):
        alone = denoiser(x_t[n : n + 1], level)
        assert torch.equal(alone.x0_hat[0], together.x0_hat[n])
        assert torch.equal(alone.diagnostics["effective_patches"][0], together.diagnostics["effective_patches"][n])


def test_halving_sum_is_the_sum_and_ignores_the_other_dimensions():
    from analytic_diffusion.search.patch_softmax import halving_sum

    z = torch.randn(37, 6, 11, generator=torch.Generator().manual_seed(0))
    total = halving_sum(z)
    torch.testing.assert_close(total.double(), z.double().sum(0), rtol=0, atol=1e-5)
    for b in range(6):
        assert torch.equal(halving_sum(z[:, b].contiguous()), total[b])
    assert torch.equal(halving_sum(z[:1]), z[0])


def test_box_sums_on_flattened_rows_equal_direct_sums():
    """Window sums along the flattened rows (shifts of 1 and of W); the sums that wrap around a row end are dropped."""
    from analytic_diffusion.search.patch_softmax import box_sums

    z = torch.randn(2, 3, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for kh, kw in ((1, 1), (3, 3), (2, 5), (9, 4), (4, 11)):
        rows = [[z[..., i : i + kh, j : j + kw].sum((-2, -1)) for j in range(11 - kw + 1)] for i in range(9 - kh + 1)]
        expected = torch.stack([torch.stack(row, -1) for row in rows], -2)
        torch.testing.assert_close(box_sums(z, (kh, kw)), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [3, 5])
def test_top_patch_of_broken_els_at_edges_and_corners_is_the_window_of_largest_weight(k):
    """Boundary-broken ELS draws an edge pixel's windows from the same distance to that edge (zero-padded), a corner
    pixel's from its own position: the figure's top window is the brute force's nearest one among exactly those."""
    store = make_store(1)
    images = store.model_space(dtype=torch.float64)
    x_t = noisy(store, LATE, 2)
    denoiser = method("broken", store, patch_size=k)
    rule = els_broken_rule(k, 8, 8)
    pixels = torch.tensor([0, 7, 1, 8, 15, 56, 62, 36])  # corners, edges (top, left, right, bottom), interior
    training = padded(images, k, circular=False)
    top = denoiser.top_patches(x_t, LATE, pixels)
    for n in range(2):
        for col, pixel in enumerate(pixels.tolist()):
            i, j = divmod(pixel, 8)
            circular, centres = rule(i, j)
            query = window(x_t[n], i, j, k, circular).flatten()
            patches = torch.stack([training[:, :, a : a + k, b : b + k] for a, b in centres], 1).flatten(2)
            best = int((query - LATE.signal_scale * patches).square().sum(-1).flatten().argmin())
            image, (a, b) = best // len(centres), centres[best % len(centres)]
            assert (top["image"][n, col].item(), top["position"][n, col].item()) == (image, a * 8 + b), (n, pixel)
            torch.testing.assert_close(top["window"][n, col].double(), window(images[image], a, b, k, False))


@pytest.mark.parametrize("channels,size,k", [(1, 8, 3), (3, 8, 5), (1, 28, 21), (3, 8, 7), (1, 8, 1), (3, 7, 7)])
def test_windows_from_strided_views_equal_the_unfold_at_those_positions(channels, size, k):
    """`gather_windows` copies the windows of a padded chunk through strided views (`window_strips`): bit for bit
    the columns of F.unfold at the positions, image-major, for the ELS interior (circular and broken), the edge
    lines of broken ELS, irregular position lists (a random one, one in reverse order: pieces of one window), a
    chunk that is a slice of a larger padded tensor, and the centre values (size 1 x 1, shifted)."""
    from analytic_diffusion.denoisers.els import broken_groups
    from analytic_diffusion.search.patch_softmax import WindowSpec, gather_windows, window_strips

    r = k // 2
    spec = WindowSpec((k, k), r)
    images = torch.randn(9, channels, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    grid = size * size  # odd k, padding r: one window per pixel
    inside = torch.tensor([[i * size + j for i in range(r, size - r) for j in range(r, size - r)]])
    position_lists = [g.positions for g in broken_groups(size, size, r) if not g.aligned] + [
        inside, torch.randint(0, grid, (3, 5), generator=torch.Generator().manual_seed(1)),
        torch.arange(grid).flip(0).reshape(size, size)]
    chunk = torch.nn.functional.pad(images, (r,) * 4)[2:7]  # a chunk not at the start of its storage
    unfolded = torch.nn.functional.unfold(images[2:7], k, padding=r)  # [K, D, P]
    depth = channels * k * k
    for positions in position_lists:
        if not positions.numel():
            continue
        runs, span = positions.shape
        expected = unfolded[:, :, positions].permute(2, 1, 0, 3).reshape(runs, depth, 5 * span)
        out = torch.full((runs, depth + 1, 5 * span), math.nan, dtype=torch.float64)
        strips = window_strips(positions, spec, images.shape[1:])
        assert torch.equal(gather_windows(chunk, strips, span, (k, k), out)[:, :depth], expected)
        assert out[:, depth].isnan().all()  # the bias row is left to the caller
        centres = images[2:7].flatten(2)[:, :, positions].permute(2, 1, 0, 3).reshape(runs, channels, 5 * span)
        values = torch.full((runs, channels, 5 * span), math.nan, dtype=torch.float64)
        shift = r * (size + 2 * r) + r
        assert torch.equal(gather_windows(chunk, strips, span, (1, 1), values, shift), centres)
    assert len(window_strips(inside, spec, images.shape[1:])) == 1  # the interior: one strided copy
