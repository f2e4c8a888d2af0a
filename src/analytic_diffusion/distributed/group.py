"""The process group of a run launched by torchrun (or any launcher that sets its environment variables), and
how a failure on one rank stops the others.

Detection: RANK and WORLD_SIZE > 1 in the environment (torchrun, `srun` with the same variables). The backend is
NCCL when the rank works on a CUDA device (cuda:LOCAL_RANK), gloo otherwise. Without them nothing is started.

Failures (docs/distributed.md): a rank that raises writes one line, `rank R of K: <error>`, into the process
group's key-value store before it exits. The others look for such a line at every sampling step and after any
collective that fails, and stop with a StudioError naming the rank. A rank that dies without a word (killed) is
noticed by the first collective that needs it: immediately where its sockets close (gloo, NCCL), after
`distributed.timeout_seconds` at the latest; torchrun also stops the remaining workers itself (SIGTERM, turned
into the same one-line error here).

Rank 0's announcements (`announce`, `wait_for`) and the collectives run through `collective` are counted per
process: a job that runs several times in one process group (a sweep's cells) gets a fresh key for each
announcement, and `agreement.Agreement` can tell whether every rank has run the same collectives.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import StudioError, one_line, unknown_name

STRATEGIES = ("samples", "dataset")
KEYS = f"ads/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"  # a restarted launch does not see old keys
FAILURE_KEY = KEYS + "failed/"  # + rank: the one line of a rank that failed
LOOK_FOR_PEERS = 2.0  # seconds a failed collective waits for a peer's line before it reports what it saw itself
POLL_SECONDS = 0.5  # how often a rank waiting for rank 0 (e.g. building the store) looks again
FIRST_POLL = 0.005  # a rank waiting for the others looks again after this, doubling up to POLL_SECONDS
DONE = "ok"  # the value of an announcement that went well; any other value is rank 0's one-line error

_announcements: Counter[str] = Counter()  # per name: how many times this process announced or waited for it
_collectives = 0  # collectives this process ran through `collective` in the current process group
_timeout_seconds = 300.0  # distributed.timeout_seconds of the current process group (set by `start`)

T = TypeVar("T")


class PeerFailure(StudioError):
    """Another rank failed (or vanished); this rank stopped. Not reported again by this rank."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run's process group."""

    rank: int  # 0 .. world_size - 1; rank 0 writes the run directory
    world_size: int  # K, the number of processes
    local_rank: int  # rank on this host: the CUDA device it uses
    strategy: str  # samples | dataset
    backend: str  # gloo | nccl

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> range:
        """This rank's contiguous part of `count` items: the first count % K ranks take one more."""
        size, extra = divmod(count, self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return range(start, start + size + (self.rank < extra))


def launched() -> bool:
    """True in a process started by torchrun (or srun, mpirun with the same variables) with more than one rank."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def speaks() -> bool:
    """Whether this process reports (its info lines, warnings and error line): one process, or rank 0 of a launch.
    Read from the environment, so it holds before the process group exists (a sweep's plan, the config)."""
    return not launched() or os.environ.get("RANK", "0") == "0"


def quiet_unless_speaking(logger: logging.Logger) -> None:
    """Under torchrun, the other ranks log errors only: every rank runs the same code, and rank 0 says each info
    line and warning once for all of them."""
    if not speaks():
        logger.setLevel(logging.ERROR)


def ignored_options_warning(overrides: Iterable[str]) -> str | None:
    """In one process, the distributed.* keys among `overrides` (key=value) do nothing: a sentence saying so, else
    None (also under torchrun, where they apply)."""
    keys = sorted({o.partition("=")[0].strip() for o in overrides if o.strip().startswith("distributed.")})
    if launched() or not keys:
        return None
    one = len(keys) == 1
    return (f"{', '.join(keys)} only matter{'s' if one else ''} under torchrun (docs/distributed.md); this run is "
            f"one process, which ignores {'it' if one else 'them'}")


def device_name(requested: str) -> str:
    """The device of this rank: auto or cuda -> cuda:LOCAL_RANK where CUDA exists; an explicit device unchanged."""
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return requested


def check_options(strategy: str, timeout_seconds: float) -> None:
    """The distributed section's values, checked in every run (one process too: a typo is never ignored)."""
    if strategy not in STRATEGIES:
        raise unknown_name("distributed.strategy", strategy, STRATEGIES)
    if not 0 < timeout_seconds < math.inf:
        raise StudioError(f"distributed.timeout_seconds must be a finite number of seconds > 0, got {timeout_seconds}")


def start(strategy: str, timeout_seconds: float, device: torch.device) -> Ranks | None:
    """Join the process group of a torchrun launch (None when not launched: one process, nothing changes).
    Checks the options first, so a bad value stops every rank with the same line."""
    check_options(strategy, timeout_seconds)
    if not launched():
        return None
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds))
        global _collectives, _timeout_seconds
        _timeout_seconds = timeout_seconds
        _announcements.clear()  # a new group: its store holds none of an earlier group's keys
        _collectives = 0
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), strategy,
                  dist.get_backend())
    signal.signal(signal.SIGTERM, _stopped_by_launcher)
    return ranks


