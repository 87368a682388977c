"""Association negotiation (PS3.8 7.1, PS3.7 D.3.3): policy checks, presentation contexts, the reply PDU.

The AE title policy reads only the request's fixed fields; only a request it lets through has its variable items
checked (at most 128 presentation contexts, odd distinct ids) and then decoded by pynetdicom, which also encodes
our A-ASSOCIATE-AC/RJ; the decisions are ours.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext

from scp import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from scp.commitment import STORAGE_COMMITMENT_PUSH_MODEL
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
_USER_REJECTION = 1
_ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
_TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


_FIXED_FIELDS = 68  # PS3.8 9.3.2: protocol version, reserved, called AE, calling AE, reserved
_NEGOTIATIONS_REMEMBERED = 64
# A modality's request is a few kilobytes; remembering only requests up to this size bounds the memory of the
# remembered negotiations (64 of them) to a few MiB whatever peers send.
_REMEMBERED_REQUEST_MAX = 64 * 1024
# PS3.8 9.3.2.2: presentation context ids are odd integers 1-255, so a request proposes at most 128 contexts;
# with one application context and one user information item, that is every item a request may hold.
_PRESENTATION_CONTEXT_ITEM = 0x20
_MAX_PRESENTATION_CONTEXTS = 128
_MAX_ITEMS = _MAX_PRESENTATION_CONTEXTS + 2


@dataclass(frozen=True)
class _Negotiated:
    """What one set of variable items (contexts, user information) negotiates to, whoever sends it."""

    application_context: str
    contexts: dict[int, tuple[str, str]]
    reply_items: bytes  # the A-ASSOCIATE-AC's variable items
    peer_maximum_length: int = 0  # the largest P-DATA-TF the requestor receives; 0: no limit (PS3.8 D.1)


@dataclass(frozen=True)
class AssociationRequest:
    """An A-ASSOCIATE-RQ with only its fixed fields read; its variable items stay undecoded until accepted."""

    calling_ae_title: str
    called_ae_title: str
    protocol_version: int
    header: bytes  # the fixed fields, echoed in the reply
    items: bytes  # the variable items: application context, presentation contexts, user information


class Rejected(Exception):
    """The request is answered with this A-ASSOCIATE-RJ (result, source, diagnostic)."""

    def __init__(self, code: tuple[int, int, int]) -> None:
        super().__init__(REJECT_REASONS.get(code, "rejected"))
        self.code = code


@dataclass(frozen=True)
class Accepted:
    """Accepted presentation contexts by id: (abstract syntax, transfer syntax)."""

    contexts: dict[int, tuple[str, str]]
    reply: bytes
    peer_maximum_length: int = 0


class Policy:
    """What this SCP accepts: AE titles and, per SOP class, the transfer syntaxes it stores.

    A modality sends the same association request every time; decoding and answering its 100-odd presentation
    contexts through pynetdicom takes tens of milliseconds, so the outcome is remembered by the request's
    variable items (the AE titles live in the fixed fields and are checked on every request). Only requests that
    passed the AE title policy and were accepted are remembered, so refused peers cannot evict anyone.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        storage = settings.supported_sop_class_uids or storage_sop_classes()
        self._syntaxes: dict[str, tuple[str, ...]] = {uid: IMPORTABLE_TRANSFER_SYNTAXES for uid in storage}
        self._syntaxes[VERIFICATION_SOP_CLASS] = VERIFICATION_SYNTAXES
        self._syntaxes[STORAGE_COMMITMENT_PUSH_MODEL] = VERIFICATION_SYNTAXES  # little endian, as request.py reads
        # Without an explicit list, private SOP classes (and ones newer than our registry) are stored too:
        # modalities send them (vendor raw data, protocols), and HealthImaging imports any SOP class.
        self._accept_private = not settings.supported_sop_class_uids
        self._remembered: OrderedDict[bytes, _Negotiated] = OrderedDict()
        self._lock = threading.Lock()

    def decode_request(self, body: bytes) -> AssociationRequest:
        if len(body) < _FIXED_FIELDS:
            raise ProtocolError(AbortReason.INVALID_PDU_PARAMETER_VALUE, "A-ASSOCIATE-RQ shorter than its fixed fields")
        header, items = body[:_FIXED_FIELDS], body[_FIXED_FIELDS:]
        return AssociationRequest(
            called_ae_title=_ae_title(header[4:20]),
            calling_ae_title=_ae_title(header[20:36]),
            protocol_version=int.from_bytes(header[:2], "big"),
            header=header,
            items=items,
        )

    def rejection(self, request: AssociationRequest) -> tuple[int, int, int] | None:
        """The A-ASSOCIATE-RJ (result, source, diagnostic) the fixed fields earn, or None to go on."""
        if request.protocol_version & 0x0001 == 0:
            return PROTOCOL_VERSION_NOT_SUPPORTED
        allowed = self._settings.require_calling_ae_title
        if allowed and request.calling_ae_title not in allowed:
            return CALLING_AE_NOT_RECOGNISED
        if self._settings.require_called_ae_title and request.called_ae_title != self._settings.ae_title:
            return CALLED_AE_NOT_RECOGNISED
        return None

    def accept(self, request: AssociationRequest) -> Accepted:
        """Negotiate the request's presentation contexts and build the A-ASSOCIATE-AC.

        Call only once :meth:`rejection` let the request through. Raises :class:`ProtocolError` for items that
        break PS3.8 9.3.2 and :class:`Rejected` for an application context other than DICOM's.
        """
        negotiated = self._negotiation(request)
        # PS3.8 9.3.3: the A-ASSOCIATE-AC echoes the request's fixed fields (its AE titles among them).
        body = request.header + negotiated.reply_items
        return Accepted(
            negotiated.contexts, struct.pack(">BBL", 0x02, 0, len(body)) + body, negotiated.peer_maximum_length
        )

    def _negotiation(self, request: AssociationRequest) -> _Negotiated:
        items = request.items
        with self._lock:
            known = self._remembered.get(items)
            if known is not None:
                self._remembered.move_to_end(items)
                return known
        check_items(items)
        negotiated = self._negotiate(request.header + items)
        if negotiated.application_context != APPLICATION_CONTEXT:
            raise Rejected(APPLICATION_CONTEXT_NOT_SUPPORTED)
        if len(items) <= _REMEMBERED_REQUEST_MAX:
            with self._lock:
                self._remembered[items] = negotiated
                if len(self._remembered) > _NEGOTIATIONS_REMEMBERED:
                    self._remembered.popitem(last=False)
        return negotiated

    def _negotiate(self, body: bytes) -> _Negotiated:
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(b"\x01\x00" + len(body).to_bytes(4, "big") + body)
            primitive = pdu.to_primitive()
        except Exception as error:  # noqa: BLE001 - any decoding failure is the peer's malformed PDU
            raise ProtocolError(
                AbortReason.INVALID_PDU_PARAMETER_VALUE, f"undecodable A-ASSOCIATE-RQ: {error}"
            ) from None
        roles, refused_roles = _commitment_roles(primitive)
        contexts, results = self._choose(primitive, refused_roles)
        reply = A_ASSOCIATE()
        reply.application_context_name = APPLICATION_CONTEXT
        reply.calling_ae_title = primitive.calling_ae_title
        reply.called_ae_title = primitive.called_ae_title
        reply.result = 0x00
        reply.result_source = 0x01
        reply.presentation_context_definition_results_list = results
        reply.user_information = self._user_information() + roles
        encoded = A_ASSOCIATE_AC()
        encoded.from_primitive(reply)
        return _Negotiated(
            application_context=str(primitive.application_context_name),
            contexts=contexts,
            reply_items=bytes(encoded.encode())[6 + _FIXED_FIELDS :],
            peer_maximum_length=_peer_maximum_length(primitive),
        )

    def _choose(
        self, primitive: A_ASSOCIATE, refused_roles: set[str]
    ) -> tuple[dict[int, tuple[str, str]], list[PresentationContext]]:
        """Negotiate every proposed context: of the transfer syntaxes proposed, the first in our order of
        preference wins (see ``IMPORTABLE_TRANSFER_SYNTAXES``)."""
        results: list[PresentationContext] = []
        accepted: dict[int, tuple[str, str]] = {}
        for proposed in primitive.presentation_context_definition_list:
            context = PresentationContext()
            context.context_id = proposed.context_id
            abstract = str(proposed.abstract_syntax)
            ours = self._syntaxes.get(abstract)
            if ours is None and self._accept_private and is_valid_uid(abstract) and not is_standard_uid(abstract):
                ours = IMPORTABLE_TRANSFER_SYNTAXES
            offered = {str(ts) for ts in proposed.transfer_syntax}
            chosen = next((ts for ts in ours or () if ts in offered), None)
            if abstract in refused_roles:
                context.result = _USER_REJECTION
            elif ours is None:
                context.result = _ABSTRACT_SYNTAX_NOT_SUPPORTED
            elif chosen is None:
                context.result = _TRANSFER_SYNTAXES_NOT_SUPPORTED
            else:
                context.result = _ACCEPTANCE
                accepted[int(proposed.context_id or 0)] = (abstract, chosen)
            # PS3.8 9.3.3.2: a rejected context still carries one (ignored) transfer syntax sub-item.
            context.transfer_syntax = [chosen or IMPORTABLE_TRANSFER_SYNTAXES[0]]
            results.append(context)
        return accepted, results

    def _user_information(self) -> list[Any]:
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = self._settings.effective_pdu_size
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        return [maximum, implementation, version]


