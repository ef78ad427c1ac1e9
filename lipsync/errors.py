"""Errors that the command line turns into exit codes."""


class BadInput(Exception):
    """Bad input or usage: the CLI prints the message on one line and exits with code 2."""


class Stalled(Exception):
    """A run that made no progress for its `stall_seconds`: the CLI prints the message (which names the stalled
    stage and what it waited for) on one line and exits with code 1."""
