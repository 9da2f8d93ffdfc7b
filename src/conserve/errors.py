"""Errors conserve raises on purpose: each carries a message fit to show a user."""


class ConserveError(Exception):
    """Base class for errors whose message is meant for the user, not a traceback."""


class ModelLoadError(ConserveError):
    """A model file or directory could not be loaded; the message names the file and the problem."""


class RequestError(ConserveError, ValueError):
    """A request is invalid (bad parameters, prompt too long, ...)."""


class EngineUnavailable(RuntimeError):
    """The engine that was serving a request failed under it, or is restarting, or the replica that held
    it is gone: the request has no answer. Batch lines that meet it run again (server/batch_retry.py)."""
