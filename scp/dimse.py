"""DIMSE command sets (PS3.7 9.3, E): parsing the requests we serve, encoding our responses.

Command sets are always implicit VR little endian and small; this module reads only the elements a C-ECHO, C-STORE
or N-ACTION request (or an N-EVENT-REPORT response) needs and writes exactly the elements our messages require.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_STORE_RSP = 0x8001
C_ECHO_RSP = 0x8030
N_EVENT_REPORT_RQ = 0x0100
N_EVENT_REPORT_RSP = 0x8100
N_ACTION_RQ = 0x0130
N_ACTION_RSP = 0x8130
NO_DATA_SET = 0x0101
_DATA_SET_PRESENT = 0x0000  # PS3.7 E.1: any value other than 0101H

_AFFECTED_SOP_CLASS_UID = 0x00000002
_REQUESTED_SOP_CLASS_UID = 0x00000003
_COMMAND_FIELD = 0x00000100
_MESSAGE_ID = 0x00000110
_MESSAGE_ID_BEING_RESPONDED_TO = 0x00000120
_COMMAND_DATA_SET_TYPE = 0x00000800
_STATUS = 0x00000900
_ERROR_COMMENT = 0x00000902
_AFFECTED_SOP_INSTANCE_UID = 0x00001000
_REQUESTED_SOP_INSTANCE_UID = 0x00001001
_EVENT_TYPE_ID = 0x00001002
_ACTION_TYPE_ID = 0x00001008
_US_ELEMENTS = (
    _COMMAND_FIELD, _MESSAGE_ID, _MESSAGE_ID_BEING_RESPONDED_TO, _COMMAND_DATA_SET_TYPE, _STATUS, _ACTION_TYPE_ID,
)  # fmt: skip
_UI_ELEMENTS = (
    _AFFECTED_SOP_CLASS_UID, _AFFECTED_SOP_INSTANCE_UID, _REQUESTED_SOP_CLASS_UID, _REQUESTED_SOP_INSTANCE_UID,
)  # fmt: skip
_RESPONSE_BIT = 0x8000


class MalformedCommand(ValueError):
    """The command set cannot be parsed, or lacks what its command needs."""


@dataclass(frozen=True)
class Command:
    command_field: int
    message_id: int
    has_data_set: bool
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    requested_sop_class_uid: str = ""
    requested_sop_instance_uid: str = ""
    action_type_id: int | None = None
    status: int | None = None  # responses only; their message_id is the Message ID Being Responded To


def parse_command(raw: bytes) -> Command:
    numbers: dict[int, int] = {}
    texts: dict[int, str] = {}
    offset = 0
    while offset < len(raw):
        if offset + 8 > len(raw):
            raise MalformedCommand("command set ends inside an element header")
        tag, length = struct.unpack_from("<LL", raw, offset)
        tag = (tag & 0xFFFF) << 16 | tag >> 16  # stored as group, element
        offset += 8
        if length > len(raw) - offset:
            raise MalformedCommand("command element runs past the end of the command set")
        value = raw[offset : offset + length]
        offset += length
        if tag in _US_ELEMENTS:
            if length != 2:
                raise MalformedCommand(f"command element ({tag >> 16:04X},{tag & 0xFFFF:04X}) is not a US")
            numbers[tag] = struct.unpack("<H", value)[0]
        elif tag in _UI_ELEMENTS:
            texts[tag] = value.decode("ascii", errors="replace").rstrip("\x00 ")
    if _COMMAND_FIELD not in numbers:
        raise MalformedCommand("command set has no Command Field")
    is_response = bool(numbers[_COMMAND_FIELD] & _RESPONSE_BIT)
    message_id = numbers.get(_MESSAGE_ID_BEING_RESPONDED_TO if is_response else _MESSAGE_ID)
    if message_id is None:
        raise MalformedCommand("command set has no Message ID")
    return Command(
        command_field=numbers[_COMMAND_FIELD],
        message_id=message_id,
        has_data_set=numbers.get(_COMMAND_DATA_SET_TYPE, NO_DATA_SET) != NO_DATA_SET,
        affected_sop_class_uid=texts.get(_AFFECTED_SOP_CLASS_UID, ""),
        affected_sop_instance_uid=texts.get(_AFFECTED_SOP_INSTANCE_UID, ""),
        requested_sop_class_uid=texts.get(_REQUESTED_SOP_CLASS_UID, ""),
        requested_sop_instance_uid=texts.get(_REQUESTED_SOP_INSTANCE_UID, ""),
        action_type_id=numbers.get(_ACTION_TYPE_ID),
        status=numbers.get(_STATUS) if is_response else None,
    )


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii", errors="replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", errors="replace")
    return raw + b" " if len(raw) % 2 else raw


def echo_request(message_id: int) -> bytes:
    """The encoded C-ECHO-RQ command set (PS3.7 9.3.5.1), as the health check sends it."""
    body = b"".join(
        [
            _element(_AFFECTED_SOP_CLASS_UID, _uid("1.2.840.10008.1.1")),
            _element(_COMMAND_FIELD, struct.pack("<H", C_ECHO_RQ)),
            _element(_MESSAGE_ID, struct.pack("<H", message_id)),
            _element(_COMMAND_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        ]
    )
    return _element(0x00000000, struct.pack("<L", len(body))) + body


def response_status(raw: bytes) -> int | None:
    """The Status (0000,0900) of a received response command set, or None if it has none or is malformed."""
    offset = 0
    while offset + 8 <= len(raw):
        tag, length = struct.unpack_from("<LL", raw, offset)
        tag = (tag & 0xFFFF) << 16 | tag >> 16
        if tag == _STATUS and length == 2 and offset + 10 <= len(raw):
            return int(struct.unpack_from("<H", raw, offset + 8)[0])
        offset += 8 + length
    return None


def response(request: Command, status: int, error_comment: str | None = None) -> bytes:
    """The encoded command set answering ``request`` with ``status``."""
    is_store = request.command_field == C_STORE_RQ
    elements = [
        _element(_AFFECTED_SOP_CLASS_UID, _uid(request.affected_sop_class_uid)),
        _element(_COMMAND_FIELD, struct.pack("<H", C_STORE_RSP if is_store else C_ECHO_RSP)),
        _element(_MESSAGE_ID_BEING_RESPONDED_TO, struct.pack("<H", request.message_id)),
        _element(_COMMAND_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        _element(_STATUS, struct.pack("<H", status)),
    ]
    if error_comment:
        elements.append(_element(_ERROR_COMMENT, _text(error_comment[:64])))  # LO: at most 64 characters
    if is_store:
        elements.append(_element(_AFFECTED_SOP_INSTANCE_UID, _uid(request.affected_sop_instance_uid)))
    body = b"".join(elements)
    return _element(0x00000000, struct.pack("<L", len(body))) + body


def action_response(request: Command, status: int, error_comment: str | None = None) -> bytes:
    """The N-ACTION-RSP command set answering ``request`` (PS3.7 10.3.4): no Action Reply data set."""
    elements = [
        _element(_AFFECTED_SOP_CLASS_UID, _uid(request.requested_sop_class_uid)),
        _element(_COMMAND_FIELD, struct.pack("<H", N_ACTION_RSP)),
        _element(_MESSAGE_ID_BEING_RESPONDED_TO, struct.pack("<H", request.message_id)),
        _element(_COMMAND_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        _element(_STATUS, struct.pack("<H", status)),
    ]
    if error_comment:
        elements.append(_element(_ERROR_COMMENT, _text(error_comment[:64])))
    elements.append(_element(_AFFECTED_SOP_INSTANCE_UID, _uid(request.requested_sop_instance_uid)))
    if request.action_type_id is not None:
        elements.append(_element(_ACTION_TYPE_ID, struct.pack("<H", request.action_type_id)))
    body = b"".join(elements)
    return _element(0x00000000, struct.pack("<L", len(body))) + body


def event_report_request(message_id: int, sop_class_uid: str, sop_instance_uid: str, event_type_id: int) -> bytes:
    """The N-EVENT-REPORT-RQ command set (PS3.7 10.3.1), followed by its Event Information data set."""
    body = b"".join(
        [
            _element(_AFFECTED_SOP_CLASS_UID, _uid(sop_class_uid)),
            _element(_COMMAND_FIELD, struct.pack("<H", N_EVENT_REPORT_RQ)),
            _element(_MESSAGE_ID, struct.pack("<H", message_id)),
            _element(_COMMAND_DATA_SET_TYPE, struct.pack("<H", _DATA_SET_PRESENT)),
            _element(_AFFECTED_SOP_INSTANCE_UID, _uid(sop_instance_uid)),
            _element(_EVENT_TYPE_ID, struct.pack("<H", event_type_id)),
        ]
    )
    return _element(0x00000000, struct.pack("<L", len(body))) + body
