"""What the engine refuses, each with the HTTP status the API answers with."""


class ServeError(Exception):
    """A request or command the engine refuses; `status` is the HTTP status the API answers with."""

    status = 400


class UnknownAdapter(ServeError):
    status = 404


class QueueFull(ServeError):
    status = 429


class PromptTooLong(ServeError):
    status = 400
