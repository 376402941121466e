"""Errors raised on bad user input, and the one "did you mean" helper.

Every user-facing problem is a :class:`MedsegError` whose message names the file (or key), what is wrong
and how to fix it. The command line prints the message as one line and exits with status 1.

Example:
    >>> check_choice("gausian", ("gaussian", "constant"), "inference.blend")
    Traceback (most recent call last):
    ...
    medseg.errors.MedsegError: inference.blend: 'gausian' is not valid (did you mean 'gaussian'?); choose one of gaussian, constant
"""
from __future__ import annotations

import difflib
from typing import Iterable, TypeVar

T = TypeVar("T")


class MedsegError(Exception):
    """A problem with the user's input, reported as one line with the fix."""


class ValidationError(MedsegError):
    """One or more problems found by ``medseg validate``; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def suggest(value: object, options: Iterable[object], n: int = 1, cutoff: float = 0.6) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``options`` to ``value``, or ``""`` when none is close."""
    names = [str(o) for o in options]
    close = difflib.get_close_matches(str(value), names, n=n, cutoff=cutoff)
    if not close:
        return ""
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)"


def check_choice(value: T, options: Iterable[T], what: str) -> T:
    """``value`` if it is one of ``options``, else a :class:`MedsegError` naming ``what``, the closest option and all."""
    options = tuple(options)
    if value not in options:
        raise MedsegError(f"{what}: '{value}' is not valid{suggest(value, options)}; choose one of {', '.join(map(str, options))}")
    return value
