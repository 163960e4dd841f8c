"""Logging for ``serve`` and ``worker``: text for a person at a terminal, or one JSON object per line for a log
pipeline (``logging: {format: json}`` in the settings).

Every record carries the id of the HTTP request (``request_id``: the caller's ``X-Request-ID`` when it sent a
well-formed one, else a fresh one, echoed in the response) or of the job (``job_id``) it was written for, so an
operator follows one hook call or one analysis across the web process and the workers.

The project logs resource ids, job ids, types and counts, never patient data or credentials (each module's
docstring says so). As a second line of defence the redaction filter here replaces anything shaped like a bearer
token, a JWT or an ``access_token=`` value before a record is written, whatever its logger (a third-party library
that logs a URL or a header, say).
"""

from __future__ import annotations

import logging
import re
import sys
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

from pipeline.jobs import current_job_id

current_request_id: ContextVar[str | None] = ContextVar("imaging_cds_request_id", default=None)

_SECRETS = (
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9\-._~+/]+=*"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),  # a JWT (header.payload.signature)
    re.compile(
        r"(?i)((?:access_token|refresh_token|id_token|client_secret|code|client_assertion|password)=)[^&\s\"']+"
    ),
)
_REDACTED = "[redacted]"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s%(job_id)s] %(message)s"
JSON_FIELDS = "%(levelname)s %(name)s %(message)s %(request_id)s %(job_id)s"


def redact(text: str) -> str:
    """``text`` with token-shaped values replaced (see the module docstring)."""
    for pattern in _SECRETS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + _REDACTED, text)
    return text


class ContextFilter(logging.Filter):
    """Adds ``request_id`` and ``job_id`` to every record, and redacts token-shaped values from its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get() or ""
        record.job_id = current_job_id.get() or ""
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            # An exception's text may quote a request; keep its type and traceback, drop its message.
            exc = record.exc_info[1]
            record.exc_text = None
            record.msg = f"{record.getMessage()} ({type(exc).__name__})"
            record.args = None
        return True


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", "")
        job_id = getattr(record, "job_id", "")
        record.request_id = f"req {request_id}" if request_id else ""
        record.job_id = f"{' ' if request_id else ''}job {job_id}" if job_id else ""
        if not request_id and not job_id:
            record.request_id = "-"
        try:
            return super().format(record)
        finally:
            record.request_id, record.job_id = request_id, job_id


def configure_logging(log_format: str = "text", level: str = "INFO", *, stream: object = None) -> logging.Handler:
    """Send the process's logs to ``stream`` (stderr) in ``log_format`` at ``level``; returns the handler.

    Replaces the root logger's handlers, so calling it again (a test, a worker child) does not double lines.
    """
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(JSON_FIELDS, rename_fields={"levelname": "level", "name": "logger"}, timestamp="time")
        )
    else:
        handler.setFormatter(_TextFormatter(TEXT_FORMAT))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
