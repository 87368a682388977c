"""Puts studies into each stage of their way to HealthImaging with the product's own writers.

The daemon's batch and manifest code (scp/batches.py, scp/part10.py) makes the S3 side; the import workflow's
record writers (functions/common/records.py) make the DynamoDB side. The status command must read what they wrote.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from common.manifest import parse_manifest
from common.records import (
    REQUEUED,
    InstanceOutcome,
    Retention,
    finish_stored_batch,
    record_instance_outcome,
    record_job_started,
    register_batch,
    register_instances,
)

from batch_contract.layout import new_batch_id, object_key
from batch_contract.manifest import CLOSED_BY_WINDOW, ManifestObject, StoredByStoreDICOM, encode_manifest
from batch_contract.timestamps import iso_millis
from scp.batches import Batch
from scp.part10 import part10_header
from tests.functions.workflow import DATASTORE_ID

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LITTLE = "1.2.840.10008.1.2.1"


def uid(*parts: int) -> str:
    return "1.2.826.0.1.3680043.8.498." + ".".join(str(p) for p in parts)


@dataclass
class Sent:
    """One batch as the daemon leaves it in S3."""

    batch: Batch
    received_at: datetime
    keys: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> key


class Pipeline:
    def __init__(self, s3: Any, table: Any, bucket: str, now: datetime) -> None:
        self.s3, self.table, self.bucket, self.now = s3, table, bucket, now

    def send(self, minutes_ago: float, study: str, series: str, sops: list[str], calling: str = "CT01") -> Sent:
        """Objects stored by the daemon into a batch opened ``minutes_ago``; no manifest yet (open batch)."""
        opened = self.now - timedelta(minutes=minutes_ago)
        batch = Batch(new_batch_id(opened))
        sent = Sent(batch, opened)
        for number, sop in enumerate(sops):
            key = object_key(batch.batch_id, study, series, sop)
            body = part10_header(CT_IMAGE_STORAGE, sop, EXPLICIT_LITTLE, calling) + b"\x08\x00\x16\x00"
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=body)
            batch.objects[key] = ManifestObject(
                key=key,
                sop_instance_uid=sop,
                sop_class_uid=CT_IMAGE_STORAGE,
                study_instance_uid=study,
                series_instance_uid=series,
                size=len(body),
                calling_ae_title=calling,
                received_at=iso_millis(opened + timedelta(seconds=number)),
            )
            sent.keys[sop] = key
        return sent

    def close(self, sent: Sent) -> None:
        """The daemon writes the manifest: the batch is closed, the workflow has not registered it yet."""
        sent.batch.closed_by = CLOSED_BY_WINDOW
        manifest = sent.batch.manifest(self.bucket, sent.received_at + timedelta(seconds=90))
        self.s3.put_object(Bucket=self.bucket, Key=sent.batch.manifest_key, Body=encode_manifest(manifest))

    def register(self, sent: Sent) -> None:
        """register_batch ran: batch item and one importing item per instance, no job yet (or, for a batch
        StoreDICOM stored, every instance imported and the batch finished)."""
        self.close(sent)
        body = self.s3.get_object(Bucket=self.bucket, Key=sent.batch.manifest_key)["Body"].read()
        manifest = parse_manifest(body, sent.batch.batch_id, self.bucket)
        execution = f"arn:aws:states:us-east-1:123456789012:execution:import:{sent.batch.batch_id}"
        attempt = register_batch(self.table, manifest, execution, self.now)
        register_instances(self.table, manifest, attempt, Retention(365), self.now)
        if manifest.stored_by_storedicom:
            finish_stored_batch(self.table, manifest, Retention(365), self.now)

    def split(self, sent: Sent, stored: dict[str, str | None], image_set: str) -> Sent | None:
        """The daemon closed the batch split by what StoreDICOM stored (``stored``: SOP Instance UID -> warning):
        the others copied into a fallback batch, closed and not registered yet, which is returned (None if all
        were stored)."""
        answered = iso_millis(sent.received_at + timedelta(seconds=30))
        answers = {sent.keys[sop]: StoredByStoreDICOM(answered, image_set, warning) for sop, warning in stored.items()}
        sent.batch.closed_by = CLOSED_BY_WINDOW
        sent.batch.split(answers, sent.received_at + timedelta(seconds=90))
        if sent.batch.fallback is None:
            return None
        rest = Sent(sent.batch.fallback, sent.received_at)
        for key, item in sent.batch.fallback.objects.items():
            source = sent.batch.fallback.copied_from(item)
            self.s3.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": source})
            rest.keys[item.sop_instance_uid] = key
        self.close(rest)
        return rest

    def start_job(self, sent: Sent) -> str:
        """start_import ran: the job is recorded and the batch is importing."""
        self.register(sent)
        job_id = os.urandom(16).hex()
        job = {"jobId": job_id, "datastoreId": DATASTORE_ID, "jobStatus": "SUBMITTED", "submittedAt": self.now}
        output = f"s3://results/jobs/{sent.batch.batch_id}/"
        record_job_started(self.table, sent.batch.batch_id, job, output, 120.0, self.now)
        return job_id

    def outcome(
        self,
        sent: Sent,
        job_id: str,
        sop: str,
        status: str,
        image_set: str | None = None,
        primary: bool | None = None,
        reason: str | None = None,
    ) -> None:
        """process_results wrote this instance's outcome."""
        record = sent.batch.objects[sent.keys[sop]]
        outcome = InstanceOutcome(
            key=sent.keys[sop],
            study_instance_uid=record.study_instance_uid,
            series_instance_uid=record.series_instance_uid,
            sop_instance_uid=sop,
            status=status,
            image_set_id=image_set,
            is_primary=primary,
            reason=reason,
            requeued_to="20991231T000000Z-0000000000000000" if status == REQUEUED else None,
        )
        assert record_instance_outcome(self.table, sent.batch.batch_id, job_id, outcome, Retention(365), self.now)
