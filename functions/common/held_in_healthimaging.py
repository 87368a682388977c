"""Which instances HealthImaging holds, asked of HealthImaging itself, for instances about to be recorded failed.

With StoreDICOM forwarding, an instance StoreDICOM stored may carry no tag saying so: its answer never reached the
daemon, or the daemon died between the answer and the tag. It then goes to an import job with its batch, and if
that job fails it, HealthImaging still holds it. Before such an instance is recorded failed, HealthImaging is asked:
one SearchImageSets per series (paginated), one GetImageSetMetadata per image set found, and an instance listed in
an image set's metadata is in HealthImaging.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from batch_contract.manifest import ManifestObject, StoredByStoreDICOM
from batch_contract.table import STORED_BY_HEALTHIMAGING
from batch_contract.timestamps import iso_millis
from common.parallel import POOLED_CLIENT_CONFIG, in_parallel

if TYPE_CHECKING:
    from mypy_boto3_medical_imaging import HealthImagingClient


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
    # Pooled: the series and image sets of a batch are asked about side by side.
    return HealthImagingLookup(boto3.client("medical-imaging", config=POOLED_CLIENT_CONFIG), forwarding_datastore_id)


@dataclass(frozen=True)
class _ImageSet:
    image_set_id: str
    is_primary: bool | None
    updated_at: datetime | None


def _asked(error: ClientError | BotoCoreError, what: str) -> HealthImagingUnreadable:
    code = str(error.response.get("Error", {}).get("Code")) if isinstance(error, ClientError) else type(error).__name__
    return HealthImagingUnreadable(f"{what}: {code}")


def _image_sets_of_series(lookup: HealthImagingLookup, series_uid: str) -> list[_ImageSet]:
    pages = lookup.client.get_paginator("search_image_sets").paginate(
        datastoreId=lookup.datastore_id,
        searchCriteria={"filters": [{"values": [{"DICOMSeriesInstanceUID": series_uid}], "operator": "EQUAL"}]},
    )
    try:
        return [
            _ImageSet(summary["imageSetId"], summary.get("isPrimary"), summary.get("updatedAt"))
            for page in pages
            for summary in page.get("imageSetsMetadataSummaries", [])
        ]
    except (ClientError, BotoCoreError) as error:
        raise _asked(error, f"SearchImageSets for series {series_uid}") from error


def _series_in(lookup: HealthImagingLookup, image_set_id: str) -> dict[str, set[str]]:
    """Series UID -> SOP Instance UIDs in the image set's metadata (gzip JSON: Study, Series, Instances)."""
    try:
        response = lookup.client.get_image_set_metadata(datastoreId=lookup.datastore_id, imageSetId=image_set_id)
        raw = response["imageSetMetadataBlob"].read()
    except (ClientError, BotoCoreError) as error:
        raise _asked(error, f"GetImageSetMetadata for image set {image_set_id}") from error
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
