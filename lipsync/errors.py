"""Errors that the command line turns into exit codes."""


class BadInput(Exception):
    """Bad input or usage: the CLI prints the message on one line and exits with code 2."""
