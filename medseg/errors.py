"""Errors raised on bad user input.

Every user-facing problem is a :class:`MedsegError` whose message names the file (or key), what is wrong
and how to fix it. The command line prints the message as one line and exits with status 1.
"""
from __future__ import annotations


class MedsegError(Exception):
    """A problem with the user's input, reported as one line with the fix."""


class ValidationError(MedsegError):
    """One or more problems found by ``medseg validate``; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
