"""S3 store: an object is acknowledged only after S3 has confirmed its upload and verified its checksum."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from batch_contract.manifest import parse_manifest
from scp.batches import Batch, Batches, BatchLimits, manifest_body
from scp.config import Settings
from scp.instances import ReceivedInstance, StoredInstance
from scp.metrics import Metrics
from scp.status import Status, StoreFailure

LOG = logging.getLogger(__name__)

# Large objects go up in parts; the transfer manager holds at most this many parts in memory for all
# associations together, so memory stays bounded whatever the object sizes and the number of associations.
_PART_SIZE = 8 * 1024 * 1024
_PARTS_IN_MEMORY = 8
_MULTIPART_THRESHOLD = 2 * _PART_SIZE
_POLL_SECONDS = 0.05
# CRC32 is computed here and verified by S3 before it answers, so a 200 means the bytes arrived intact.
_UPLOAD_ARGUMENTS = {"ChecksumAlgorithm": "CRC32", "ContentType": "application/dicom"}
# The sender waits DIMSE_TIMEOUT for our answer; leave it time to receive the failure status.
_DEADLINE_SHARE = 0.75
_FIRST_BACKOFF_SECONDS = 0.25
_MAX_BACKOFF_SECONDS = 4.0
# Errors that say "not now" rather than "never": worth retrying within the deadline.
_RETRYABLE_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed", "Throttling",
     "ThrottlingException", "RequestLimitExceeded", "500", "502", "503", "504"}
)  # fmt: skip


# botocore waits this long for "100 Continue" before it sends a large body anyway.
_EXPECT_CONTINUE_SECONDS = 1.0
# At shutdown, manifests (and late objects' copies) S3 refuses are retried for a minute, or for SHUTDOWN_GRACE_SECONDS
# when that is shorter: a shorter grace asks for a shorter stop. Never for less than 15 s, so that a close S3 accepts
# is not cut short (a forwarding batch waits up to 10 s for its StoreDICOM requests before its manifests).
_CLOSE_SECONDS_MAX = 60.0
_CLOSE_SECONDS_MIN = 15.0


class BatchForwarding(Protocol):
    """StoreDICOM forwarding in S3 mode (scp/forwarding/batches.py): told of each object S3 has confirmed, and asked
    to split each batch by what StoreDICOM stored before its manifest is written."""

    def uploaded(self, staged: Path, key: str, instance: ReceivedInstance) -> None:
        """Called after S3 confirmed ``key`` and before the object counts in its batch; never raises."""

    def closing(self, batch: Batch) -> None:
        """Called before the batch's manifests are written, again if writing them is retried."""


def _attempt_timeouts(settings: Settings) -> tuple[float, float]:
    """(connect, read) timeouts of one request, sized so that retries fit in the store's deadline."""
    budget = settings.dimse_timeout * _DEADLINE_SHARE
    return min(5.0, budget / 6), max(1.0, budget / 3)


def s3_session(settings: Settings) -> boto3.session.Session:
    """A session in AWS_REGION, else the standard region chain; credentials from the standard chain (botocore itself
    reads AWS_DEFAULT_REGION only, never AWS_REGION)."""
    return boto3.session.Session(region_name=settings.aws_region)


def s3_client(settings: Settings, session: boto3.session.Session | None = None) -> Any:
    """An S3 client of ``session`` (by default, :func:`s3_session`'s); AWS_ENDPOINT_URL is honoured by boto3.

    botocore does not retry on its own: its retries would run outside the store's deadline, so the one retry
    policy is ``S3Store._upload``'s, which knows how long the modality still waits.
    """
    connect, read = _attempt_timeouts(settings)
    config = Config(
        max_pool_connections=settings.max_pool_connections,
        connect_timeout=connect,
        read_timeout=read,
        retries={"mode": "standard", "total_max_attempts": 1},
        request_checksum_calculation="when_supported",
    )
    return (session or s3_session(settings)).client("s3", config=config)


