"""The `ads` command line: a thin layer over config loading and the jobs.

Every StudioError becomes one line on stderr and exit status 2. Any other error is a bug: in one process Python
prints its traceback (exit status 1); under torchrun rank 0 prints its one `error:` line (exit status 1) and each
failed rank's traceback goes into torchrun's failure report (docs/distributed.md, "Failures"). No run directory is
created before the config, the dataset and any checkpoint path have been checked; a failure after that leaves the
run marked INCOMPLETE.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from .errors import StudioError, one_line

DEFAULT_CONFIG = "nearest_dataset/mnist5k"
DEFAULT_TRAINING_CONFIG = "unet_train/mnist5k_small"


def _config_arguments(parser: argparse.ArgumentParser, default: str = DEFAULT_CONFIG) -> None:
    parser.add_argument("-c", "--config", default=default,
                        help=f"config under configs/ (e.g. optimal/cifar10) or a YAML path (default: {default})")
    parser.add_argument("overrides", nargs="*", default=[], help="dot-list overrides, e.g. sampling.num_samples=16 experiment.device=cpu")


class _OneLineErrors(argparse.ArgumentParser):
    """argparse, with its usage errors as the studio's other errors: one `error:` line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog="ads", description="Analytic Diffusion Studio: sample closed-form diffusion denoisers.")
    commands = parser.add_subparsers(dest="command", required=True)
    _config_arguments(commands.add_parser("generate", help="sample images with a method and write a run directory"))
    _config_arguments(commands.add_parser("config", help="print the resolved config without running anything"))
    _config_arguments(commands.add_parser("calibrate", help="fit a local patch method's patch size per step to a "
                                          "trained network (baseline.checkpoint=...)"), "els/mnist5k")
    _config_arguments(commands.add_parser("train-unet", help="train the UNet baseline (rerun to resume)"),
                      DEFAULT_TRAINING_CONFIG)
    analysis = commands.add_parser(
        "memorization", help="which training images samples copy: d1, d2, d1/d2 and neighbour figures")
    analysis.add_argument("images", help="a run directory, a sweep folder, a folder of images or a .pt/.npy/.npz "
                                         "tensor (uint8 pixels or model-space floats)")
    analysis.add_argument("-c", "--config", default=None,
                          help="config whose dataset is the training set (default: the run's own config.yaml, "
                               f"else {DEFAULT_CONFIG})")
    analysis.add_argument("overrides", nargs="*", default=[], help="dot-list overrides, e.g. memorization.reference_size=500")
    commands.add_parser("list", help="list methods, datasets and configs")
    sweep = commands.add_parser("sweep", help="every method x dataset x grid from the same noise: runs, figure, table")
    sweep.add_argument("-c", "--config", default=None,
                       help="sweep file under configs/ (e.g. sweeps/subset_size) or a YAML path (default: sweeps/default)")
    sweep.add_argument("--methods", help="comma-separated methods (default: the file's; every analytic method)")
    sweep.add_argument("--datasets", help="comma-separated datasets (default: the file's; mnist5k)")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="a config key and its values, e.g. model.params.temperature=0.5,1,2 (repeatable)")
    sweep.add_argument("--name", help="the sweep folder under <paths.runs>/sweeps/ (default: the file's name)")
    sweep.add_argument("--force", action="store_true", help="rerun every cell, even those already complete")
    sweep.add_argument("overrides", nargs="*", default=[], help="dot-list overrides for every cell, e.g. sampling.num_samples=16")
    cache = commands.add_parser("cache", help="list cached dataset stores and statistics, or remove some")
    actions = cache.add_subparsers(dest="action")
    listing = actions.add_parser("list", help="every cache entry with its size, dataset and last use (the default)")
    listing.add_argument("overrides", nargs="*", default=[], help="dot-list overrides, e.g. paths.cache=/scratch/cache")
    clear = actions.add_parser("clear", help="remove cache entries: those unused for a while, or of one dataset")
    clear.add_argument("--older-than", metavar="AGE", help="last used more than AGE ago: 30d, 12h, 2w, 90m")
    clear.add_argument("--dataset", metavar="NAME", help="computed from this dataset")
    clear.add_argument("--all", action="store_true", help="every entry")
    clear.add_argument("overrides", nargs="*", default=[], help="dot-list overrides, e.g. paths.cache=/scratch/cache")
    return parser


class _ConsoleHandler(logging.StreamHandler):
    """The one console handler `ads` installs on the root logger (replaced, never stacked, on a second `main`):
    the studio's records as its logger's level lets them through, other libraries' from `others` on (even those
    that set their own loggers to INFO)."""

    def __init__(self, others: int):
        super().__init__(sys.stderr)
        self.others = others

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == "analytic_diffusion" or record.name.startswith("analytic_diffusion.")
        return (ours or record.levelno >= self.others) and super().filter(record)


