"""The S3 key layout, as the functions import it: the definitions are the batch contract's (batch_contract/)."""

from __future__ import annotations

from batch_contract.layout import (
    BATCH_ID_PATTERN,
    BATCHES_PREFIX,
    MANIFESTS_PREFIX,
    RESULTS_PREFIX,
    UID_PATTERN,
    LayoutError,
    ObjectKey,
    batch_id_from_manifest_key,
    batch_id_from_prefix,
    batch_id_time_part,
    batch_opened_at,
    batch_prefix,
    check_batch_id,
    late_batch_id,
    manifest_key,
    object_key,
    parse_object_key,
    results_prefix,
    split_s3_uri,
)

__all__ = [
    "BATCHES_PREFIX",
    "BATCH_ID_PATTERN",
    "MANIFESTS_PREFIX",
    "RESULTS_PREFIX",
    "UID_PATTERN",
    "LayoutError",
    "ObjectKey",
    "batch_id_from_manifest_key",
    "batch_id_from_prefix",
    "batch_id_time_part",
    "batch_opened_at",
    "batch_prefix",
    "check_batch_id",
    "late_batch_id",
    "manifest_key",
    "object_key",
    "parse_object_key",
    "results_prefix",
    "split_s3_uri",
]
