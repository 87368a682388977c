"""DICOM UID validation: the only gate a received UID passes before it may name a file or an S3 key."""

from __future__ import annotations

import re

# PS3.5 9.1: digits and dots, at most 64 characters, no empty component. Leading zeros inside a component are
# invalid by the letter of the standard but common in data from real modalities; they are harmless in a path,
# so they are accepted rather than refusing a patient's images.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
UID_MAX_LENGTH = 64


def is_valid_uid(value: str) -> bool:
    return len(value) <= UID_MAX_LENGTH and _UID.fullmatch(value) is not None
