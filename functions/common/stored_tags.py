"""Which of the objects an import job or a failed workflow would record failed StoreDICOM had stored already.

The daemon tags an object once StoreDICOM stored it (batch_contract/stored_tags.py); a batch the sweeper sealed
whole after the daemon died, or a fallback batch whose withdrawn request was answered after the close, holds such
objects. Their tags are read only for the instances about to be recorded failed, so the usual path costs nothing.
Where forwarding is on, an instance without the tag may still be in HealthImaging (StoreDICOM's answer was lost, or
the daemon died before tagging): HealthImaging is asked about those (common/held_in_healthimaging.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from aws_lambda_powertools import Logger
from botocore.exceptions import BotoCoreError, ClientError

from batch_contract.manifest import ManifestObject, StoredByStoreDICOM
from batch_contract.stored_tags import parse_stored_tags
from common.held_in_healthimaging import HealthImagingLookup, HealthImagingUnreadable, held_in_healthimaging
from common.parallel import in_parallel

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

logger = Logger(service="import-workflow", child=True)

_GONE = ("NoSuchKey", "404")


class StoredTagsUnreadable(Exception):
    """An object's tags could not be read (throttling, a server error, access): the task is retried."""


def stored_by_storedicom(
    s3: S3Client,
    bucket: str,
    entries: Sequence[ManifestObject],
    healthimaging: HealthImagingLookup | None,
    retry_on_error: bool,
    now: datetime,
) -> dict[str, StoredByStoreDICOM]:
    """StoreDICOM's answer, by key, for each of ``entries`` whose object's tags say StoreDICOM stored it, and,
    with ``healthimaging`` (forwarding on), for each of the others that HealthImaging holds.

    An object that is gone has no say (logged). Any other error raises (StoredTagsUnreadable,
    HealthImagingUnreadable) when ``retry_on_error`` (the state machine, or the sweeper's next run, does it again);
    otherwise it is logged and the objects it concerns count as not stored: recorded failed, which is what is
    known of them.
    """

    def read(key: str) -> tuple[str, StoredByStoreDICOM | None]:
        try:
            tag_set = s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
        except (ClientError, BotoCoreError) as error:
            code = (
                str(error.response.get("Error", {}).get("Code"))
                if isinstance(error, ClientError)
                else type(error).__name__
            )
            if retry_on_error and code not in _GONE:
                raise StoredTagsUnreadable(f"tags of {key} unreadable: {code}") from error
            logger.warning("tags unreadable; recorded as the import says", key=key, error=code)
            return key, None
        return key, parse_stored_tags(tag_set)

    stored = {key: answer for key, answer in in_parallel(read, [e.key for e in entries]) if answer is not None}
    untagged = [entry for entry in entries if entry.key not in stored]
    if healthimaging is None or not untagged:
        return stored
    try:
        held = held_in_healthimaging(healthimaging, untagged, now)
    except HealthImagingUnreadable as error:
        if retry_on_error:
            raise
        logger.warning("HealthImaging could not be asked; recorded as the import says", error=str(error))
        return stored
    if held:
        logger.warning(
            "instances without StoreDICOM's answer found in HealthImaging: recorded imported", instances=len(held)
        )
    return stored | held
