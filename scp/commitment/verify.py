"""Checking that the store still holds an instance's object: the local file's meta names it, or the S3 key exists."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info

from scp.commitment.request import Reference

LOG = logging.getLogger(__name__)

_S3_PREFIX = "s3://"
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


class LocalFiles:
    """Local store: the final file exists under the store's root and its file meta names the instance and class."""

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()

    def holds(self, location: str, reference: Reference) -> bool | None:
        path = Path(location)
        if not path.is_relative_to(self._root):
            return False  # the ledger only records paths the local store built under its root
        try:
            meta = read_file_meta_info(path)
        except FileNotFoundError:
            return False
        except Exception as error:  # noqa: BLE001 - any unreadable file meta means it is not (or no longer) that object
            LOG.warning(
                "commitment check cannot read a stored file",
                extra={"location": location, "error": type(error).__name__},
            )
            return False
        return bool(
            meta.get("MediaStorageSOPInstanceUID") == reference.sop_instance_uid
            and meta.get("MediaStorageSOPClassUID") == reference.sop_class_uid
        )


class S3Objects:
    """S3 store: the object's key exists (S3 acknowledged it with its checksum before the C-STORE succeeded)."""

    def __init__(self, client: Any, bucket: str) -> None:
        self._client = client
        self._bucket = bucket

    def holds(self, location: str, reference: Reference) -> bool | None:
        prefix = f"{_S3_PREFIX}{self._bucket}/"
        if not location.startswith(prefix):
            return False
        try:
            self._client.head_object(Bucket=self._bucket, Key=location[len(prefix) :])
        except Exception as error:  # noqa: BLE001 - botocore's errors; a missing key is an answer, the rest transient
            code = str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND:
                return False
            LOG.warning("commitment check cannot reach S3", extra={"error": type(error).__name__, "code": code})
            return None
        return True
