"""The typed schema of a run's configuration: every valid key, its type and its default, defined once.

Method hyper-parameters (`model.params`) are checked against the chosen method's own `Params` dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..sampling import SchedulerOptions
from ..unet.training import TrainingConfig


@dataclass
class ExperimentConfig:
    name: str = "default"  # groups runs: <paths.runs>/<name>/
    run_name: Optional[str] = None  # None = <method>_<dataset>
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    append_timestamp: bool = True  # add _YYYYmmdd-HHMMSS so runs never overwrite each other


@dataclass
class PathsConfig:
    root: str = "${oc.env:ADS_ROOT,studio}"  # everything below lives here unless set on its own
    datasets: str = "${.root}/datasets"
    cache: str = "${.root}/cache"
    runs: str = "${.root}/runs"


@dataclass
class DatasetConfig:
    name: str = "mnist5k"
    split: str = "train"
    download: bool = False  # torchvision sets only; never implicit
    path: Optional[str] = None  # folder or file for image_folder / array; overrides the default location of others
    batch_size: int = 256  # images decoded per batch when the store is built
    num_workers: int = 0  # decoding processes
    subset_size: Optional[int] = None  # first N images; None = all
    resolution: Optional[int] = None  # square side in pixels; None = native
    channels: Optional[int] = None  # 1 or 3; None = native (folders: colour if any file is colour)
    background: str = "white"  # transparent pixels are composited onto this colour: white, black, #rrggbb, ...


@dataclass
class ModelConfig:
    name: str = "nearest_dataset"
    params: Any = field(default_factory=dict)  # checked against the method's Params dataclass


@dataclass
class SamplingConfig(SchedulerOptions):
    num_samples: int = 16
    batch_size: int = 16
    per_sample_seeds: bool = False  # True: sample i gets its own generator, results independent of batch size


@dataclass
class OutputConfig:
    images: bool = True  # images/sample_0000.png ...
    grid: bool = True  # grid.png
    intermediates: bool = False  # intermediates/: x_t and x0_hat per step as image strips, and trajectory.pt
    tensors: bool = True  # samples.pt: final samples in model space
    masks: bool = True  # masks.png for methods with locality masks (pca_locality): a few pixels x timesteps
    patches: bool = True  # patches.png for local patch methods (local_score, els, pspc): top training patch per pixel
    grid_columns: Optional[int] = None  # None = about square


@dataclass
class LoggingConfig:
    level: str = "info"  # debug | info | warning
    wandb: bool = False  # Weights & Biases, never required
    wandb_mode: str = "offline"  # offline | online
    wandb_project: str = "analytic-diffusion-studio"


@dataclass
class BaselineConfig:
    checkpoint: Optional[str] = None  # a trained network to compare with (docs/backbones.md: DDPM-UNet file, pytorch-ddpm
    # checkpoint, diffusers folder, `ads train-unet` output); None = no comparison
    use_ema: bool = True  # EMA weights where the file has both (studio, pytorch-ddpm); False: the raw ones
    eta: Optional[float] = None  # DDIM eta of the baseline's own trajectory; None = the run's sampling.eta


@dataclass
class CalibrationConfig:
    num_seeds: int = 16  # trajectories of the network the patch size is fitted along
    candidates: Optional[list[int]] = None  # patch sizes tried; None = 3, 5, ..., up to the image size


@dataclass
class MemorizationConfig:
    threshold: float = 1 / 3  # memorized when d1 / d2 < threshold (Gu et al., arXiv 2310.02664); generate uses it too
    num_neighbors: int = 5  # ads memorization: nearest training images shown beside each sample in neighbours.png
    figure_samples: int = 16  # ads memorization: samples (the first ones) shown in neighbours.png
    reference: str = "auto"  # held-out real images: auto (test split if the dataset has one) | test | leave_one_out
    reference_size: int = 1000  # held-out (or left-out) real images analysed, evenly spaced over the set


@dataclass
class TrainingSection(TrainingConfig):
    output_dir: str = "${paths.root}/unet/${experiment.name}"  # `ads train-unet` writes and resumes checkpoint.pt here


@dataclass
class DistributedConfig:
    strategy: str = "samples"  # under torchrun: samples (split the samples) | dataset (one store shard per rank)
    timeout_seconds: float = 300.0  # a collective waiting longer for a peer fails the run (the failure bound)


@dataclass
class StudioConfig:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)  # generate: compare the method with a UNet
    training: TrainingSection = field(default_factory=TrainingSection)  # train-unet only
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)  # calibrate only
    memorization: MemorizationConfig = field(default_factory=MemorizationConfig)  # memorization and generate
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # under torchrun only
