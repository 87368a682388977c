"""Reading a Lambda function's environment once, at cold start, reporting every bad variable in one error."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass


class ConfigurationError(Exception):
    """One or more environment variables are missing or invalid; the message names each of them."""


class EnvironmentReader:
    """Collects values and problems; ``finish()`` raises once with every problem found."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self._problems: list[str] = []

    def text(self, name: str, pattern: str | None = None) -> str:
        value = self._environ.get(name, "").strip()
        if not value:
            self._problems.append(f"{name}: required, not set")
        elif pattern is not None and not re.fullmatch(pattern, value):
            self._problems.append(f"{name}: expected a value matching {pattern}, got {value!r}")
        return value

    def integer(self, name: str, default: int, minimum: int, maximum: int) -> int:
        raw = self._environ.get(name, "").strip()
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            self._problems.append(f"{name}: expected an integer {minimum}-{maximum}, got {raw!r}")
            return default
        if not minimum <= value <= maximum:
            self._problems.append(f"{name}: expected an integer {minimum}-{maximum}, got {raw!r}")
        return value

    def required_integer(self, name: str, minimum: int, maximum: int) -> int:
        if not self._environ.get(name, "").strip():
            self._problems.append(f"{name}: required, not set")
            return minimum
        return self.integer(name, minimum, minimum, maximum)

    def boolean(self, name: str, default: bool) -> bool:
        raw = self._environ.get(name, "").strip().lower()
        if not raw:
            return default
        if raw not in ("true", "false"):
            self._problems.append(f"{name}: expected true or false, got {raw!r}")
            return default
        return raw == "true"

    def finish(self) -> None:
        if self._problems:
            raise ConfigurationError("; ".join(self._problems))


def record_retention_days(reader: EnvironmentReader) -> int:
    """RECORD_RETENTION_DAYS, read alike by every function that writes final records (0 keeps them for ever)."""
    return reader.integer("RECORD_RETENTION_DAYS", 365, 0, 36500)


def forwarding_datastore_id(reader: EnvironmentReader) -> str | None:
    """The data store StoreDICOM forwards to when STOREDICOM_FORWARDING is true (then DATASTORE_ID is required),
    read alike by every function that records instances failed: HealthImaging is asked about those without
    StoreDICOM's answer. None when forwarding is off."""
    if not reader.boolean("STOREDICOM_FORWARDING", False):
        return None
    return reader.text("DATASTORE_ID", r"[0-9a-z]{32}")


@dataclass(frozen=True)
class RecordSettings:
    """The whole environment of a function that reads a batch's manifest or objects and writes its records
    (RegisterBatch, ProcessResults, RecordFailure)."""

    table_name: str
    dicom_bucket: str
    retention_days: int
    # None when forwarding is off; RegisterBatch, which fails no instance, never asks HealthImaging.
    forwarding_datastore_id: str | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RecordSettings:
        reader = EnvironmentReader(environ)
        settings = cls(
            table_name=reader.text("TABLE_NAME"),
            dicom_bucket=reader.text("DICOM_BUCKET"),
            retention_days=record_retention_days(reader),
            forwarding_datastore_id=forwarding_datastore_id(reader),
        )
        reader.finish()
        return settings
