"""`dicom-store-scp status`: did everything a modality sent reach AWS HealthImaging?

Reads the import workflow's DynamoDB table (docs/import-workflow.rst) and, for what the table cannot know yet
(objects in a batch that is still open, or closed but not yet registered), the S3 batches (docs/s3-layout.rst).
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from scp.batches import BATCHES_PREFIX, MANIFESTS_PREFIX, iso
from scp.config import parse_ae_title
from scp.uids import is_valid_uid

EXIT_IMPORTED = 0
EXIT_ATTENTION = 1
EXIT_PENDING = 2
EXIT_UNKNOWN = 3

# Where an instance is on its way, in the order it travels.
OPEN = "open"  # stored in S3; its batch has no manifest yet
BATCHED = "batched"  # its batch is closed; no import job has started for it yet
IMPORTING = "importing"  # an import job is running
STUCK = "stuck"  # its import job has not finished within IMPORT_TIMEOUT_HOURS; HealthImaging may still finish it
REQUEUED = "requeued"  # failed on HealthImaging's side; copied into a new batch that will import it again
IMPORTED = "imported"  # in a primary image set (with or without a warning)
NON_PRIMARY = "nonprimary"  # imported, but into a non-primary image set: its metadata conflicts, a human must look
UNCONFIRMED = "unconfirmed"  # its job completed but its report never became readable: HealthImaging may hold it
FAILED = "failed"
STATES = (OPEN, BATCHED, IMPORTING, STUCK, REQUEUED, IMPORTED, NON_PRIMARY, UNCONFIRMED, FAILED)
PENDING = (OPEN, BATCHED, IMPORTING, STUCK, REQUEUED)

BY_CALLING_AE_INDEX = "ByCallingAE"
DEFAULT_LOOKBACK_HOURS = 72  # the sweeper's default: older batches without a manifest have been closed by it
DEFAULT_WINDOW = timedelta(hours=24)
_BATCH_ID = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{16}")
_RELATIVE = re.compile(r"([0-9]+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
# The daemon's Part-10 header (preamble, DICM, file meta) is a few hundred bytes; its calling AE title is there.
_HEADER_BYTES = 2048
_PARALLEL_READS = 16
# PS3.5 7.1.2: these VRs have a 4-byte length after two reserved bytes; the others a 2-byte length.
_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


class StatusError(Exception):
    """The status cannot be determined (bad option, unreachable table); the message says why."""


@dataclass(frozen=True)
class Instance:
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    state: str
    batch_id: str
    received_at: str | None = None
    calling_ae_title: str | None = None
    image_set_id: str | None = None
    job_id: str | None = None
    reason: str | None = None


@dataclass
class Report:
    query: dict[str, str]
    table: str
    bucket: str | None
    generated_at: datetime
    instances: list[Instance] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        found = Counter(instance.state for instance in self.instances)
        return {"received": len(self.instances), **{state: found[state] for state in STATES}}

    @property
    def exit_code(self) -> int:
        counts = self.counts
        if counts[FAILED] or counts[NON_PRIMARY] or counts[UNCONFIRMED]:
            return EXIT_ATTENTION
        if any(counts[state] for state in PENDING):
            return EXIT_PENDING
        if not self.instances and "studyInstanceUid" in self.query:
            return EXIT_UNKNOWN  # a study nobody has heard of is not "imported"
        return EXIT_IMPORTED

    @property
    def verdict(self) -> str:
        return {EXIT_IMPORTED: "imported", EXIT_ATTENTION: "attention", EXIT_PENDING: "pending"}.get(
            self.exit_code, "not found"
        )

    def oldest_pending(self) -> Instance | None:
        pending = [i for i in self.instances if i.state in PENDING]
        return min(pending, key=lambda i: i.received_at or _batch_time(i.batch_id)) if pending else None

    def waited_seconds(self, instance: Instance) -> int:
        since = _parse_time(instance.received_at or _batch_time(instance.batch_id))
        return max(0, int((self.generated_at - since).total_seconds()))

    def to_json(self) -> dict[str, Any]:
        oldest = self.oldest_pending()
        image_sets = Counter(i.image_set_id for i in self.instances if i.state == IMPORTED and i.image_set_id)
        studies: dict[str, Counter[str]] = {}
        for instance in self.instances:
            studies.setdefault(instance.study_instance_uid, Counter())[instance.state] += 1
        return {
            "query": self.query,
            "table": self.table,
            "bucket": self.bucket,
            "s3Checked": self.bucket is not None,
            "generatedAt": iso(self.generated_at),
            "verdict": self.verdict,
            "exitCode": self.exit_code,
            "counts": self.counts,
            "oldestPending": None
            if oldest is None
            else {**_camel(asdict(oldest)), "waitingSeconds": self.waited_seconds(oldest)},
            "imageSets": [{"imageSetId": key, "instances": n} for key, n in sorted(image_sets.items())],
            "studies": {uid: {state: counts[state] for state in STATES} for uid, counts in sorted(studies.items())},
            "instances": [_camel(asdict(i)) for i in sorted(self.instances, key=_display_order)],
        }

    def to_text(self) -> str:
        counts = self.counts
        lines = [_title(self.query)]
        source = f"table {self.table}" + (f", S3 bucket {self.bucket}" if self.bucket else ", S3 not checked")
        lines.append(f"  {'received':<12}{counts['received']:>7}   ({source})")
        labels = {
            OPEN: "stored in S3, batch still open",
            BATCHED: "batch closed, import not started yet",
            IMPORTING: "import job running",
            STUCK: "import job running past IMPORT_TIMEOUT_HOURS, checked hourly",
            REQUEUED: "HealthImaging server error, importing again in a new batch",
            IMPORTED: "in primary image sets",
            NON_PRIMARY: "in non-primary image sets: metadata conflicts, review in HealthImaging",
            UNCONFIRMED: "import job completed, its report unreadable: look the job up in HealthImaging",
            FAILED: "not imported",
        }
        for state in STATES:
            lines.append(f"  {_LABELS[state]:<12}{counts[state]:>7}   {labels[state]}")
        oldest = self.oldest_pending()
        if oldest is not None:
            waited = _duration(self.waited_seconds(oldest))
            lines.append(
                f"Oldest not yet imported: {oldest.sop_instance_uid} ({_LABELS[oldest.state]}, batch "
                f"{oldest.batch_id}), received {oldest.received_at or 'at ' + _batch_time(oldest.batch_id)}, "
                f"waiting {waited}"
            )
        image_sets = Counter(i.image_set_id for i in self.instances if i.state == IMPORTED and i.image_set_id)
        if image_sets:
            lines.append("Image sets: " + ", ".join(f"{key} ({n})" for key, n in sorted(image_sets.items())))
        for instance in sorted(self.instances, key=_display_order):
            if instance.state == NON_PRIMARY:
                lines.append(f"Non-primary: {instance.sop_instance_uid} in image set {instance.image_set_id}")
            elif instance.state == FAILED:
                lines.append(f"Failed: {instance.sop_instance_uid}: {instance.reason or 'no reason recorded'}")
            elif instance.state == IMPORTED and instance.reason:
                lines.append(f"Warning: {instance.sop_instance_uid}: {instance.reason}")
        if self.bucket is None:
            lines.append("Objects in open or unregistered batches are not counted without --bucket.")
        lines.append(f"Result: {self.verdict.upper()} (exit {self.exit_code})")
        return "\n".join(lines) + "\n"


_LABELS = {
    OPEN: "open batch",
    BATCHED: "batched",
    IMPORTING: "importing",
    STUCK: "stuck",
    REQUEUED: "requeued",
    IMPORTED: "imported",
    NON_PRIMARY: "non-primary",
    UNCONFIRMED: "unconfirmed",
    FAILED: "failed",
}


# -- reading the table -----------------------------------------------------------------------------------------


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
            ExpressionAttributeValues={":pk": f"STUDY#{study_uid}", ":instance": "INSTANCE#"},
            ConsistentRead=True,
        )
    )


def calling_ae_items(table: Any, calling_ae_title: str, since: datetime, until: datetime) -> list[dict[str, Any]]:
    # gsi2sk is "<receivedAt>#<SOP Instance UID>"; "~" sorts after "#", so an instance received exactly at
    # ``until`` is still inside the range.
    return list(
        _query(
            table,
            IndexName=BY_CALLING_AE_INDEX,
            KeyConditionExpression="gsi2pk = :ae AND gsi2sk BETWEEN :since AND :until",
            ExpressionAttributeValues={
                ":ae": f"AE#{calling_ae_title}",
                ":since": iso(since),
                ":until": iso(until) + "~",
            },
        )
    )


def _batch_statuses(table: Any, batch_ids: Iterable[str]) -> dict[str, str]:
    statuses = {}
    for batch_id in sorted(set(batch_ids)):
        item = table.get_item(Key={"pk": f"BATCH#{batch_id}", "sk": "BATCH"}, ConsistentRead=True).get("Item")
        if item:
            statuses[batch_id] = str(item.get("status", ""))
    return statuses


def _registered(table: Any, batch_ids: Sequence[str]) -> set[str]:
    """Which of ``batch_ids`` have a batch item (100 keys per BatchGetItem, DynamoDB's limit)."""
    found: set[str] = set()
    client = table.meta.client  # the resource's client: it (de)serialises attribute values like the table does
    for start in range(0, len(batch_ids), 100):
        keys = [{"pk": f"BATCH#{batch_id}", "sk": "BATCH"} for batch_id in batch_ids[start : start + 100]]
        request: dict[str, Any] = {table.name: {"Keys": keys, "ProjectionExpression": "pk"}}
        while request:
            answer = client.batch_get_item(RequestItems=request)
            found.update(str(item["pk"])[len("BATCH#") :] for item in answer["Responses"].get(table.name, []))
            request = answer.get("UnprocessedKeys") or {}
    return found


def instance_from_item(item: Mapping[str, Any], batch_statuses: Mapping[str, str]) -> Instance:
    status = str(item.get("status", ""))
    batch_id = str(item.get("batchId", ""))
    if status == "importing":
        # The instance item says "importing" from registration on; the batch says whether a job has started.
        state = BATCHED if batch_statuses.get(batch_id) == "registered" else IMPORTING
    elif status in ("imported", "warning"):
        state = NON_PRIMARY if item.get("isPrimary") is False else IMPORTED
    elif status == "requeued":
        state = REQUEUED
    elif status == "stuck":
        state = STUCK
    elif status == "unconfirmed":
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
    )


