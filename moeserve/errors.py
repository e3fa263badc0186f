"""Exceptions that carry a message meant for the user (CLI prints it, the server returns it)."""


class MoEServeError(Exception):
    """Base class: the message is safe and useful to show to a user."""


class CheckpointError(MoEServeError):
    """A checkpoint directory cannot be loaded; the message names the file and what is wrong."""


class ConfigError(MoEServeError, ValueError):
    """An engine / server option is invalid; the message names the option."""
