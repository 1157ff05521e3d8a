"""Domain errors of the serving side.

They carry no gRPC status codes: the servicers raise them and `serving.server` maps them to
status codes in one place. Each message says what was wrong and what is allowed, because it is
sent to the client as is.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class of the errors a client can cause or be told about."""


class UnknownTask(ServingError):
    """The requested task (model name) is not served; the message names the tasks that are."""


class UnknownVersion(ServingError):
    """The requested model version is not loaded (or does not hold the task)."""


class InvalidInput(ServingError):
    """The request is malformed: datatype, shape, element count, or a missing or extra input."""


class RequestTooLarge(ServingError):
    """The request holds more rows than the server's maximum batch size."""


class NotReady(ServingError):
    """No model version is loaded yet, or the server is shutting down."""


class Unauthenticated(ServingError):
    """The call lacks the bearer token the server requires."""


class ReloadFailed(ServingError):
    """A newer version exists but could not be loaded; the previous one is still served."""
