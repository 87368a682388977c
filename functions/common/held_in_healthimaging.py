"""Which instances HealthImaging holds, asked of HealthImaging itself, for instances about to be recorded failed.

With StoreDICOM forwarding, an instance StoreDICOM stored may carry no tag saying so: its answer never reached the
daemon, or the daemon died between the answer and the tag. It then goes to an import job with its batch, and if
that job fails it, HealthImaging still holds it. Before such an instance is recorded failed, HealthImaging is asked:
one SearchImageSets per series (paginated), one GetImageSetMetadata per image set found, and an instance listed in
an image set's metadata is in HealthImaging.

A batch's lookup is many calls, and the first that fails fails it all; retried only as a whole (the state
machine's retry of the task), one call in ten failing over twenty calls fails nine lookups in ten, and a batch
would reach RecordFailure on HealthImaging's passing errors. So each call is retried here, by one policy (the
client's own retries are off): throttling, server errors and transport errors, LOOKUP_ATTEMPTS times with full
jitter. An error that asking again cannot mend (access, validation, a data store not found) is not retried.
"""

from __future__ import annotations

import gzip
import json
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError

from batch_contract.manifest import ManifestObject, StoredByStoreDICOM
from batch_contract.table import STORED_BY_HEALTHIMAGING
from batch_contract.timestamps import iso_millis
from common.parallel import POOLED_CLIENT_CONFIG, in_parallel

if TYPE_CHECKING:
    from mypy_boto3_medical_imaging import HealthImagingClient


Answer = TypeVar("Answer")

LOOKUP_ATTEMPTS = 4
BACKOFF_BASE_SECONDS = 0.25
BACKOFF_CAP_SECONDS = 2.0
_RETRYABLE_CODES = frozenset({"ThrottlingException", "InternalServerException", "ServiceUnavailableException"})


class HealthImagingUnreadable(Exception):
    """HealthImaging could not be asked (throttling, a server error, access, a transport error)."""


@dataclass(frozen=True)
class HealthImagingLookup:
    """The data store StoreDICOM forwards to, and a client to ask it; None where forwarding is off."""

    client: HealthImagingClient
    datastore_id: str


def healthimaging_lookup(forwarding_datastore_id: str | None) -> HealthImagingLookup | None:
    """The lookup a function that records failures uses (common/config.py, forwarding_datastore_id)."""
    if forwarding_datastore_id is None:
        return None
    # Pooled: the series and image sets of a batch are asked about side by side. One attempt per client call: the
    # retries are _asking's.
    config = POOLED_CLIENT_CONFIG.merge(Config(retries={"total_max_attempts": 1}))
    return HealthImagingLookup(boto3.client("medical-imaging", config=config), forwarding_datastore_id)


@dataclass(frozen=True)
class _ImageSet:
    image_set_id: str
    is_primary: bool | None
    updated_at: datetime | None


def _retryable(error: ClientError | BotoCoreError) -> bool:
    if isinstance(error, ClientError):
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return str(error.response.get("Error", {}).get("Code")) in _RETRYABLE_CODES or status >= 500
    return isinstance(error, ConnectionError | HTTPClientError)


def _asking(call: Callable[[], Answer], what: str) -> Answer:
    """``call()``, tried again through passing errors; HealthImagingUnreadable once it has failed for good."""
    attempt = 1
    while True:
        try:
            return call()
        except (ClientError, BotoCoreError) as error:
            if attempt == LOOKUP_ATTEMPTS or not _retryable(error):
                code = (
                    str(error.response.get("Error", {}).get("Code"))
                    if isinstance(error, ClientError)
                    else type(error).__name__
                )
                raise HealthImagingUnreadable(f"{what}: {code} (attempt {attempt})") from error
        ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt)
        time.sleep(random.uniform(0, ceiling))  # noqa: S311 - spreading retries, not security
        attempt += 1


def _image_sets_of_series(lookup: HealthImagingLookup, series_uid: str) -> list[_ImageSet]:
    def search() -> list[_ImageSet]:
        # Every page again on a retry: a page token is not kept across a failed call.
        pages = lookup.client.get_paginator("search_image_sets").paginate(
            datastoreId=lookup.datastore_id,
            searchCriteria={"filters": [{"values": [{"DICOMSeriesInstanceUID": series_uid}], "operator": "EQUAL"}]},
        )
        return [
            _ImageSet(summary["imageSetId"], summary.get("isPrimary"), summary.get("updatedAt"))
            for page in pages
            for summary in page.get("imageSetsMetadataSummaries", [])
        ]

    return _asking(search, f"SearchImageSets for series {series_uid}")


def _series_in(lookup: HealthImagingLookup, image_set_id: str) -> dict[str, set[str]]:
    """Series UID -> SOP Instance UIDs in the image set's metadata (gzip JSON: Study, Series, Instances)."""

    def read() -> bytes:
        response = lookup.client.get_image_set_metadata(datastoreId=lookup.datastore_id, imageSetId=image_set_id)
        return response["imageSetMetadataBlob"].read()

    raw = _asking(read, f"GetImageSetMetadata for image set {image_set_id}")
    if raw[:2] == b"\x1f\x8b":  # the service sends gzip (contentEncoding "gzip")
        raw = gzip.decompress(raw)
    try:
        series: Any = json.loads(raw)["Study"]["Series"]
        return {str(uid): set(entry.get("Instances") or {}) for uid, entry in series.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise HealthImagingUnreadable(f"metadata of image set {image_set_id} unreadable: {error}") from error


def held_in_healthimaging(
    lookup: HealthImagingLookup, entries: Iterable[ManifestObject], now: datetime
) -> dict[str, StoredByStoreDICOM]:
    """What HealthImaging holds of ``entries``, by key, recorded as StoreDICOM's answer would be; ``storedBy``
    says HealthImaging was asked. A primary image set wins over a non-primary one holding the same instance.
    Raises HealthImagingUnreadable when a call fails."""
    by_series: dict[str, dict[str, str]] = {}
    for entry in entries:
        by_series.setdefault(entry.series_instance_uid, {})[entry.sop_instance_uid] = entry.key
    if not by_series:
        return {}
    series_uids = sorted(by_series)
    found_sets = in_parallel(lambda series: _image_sets_of_series(lookup, series), series_uids)
    # An image set is read once, however many of the batch's series the search found in it.
    image_sets = {image_set.image_set_id: image_set for sets in found_sets for image_set in sets}
    listed = in_parallel(lambda image_set_id: _series_in(lookup, image_set_id), list(image_sets))
    held: dict[str, StoredByStoreDICOM] = {}
    for (image_set_id, image_set), series_in_set in zip(image_sets.items(), listed, strict=True):
        for series, sops in series_in_set.items():
            for sop in sops & by_series.get(series, {}).keys():
                key = by_series[series][sop]
                if key in held and held[key].is_primary is not False:
                    continue
                held[key] = StoredByStoreDICOM(
                    # HealthImaging does not say when it took the instance; the image set's last change is
                    # no earlier.
                    stored_at=iso_millis(image_set.updated_at or now),
                    image_set_id=image_set_id,
                    warning=None,
                    is_primary=image_set.is_primary,
                    stored_by=STORED_BY_HEALTHIMAGING,
                )
    return held
