"""Negotiating the Storage Commitment context: its syntaxes, SCP/SCU role selection (PS3.7 D.3.3.4), and the
requestor's maximum PDU length that a report on the same association must respect."""

from __future__ import annotations

from pynetdicom import build_role
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import build_context

from scp.commitment import STORAGE_COMMITMENT_PUSH_MODEL
from scp.config import Settings
from scp.negotiation import Accepted, Policy

EXPLICIT, BIG_ENDIAN = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"


def negotiate(syntaxes: list[str], roles: list[SCP_SCU_RoleSelectionNegotiation]) -> tuple[Accepted, A_ASSOCIATE]:
    policy = Policy(Settings.from_env({}))
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "CT1", "STORESCP"
    context = build_context(STORAGE_COMMITMENT_PUSH_MODEL, syntaxes)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    primitive.user_information = [maximum, *roles]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    accepted = policy.accept(policy.decode_request(pdu.encode()[6:]))
    reply = A_ASSOCIATE_AC()
    reply.decode(accepted.reply)
    return accepted, reply.to_primitive()


def role_replies(reply: A_ASSOCIATE) -> list[tuple[str, bool, bool]]:
    return [
        (str(item.sop_class_uid), bool(item.scu_role), bool(item.scp_role))
        for item in reply.user_information
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
    ]


def test_commitment_is_accepted_with_the_default_roles_and_the_peer_pdu_length_kept() -> None:
    accepted, reply = negotiate([BIG_ENDIAN, EXPLICIT], [])
    assert accepted.contexts == {1: (STORAGE_COMMITMENT_PUSH_MODEL, EXPLICIT)}
    assert accepted.peer_maximum_length == 16384
    assert role_replies(reply) == []  # nothing proposed, nothing answered: the default roles hold


def test_a_proposed_scu_role_is_accepted_and_a_proposed_scp_role_declined() -> None:
    accepted, reply = negotiate([EXPLICIT], [build_role(STORAGE_COMMITMENT_PUSH_MODEL, scu_role=True, scp_role=True)])
    assert accepted.contexts == {1: (STORAGE_COMMITMENT_PUSH_MODEL, EXPLICIT)}
    assert role_replies(reply) == [(STORAGE_COMMITMENT_PUSH_MODEL, True, False)]


def test_a_requestor_declining_the_scu_role_has_its_commitment_context_rejected() -> None:
    accepted, reply = negotiate([EXPLICIT], [build_role(STORAGE_COMMITMENT_PUSH_MODEL, scu_role=False, scp_role=True)])
    assert accepted.contexts == {}
    assert [context.result for context in reply.presentation_context_definition_results_list] == [1]
    assert role_replies(reply) == []
