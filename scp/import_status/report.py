"""The status report: where each instance is on its way to HealthImaging, counts, verdict, exit code, text and JSON."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from batch_contract.layout import batch_opened_at, is_batch_id
from batch_contract.timestamps import iso_millis, parse_iso

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
ATTENTION = (NON_PRIMARY, UNCONFIRMED, FAILED)

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
_MEANINGS = {
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
_VERDICTS = {EXIT_IMPORTED: "imported", EXIT_ATTENTION: "attention", EXIT_PENDING: "pending"}
# Sorts after every real time: an instance without any known time is the newest, not the oldest.
_UNKNOWN_TIME = "9999-12-31T23:59:59.999Z"


def verdict_word(exit_code: int) -> str:
    """The word a status report gives its exit code."""
    return _VERDICTS.get(exit_code, "not found")


def result_line(exit_code: int) -> str:
    return f"Result: {verdict_word(exit_code).upper()} (exit {exit_code})"


def image_sets_line(instances_by_image_set: Mapping[str, int]) -> str:
    return "Image sets: " + ", ".join(f"{key} ({n})" for key, n in sorted(instances_by_image_set.items()))


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
    # "StoreDICOM" when StoreDICOM forwarding stored it in HealthImaging (no import job); None after an import job.
    stored_by: str | None = None


def newest_per_instance(instances: Iterable[Instance]) -> list[Instance]:
    """An instance sent again lives in a newer batch; that newer copy is the one whose fate counts."""
    newest: dict[str, Instance] = {}
    for instance in instances:
        current = newest.get(instance.sop_instance_uid)
        if current is None or instance.batch_id > current.batch_id:  # batch ids begin with their open time
            newest[instance.sop_instance_uid] = instance
    return list(newest.values())


def batch_time(batch_id: str) -> str:
    """The open time a batch id begins with, as an ISO timestamp (the receive time of its first object)."""
    return iso_millis(batch_opened_at(batch_id)) if is_batch_id(batch_id) else _UNKNOWN_TIME


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
        if any(counts[state] for state in ATTENTION):
            return EXIT_ATTENTION
        if any(counts[state] for state in PENDING):
            return EXIT_PENDING
        if not self.instances and "studyInstanceUid" in self.query:
            return EXIT_UNKNOWN  # a study nobody has heard of is not "imported"
        return EXIT_IMPORTED

    @property
    def verdict(self) -> str:
        return verdict_word(self.exit_code)

    def oldest_pending(self) -> Instance | None:
        pending = [i for i in self.instances if i.state in PENDING]
        return min(pending, key=lambda i: i.received_at or batch_time(i.batch_id)) if pending else None

    def waited_seconds(self, instance: Instance) -> int:
        since = parse_iso(instance.received_at or batch_time(instance.batch_id))
        return max(0, int((self.generated_at - since).total_seconds()))

    @property
    def stored_by_storedicom(self) -> int:
        """How many of the imported (and non-primary) instances StoreDICOM stored, without an import job."""
        return sum(1 for i in self.instances if i.state in (IMPORTED, NON_PRIMARY) and i.stored_by)

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
            "generatedAt": iso_millis(self.generated_at),
            "verdict": self.verdict,
            "exitCode": self.exit_code,
            "counts": self.counts,
            "storedByStoreDICOM": self.stored_by_storedicom,
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
        for state in STATES:
            lines.append(f"  {_LABELS[state]:<12}{counts[state]:>7}   {_MEANINGS[state]}")
        if self.stored_by_storedicom:
            imported = counts[IMPORTED] + counts[NON_PRIMARY]
            stored = self.stored_by_storedicom
            lines.append(f"Stored by StoreDICOM (no import job): {stored} of the {imported} imported")
        oldest = self.oldest_pending()
        if oldest is not None:
            waited = _duration(self.waited_seconds(oldest))
            lines.append(
                f"Oldest not yet imported: {oldest.sop_instance_uid} ({_LABELS[oldest.state]}, batch "
                f"{oldest.batch_id}), received {oldest.received_at or 'at ' + batch_time(oldest.batch_id)}, "
                f"waiting {waited}"
            )
        image_sets = Counter(i.image_set_id for i in self.instances if i.state == IMPORTED and i.image_set_id)
        if image_sets:
            lines.append(image_sets_line(image_sets))
        for instance in sorted(self.instances, key=_display_order):
            if instance.state == NON_PRIMARY:
                lines.append(f"Non-primary: {instance.sop_instance_uid} in image set {instance.image_set_id}")
            elif instance.state == FAILED:
                lines.append(f"Failed: {instance.sop_instance_uid}: {instance.reason or 'no reason recorded'}")
            elif instance.state == IMPORTED and instance.reason:
                source = f" (from {instance.stored_by})" if instance.stored_by else ""
                lines.append(f"Warning{source}: {instance.sop_instance_uid}: {instance.reason}")
        if self.bucket is None:
            lines.append("Objects in open or unregistered batches are not counted without --bucket.")
        lines.append(result_line(self.exit_code))
        return "\n".join(lines) + "\n"


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
