"""Logging for every Corral process: one line per lifecycle event, with its ids.

Every line carries the request it belongs to (`common.logctx`), as ` request=req_…` at the
end of a text line or a `request_id` field of a JSON line (`--log-format json`: one object
per line, for log shippers).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from common.logctx import ContextFilter


class TextFormatter(logging.Formatter):
    def __init__(self, name: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", "")
        if not rid:
            return line
        head, sep, tail = line.partition("\n")  # keep the ids on the first line of a traceback
        client = getattr(record, "client_request_id", "")
        ids = f" request={rid}" + (f" client_request={client}" if client else "")
        return head + ids + sep + tail


class JsonFormatter(logging.Formatter):
    def __init__(self, name: str) -> None:
        super().__init__()
        self._process = name

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "process": self._process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in ("request_id", "client_request_id"):
            if getattr(record, field, ""):
                entry[field] = getattr(record, field)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "INFO", name: str = "corral", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(name) if fmt == "json" else TextFormatter(name))
    handler.addFilter(ContextFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # Per-request HTTP lines from the clients we use, and the gguf writer's lines about the
    # demo models' temporary files, are noise at INFO.
    for noisy in ("httpx", "httpcore", "gguf"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