def _stopped_by_launcher(signum: int, frame: Any) -> None:
    """torchrun terminates the other workers when one fails, and all of them when it is itself terminated (a
    scheduler cancelling the job, `kill`): say which rank failed if one said so, as a one-line error."""
    raise PeerFailure(peer_failure(wait=0.5) or "stopped by the launcher (SIGTERM): another rank died without a "
                      "message, or the job was cancelled")


def finish(ranks: Ranks) -> None:
    """Leave the process group after a successful run (every rank reaches this)."""
    collective(dist.barrier)
    dist.destroy_process_group()


def _store():
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def report_failure(ranks: Ranks, exc: BaseException) -> None:
    """Publish this rank's error for the others (best effort: the store may already be gone)."""
    line = f"rank {ranks.rank} of {ranks.world_size} failed: {type(exc).__name__}: {exc}".splitlines()[0]
    _publish(ranks.rank, line)


def _publish(rank: int, line: str) -> None:
    """Make `line` the failure of `rank` that the others find (`peer_failure`); best effort."""
    try:
        _store().set(f"{FAILURE_KEY}{rank}", line)
    except Exception:  # the store's host is gone too: the peers see their sockets close instead
        pass


def record_for_launcher(exc: BaseException) -> None:
    """Keep the traceback of an error that is not a StudioError (a bug, not the user's input) where the launcher
    shows it, once per failed rank: torchrun's error file (TORCHELASTIC_ERROR_FILE, which torchrun sets per worker
    and prints under that rank in its failure report); without one (another launcher), this rank's stderr. Call it
    while handling `exc`."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)
    else:
        traceback.print_exception(exc)


def peer_failure(wait: float = 0.0) -> str | None:
    """The line of a rank that failed, if one was published (looking for up to `wait` seconds)."""
    if not dist.is_initialized():
        return None
    me, deadline = dist.get_rank(), time.monotonic() + wait
    keys = [f"{FAILURE_KEY}{r}" for r in range(dist.get_world_size()) if r != me]
    try:
        store = _store()
        while True:
            for key in keys:
                if store.check([key]):
                    return store.get(key).decode()
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)
    except Exception:  # the store's host (rank 0 or the launcher) is gone
        return None


def _announcement_key(name: str) -> str:
    """The key of the next announcement of `name` (every rank asks in the same order: the same key)."""
    _announcements[name] += 1
    return f"{KEYS}done/{name}/{_announcements[name]}"


def announce(name: str, error: str | None = None) -> None:
    """Rank 0: `name` is done (e.g. the dataset store is built), or failed with the one-line `error`; the ranks
    in wait_for(name) go on (or stop with the same line)."""
    _store().set(_announcement_key(name), DONE if error is None else error)


def wait_for(name: str) -> None:
    """Wait, without a time limit, until rank 0 announces `name` (building a large store can take hours, longer
    than any collective's timeout); stop with rank 0's line if `name` failed there (a StudioError, as rank 0's
    own), with one line if a rank fails or rank 0's store goes away."""
    store, key = _store(), _announcement_key(name)
    while True:
        try:
            if store.check([key]):
                value = store.get(key).decode()
                if value != DONE:
                    raise StudioError(value)
                return
        except StudioError:
            raise
        except Exception as exc:  # the store's host is gone
            raise PeerFailure(f"rank 0 went away while rank {dist.get_rank()} waited for it ({name}): {exc}") from exc
        check_peers()
        time.sleep(POLL_SECONDS)


def all_arrived(name: str) -> None:
    """Wait until every rank has reached `name`, before a collective that follows work of unequal length (under
    `samples` a rank with one more sampling batch than another may take longer than distributed.timeout_seconds,
    the collectives' limit, to reach the gather); `wait_while_progressing`."""
    key = _announcement_key(name)
    _store().set(f"{key}/{dist.get_rank()}", DONE)
    wait_while_progressing([f"{key}/{rank}" for rank in range(dist.get_world_size())], name)


def wait_while_progressing(keys: list[str], what: str) -> None:
    """Wait until every rank r has set keys[r] in the store, for as long as each rank still on its way makes
    progress (`check_peers` counts its sampling steps): one that makes none within distributed.timeout_seconds
    (killed without a word, or hung) stops this rank with one line, also published for the rank that speaks, as a
    rank that fails or the store going away do. Waiting is no progress: two ranks waiting at different points stop.
    `what`: what this rank waits for, for the line."""
    store, me, size = _store(), dist.get_rank(), dist.get_world_size()
    seen: dict[int, tuple[int, float]] = {}  # rank -> (its progress count, when this rank saw it change)
    pause = FIRST_POLL
    while True:
        try:
            waiting = [rank for rank, key in enumerate(keys) if not store.check([key])]
            counts = {rank: store.add(_progress_key(rank), 0) for rank in waiting}
        except Exception as exc:  # the store's host is gone
            raise PeerFailure(f"the process group's store went away while rank {me} waited for the others "
                              f"({what}): {exc}") from exc
        if not waiting:
            return
        now = time.monotonic()
        for rank, count in counts.items():
            if rank not in seen or seen[rank][0] != count:
                seen[rank] = (count, now)
            elif now - seen[rank][1] > _timeout_seconds:
                line = (f"rank {rank} of {size} made no progress (killed, or hung) within distributed.timeout_seconds="
                        f"{_timeout_seconds:g} while rank {me} waited for it ({what})")
                _publish(me, line)  # so that the rank that speaks says it (the one that hangs, when it wakes)
                raise PeerFailure(f"{line}; rank {me} stopped")
        _stop_if_a_peer_failed()
        time.sleep(pause)
        pause = min(2 * pause, POLL_SECONDS)


def writer_first(ranks: Ranks | None, name: str, work: Callable[[], T]) -> T:
    """`work()` on rank 0, then on the other ranks once rank 0 has announced `name` done: rank 0 alone builds the
    dataset store or downloads the dataset, the others then find it written and read it (no two ranks write the
    same files); if rank 0's work fails, the others stop with its line. In one process (ranks None): work()."""
    if ranks is None:
        return work()
    if not ranks.is_writer:
        wait_for(name)
        return work()
    try:
        result = work()
    except Exception as exc:
        announce(name, one_line(exc))
        raise
    announce(name)
    return result


def collectives_run() -> int:
    """How many collectives this process has run through `collective` in the current process group."""
    return _collectives


def check_peers() -> None:
    """Raise PeerFailure if another rank has failed, and count one step of this rank's progress for `all_arrived`
    (called once per sampling step and while waiting; two store round trips)."""
    _stop_if_a_peer_failed()
    _store().add(_progress_key(dist.get_rank()), 1)


def _stop_if_a_peer_failed() -> None:
    line = peer_failure()
    if line is not None:
        raise PeerFailure(f"{line}; rank {dist.get_rank()} stopped")


def _progress_key(rank: int) -> str:
    return f"{KEYS}progress/{rank}"


def collective(operation: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a collective; if it fails (a peer raised, died or exceeded the timeout), one line naming the rank."""
    global _collectives
    _collectives += 1
    try:
        return operation(*args, **kwargs)
    except (RuntimeError, dist.DistError) as exc:
        line = peer_failure(wait=LOOK_FOR_PEERS)
        me = dist.get_rank()
        if line is None:
            first = (str(exc).strip().splitlines() or ["no details"])[0].split(". This is typically")[0]
            line = f"a peer of rank {me} stopped without a message (killed, or slower than distributed.timeout_seconds): {first}"
        raise PeerFailure(f"{line}; rank {me} stopped") from exc


@contextmanager
def failures_published(ranks: Ranks) -> Iterator[None]:
    """Publish any error of this rank for the others; the process group is left as it is (the process exits)."""
    try:
        yield
    except PeerFailure:
        raise
    except BaseException as exc:
        report_failure(ranks, exc)
        raise
