"""Delivering a Storage Commitment Result on a new association to the requesting AE, with pynetdicom as the
association requestor proposing the SCP role for the commitment SOP class (PS3.4 J.3.3.1.3, PS3.7 D.3.3.4)."""

from __future__ import annotations

from pynetdicom import AE, build_role
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from scp.commitment import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH_MODEL
from scp.commitment.report import Report
from scp.config import CommitmentPeer, Settings

_LITTLE_ENDIAN_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


class DeliveryFailed(Exception):
    """The report did not reach the peer; it is tried again later."""


class ReportSender:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def deliver(self, peer: CommitmentPeer, report: Report) -> int:
        """Send ``report`` to ``peer`` and return the status of its N-EVENT-REPORT-RSP."""
        ae = AE(ae_title=self._settings.ae_title)
        ae.acse_timeout = self._settings.acse_timeout
        ae.dimse_timeout = self._settings.dimse_timeout
        ae.network_timeout = self._settings.network_timeout
        ae.maximum_pdu_size = self._settings.effective_pdu_size
        ae.add_requested_context(StorageCommitmentPushModel, _LITTLE_ENDIAN_SYNTAXES)
        role = build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        association = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, ext_neg=[role])
        if not association.is_established:
            raise DeliveryFailed("association rejected" if association.is_rejected else "association not established")
        try:
            accepted = [
                context
                for context in association.accepted_contexts
                # Seen from this side (the requestor), as_scp: the peer accepted that we act as SCP.
                if context.abstract_syntax == STORAGE_COMMITMENT_PUSH_MODEL and context.as_scp
            ]
            if not accepted:
                raise DeliveryFailed("peer did not accept the SCP role for Storage Commitment")
            status, _ = association.send_n_event_report(
                report.event_information, report.event_type, STORAGE_COMMITMENT_PUSH_MODEL,
                STORAGE_COMMITMENT_INSTANCE,
            )  # fmt: skip
            if "Status" not in status:
                raise DeliveryFailed("no N-EVENT-REPORT response")
            return int(status.Status)
        finally:
            if association.is_established:
                association.release()
