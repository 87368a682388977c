"""Reading the import workflow's DynamoDB table (docs/import-workflow.rst): instance items and their batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from batch_contract import table as contract
from batch_contract.timestamps import iso_millis
from scp.import_status.report import (
    BATCHED,
    FAILED,
    IMPORTED,
    IMPORTING,
    NON_PRIMARY,
    REQUEUED,
    STUCK,
    UNCONFIRMED,
    Instance,
)

# DynamoDB's BatchGetItem takes at most 100 keys per request.
_BATCH_GET_KEYS = 100


def _query(table: Any, **arguments: Any) -> Iterator[dict[str, Any]]:
    while True:
        page = table.query(**arguments)
        yield from page.get("Items", [])
        if "LastEvaluatedKey" not in page:
            return
        arguments["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def study_items(table: Any, study_uid: str) -> list[dict[str, Any]]:
    return list(
        _query(
            table,
            KeyConditionExpression="pk = :pk AND begins_with(sk, :instance)",
            ExpressionAttributeValues={
                ":pk": contract.study_partition(study_uid),
                ":instance": contract.INSTANCE_SORT_PREFIX,
            },
            ConsistentRead=True,
        )
    )


def calling_ae_items(table: Any, calling_ae_title: str, since: datetime, until: datetime) -> list[dict[str, Any]]:
    # The sort key is "<receivedAt>#<SOP Instance UID>"; "~" sorts after "#", so an instance received exactly at
    # ``until`` is still inside the range.
    return list(
        _query(
            table,
            IndexName=contract.BY_CALLING_AE_INDEX,
            KeyConditionExpression="gsi2pk = :ae AND gsi2sk BETWEEN :since AND :until",
            ExpressionAttributeValues={
                ":ae": contract.calling_ae_partition(calling_ae_title),
                ":since": iso_millis(since),
                ":until": iso_millis(until) + "~",
            },
        )
    )


def _batch_statuses(table: Any, batch_ids: Iterable[str]) -> dict[str, str]:
    statuses = {}
    for batch_id in sorted(set(batch_ids)):
        item = table.get_item(Key=contract.batch_key(batch_id), ConsistentRead=True).get("Item")
        if item:
            statuses[batch_id] = str(item.get("status", ""))
    return statuses


def registered(table: Any, batch_ids: Sequence[str]) -> set[str]:
    """Which of ``batch_ids`` have a batch item."""
    found: set[str] = set()
    client = table.meta.client  # the resource's client: it (de)serialises attribute values like the table does
    for start in range(0, len(batch_ids), _BATCH_GET_KEYS):
        keys = [contract.batch_key(batch_id) for batch_id in batch_ids[start : start + _BATCH_GET_KEYS]]
        request: dict[str, Any] = {table.name: {"Keys": keys, "ProjectionExpression": "pk"}}
        while request:
            answer = client.batch_get_item(RequestItems=request)
            found.update(contract.batch_id_of_key(str(item["pk"])) for item in answer["Responses"].get(table.name, []))
            request = answer.get("UnprocessedKeys") or {}
    return found


def instance_from_item(item: Mapping[str, Any], batch_statuses: Mapping[str, str]) -> Instance:
    status = str(item.get("status", ""))
    batch_id = str(item.get("batchId", ""))
    if status == contract.IMPORTING:
        # The instance item says "importing" from registration on; the batch says whether a job has started.
        state = BATCHED if batch_statuses.get(batch_id) == contract.BATCH_REGISTERED else IMPORTING
    elif status in (contract.IMPORTED, contract.WARNING):
        state = NON_PRIMARY if item.get("isPrimary") is False else IMPORTED
    elif status == contract.REQUEUED:
        state = REQUEUED
    elif status == contract.STUCK:
        state = STUCK
    elif status == contract.UNCONFIRMED:
        state = UNCONFIRMED
    else:
        state = FAILED
    return Instance(
        sop_instance_uid=str(item["sopInstanceUid"]),
        study_instance_uid=str(item["studyInstanceUid"]),
        series_instance_uid=str(item["seriesInstanceUid"]),
        state=state,
        batch_id=batch_id,
        received_at=_optional(item, "receivedAt"),
        calling_ae_title=_optional(item, "callingAETitle"),
        image_set_id=_optional(item, "imageSetId"),
        job_id=_optional(item, "jobId"),
        reason=_optional(item, "reason"),
        stored_by=_optional(item, "storedBy"),
    )


def instances(table: Any, items: list[dict[str, Any]]) -> list[Instance]:
    """The report's view of instance items, asking the batch items where a job has not started yet."""
    importing = [str(item.get("batchId", "")) for item in items if item.get("status") == contract.IMPORTING]
    statuses = _batch_statuses(table, importing)
    return [instance_from_item(item, statuses) for item in items]


def _optional(item: Mapping[str, Any], name: str) -> str | None:
    value = item.get(name)
    return str(value) if value not in (None, "") else None
