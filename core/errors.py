"""Errors: the ones the command line turns into exit codes, and the one failure type of a single item."""

from __future__ import annotations


class BadInput(Exception):
    """Bad input or usage: the CLI prints the message on one line and exits with code 2."""


class Stalled(Exception):
    """A run that made no progress for its `stall_seconds`: the CLI prints the message (which names the stalled
    stage and what it waited for) on one line and exits with code 1."""


class ItemFailure(Exception):
    """One item (an input, a segment, a pair, a video) that a stage cannot process: the stage, a reason
    code and a message. Stages catch it and write a failure row for that item; the run goes on."""

    def __init__(self, stage: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.stage, self.reason, self.message = stage, reason, message

    @classmethod
    def of(cls, stage: str, exc: Exception) -> ItemFailure:
        """An ItemFailure from an exception carrying a `reason` (e.g. a MediaError)."""
        return cls(stage, getattr(exc, "reason", "error"), str(exc))

    def __reduce__(self):  # pickles across Ray workers with its fields
        return type(self), (self.stage, self.reason, self.message)
