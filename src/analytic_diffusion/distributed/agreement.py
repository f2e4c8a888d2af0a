"""Agreeing on how a unit of work went, so that a job of many units (a sweep's cells) can record a failed unit
and go on with the next one on every rank together (docs/distributed.md, "Sweeps").

A unit is cut into phases. At the end of each phase every rank posts, in the process group's key-value store,
whether its phase went well (or its error in one line) and how many collectives it has run, then waits until
every rank has posted. If every rank ran the same collectives, no rank is left inside a collective the others
skipped: the process group is intact, and if any rank failed, every rank raises the same AgreedFailure and the
unit is over. If the counts differ (a rank failed between two collectives of the others), or a rank on its way makes
no progress for `distributed.timeout_seconds` (it died, or is stuck in a collective a failed rank never reached),
the group cannot be trusted and every rank stops with PeerFailure, as a failed `ads generate` does. A rank that is
only slower (one more sampling batch) is waited for.

A phase must fail alike on every rank or contain no collective after the point where one rank alone may fail:
checks every rank makes (config, store, fit), sampling under `samples` (no collective until the final gather),
rank 0 writing the run directory. A phase that holds collectives every step (sampling under `dataset`) is not
agreed: a failure there stops every rank (`phase(recoverable=False)`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import StudioError, one_line
from .group import KEYS, PeerFailure, Ranks, _store, collectives_run, wait_while_progressing


class AgreedFailure(StudioError):
    """The unit failed on one rank or more, and every rank raised this at the same point with the same line; the
    process group is intact."""


class Agreement:
    """The phases of one unit of work (`name`, unique in the process group) on every rank."""

    def __init__(self, ranks: Ranks, name: str):
        self.ranks, self.name = ranks, name
        self.points = 0
        self.broken = False  # an error passed a phase that is not agreed: no later phase agrees on it either

    @contextmanager
    def phase(self, recoverable: bool = True) -> Iterator[None]:
        """Run a phase; at its end (or at its error) agree with the other ranks. Raises AgreedFailure when any
        rank's phase failed and PeerFailure when the ranks cannot agree; `recoverable=False`: no agreement, an
        error goes on as it is (every rank stops)."""
        if not recoverable:
            try:
                yield
            except BaseException:
                self.broken = True
                raise
            return
        try:
            yield
        except (AgreedFailure, PeerFailure):  # already agreed (a phase inside this one), or fatal
            raise
        except Exception as exc:
            if self.broken:  # the others may be inside a collective this rank left: every rank stops
                raise
            raise self._agree(one_line(exc)) from exc
        failure = self._agree(None)
        if failure is not None:
            raise failure

    def _agree(self, error: str | None) -> AgreedFailure | None:
        """Post this rank's outcome, wait for every rank's (`wait_while_progressing`: for as long as the ranks
        still on their way make progress); the failure they agree on (None if none failed)."""
        self.points += 1
        prefix, me, size = f"{KEYS}agree/{self.name}/{self.points}/", self.ranks.rank, self.ranks.world_size
        keys = [f"{prefix}{r}" for r in range(size)]
        what = f"the end of a phase of {self.name}"
        try:
            store = _store()
            store.set(keys[me], json.dumps({"collectives": collectives_run(), "error": error}))
            wait_while_progressing(keys, what)
            posts = [json.loads(store.get(key)) for key in keys]
        except (StudioError, KeyboardInterrupt):
            raise
        except Exception as exc:  # the store's host is gone
            raise PeerFailure(f"the process group's store went away while rank {me} waited for the others "
                              f"({what}): {exc}") from exc
        counts = [post["collectives"] for post in posts]
        failed = [(rank, post["error"]) for rank, post in enumerate(posts) if post["error"] is not None]
        if len(set(counts)) > 1:
            reason = f"; rank {failed[0][0]} of {size} failed: {failed[0][1]}" if failed else ""
            raise PeerFailure(f"the ranks stopped {self.name} at different collectives ({counts}){reason}; "
                              f"rank {me} stopped")
        if not failed:
            return None
        if len(failed) == size:  # every rank failed: rank 0's line, as one process reports it
            return AgreedFailure(failed[0][1])
        rank, line = failed[0]
        return AgreedFailure(f"rank {rank} of {size} failed: {line}")

