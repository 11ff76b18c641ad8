"""Errors that end a command with one clear line instead of a traceback."""


class StartupError(Exception):
    """A problem a user can fix (bad setting, port in use, unreachable server); exit status 2."""


class Refusal(Exception):
    """A refusal whose message is the whole story (a foreign key, say): logged as one line, without
    the traceback, whoever logs it (the Temporal SDK logs failed workflow tasks with theirs)."""
