"""A modality that requests Storage Commitment with pynetdicom, and its event receiver: a pynetdicom SCP that takes
N-EVENT-REPORTs on associations the daemon opens."""

from __future__ import annotations

import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from tests.support.corpus import CT_IMAGE_STORAGE, make_instance, read
from tests.support.daemon import Daemon
from tests.support.waits import free_port

COMMITMENT = "1.2.840.10008.1.20.1"
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
NO_SUCH_OBJECT = 0x0112
PROCESSING_FAILURE = 0x0110
CLASS_INSTANCE_CONFLICT = 0x0119


@dataclass(frozen=True)
class Received:
    """One N-EVENT-REPORT as the modality received it."""

    event_type: int
    transaction_uid: str
    committed: list[tuple[str, str]]
    failed: list[tuple[str, str, int]]


def received(event: Any) -> Received:
    information = event.event_information
    return Received(
        event_type=int(event.event_type),
        transaction_uid=str(information.TransactionUID),
        committed=[
            (str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
            for item in information.get("ReferencedSOPSequence", [])
        ],
        failed=[
            (str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID), int(item.FailureReason))
            for item in information.get("FailedSOPSequence", [])
        ],
    )


def instances(directory: Path, count: int) -> list[Path]:
    study = generate_uid()
    series = generate_uid()
    return [make_instance(directory, pixel_bytes=4096, study_uid=study, series_uid=series) for _ in range(count)]


def references(paths: list[Path]) -> list[tuple[str, str]]:
    found = []
    for path in paths:
        dataset = read(path)
        found.append((str(dataset.SOPClassUID), str(dataset.SOPInstanceUID)))
    return found


def action_information(refs: list[tuple[str, str]], transaction_uid: str | None = None) -> Dataset:
    dataset = Dataset()
    dataset.TransactionUID = transaction_uid or generate_uid()
    items = Sequence()
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    dataset.ReferencedSOPSequence = items
    return dataset


class Modality:
    """Stores with C-STORE and requests commitment with N-ACTION; reports on its own association land in
    ``reports``."""

    def __init__(self, daemon: Daemon, ae_title: str = "MODALITY") -> None:
        self.daemon = daemon
        self.ae_title = ae_title
        self.reports: queue.Queue[Received] = queue.Queue()

    def _on_report(self, event: Any) -> tuple[int, None]:
        self.reports.put(received(event))
        return 0x0000, None  # pynetdicom: (status, Event Reply)

    def associate(self, transfer_syntax: str = "1.2.840.10008.1.2.1", propose_scu_role: bool = False) -> Association:
        """With ``propose_scu_role``, an SCP/SCU Role Selection item proposes this AE as SCU (PS3.7 D.3.3.4)."""
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(CT_IMAGE_STORAGE, "1.2.840.10008.1.2.1")
        ae.add_requested_context(StorageCommitmentPushModel, transfer_syntax)
        association = ae.associate(
            "127.0.0.1", self.daemon.port, ae_title=self.daemon.ae_title,
            ext_neg=[build_role(StorageCommitmentPushModel, scu_role=True)] if propose_scu_role else [],
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)],
        )  # fmt: skip
        assert association.is_established
        return association

    def store(self, association: Association, paths: list[Path]) -> None:
        for path in paths:
            status = association.send_c_store(read(path))
            assert status.Status == 0x0000, f"C-STORE of {path.name}: 0x{status.Status:04X}"

    def request(self, association: Association, information: Dataset, action_type: int = 1) -> int:
        status, _ = association.send_n_action(information, action_type, COMMITMENT, COMMITMENT_INSTANCE)
        return int(status.Status)


class EventReceiver:
    """The modality's Storage Commitment SCU side that accepts the daemon's association (the SCP role proposed)."""

    def __init__(self, ae_title: str = "MODALITY") -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.reports: queue.Queue[Received] = queue.Queue()
        self.roles: list[tuple[bool, bool]] = []  # (as SCU, as SCP) of this acceptor on each report's context
        self._ae = AE(ae_title=ae_title)
        self._ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        self._server = self._ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)],
        )  # fmt: skip

    @property
    def peer_setting(self) -> str:
        return f"{self.ae_title}=127.0.0.1:{self.port}"

    def _on_report(self, event: Any) -> tuple[int, None]:
        self.roles.extend((bool(c.as_scu), bool(c.as_scp)) for c in event.assoc.accepted_contexts)
        self.reports.put(received(event))
        return 0x0000, None  # pynetdicom: (status, Event Reply)

    def close(self) -> None:
        self._server.shutdown()
