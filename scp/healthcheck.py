"""`dicom-store-scp healthcheck`: is the daemon answering DICOM? Decided by a real association and C-ECHO.

Spoken with the daemon's own upper layer rather than pynetdicom's, so that it can start with the PROXY protocol
LOCAL header the daemon requires of every connection when PROXY_PROTOCOL is set.
"""

from __future__ import annotations

import contextlib
import socket

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context

from scp import IMPLEMENTATION_CLASS_UID, dimse
from scp.association import HEALTHCHECK_AE_TITLE
from scp.config import Settings
from scp.contexts import VERIFICATION_SOP_CLASS
from scp.negotiation import APPLICATION_CONTEXT
from scp.proxy_protocol import local_header
from scp.upper_layer import PduReader, PduType, PeerClosed, PeerSilent, ProtocolError, p_data, pdu

_TIMEOUT_SECONDS = 10
_CONTEXT_ID = 1
_IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
_MAXIMUM_PDU = 16_384
_COMMAND_LAST_FRAGMENT = 0x03
_ACCEPTANCE = 0


def target_address(settings: Settings) -> str:
    if settings.bind_address in ("0.0.0.0", "::"):  # noqa: S104 - listening everywhere: ask over loopback
        return "127.0.0.1" if settings.bind_address == "0.0.0.0" else "::1"  # noqa: S104
    return settings.bind_address


def check(settings: Settings) -> tuple[bool, str]:
    """(healthy, what was seen).

    An association rejection still proves the daemon is serving DICOM: at MAXIMUM_ASSOCIATIONS it answers
    "local limit exceeded", and a busy task must not be replaced for being busy.
    """
    try:
        with socket.create_connection((target_address(settings), settings.scp_port), _TIMEOUT_SECONDS) as sock:
            return _converse(sock, settings)
    except (OSError, PeerClosed, PeerSilent):
        return False, "no association (connection refused, timed out or closed)"
    except ProtocolError as error:
        return False, f"not a DICOM answer: {error.detail}"


def _converse(sock: socket.socket, settings: Settings) -> tuple[bool, str]:
    reader = PduReader(sock)
    if settings.proxy_protocol:
        sock.sendall(local_header())
    sock.sendall(_associate_request(settings.ae_title))
    pdu_type, body = reader.read(_TIMEOUT_SECONDS, _TIMEOUT_SECONDS, _MAXIMUM_PDU)
    if pdu_type == PduType.ASSOCIATE_RJ:
        return True, "association rejected by a running daemon"
    if pdu_type != PduType.ASSOCIATE_AC:
        return False, f"no association (answered with PDU 0x{pdu_type:02X})"
    if not _verification_accepted(bytes(body)):
        return False, "association accepted without Verification"
    sock.sendall(p_data(_CONTEXT_ID, _COMMAND_LAST_FRAGMENT, dimse.echo_request(message_id=1)))
    pdu_type, body = reader.read(_TIMEOUT_SECONDS, _TIMEOUT_SECONDS, _MAXIMUM_PDU)
    # One PDV holding the whole response command: length (4), context id, message header, the command set.
    status = dimse.response_status(bytes(body[6:])) if pdu_type == PduType.P_DATA_TF else None
    with contextlib.suppress(OSError, PeerClosed, PeerSilent, ProtocolError):  # the answer is in; release politely
        sock.sendall(pdu(PduType.RELEASE_RQ, bytes(4)))
        reader.read(_TIMEOUT_SECONDS, _TIMEOUT_SECONDS, _MAXIMUM_PDU)
    if status == 0:
        return True, "C-ECHO succeeded"
    return False, "C-ECHO failed"


def _associate_request(called_ae_title: str) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = HEALTHCHECK_AE_TITLE
    primitive.called_ae_title = called_ae_title
    context = build_context(VERIFICATION_SOP_CLASS, [_IMPLICIT_VR_LITTLE_ENDIAN])
    context.context_id = _CONTEXT_ID
    primitive.presentation_context_definition_list = [context]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = _MAXIMUM_PDU
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    primitive.user_information = [maximum, implementation]
    request = A_ASSOCIATE_RQ()
    request.from_primitive(primitive)
    return bytes(request.encode())


def _verification_accepted(body: bytes) -> bool:
    accept = A_ASSOCIATE_AC()
    try:
        accept.decode(bytes(pdu(PduType.ASSOCIATE_AC, body)))
        results = accept.to_primitive().presentation_context_definition_results_list
    except Exception:  # noqa: BLE001 - an answer pynetdicom cannot decode is no Verification
        return False
    return any(context.context_id == _CONTEXT_ID and context.result == _ACCEPTANCE for context in results)
