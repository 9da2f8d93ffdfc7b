"""Errors conserve raises on purpose: each carries a message fit to show a user."""


class ConserveError(Exception):
    """Base class for errors whose message is meant for the user, not a traceback."""


class ModelLoadError(ConserveError):
    """A model file or directory could not be loaded; the message names the file and the problem."""


class RequestError(ConserveError, ValueError):
    """A request is invalid (bad parameters, prompt too long, ...)."""
