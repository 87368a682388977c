"""Wiring the Storage Commitment SCP: its databases under STORAGE_DIR, the evidence COMMITMENT_AFTER names, and
the store wrapped so that each durable instance is recorded where commitment can find it."""

from __future__ import annotations

from scp.commitment import ledger, pending
from scp.commitment.committer import Evidence, ObjectCheck, StoreEvidence
from scp.commitment.sender import ReportSender
from scp.commitment.service import CommitmentService
from scp.commitment.verify import LocalFiles, S3Objects
from scp.config import Settings
from scp.storage import Store


def start_commitment(settings: Settings, store: Store) -> tuple[CommitmentService, Store]:
    """The running service, and the store the receive path must use from now on."""
    requests = pending.PendingRequests(pending.database_path(settings.storage_dir))
    stored = ledger.Ledger(ledger.database_path(settings.storage_dir))
    evidence: Evidence = StoreEvidence(stored, _object_check(settings))
    service = CommitmentService(
        requests, evidence, ReportSender(settings), settings.commitment_peers, settings.commitment_timeout
    )
    recording = ledger.RecordingStore(store, stored)
    service.start()
    return service, recording


def _object_check(settings: Settings) -> ObjectCheck:
    if settings.dicom_bucket is None:
        return LocalFiles(settings.storage_dir)
    from scp.storage.s3 import s3_client  # boto3 loads only when S3 is configured

    return S3Objects(s3_client(settings), settings.dicom_bucket)
