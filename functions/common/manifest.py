"""Batch manifests in S3: reading them and writing them once; the schema is the batch contract's (batch_contract/)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from batch_contract.layout import manifest_key
from batch_contract.manifest import (
    CLOSED_BY_DAEMON,
    CLOSED_BY_LATE,
    CLOSED_BY_REQUEUE,
    CLOSED_BY_SWEEPER,
    MANIFEST_VERSION,
    Manifest,
    ManifestError,
    ManifestObject,
    encode_manifest,
    parse_manifest,
)
from batch_contract.timestamps import iso_millis, parse_iso

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = [
    "CLOSED_BY_DAEMON",
    "CLOSED_BY_LATE",
    "CLOSED_BY_REQUEUE",
    "CLOSED_BY_SWEEPER",
    "MANIFEST_VERSION",
    "Manifest",
    "ManifestError",
    "ManifestObject",
    "iso_millis",
    "parse_iso",
    "parse_manifest",
    "read_manifest",
    "write_manifest_once",
]


def read_manifest(s3: S3Client, bucket: str, batch_id: str) -> Manifest:
    body = s3.get_object(Bucket=bucket, Key=manifest_key(batch_id))["Body"].read()
    return parse_manifest(body, batch_id, bucket)


def write_manifest_once(s3: S3Client, manifest: Manifest) -> bool:
    """Conditional put (If-None-Match: *): True if this call created it, False if one already existed."""
    body = encode_manifest(manifest)
    try:
        s3.put_object(
            Bucket=manifest.bucket,
            Key=manifest_key(manifest.batch_id),
            Body=body,
            ContentType="application/json",
            IfNoneMatch="*",
        )
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "PreconditionFailed":
            return False
        raise
    return True