def _from_table(table: Any, items: list[dict[str, Any]]) -> list[Instance]:
    importing = [str(item.get("batchId", "")) for item in items if item.get("status") == "importing"]
    statuses = _batch_statuses(table, importing)
    return [instance_from_item(item, statuses) for item in items]


# -- reading S3: what the table does not know yet -------------------------------------------------------------


def _pages(s3: Any, **arguments: Any) -> Iterator[dict[str, Any]]:
    yield from s3.get_paginator("list_objects_v2").paginate(**arguments)


def _recent_batch_ids(s3: Any, bucket: str, start: datetime) -> list[str]:
    after = f"{BATCHES_PREFIX}{start.astimezone(UTC):%Y%m%dT%H%M%SZ}"
    ids = []
    for page in _pages(s3, Bucket=bucket, Prefix=BATCHES_PREFIX, Delimiter="/", StartAfter=after):
        for common in page.get("CommonPrefixes", []):
            candidate = common["Prefix"][len(BATCHES_PREFIX) :].rstrip("/")
            if _BATCH_ID.fullmatch(candidate):
                ids.append(candidate)
    return ids


def _closed_batch_ids(s3: Any, bucket: str, start: datetime) -> set[str]:
    after = f"{MANIFESTS_PREFIX}{start.astimezone(UTC):%Y%m%dT%H%M%SZ}"
    closed = set()
    for page in _pages(s3, Bucket=bucket, Prefix=MANIFESTS_PREFIX, StartAfter=after):
        for entry in page.get("Contents", []):
            name = entry["Key"][len(MANIFESTS_PREFIX) :]
            if name.endswith(".json"):
                closed.add(name[: -len(".json")])
    return closed


