"""Timestamps of the contract: ISO 8601 UTC with milliseconds and ``Z`` (``2026-11-23T18:57:00.113Z``)."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_millis(moment: datetime) -> str:
    """The manifest's and the table's timestamp format; a naive ``moment`` is taken as UTC."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_iso(text: str) -> datetime:
    """An ISO 8601 timestamp as an aware UTC datetime (``Z`` or an offset; none means UTC)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
