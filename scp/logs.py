"""Structured logging: one JSON object per line on stdout, for CloudWatch Logs and `jq` alike."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Attributes every LogRecord has; anything else was passed through `extra=` and belongs in the JSON.
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_LOGGED_VALUE_MAX = 70  # enough for any real UID or AE title; crafted input stays out of the log


def printable(value: object) -> str:
    """A received value made safe for a log line: printable ASCII, bounded length."""
    text = "".join(char if 0x20 <= ord(char) < 0x7F else "?" for char in str(value))
    return text if len(text) <= _LOGGED_VALUE_MAX else text[:_LOGGED_VALUE_MAX] + "..."


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({key: value for key, value in vars(record).items() if key not in _RESERVED})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=True)


def configure(level: str) -> None:
    """Send every logger's records to stdout as JSON; pynetdicom's chatter only from WARNING up."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library warnings (pydicom's about odd values, for one) become JSON lines too, never raw text on stderr.
    logging.captureWarnings(True)
    # pynetdicom logs every PDU at INFO/DEBUG, and logs a traceback for every peer that hangs up early; our own
    # lines say what happened in one line each, so its logger only passes real warnings unless debugging.
    logging.getLogger("pynetdicom").setLevel(level if level == "DEBUG" else "WARNING")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel("WARNING")


class _ReceiverTag(logging.Filter):
    def __init__(self, receiver: int) -> None:
        super().__init__()
        self._receiver = receiver

    def filter(self, record: logging.LogRecord) -> bool:
        record.receiver = self._receiver
        return True


def tag_receiver(receiver: int) -> None:
    """Every line of this receiver process names it, among several on one port."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ReceiverTag(receiver))
