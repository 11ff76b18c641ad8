"""Errors that end a command with one clear line instead of a traceback."""


class StartupError(Exception):
    """A problem a user can fix (bad setting, port in use, unreachable server); exit status 2."""