def _setup_logging(level: str) -> None:
    """The studio's records at `level` on stderr; other libraries' (faiss's loader, PIL, urllib3...) only from WARNING
    on, except with logging.level=debug."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _ConsoleHandler)]:
        root.removeHandler(handler)
    console = _ConsoleHandler(logging.DEBUG if level == "debug" else logging.WARNING)
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    root.setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    logging.getLogger("analytic_diffusion").setLevel(level.upper())
    from .distributed import quiet_unless_speaking

    quiet_unless_speaking(logging.getLogger("analytic_diffusion"))  # under torchrun rank 0 speaks for all


def _run(args: argparse.Namespace) -> int | None:
    """Run the command; a status other than None is the exit status (a sweep with failed cells: 1)."""
    from .config import available_configs, load_config, to_yaml
    from .distributed import launched, quiet_unless_speaking

    if launched() and args.command not in ("generate", "memorization", "sweep"):
        raise StudioError(f"ads {args.command} does not run under torchrun; only ads generate, ads sweep and ads "
                          "memorization do (docs/distributed.md): launch it as one process")
    quiet_unless_speaking(logging.getLogger("analytic_diffusion"))  # also the warnings of loading a config

    if args.command == "list":
        from .data import DATASETS
        from .denoisers import DENOISERS, load_all

        load_all()
        print("methods: " + ", ".join(sorted(DENOISERS)))
        print("datasets: " + ", ".join(sorted(DATASETS)))
        print("configs: " + ", ".join(available_configs()))
        print("sweeps: " + ", ".join(available_configs("sweep")))
        return
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "cache":
        _cache(args)
        return
    if args.command == "memorization":
        from .memorization import memorization, summary

        _setup_logging("info")
        _warn_if_ignored(args.overrides)
        result = memorization(args.images, args.config, args.overrides, fallback_config=DEFAULT_CONFIG)
        if result is not None:  # under torchrun, rank 0 reports
            print(summary(result))
        return
    cfg = load_config(args.config, args.overrides)
    if args.command == "config":
        print(to_yaml(cfg), end="")
        return
    _setup_logging(cfg.logging.level)
    if args.command == "generate":
        _warn_if_ignored(args.overrides)
    if args.command == "train-unet":
        from .train_unet import summary, train_unet

        print(summary(*train_unet(cfg)))
        return
    if args.command == "calibrate":
        from .calibrate import calibrate, summary

        print(summary(calibrate(cfg)))
        return
    from .generate import generate, summary

    result = generate(cfg)
    if result is not None:  # under torchrun, rank 0 reports
        print(summary(result))


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import load_spec, plan_sweep, run_sweep, summary

    _setup_logging("info")
    spec = load_spec(args.config, args.methods, args.datasets, args.grid, args.overrides, args.name)
    plan = plan_sweep(spec)  # every cell's config checked before anything is written
    _setup_logging(plan.cells[0].config.logging.level)
    _warn_if_ignored(spec.overrides)
    result = run_sweep(plan, force=args.force)
    if result is None:  # under torchrun, rank 0 reports
        return 0
    print(summary(result))
    failed = [o.cell.name for o in result.outcomes if o.status == "failed"]
    if failed:
        print(f"error: {len(failed)} of {len(result.outcomes)} cells failed ({', '.join(failed)}); their errors are "
              f"in {plan.folder / 'summary.md'}; rerun the same command to run only the unfinished cells", file=sys.stderr)
        return 1
    return 0


def _cache(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .cache import cache_entries, format_entries, human_bytes, remove_entries, select_entries
    from .config import load_config
    from .errors import StudioError

    root = Path(load_config(None, getattr(args, "overrides", [])).paths.cache)
    entries = cache_entries(root)
    if args.action != "clear":
        print(format_entries(entries, root))
        return
    if args.older_than is None and args.dataset is None and not args.all:
        raise StudioError("say what to remove: --older-than 30d, --dataset NAME (both: entries matching both) or --all")
    chosen = select_entries(entries, args.older_than, args.dataset)
    if not chosen:
        datasets = sorted({e.dataset for e in entries})
        print(f"nothing to remove in {root} (datasets in the cache: {', '.join(datasets) or 'none'})")
        return
    print(format_entries(chosen, root))
    print(f"removed {len(chosen)} entries, {human_bytes(remove_entries(chosen))} freed")


def _warn_if_ignored(overrides: list[str]) -> None:
    """One warning line for distributed.* overrides in one process (they only matter under torchrun)."""
    from .distributed import ignored_options_warning

    warning = ignored_options_warning(overrides)
    if warning:
        logging.getLogger("analytic_diffusion").warning("warning: %s", warning)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ads` and `python -m analytic_diffusion`; returns the exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides after an option (`images -c x a=b`) come back as extra
    if extra and not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    # Under torchrun only rank 0 prints an error line (speaks): its own error, or the line of the rank that failed
    # first (every rank refusing the same bad input would print it K times).
    from .distributed import launched, speaks

    try:
        status = _run(args)
    except StudioError as exc:
        if speaks():
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        memory = isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"  # torch's (CUDA, MPS)
        if not memory and not launched():
            raise  # one process: Python prints the traceback, exit status 1
        if not memory:  # under torchrun: each failed rank's traceback in torchrun's report, one line from rank 0
            from .distributed.group import record_for_launcher

            record_for_launcher(exc)
        if speaks():
            first = (str(exc).strip().splitlines() or ["no details"])[0]
            print(f"error: out of memory ({first}); lower sampling.batch_size or model.params.chunk_size, use a "
                  "dataset.subset_size or a smaller dataset.resolution, or another experiment.device" if memory
                  else f"error: {one_line(exc)}", file=sys.stderr)
        return 2 if memory else 1
    except KeyboardInterrupt:
        advice = {
            "train-unet": "rerun the same command to resume from the last checkpoint",
            "sweep": "finished cells are kept; rerun the same command to run the rest",
        }.get(args.command, "a run directory, if one was created, stays marked INCOMPLETE")
        if speaks():  # under torchrun every rank is interrupted: rank 0 says it once
            print(f"interrupted; {advice}", file=sys.stderr)
        return 130
    return status or 0
