"""Wiring the Storage Commitment SCP: its databases under STORAGE_DIR, the evidence COMMITMENT_AFTER names, and
the store wrapped so that each durable instance is recorded where commitment can find it."""

from __future__ import annotations

from scp.commitment import ledger, pending
from scp.commitment.committer import Evidence, HealthImagingEvidence, ObjectCheck, StoreEvidence
from scp.commitment.forwarded import ForwardingDatabase
from scp.commitment.sender import ReportSender
from scp.commitment.service import CommitmentService
from scp.commitment.verify import LocalFiles, S3Objects
from scp.config import COMMITMENT_AFTER_HEALTHIMAGING, Settings
from scp.forwarding.results import database_path
from scp.storage import Store


def start_commitment(settings: Settings, store: Store, receiver: int = 0) -> tuple[CommitmentService, Store]:
    """The running service of receiver process ``receiver``, and the store the receive path must use from now on.

    The ledger of stored instances is one database that every receiver process writes, since a study may arrive
    on associations served by different processes; the requests are each process's own."""
    requests = pending.PendingRequests(pending.database_path(settings.storage_dir, receiver))
    evidence: Evidence
    if settings.commitment_after == COMMITMENT_AFTER_HEALTHIMAGING:
        # The forwarding database exists by now: the store was built, and forwarding started, before this.
        evidence = HealthImagingEvidence(ForwardingDatabase(database_path(settings.storage_dir)))
    else:
        stored = ledger.Ledger(ledger.database_path(settings.storage_dir), receiver)
        evidence = StoreEvidence(stored, _object_check(settings))
        store = ledger.RecordingStore(store, stored)
    service = CommitmentService(
        requests, evidence, ReportSender(settings), settings.commitment_peers, settings.commitment_timeout
    )
    service.start()
    return service, store


def create_shared_databases(settings: Settings) -> None:
    """Before the receiver processes are forked: the commitment database that all of them open."""
    if settings.commitment_after != COMMITMENT_AFTER_HEALTHIMAGING:
        ledger.create(ledger.database_path(settings.storage_dir))


def _object_check(settings: Settings) -> ObjectCheck:
    if settings.dicom_bucket is None:
        return LocalFiles(settings.storage_dir)
    from scp.storage.s3 import s3_client  # boto3 loads only when S3 is configured

    return S3Objects(s3_client(settings), settings.dicom_bucket)
