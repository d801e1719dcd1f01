"""Errors a request can end in, shared by the front end, the HTTP API and the web chat."""


class RequestError(ValueError):
    """Bad input in a request: the message names the value and the limit (HTTP 400).

    `param` names the request field at fault, as the OpenAI API reports it; `code` is OpenAI's error code where
    it has one (context_length_exceeded)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class BusyError(RuntimeError):
    """Every cache slot is taken and the waiting line is full: the caller should retry later (HTTP 429)."""


class UnavailableError(RuntimeError):
    """The model cannot serve now: its ranks are being rebuilt, or the devices left cannot hold it (HTTP 503)."""


def error_summary(e: BaseException) -> str:
    """`Type: last line` of an error, looking through Ray's task errors to the exception the actor raised: one line
    for logs and reports (Ray's own text wraps the cause in a traceback)."""
    cause = getattr(e, "cause", None) or e
    lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"
