"""Storage Commitment Push Model SCP (PS3.4 J): a modality learns which instances the archive has taken over.

``request`` reads and checks an N-ACTION, ``pending`` keeps requests durably until reported, ``ledger`` records
where each stored instance went, ``verify`` and ``committer`` decide per instance, ``report`` builds the
N-EVENT-REPORT, ``channel`` sends it on the request's association and ``sender`` on a new one; ``service`` runs
them together.
"""

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
# PS3.4 J.3.1: the SOP Class has one well-known SOP Instance, named in every N-ACTION and N-EVENT-REPORT.
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_STORAGE_COMMITMENT = 1  # PS3.4 J.3.2: the only Action Type ID
ALL_COMMITTED = 1  # PS3.4 J.3.3: Event Type ID, storage commitment request successful
FAILURES_EXIST = 2  # PS3.4 J.3.3: storage commitment request complete, failure exists