def check_items(items: bytes) -> None:
    """Walk the request's variable items (a few hundred at most) before anything decodes them: at most 128
    presentation contexts, each id odd 1-255 and proposed once (PS3.8 9.3.2.2), nothing beyond the request."""
    offset = count = contexts = 0
    seen: set[int] = set()
    while offset < len(items):
        if offset + 4 > len(items):
            raise ProtocolError(AbortReason.INVALID_PDU_PARAMETER_VALUE, "A-ASSOCIATE-RQ item header truncated")
        item_type = items[offset]
        (length,) = struct.unpack_from(">H", items, offset + 2)
        if offset + 4 + length > len(items):
            raise ProtocolError(AbortReason.INVALID_PDU_PARAMETER_VALUE, "A-ASSOCIATE-RQ item runs past its end")
        count += 1
        if count > _MAX_ITEMS:
            raise ProtocolError(AbortReason.INVALID_PDU_PARAMETER_VALUE, f"A-ASSOCIATE-RQ has over {_MAX_ITEMS} items")
        if item_type == _PRESENTATION_CONTEXT_ITEM:
            contexts += 1
            if contexts > _MAX_PRESENTATION_CONTEXTS:
                raise ProtocolError(
                    AbortReason.INVALID_PDU_PARAMETER_VALUE,
                    f"over {_MAX_PRESENTATION_CONTEXTS} presentation contexts proposed",
                )
            if length < 4:
                raise ProtocolError(AbortReason.INVALID_PDU_PARAMETER_VALUE, "presentation context item too short")
            context_id = items[offset + 4]
            if context_id % 2 == 0:
                raise ProtocolError(
                    AbortReason.INVALID_PDU_PARAMETER_VALUE, f"presentation context id {context_id} is not odd 1-255"
                )
            if context_id in seen:
                raise ProtocolError(
                    AbortReason.INVALID_PDU_PARAMETER_VALUE, f"presentation context id {context_id} proposed twice"
                )
            seen.add(context_id)
        offset += 4 + length


