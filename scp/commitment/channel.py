"""A Storage Commitment report sent on the request's own association (PS3.4 J.3.3): the N-EVENT-REPORT-RQ command
and its Event Information, encoded in the context's transfer syntax and cut into P-DATA-TF PDUs the peer accepts."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

from pynetdicom.dsutils import encode

from scp import dimse
from scp.commitment import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH_MODEL
from scp.commitment.report import Report
from scp.commitment.service import ChannelClosed
from scp.upper_layer import PeerClosed, p_data

_IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
_COMMAND_FRAGMENT = 0x01
_LAST_FRAGMENT = 0x02
_PDV_OVERHEAD = 6  # PS3.8 9.3.5.1: the PDV item's length field, context id and message control header


def message_pdus(context_id: int, command: bytes, data_set: bytes, maximum_length: int) -> list[bytes]:
    """One DIMSE message as P-DATA-TF PDUs whose variable field stays within ``maximum_length`` (PS3.8 D.1)."""
    chunk = max(maximum_length - _PDV_OVERHEAD, 1)
    pdus = [
        p_data(context_id, _COMMAND_FRAGMENT | (_LAST_FRAGMENT if start + chunk >= len(command) else 0), piece)
        for start in range(0, len(command), chunk)
        for piece in [command[start : start + chunk]]
    ]
    pdus.extend(
        p_data(context_id, _LAST_FRAGMENT if start + chunk >= len(data_set) else 0, data_set[start : start + chunk])
        for start in range(0, len(data_set), chunk)
    )
    return pdus


class AssociationChannel:
    """Implements ``ReportChannel`` for the association ``send`` belongs to; ``send`` writes one message's PDUs
    together, never interleaved with another message of the association, and raises ``PeerClosed`` once it ended."""

    def __init__(
        self, send: Callable[[list[bytes]], None], context_id: int, transfer_syntax: str, maximum_length: int
    ) -> None:
        self._send = send
        self._context_id = context_id
        self._implicit = transfer_syntax == _IMPLICIT_VR_LITTLE_ENDIAN
        self._maximum_length = maximum_length
        self._message_ids = itertools.count(1)
        self._lock = threading.Lock()

    def next_message_id(self) -> int:
        with self._lock:
            return (next(self._message_ids) - 1) % 0xFFFF + 1  # a US, never 0

    def send_event_report(self, report: Report, message_id: int) -> None:
        command = dimse.event_report_request(
            message_id, STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_INSTANCE, report.event_type
        )
        data_set = encode(report.event_information, self._implicit, True)
        if data_set is None:
            raise ChannelClosed("the report cannot be encoded in the association's transfer syntax")
        try:
            self._send(message_pdus(self._context_id, command, data_set, self._maximum_length))
        except PeerClosed as closed:
            raise ChannelClosed(str(closed)) from None
