"""The import workflow's DynamoDB table (docs/import-workflow.rst): keys, index keys, index names, status words.

An item per instance (``STUDY#<study>`` / ``INSTANCE#<series>#<sop>``), per batch (``BATCH#<id>`` / ``BATCH``)
and per import job (``BATCH#<id>`` / ``JOB#<job>``). The workflow writes them, the status command reads them.
"""

from __future__ import annotations

BY_BATCH_INDEX = "ByBatch"  # gsi1pk = BATCH#<batch-id>, gsi1sk = INSTANCE#<sop> or JOB#<job>
BY_CALLING_AE_INDEX = "ByCallingAE"  # gsi2pk = AE#<calling AE title>, gsi2sk = <receivedAt>#<sop>
BY_STATUS_INDEX = "ByStatus"  # gsi3pk = STATUS#<entity>#<status>, gsi3sk = <time>#<id>

ENTITY_INSTANCE = "instance"
ENTITY_BATCH = "batch"
ENTITY_JOB = "job"

# Instance statuses. "importing" covers the time from batch registration to the job's outcome.
IMPORTING = "importing"
IMPORTED = "imported"
WARNING = "warning"  # imported, with a warning from the job
FAILED = "failed"
REQUEUED = "requeued"  # failed with a server error, copied into a re-queue batch that imports it again
# The job has not finished within IMPORT_TIMEOUT_HOURS; HealthImaging may still finish it, and the next status
# check that sees it finish records the real outcome.
STUCK = "stuck"
# The job COMPLETED but its output never became readable: HealthImaging may well have imported the instance, so
# it is neither imported nor failed; the reason says which job to look at.
UNCONFIRMED = "unconfirmed"
NON_PRIMARY = "nonprimary"  # only a ByStatus partition: imported or warning with isPrimary false
INSTANCE_STATUSES = (IMPORTING, IMPORTED, WARNING, FAILED, REQUEUED, STUCK, UNCONFIRMED)
# ``storedBy`` of an instance item, and of its batch item: StoreDICOM stored it in HealthImaging before the batch
# closed, and no import job ran (its status is imported, or warning with StoreDICOM's warning as the reason).
# Absent where an import job imported it.
STORED_BY_STOREDICOM = "StoreDICOM"
# ``storedBy`` of an instance item whose object carried no StoreDICOM answer (it was lost, or the daemon died before
# tagging it) and that an import job did not import: HealthImaging, asked, holds it; the image set id is the one
# it named, and ``isPrimary`` is the image set's.
STORED_BY_HEALTHIMAGING = "HealthImaging search"

# Batch statuses.
BATCH_REGISTERED = "registered"
BATCH_IMPORTING = "importing"
BATCH_IMPORTED = "imported"
BATCH_PARTIAL = "partial"
BATCH_FAILED = "failed"
BATCH_STUCK = "stuck"
BATCH_UNCONFIRMED = "unconfirmed"
BATCH_STATUSES = (
    BATCH_REGISTERED, BATCH_IMPORTING, BATCH_IMPORTED, BATCH_PARTIAL, BATCH_FAILED, BATCH_STUCK, BATCH_UNCONFIRMED
)

_BATCH = "BATCH#"
_STUDY = "STUDY#"
_INSTANCE = "INSTANCE#"
_JOB = "JOB#"
_AE = "AE#"


def batch_key(batch_id: str) -> dict[str, str]:
    return {"pk": f"{_BATCH}{batch_id}", "sk": "BATCH"}


def batch_id_of_key(pk: str) -> str:
    """The batch id in a batch item's ``pk``."""
    if not pk.startswith(_BATCH):
        raise ValueError(f"not a batch partition key: {pk!r}")
    return pk[len(_BATCH) :]


def job_key(batch_id: str, job_id: str) -> dict[str, str]:
    return {"pk": f"{_BATCH}{batch_id}", "sk": f"{_JOB}{job_id}"}


def instance_key(study_uid: str, series_uid: str, sop_uid: str) -> dict[str, str]:
    return {"pk": study_partition(study_uid), "sk": f"{_INSTANCE}{series_uid}#{sop_uid}"}


def study_partition(study_uid: str) -> str:
    """The ``pk`` of every instance of a study; their ``sk`` begins with ``INSTANCE_SORT_PREFIX``."""
    return f"{_STUDY}{study_uid}"


INSTANCE_SORT_PREFIX = _INSTANCE


def by_batch_keys(batch_id: str, sort: str) -> dict[str, str]:
    """ByBatch index keys of an item of this batch; ``sort`` is ``instance_sort(sop)`` or ``job_sort(job)``."""
    return {"gsi1pk": f"{_BATCH}{batch_id}", "gsi1sk": sort}


def instance_sort(sop_uid: str) -> str:
    return f"{_INSTANCE}{sop_uid}"


def job_sort(job_id: str) -> str:
    return f"{_JOB}{job_id}"


def calling_ae_partition(calling_ae_title: str) -> str:
    return f"{_AE}{calling_ae_title}"


def received_sort(received_at: str, sop_uid: str) -> str:
    """ByCallingAE sort key: ``<receivedAt>#<sop>``; ``~`` after a timestamp sorts after every such key."""
    return f"{received_at}#{sop_uid}"


def status_partition(entity: str, status: str) -> str:
    return f"STATUS#{entity}#{status}"
