"""Which of the objects an import job or a failed workflow would record failed StoreDICOM had stored already.

The daemon tags an object once StoreDICOM stored it (batch_contract/stored_tags.py); a batch the sweeper sealed
whole after the daemon died, or a fallback batch whose withdrawn request was answered after the close, holds such
objects. Their tags are read only for the instances about to be recorded failed, so the usual path costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from aws_lambda_powertools import Logger
from botocore.exceptions import BotoCoreError, ClientError

from batch_contract.manifest import StoredByStoreDICOM
from batch_contract.stored_tags import parse_stored_tags
from common.parallel import in_parallel

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

logger = Logger(service="import-workflow", child=True)

_GONE = ("NoSuchKey", "404")


class StoredTagsUnreadable(Exception):
    """An object's tags could not be read (throttling, a server error, access): the task is retried."""


def stored_by_storedicom(
    s3: S3Client, bucket: str, keys: Iterable[str], retry_on_error: bool
) -> dict[str, StoredByStoreDICOM]:
    """StoreDICOM's answer, by key, for each object whose tags say StoreDICOM stored it.

    An object that is gone has no say (logged). Any other error raises StoredTagsUnreadable when
    ``retry_on_error`` (the state machine runs the task again); otherwise it is logged and the object counts as not
    stored by StoreDICOM: recorded failed, which is what is known of it.
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

    return {key: stored for key, stored in in_parallel(read, list(keys)) if stored is not None}
