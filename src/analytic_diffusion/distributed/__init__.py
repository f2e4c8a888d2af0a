"""Running one job on many processes (torchrun: GPUs with NCCL, CPUs with gloo), DESIGN.md §9, docs/distributed.md."""

from .group import (PeerFailure, Ranks, announce, check_peers, device_name, failures_published, finish,
                    ignored_options_warning, launched, quiet_unless_speaking, speaks, start, wait_for, writer_first)

__all__ = ["PeerFailure", "Ranks", "announce", "check_peers", "device_name", "failures_published", "finish",
           "ignored_options_warning", "launched", "quiet_unless_speaking", "speaks", "start", "wait_for",
           "writer_first"]
