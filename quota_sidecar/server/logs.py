"""Logging set-up for ``serve``: text or JSON lines, and no credentials in either.

JSON lines carry ``ts`` (UTC, ISO 8601 with milliseconds), ``level``,
``logger``, ``msg``, ``worker`` (under ``--workers N``) and every field the
event was logged with (``extra=``): decisions and failed calls carry
``account_id`` and ``reservation_id``. The sidecar logs no secret on purpose;
as a second line of defence, the ``user:password@`` part of any URL in a
message, a field or a traceback is masked, whatever the format.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone
from typing import Any

# scheme://user:password@host -> scheme://***@host (redis://, rediss://, redis+sentinel://, http://...).
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
# Attributes every LogRecord has; anything else on a record came from extra= and is the event's own.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime",
                                                                                         "taskName"}


def mask_credentials(text: str) -> str:
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask_credentials(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; see the module docstring for its keys."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "msg": mask_credentials(record.getMessage())}
        if self._worker is not None:
            line["worker"] = self._worker
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRIBUTES and not name.startswith("_"):
                line[name] = mask_credentials(value) if isinstance(value, str) else value
        if record.exc_info:
            line["exc"] = mask_credentials(self.formatException(record.exc_info))
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(level: str, log_format: str, worker: int | None = None) -> None:
    """Replaces the root logger's handlers with one stderr handler in ``log_format`` (text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        tag = f"[w{worker}]" if worker is not None else ""
        handler.setFormatter(TextFormatter(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