# -- Storage Commitment: SCP/SCU role selection (PS3.7 D.3.3.4) and the requestor's PDU size ---------------------


def _commitment_roles(primitive: A_ASSOCIATE) -> tuple[list[Any], set[str]]:
    """Our answers to the requestor's role selection items, and the SOP classes whose contexts it leaves us no role
    in. Only the default roles serve: the requestor as SCU (N-ACTION, then N-EVENT-REPORT on the same
    association), this SCP as SCP. A proposed SCU role is accepted, a proposed SCP role declined (this SCP never
    requests commitment); a requestor that declines the SCU role has its commitment context rejected."""
    replies: list[Any] = []
    refused: set[str] = set()
    for item in primitive.user_information:
        if not isinstance(item, SCP_SCU_RoleSelectionNegotiation):
            continue
        if str(item.sop_class_uid) != STORAGE_COMMITMENT_PUSH_MODEL:
            continue  # PS3.7 D.3.3.4: an item left unanswered keeps the default roles; we serve no other roles
        if not item.scu_role:
            refused.add(STORAGE_COMMITMENT_PUSH_MODEL)  # its context is rejected; no roles left to answer
            continue
        reply = SCP_SCU_RoleSelectionNegotiation()
        reply.sop_class_uid = item.sop_class_uid
        reply.scu_role = True
        reply.scp_role = False
        replies.append(reply)
    return replies, refused


def _peer_maximum_length(primitive: A_ASSOCIATE) -> int:
    for item in primitive.user_information:
        if isinstance(item, MaximumLengthNotification):
            return int(item.maximum_length_received or 0)
    return 0


def _ae_title(raw: bytes) -> str:
    return raw.decode("ascii", errors="replace").strip(" \x00")


def rejection_pdu(code: tuple[int, int, int]) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.result, primitive.result_source, primitive.diagnostic = code
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())
