"""One log format: every line on stderr is one JSON object, including what native libraries print.

``configure_logging`` (``dhrclip serve`` only; tests leave logging alone):

- the ``dhrclip``, ``uvicorn``, ``asyncio`` and ``py.warnings`` loggers write JSON lines (``ts``, ``level``,
  ``logger``, then either the access fields or ``msg``, and ``exc`` for a traceback) to the original stderr;
- Python warnings (numpy, Pillow) are routed through logging (``py.warnings``) instead of being printed raw;
- file descriptor 2 itself is redirected into a pipe read by a daemon thread, so whatever C code writes there
  (libpng, libjpeg, libtiff, OpenCV) becomes one JSON line per text line on the ``dhrclip.native`` logger;
- floats in access fields are rounded to 3 decimals.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

NATIVE_LOGGER = "dhrclip.native"
LOGGERS = ("dhrclip", "uvicorn", "uvicorn.error", "py.warnings", "asyncio")
_FLOAT_DIGITS = 3


def _rounded(value):
    if isinstance(value, float):
        return round(value, _FLOAT_DIGITS)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: ``ts``, ``level``, ``logger`` and either the access fields or ``msg``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            out.update(_rounded(access))
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=str)


def _pump(read_fd: int, log: logging.Logger) -> None:
    """Turn each line written to the redirected fd 2 into one log record (runs in a daemon thread)."""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        pending = b""
        while chunk := pipe.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                text = line.decode("utf-8", "replace").rstrip()
                if text:
                    log.warning(text)


def capture_native_stderr(handler: logging.Handler) -> None:
    """Point ``handler`` at a copy of the real stderr, then send fd 2 (C libraries, stray prints) through logging."""
    sys.stderr.flush()
    real = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    if isinstance(handler, logging.StreamHandler):
        handler.setStream(real)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stderr = os.fdopen(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    native = logging.getLogger(NATIVE_LOGGER)
    threading.Thread(target=_pump, args=(read_fd, native), name="dhr-native-stderr", daemon=True).start()


def configure_logging(level: str = "info", native: bool = True) -> None:
    """Send the ``dhrclip``, ``uvicorn`` and warning loggers to stderr as JSON lines (see the module docstring).
    uvicorn's access logger is silenced: ``dhrclip.access`` has one line per request already."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.captureWarnings(True)
    for name in LOGGERS:
        log = logging.getLogger(name)
        log.handlers[:] = [handler] if name != "uvicorn.error" else []
        log.setLevel(level.upper())
        log.propagate = name == "uvicorn.error"  # -> "uvicorn"
    logging.getLogger("uvicorn.access").disabled = True
    if native:
        capture_native_stderr(handler)
