"""Association negotiation (PS3.8 7.1, PS3.7 D.3.3): policy checks, presentation contexts, the reply PDU.

pynetdicom decodes the A-ASSOCIATE-RQ and encodes our A-ASSOCIATE-AC/RJ; the decisions are ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from scp import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from scp.config import Settings
from scp.contexts import IMPORTABLE_TRANSFER_SYNTAXES, VERIFICATION_SOP_CLASS, is_standard_uid, storage_sop_classes
from scp.uids import is_valid_uid
from scp.upper_layer import AbortReason, ProtocolError

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")

# PS3.8 9.3.3.2 result/source/diagnostic, and how a modality's log prints them.
REJECT_REASONS = {
    (1, 1, 2): "application context name not supported",
    (1, 1, 3): "calling AE title not recognised",
    (1, 1, 7): "called AE title not recognised",
    (1, 2, 2): "protocol version not supported",
    (2, 3, 2): "local limit exceeded",
}
CALLING_AE_NOT_RECOGNISED = (1, 1, 3)
CALLED_AE_NOT_RECOGNISED = (1, 1, 7)
APPLICATION_CONTEXT_NOT_SUPPORTED = (1, 1, 2)
PROTOCOL_VERSION_NOT_SUPPORTED = (1, 2, 2)
LOCAL_LIMIT_EXCEEDED = (2, 3, 2)

_ACCEPTANCE = 0
_ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
_TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


@dataclass(frozen=True)
class AssociationRequest:
    calling_ae_title: str
    called_ae_title: str
    peer_max_pdu: int  # 0: no limit
    primitive: A_ASSOCIATE
    protocol_version: int


@dataclass(frozen=True)
class Accepted:
    """Accepted presentation contexts by id: (abstract syntax, transfer syntax)."""

    contexts: dict[int, tuple[str, str]]
    reply: bytes


class Policy:
    """What this SCP accepts: AE titles and, per SOP class, the transfer syntaxes it stores."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        storage = settings.supported_sop_class_uids or storage_sop_classes()
        self._syntaxes: dict[str, tuple[str, ...]] = {uid: IMPORTABLE_TRANSFER_SYNTAXES for uid in storage}
        self._syntaxes[VERIFICATION_SOP_CLASS] = VERIFICATION_SYNTAXES
        # Without an explicit list, private SOP classes (and ones newer than our registry) are stored too:
        # modalities send them (vendor raw data, protocols), and HealthImaging imports any SOP class.
        self._accept_private = not settings.supported_sop_class_uids

    def decode_request(self, body: bytes) -> AssociationRequest:
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(b"\x01\x00" + len(body).to_bytes(4, "big") + body)
            primitive = pdu.to_primitive()
        except Exception as error:  # noqa: BLE001 - any decoding failure is the peer's malformed PDU
            raise ProtocolError(
                AbortReason.INVALID_PDU_PARAMETER_VALUE, f"undecodable A-ASSOCIATE-RQ: {error}"
            ) from None
        return AssociationRequest(
            calling_ae_title=str(primitive.calling_ae_title).strip(),
            called_ae_title=str(primitive.called_ae_title).strip(),
            peer_max_pdu=int(primitive.maximum_length_received or 0),
            primitive=primitive,
            protocol_version=int(pdu.protocol_version),
        )

    def rejection(self, request: AssociationRequest) -> tuple[int, int, int] | None:
        """The A-ASSOCIATE-RJ (result, source, diagnostic) this request gets, or None to go on."""
        if request.protocol_version & 0x0001 == 0:
            return PROTOCOL_VERSION_NOT_SUPPORTED
        if str(request.primitive.application_context_name) != APPLICATION_CONTEXT:
            return APPLICATION_CONTEXT_NOT_SUPPORTED
        allowed = self._settings.require_calling_ae_title
        if allowed and request.calling_ae_title not in allowed:
            return CALLING_AE_NOT_RECOGNISED
        if self._settings.require_called_ae_title and request.called_ae_title != self._settings.ae_title:
            return CALLED_AE_NOT_RECOGNISED
        return None

    def accept(self, request: AssociationRequest) -> Accepted:
        """Negotiate every proposed context: of the transfer syntaxes proposed, the first in our order of
        preference wins (see ``IMPORTABLE_TRANSFER_SYNTAXES``)."""
        results: list[PresentationContext] = []
        accepted: dict[int, tuple[str, str]] = {}
        for proposed in request.primitive.presentation_context_definition_list:
            context = PresentationContext()
            context.context_id = proposed.context_id
            abstract = str(proposed.abstract_syntax)
            ours = self._syntaxes.get(abstract)
            if ours is None and self._accept_private and is_valid_uid(abstract) and not is_standard_uid(abstract):
                ours = IMPORTABLE_TRANSFER_SYNTAXES
            offered = {str(ts) for ts in proposed.transfer_syntax}
            chosen = next((ts for ts in ours or () if ts in offered), None)
            if ours is None:
                context.result = _ABSTRACT_SYNTAX_NOT_SUPPORTED
            elif chosen is None:
                context.result = _TRANSFER_SYNTAXES_NOT_SUPPORTED
            else:
                context.result = _ACCEPTANCE
                accepted[int(proposed.context_id or 0)] = (abstract, chosen)
            # PS3.8 9.3.3.2: a rejected context still carries one (ignored) transfer syntax sub-item.
            context.transfer_syntax = [chosen or IMPORTABLE_TRANSFER_SYNTAXES[0]]
            results.append(context)
        reply = A_ASSOCIATE()
        reply.application_context_name = APPLICATION_CONTEXT
        reply.calling_ae_title = request.primitive.calling_ae_title
        reply.called_ae_title = request.primitive.called_ae_title
        reply.result = 0x00
        reply.result_source = 0x01
        reply.presentation_context_definition_results_list = results
        reply.user_information = self._user_information()
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(reply)
        return Accepted(contexts=accepted, reply=pdu.encode())

    def _user_information(self) -> list[Any]:
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = self._settings.effective_pdu_size
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        return [maximum, implementation, version]


def rejection_pdu(code: tuple[int, int, int]) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.result, primitive.result_source, primitive.diagnostic = code
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())
