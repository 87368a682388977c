"""StoreDICOM's answer kept on the S3 object itself (docs/s3-layout.rst, "Object tags").

In S3 mode the daemon's knowledge of what StoreDICOM stored is otherwise only in its working state, lost with the
daemon. Once StoreDICOM stored an instance the daemon tags its object with these tags, so that an import job that
later fails for an object of a batch sealed whole by the sweeper (or of a fallback batch) never records ``failed``
what HealthImaging holds: the workflow reads the tags of each instance it is about to fail.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from batch_contract.manifest import StoredByStoreDICOM
from batch_contract.timestamps import iso_millis, parse_iso

TAG_STORED_AT = "storedicom-stored-at"
TAG_IMAGE_SET = "storedicom-image-set"
TAG_WARNING = "storedicom-warning"

# S3 tag values: at most 256 characters of letters, digits, spaces and ``+ - = . _ : / @``.
_VALUE_LIMIT = 256
_VALUE_PUNCTUATION = frozenset(" +-=._:/@")


def _tag_value(text: str) -> str:
    kept = "".join(char if (char.isascii() and char.isalnum()) or char in _VALUE_PUNCTUATION else " " for char in text)
    return " ".join(kept.split())[:_VALUE_LIMIT] or "warning"


def _image_set_id(text: str | None) -> str | None:
    # The daemon keeps only ASCII letters and digits from StoreDICOM's answer; anything else names no image set.
    return text if text and text.isascii() and text.isalnum() and len(text) <= 64 else None


def stored_tags(stored: StoredByStoreDICOM) -> list[dict[str, str]]:
    """The object's TagSet for PutObjectTagging (it replaces any tags; the daemon's objects carry no others)."""
    tags = [{"Key": TAG_STORED_AT, "Value": iso_millis(parse_iso(stored.stored_at))}]
    image_set_id = _image_set_id(stored.image_set_id)
    if image_set_id:
        tags.append({"Key": TAG_IMAGE_SET, "Value": image_set_id})
    if stored.warning:
        # Tag values allow few characters: the warning's text is kept as far as they allow.
        tags.append({"Key": TAG_WARNING, "Value": _tag_value(stored.warning)})
    return tags


def parse_stored_tags(tag_set: Iterable[Mapping[str, object]]) -> StoredByStoreDICOM | None:
    """StoreDICOM's answer from GetObjectTagging's TagSet; None if the tags do not say StoreDICOM stored it."""
    tags = {str(tag.get("Key")): str(tag.get("Value", "")) for tag in tag_set}
    stored_at = tags.get(TAG_STORED_AT)
    if not stored_at:
        return None
    try:
        stamp = iso_millis(parse_iso(stored_at))
    except ValueError:
        return None
    return StoredByStoreDICOM(stamp, _image_set_id(tags.get(TAG_IMAGE_SET)), tags.get(TAG_WARNING) or None)
