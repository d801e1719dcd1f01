"""Errors a request can end in, shared by the front end, the HTTP API and the web chat."""


class RequestError(ValueError):
    """Bad input in a request: the message names the value and the limit (HTTP 400)."""


class BusyError(RuntimeError):
    """Every cache slot is taken and the waiting line is full: the caller should retry later (HTTP 429)."""
