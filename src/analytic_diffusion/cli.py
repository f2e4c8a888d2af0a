"""The `ads` command line: a thin layer over config loading and the jobs.

Every StudioError becomes one line on stderr and exit status 2. No run directory is created before the config,
the dataset and any checkpoint path have been checked; a failure after that leaves the run marked INCOMPLETE.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import StudioError

DEFAULT_CONFIG = "nearest_dataset/mnist5k"
DEFAULT_TRAINING_CONFIG = "unet_train/mnist5k_small"


def _config_arguments(parser: argparse.ArgumentParser, default: str = DEFAULT_CONFIG) -> None:
    parser.add_argument("-c", "--config", default=default,
                        help=f"config under configs/ (e.g. optimal/cifar10) or a YAML path (default: {default})")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. sampling.num_samples=16 experiment.device=cpu")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ads", description="Analytic Diffusion Studio: sample closed-form diffusion denoisers.")
    commands = parser.add_subparsers(dest="command", required=True)
    _config_arguments(commands.add_parser("generate", help="sample images with a method and write a run directory"))
    _config_arguments(commands.add_parser("config", help="print the resolved config without running anything"))
    _config_arguments(commands.add_parser("train-unet", help="train the UNet baseline (rerun to resume)"),
                      DEFAULT_TRAINING_CONFIG)
    analysis = commands.add_parser(
        "memorization", help="which training images samples copy: d1, d2, d1/d2 and neighbour figures")
    analysis.add_argument("images", help="a run directory, a sweep folder, a folder of images or a .pt/.npy/.npz "
                                         "tensor (uint8 pixels or model-space floats)")
    analysis.add_argument("-c", "--config", default=None,
                          help="config whose dataset is the training set (default: the run's own config.yaml, "
                               f"else {DEFAULT_CONFIG})")
    analysis.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. memorization.reference_size=500")
    commands.add_parser("list", help="list methods, datasets and configs")
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(message)s", stream=sys.stderr)
    logging.getLogger("analytic_diffusion").setLevel(level.upper())


def _run(args: argparse.Namespace) -> None:
    from .config import available_configs, load_config, to_yaml

    if args.command == "list":
        from .data import DATASETS
        from .denoisers import DENOISERS, load_all

        load_all()
        print("methods: " + ", ".join(sorted(DENOISERS)))
        print("datasets: " + ", ".join(sorted(DATASETS)))
        print("configs: " + ", ".join(available_configs()))
        return
    if args.command == "memorization":
        from .memorization import memorization, summary

        _setup_logging("info")
        print(summary(memorization(args.images, args.config, args.overrides, fallback_config=DEFAULT_CONFIG)))
        return
    cfg = load_config(args.config, args.overrides)
    if args.command == "config":
        print(to_yaml(cfg), end="")
        return
    _setup_logging(cfg.logging.level)
    if args.command == "train-unet":
        from .train_unet import summary, train_unet

        print(summary(*train_unet(cfg)))
        return
    from .generate import generate, summary

    print(summary(generate(cfg)))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ads` and `python -m analytic_diffusion`; returns the exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides after an option (`images -c x a=b`) come back as extra
    if extra and not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        _run(args)
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = "rerun the same command to resume from the last checkpoint"
        print(f"interrupted; {resume if args.command == 'train-unet' else 'a run directory, if one was created, stays marked INCOMPLETE'}",
              file=sys.stderr)
        return 130
    return 0
