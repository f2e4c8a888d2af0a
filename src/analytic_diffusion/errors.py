"""The one exception type the command line turns into a one-line message and a non-zero exit."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class StudioError(Exception):
    """A problem with the user's input or environment, phrased as what went wrong and what to do."""


def closest(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> StudioError:
    """An error for a name that is not registered, naming the closest valid one and listing all."""
    choices = sorted(choices)
    return StudioError(f"unknown {kind} '{name}'{closest(name, choices)}; choose one of: {', '.join(choices)}")


def one_line(exc: BaseException) -> str:
    """How a failure is reported in one line: a StudioError's own message, any other error as `Type: message`
    (its first line)."""
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    return message if isinstance(exc, StudioError) else f"{type(exc).__name__}: {message}".rstrip(": ")