class S3Store:
    def __init__(self, client: Any, settings: Settings, metrics: Metrics) -> None:
        assert settings.dicom_bucket
        self._client = client
        self._metrics = metrics
        self._bucket = settings.dicom_bucket
        self._deadline_seconds = settings.dimse_timeout * _DEADLINE_SHARE
        # The longest one small PUT can take before botocore gives up on it.
        self._attempt_seconds = sum(_attempt_timeouts(settings)) + _EXPECT_CONTINUE_SECONDS
        self._close_seconds = min(_CLOSE_SECONDS_MAX, max(settings.shutdown_grace_seconds, _CLOSE_SECONDS_MIN))
        self._multipart_threshold = _MULTIPART_THRESHOLD
        transfer_config = TransferConfig(
            multipart_threshold=_MULTIPART_THRESHOLD,
            multipart_chunksize=_PART_SIZE,
            max_concurrency=settings.max_pool_connections,
            use_threads=True,
        )
        transfer_config.max_in_memory_upload_chunks = _PARTS_IN_MEMORY  # s3transfer's knob; boto3 has no alias
        self._transfers = create_transfer_manager(client, transfer_config)
        self.batches = Batches(
            BatchLimits(settings.batch_max_files, settings.batch_max_bytes, settings.batch_window_seconds),
            self._close_batch,
            metrics,
        )
        self.forwarding: BatchForwarding | None = None

    def check_bucket(self) -> bool:
        """HeadBucket at start: a clear log line now beats a mysterious 0xA700 on the first store."""
        try:
            self._client.head_bucket(Bucket=self._bucket)
        except (ClientError, BotoCoreError) as error:
            LOG.error(
                "S3 bucket is not usable; stores will be refused with 0xA700 until it is",
                extra={"bucket": self._bucket, "error": _describe(error)},
            )
            return False
        return True

    def start(self) -> None:
        self.batches.start()

    def store(self, staged: Path, instance: ReceivedInstance) -> StoredInstance:
        size = os.path.getsize(staged)
        batch = self.batches.join(size)
        key = batch.key_for(instance)
        uploaded = False
        try:
            self._upload(staged, key)
            uploaded = True
        finally:
            if not uploaded:
                self.batches.leave(batch, size, key)
        try:
            if self.forwarding is not None:
                # Before ``complete``: the batch cannot close, and be split, before its forwarding knows the object.
                self.forwarding.uploaded(staged, key, instance)
        finally:
            replaced = self.batches.complete(batch, key, instance, size)
        return StoredInstance(location=f"s3://{self._bucket}/{key}", replaced=replaced)

    def close(self) -> None:
        left_open = self.batches.close_all(timeout=self._close_seconds)
        if left_open:
            LOG.error("batches left without a manifest; the sweeper will close them", extra={"batches": left_open})
        self._transfers.shutdown()

    def _upload(self, staged: Path, key: str) -> None:
        deadline = time.monotonic() + self._deadline_seconds
        backoff = _FIRST_BACKOFF_SECONDS
        attempt = 1
        while True:
            try:
                self._upload_once(staged, key, deadline)
                return
            except (ClientError, BotoCoreError) as error:
                # Retry only if a whole further attempt still ends before the deadline.
                if not _retryable(error) or time.monotonic() + backoff + self._attempt_seconds > deadline:
                    raise StoreFailure(Status.OUT_OF_RESOURCES, f"S3 upload failed: {_describe(error)}") from error
                LOG.warning("S3 upload retry", extra={"key": key, "attempt": attempt, "error": _describe(error)})
                self._metrics.s3_upload_retried()
            time.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
            attempt += 1

    def _upload_once(self, staged: Path, key: str, deadline: float) -> None:
        if os.path.getsize(staged) < self._multipart_threshold:
            # One PUT streamed from the file; botocore's timeouts bound it.
            with open(staged, "rb") as body:
                self._client.put_object(Bucket=self._bucket, Key=key, Body=body, **_UPLOAD_ARGUMENTS)
            return
        future = self._transfers.upload(str(staged), self._bucket, key, extra_args=dict(_UPLOAD_ARGUMENTS))
        # s3transfer futures cannot wait with a timeout; a multipart upload takes seconds, so polling is cheap.
        while not future.done():
            if time.monotonic() >= deadline:
                future.cancel()
                raise StoreFailure(Status.OUT_OF_RESOURCES, "S3 upload did not finish in time")
            time.sleep(_POLL_SECONDS)
        future.result()

    def _close_batch(self, batch: Batch) -> None:
        """The batch's manifests: split by StoreDICOM's results first, if forwarding. The fallback batch's copies are
        made first, then the split batch's own manifest, then the fallback's. Until the own manifest exists the
        sweeper may seal the batch whole, and then the fallback must not be: its copies are deleted and no manifest
        of it is written. Once the own manifest exists, a fallback left without one (the daemon died, or S3 refused
        its manifest) is an abandoned batch the sweeper seals. Either way each object is in exactly one manifest."""
        self._remove_unsettled(batch)
        if not batch.objects:
            return
        if self.forwarding is not None:
            self.forwarding.closing(batch)
        fallback = batch.fallback
        if fallback is not None:
            self._copy_into(fallback)
        if self._write_manifest(batch) and fallback is not None:
            self._write_manifest(fallback)

    def _remove_unsettled(self, batch: Batch) -> None:
        """Delete what failed uploads may have left under the batch's prefix: its import job would take it, for an
        instance the modality was told is not stored and has likely sent again into another batch. An object a
        later C-STORE of the same instance completed in this batch is kept. Raises on S3 errors (the closer
        retries); deleting a key S3 never stored succeeds."""
        for key in sorted(batch.unsettled - batch.objects.keys()):
            self._client.delete_object(Bucket=self._bucket, Key=key)
            LOG.info("object of a failed upload removed", extra={"batch_id": batch.batch_id, "key": key})
        batch.unsettled.clear()

    def _copy_into(self, batch: Batch) -> None:
        """Server-side copies of a late or fallback batch's objects from the batch they were stored into."""
        copies = [
            self._transfers.copy({"Bucket": self._bucket, "Key": batch.copied_from(item)}, self._bucket, item.key)
            for item in batch.objects.values()
        ]
        for copy in copies:
            copy.result()

    def _write_manifest(self, batch: Batch) -> bool:
        """Write the batch's manifest; if another writer sealed the batch first, give its late objects their own.
        Returns whether this manifest is the batch's (False: the other writer's is).

        Raises on any S3 error, and the closer retries the whole call: every step is idempotent (the late batch is
        fixed on ``batch``, copies overwrite, deleting a deleted copy succeeds, manifests are written once).
        """
        try:
            # If-None-Match makes the first manifest final: a sweeper that closed this batch first wins.
            self._client.put_object(
                Bucket=self._bucket,
                Key=batch.manifest_key,
                Body=manifest_body(batch, self._bucket),
                ContentType="application/json",
                ChecksumAlgorithm="CRC32",
                IfNoneMatch="*",
            )
            return True
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "PreconditionFailed":
                raise
        sealed = parse_manifest(
            self._client.get_object(Bucket=self._bucket, Key=batch.manifest_key)["Body"].read(),
            batch.batch_id,
            self._bucket,
        )
        if batch.fallback is not None:
            if sealed.fallback_batch_id == batch.fallback.batch_id:
                return True  # this close's own, written by an earlier attempt (its answer lost, or a later step failed)
            self._withdraw_fallback(batch)
        listed = {item.key for item in sealed.objects}
        late = batch.late_batch(listed)
        if late is None:
            LOG.info("batch manifest written elsewhere, listing every object", extra={"batch_id": batch.batch_id})
            return False
        self._copy_into(late)
        self._write_manifest(late)
        LOG.warning(
            "batch sealed elsewhere without some objects: copied into a batch of their own",
            extra={"batch_id": batch.batch_id, "late_batch_id": late.batch_id, "objects": len(late.objects)},
        )
        return False

    def _withdraw_fallback(self, batch: Batch) -> None:
        """The sweeper sealed a split batch before its own manifest: its manifest lists the fallback's objects under
        their keys in this batch, so the fallback's copies are deleted (before the sweeper could find them old enough
        to seal) and the objects rejoin this batch, to be compared with that manifest as every other one."""
        fallback = batch.fallback
        assert fallback is not None
        for key in sorted(fallback.objects):
            self._client.delete_object(Bucket=self._bucket, Key=key)
        batch.rejoin_fallback()
        LOG.warning(
            "split batch sealed elsewhere first: its fallback batch withdrawn",
            extra={"batch_id": batch.batch_id, "fallback_batch_id": fallback.batch_id},
        )


def _retryable(error: Exception) -> bool:
    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code")) in _RETRYABLE_CODES
    return True  # connection, timeout and other transport errors


def _describe(error: Exception) -> str:
    if isinstance(error, ClientError):
        details = error.response.get("Error", {})
        return f"{details.get('Code', 'error')}: {details.get('Message', '')}".strip()
    return f"{type(error).__name__}: {error}"