@dataclass(frozen=True)
class _Unregistered:
    batch_id: str
    closed: bool


def _unregistered_batches(s3: Any, bucket: str, table: Any, start: datetime) -> list[_Unregistered]:
    """Batches opened since ``start`` that the table does not hold: still open, or closed but not registered."""
    batch_ids = _recent_batch_ids(s3, bucket, start)
    if not batch_ids:
        return []
    closed = _closed_batch_ids(s3, bucket, start)
    registered = _registered(table, batch_ids)
    return [_Unregistered(b, b in closed) for b in batch_ids if b not in registered]


def _objects(s3: Any, bucket: str, prefix: str) -> Iterator[tuple[list[str], datetime]]:
    """(key parts after ``batches/``, LastModified) of every object under ``prefix``."""
    for page in _pages(s3, Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", []):
            parts = entry["Key"][len(BATCHES_PREFIX) :].split("/")
            if len(parts) == 4 and parts[3].endswith(".dcm"):
                yield parts, entry["LastModified"]


def _s3_instance(parts: list[str], modified: datetime, batch: _Unregistered, calling: str | None) -> Instance:
    return Instance(
        sop_instance_uid=parts[3][: -len(".dcm")],
        study_instance_uid=parts[1],
        series_instance_uid=parts[2],
        state=BATCHED if batch.closed else OPEN,
        batch_id=batch.batch_id,
        received_at=iso(modified.astimezone(UTC)),
        calling_ae_title=calling,
    )


def study_in_s3(s3: Any, bucket: str, batches: list[_Unregistered], study_uid: str) -> list[Instance]:
    found = []
    for batch in batches:
        for parts, modified in _objects(s3, bucket, f"{BATCHES_PREFIX}{batch.batch_id}/{study_uid}/"):
            found.append(_s3_instance(parts, modified, batch, None))
    return found


def calling_ae_in_s3(
    s3: Any, bucket: str, batches: list[_Unregistered], calling_ae_title: str, since: datetime, until: datetime
) -> list[Instance]:
    """Objects from ``calling_ae_title`` received in the range; the key does not name the sender, the file does."""
    candidates = [
        (parts, modified, batch)
        for batch in batches
        if _batch_time(batch.batch_id) <= iso(until)
        for parts, modified in _objects(s3, bucket, f"{BATCHES_PREFIX}{batch.batch_id}/")
        if since <= modified <= until
    ]
    with ThreadPoolExecutor(max_workers=_PARALLEL_READS) as pool:
        senders = list(pool.map(lambda c: _source_ae_title(s3, bucket, BATCHES_PREFIX + "/".join(c[0])), candidates))
    return [
        _s3_instance(parts, modified, batch, sender)
        for (parts, modified, batch), sender in zip(candidates, senders, strict=True)
        if sender == calling_ae_title
    ]


def _source_ae_title(s3: Any, bucket: str, key: str) -> str | None:
    """The Source Application Entity Title (0002,0016) the daemon wrote into the object's file meta."""
    head = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{_HEADER_BYTES - 1}")["Body"].read()
    return source_ae_title(head)


def source_ae_title(head: bytes) -> str | None:
    """(0002,0016) from the start of a Part-10 file; the file meta is always explicit VR little endian (PS3.10 7.1)."""
    if head[128:132] != b"DICM":
        return None
    offset = 132
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if group != 0x0002:
            return None
        if head[offset + 4 : offset + 6] in _LONG_LENGTH_VRS:
            if offset + 12 > len(head):
                return None
            (length,) = struct.unpack_from("<I", head, offset + 8)
            value_at = offset + 12
        else:
            (length,) = struct.unpack_from("<H", head, offset + 6)
            value_at = offset + 8
        if element == 0x0016:
            title = head[value_at : value_at + length].decode("ascii", "replace").strip(" \0")
            return title or None
        offset = value_at + length
    return None


# -- putting it together -----------------------------------------------------------------------------------


def _newest_per_instance(instances: Iterable[Instance]) -> list[Instance]:
    """An instance sent again lives in a newer batch; that newer copy is the one whose fate counts."""
    newest: dict[str, Instance] = {}
    for instance in instances:
        current = newest.get(instance.sop_instance_uid)
        if current is None or instance.batch_id > current.batch_id:  # batch ids begin with their open time
            newest[instance.sop_instance_uid] = instance
    return list(newest.values())


def study_report(table: Any, s3: Any, bucket: str | None, study_uid: str, now: datetime, lookback: timedelta) -> Report:
    report = Report({"studyInstanceUid": study_uid}, table.name, bucket, now)
    found = _from_table(table, study_items(table, study_uid))
    if bucket is not None:
        found += study_in_s3(s3, bucket, _unregistered_batches(s3, bucket, table, now - lookback), study_uid)
    report.instances = _newest_per_instance(found)
    return report


def calling_ae_report(
    table: Any,
    s3: Any,
    bucket: str | None,
    calling_ae_title: str,
    window: tuple[datetime, datetime],
    now: datetime,
    lookback: timedelta,
) -> Report:
    since, until = window
    query = {"callingAETitle": calling_ae_title, "since": iso(since), "until": iso(until)}
    report = Report(query, table.name, bucket, now)
    found = _from_table(table, calling_ae_items(table, calling_ae_title, since, until))
    if bucket is not None:
        # A batch opened before ``since`` may still hold objects received after it (a steady stream keeps a
        # batch open), so batches are looked for from ``lookback`` before the range.
        batches = _unregistered_batches(s3, bucket, table, since - lookback)
        found += calling_ae_in_s3(s3, bucket, batches, calling_ae_title, since, until)
    report.instances = _newest_per_instance(found)
    return report


# -- command line ------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse exits 2 on a usage error, which this command uses for "pending".
        self.print_usage(sys.stderr)
        self.exit(EXIT_UNKNOWN, f"{self.prog}: invalid configuration: {message}\n")


def parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    command = _Parser(
        prog="dicom-store-scp status",
        description="Did everything a modality sent reach AWS HealthImaging? Reports, per study or per calling AE "
        "title and time range, how many instances were received, are in an open batch, waiting for or in an "
        "import job, imported (with image set ids), imported as non-primary, or failed (with reasons).",
        epilog="Exit codes: 0 everything received is imported; 1 something failed or landed in a non-primary "
        "image set (a human must look); 2 something is still on its way (and nothing failed); 3 the status "
        "could not be determined (invalid configuration, table unreachable, or the study was not found).",
    )
    which = command.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", metavar="UID", help="Study Instance UID")
    which.add_argument("--calling-ae", metavar="AE", help="calling AE title of the modality")
    command.add_argument(
        "--since", metavar="TIME", help="with --calling-ae: start, ISO 8601 UTC or relative (90m, 2h, 1d); default 24h"
    )
    command.add_argument("--until", metavar="TIME", help="with --calling-ae: end, ISO 8601 UTC; default now")
    command.add_argument(
        "--table",
        default=environ.get("IMPORT_TABLE_NAME"),
        help="the import workflow's DynamoDB table (stack output ImportTableName); env IMPORT_TABLE_NAME",
    )
    command.add_argument(
        "--bucket",
        default=environ.get("DICOM_BUCKET") or None,
        help="the DICOM bucket, to count objects in batches the table does not hold yet; env DICOM_BUCKET",
    )
    command.add_argument("--no-s3", action="store_true", help="read the table only, even if a bucket is known")
    command.add_argument(
        "--lookback-hours",
        type=int,
        default=DEFAULT_LOOKBACK_HOURS,
        help=f"how far back to look for unregistered batches in S3 (default {DEFAULT_LOOKBACK_HOURS})",
    )
    command.add_argument("--region", default=None, help="AWS Region; default from the standard AWS configuration")
    command.add_argument("--json", action="store_true", help="print one JSON document for scripts")
    return command


def _problems(arguments: argparse.Namespace) -> list[str]:
    problems = []
    if not arguments.table:
        problems.append("--table (or IMPORT_TABLE_NAME) is required")
    if arguments.study is not None and not is_valid_uid(arguments.study):
        problems.append(f"--study: not a valid UID: {arguments.study!r}")
    if arguments.calling_ae is not None:
        try:
            arguments.calling_ae = parse_ae_title(arguments.calling_ae)
        except ValueError as error:
            problems.append(f"--calling-ae: {error}")
    elif arguments.since or arguments.until:
        problems.append("--since and --until go with --calling-ae")
    if not 1 <= arguments.lookback_hours <= 8760:
        problems.append("--lookback-hours: expected 1-8760")
    return problems


def parse_time(text: str, now: datetime) -> datetime:
    """ISO 8601 (UTC unless it says otherwise) or a span back from now such as ``90m``, ``2h``, ``1d``."""
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        return now - timedelta(**{_UNITS[relative[2]]: int(relative[1])})
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise StatusError(f"not a time: {text!r} (use ISO 8601 such as 2026-11-23T08:00Z, or 90m, 2h, 1d)") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def run(arguments: argparse.Namespace, table: Any, s3: Any, now: datetime) -> Report:
    bucket = None if arguments.no_s3 else arguments.bucket
    if arguments.study is not None:
        return study_report(table, s3, bucket, arguments.study, now, timedelta(hours=arguments.lookback_hours))
    until = parse_time(arguments.until, now) if arguments.until else now
    since = parse_time(arguments.since, now) if arguments.since else until - DEFAULT_WINDOW
    if since > until:
        raise StatusError("--since is after --until")
    lookback = timedelta(hours=arguments.lookback_hours)
    return calling_ae_report(table, s3, bucket, arguments.calling_ae, (since, until), now, lookback)


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    arguments = parser(environ).parse_args(argv)
    problems = _problems(arguments)
    if problems:
        sys.stderr.write("dicom-store-scp status: invalid configuration:\n" + "".join(f"  {p}\n" for p in problems))
        return EXIT_UNKNOWN
    import boto3  # loads only for this command
    from botocore.exceptions import BotoCoreError, ClientError

    session = boto3.session.Session(region_name=arguments.region)
    try:
        table = session.resource("dynamodb").Table(arguments.table)
        report = run(arguments, table, session.client("s3"), datetime.now(UTC))
    except StatusError as error:
        sys.stderr.write(f"dicom-store-scp status: invalid configuration: {error}\n")
        return EXIT_UNKNOWN
    except (BotoCoreError, ClientError) as error:
        sys.stderr.write(f"dicom-store-scp status: cannot read the import status: {error}\n")
        return EXIT_UNKNOWN
    if arguments.json:
        sys.stdout.write(json.dumps(report.to_json(), indent=1) + "\n")
    else:
        sys.stdout.write(report.to_text())
    return report.exit_code


def _optional(item: Mapping[str, Any], name: str) -> str | None:
    value = item.get(name)
    return str(value) if value not in (None, "") else None


def _batch_time(batch_id: str) -> str:
    """The open time a batch id begins with, as an ISO timestamp (the receive time of its first object)."""
    if not _BATCH_ID.fullmatch(batch_id):
        return "9999-12-31T23:59:59.999Z"
    return iso(datetime.strptime(batch_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC))


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def _duration(seconds: int) -> str:
    """The two largest units: ``2d 3h``, ``1h 0m``, ``5m 12s``, ``42s``."""
    units = (("d", 86_400), ("h", 3600), ("m", 60), ("s", 1))
    for index, (name, size) in enumerate(units[:-1]):
        if seconds >= size:
            smaller, smaller_size = units[index + 1]
            return f"{seconds // size}{name} {seconds % size // smaller_size}{smaller}"
    return f"{seconds}s"


def _camel(record: dict[str, Any]) -> dict[str, Any]:
    names = {"calling_ae_title": "callingAETitle"}
    return {names.get(k) or re.sub(r"_([a-z])", lambda m: m[1].upper(), k): v for k, v in record.items()}


def _display_order(instance: Instance) -> tuple[int, str, str]:
    return STATES.index(instance.state), instance.series_instance_uid, instance.sop_instance_uid


def _title(query: Mapping[str, str]) -> str:
    if "studyInstanceUid" in query:
        return f"Study {query['studyInstanceUid']}"
    return f"Calling AE {query['callingAETitle']}, received {query['since']} to {query['until']}"
