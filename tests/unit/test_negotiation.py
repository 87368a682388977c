"""Negotiation decisions: AE title policy, protocol checks, and which transfer syntax a context gets."""

from __future__ import annotations

import pytest
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

from scp import IMPLEMENTATION_CLASS_UID
from scp.config import Settings
from scp.negotiation import (
    APPLICATION_CONTEXT_NOT_SUPPORTED,
    CALLED_AE_NOT_RECOGNISED,
    CALLING_AE_NOT_RECOGNISED,
    AssociationRequest,
    Policy,
    Rejected,
    rejection_pdu,
)
from scp.upper_layer import ProtocolError
from tests.robustness import wire

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT, IMPLICIT, JPEG_LOSSLESS, JPEG_BASELINE = (
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.50",
)  # fmt: skip


def request(
    policy: Policy,
    contexts: list[tuple[str, list[str]]],
    calling: str = "CT1",
    called: str = "STORESCP",
    ids: list[int] | None = None,
    application_context: str = "1.2.840.10008.3.1.1.1",
) -> AssociationRequest:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = application_context
    primitive.calling_ae_title, primitive.called_ae_title = calling, called
    proposed = []
    for number, (abstract, syntaxes) in enumerate(contexts):
        context = build_context(abstract, syntaxes)
        context.context_id = ids[number] if ids else 2 * number + 1
        proposed.append(context)
    primitive.presentation_context_definition_list = proposed
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    primitive.user_information = [maximum]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return policy.decode_request(pdu.encode()[6:])


def test_uncompressed_then_lossless_then_lossy_whatever_the_proposal_order() -> None:
    policy = Policy(Settings.from_env({}))
    accepted = policy.accept(
        request(
            policy,
            [
                (CT, [JPEG_BASELINE, JPEG_LOSSLESS, IMPLICIT]),
                (CT, [JPEG_BASELINE, JPEG_LOSSLESS]),
                (CT, [JPEG_BASELINE]),
            ],
        )
    )
    assert accepted.contexts == {1: (CT, IMPLICIT), 3: (CT, JPEG_LOSSLESS), 5: (CT, JPEG_BASELINE)}


def test_reply_is_an_association_accept_with_our_identity_and_rejected_contexts() -> None:
    policy = Policy(Settings.from_env({"MAXIMUM_PDU_SIZE": "65536"}))
    accepted = policy.accept(
        request(
            policy, [(CT, [EXPLICIT]), ("1.2.840.10008.5.1.4.1.2.1.1", [EXPLICIT]), (CT, ["1.2.840.10008.1.2.4.94"])]
        )
    )
    pdu = A_ASSOCIATE_AC()
    pdu.decode(accepted.reply)
    reply = pdu.to_primitive()
    results = {cx.context_id: cx.result for cx in reply.presentation_context_definition_results_list}
    assert results == {1: 0, 3: 3, 5: 4}  # accepted, abstract syntax not supported, transfer syntaxes not supported
    assert reply.maximum_length_received == 65536
    assert reply.implementation_class_uid == IMPLEMENTATION_CLASS_UID


def test_ae_title_policy() -> None:
    open_policy = Policy(Settings.from_env({}))
    assert open_policy.rejection(request(open_policy, [(CT, [EXPLICIT])], called="ANYTHING")) is None
    strict = Policy(Settings.from_env({"REQUIRE_CALLED_AE_TITLE": "true", "REQUIRE_CALLING_AE_TITLE": "CT1,MR1"}))
    assert strict.rejection(request(strict, [(CT, [EXPLICIT])], called="OTHER")) == CALLED_AE_NOT_RECOGNISED
    assert strict.rejection(request(strict, [(CT, [EXPLICIT])], calling="XR9")) == CALLING_AE_NOT_RECOGNISED
    assert strict.rejection(request(strict, [(CT, [EXPLICIT])], calling="MR1")) is None


def test_supported_sop_class_list_limits_the_contexts() -> None:
    policy = Policy(Settings.from_env({"SUPPORTED_SOP_CLASS_UIDS": "1.2.840.10008.5.1.4.1.1.4"}))
    accepted = policy.accept(request(policy, [(CT, [EXPLICIT]), ("1.2.840.10008.5.1.4.1.1.4", [EXPLICIT]),
                                              ("1.2.840.10008.1.1", [IMPLICIT])]))  # fmt: skip
    assert sorted(accepted.contexts) == [3, 5]


def test_rejection_pdu_round_trips() -> None:
    pdu = A_ASSOCIATE_RJ()
    pdu.decode(rejection_pdu((2, 3, 2)))
    assert (pdu.result, pdu.source, pdu.reason_diagnostic) == (2, 3, 2)


def test_private_sop_classes_are_stored_but_standard_non_storage_classes_are_not() -> None:
    policy = Policy(Settings.from_env({}))
    siemens_csa_non_image = "1.3.12.2.1107.5.9.1"
    retired_ultrasound = "1.2.840.10008.5.1.4.1.1.6"
    patient_root_find = "1.2.840.10008.5.1.4.1.2.1.1"
    proposals = [(siemens_csa_non_image, [EXPLICIT]), (retired_ultrasound, [EXPLICIT]), (patient_root_find, [EXPLICIT])]
    assert sorted(policy.accept(request(policy, proposals)).contexts) == [1, 3]
    listed = Policy(Settings.from_env({"SUPPORTED_SOP_CLASS_UIDS": CT}))
    assert listed.accept(request(listed, proposals)).contexts == {}


def test_a_repeated_request_is_answered_from_memory_with_its_own_ae_titles() -> None:
    policy = Policy(Settings.from_env({}))
    first = request(policy, [(CT, [EXPLICIT])], calling="CT1")
    again = request(policy, [(CT, [EXPLICIT])], calling="CT2", called="OTHER")
    assert policy.accept(again).contexts is policy.accept(first).contexts  # decoded once
    pdu = A_ASSOCIATE_AC()
    pdu.decode(policy.accept(again).reply)
    reply = pdu.to_primitive()
    assert (reply.calling_ae_title, reply.called_ae_title) == ("CT2", "OTHER")


def test_the_ae_title_policy_decides_before_any_item_is_decoded() -> None:
    strict = Policy(Settings.from_env({"REQUIRE_CALLING_AE_TITLE": "CT1"}))
    fixed = request(strict, [(CT, [EXPLICIT])], calling="INTRUDER").header
    garbage = strict.decode_request(fixed + b"\x20\xff" * 100_000)  # items no decoder would survive
    assert strict.rejection(garbage) == CALLING_AE_NOT_RECOGNISED


def test_more_than_128_contexts_are_refused() -> None:
    policy = Policy(Settings.from_env({}))
    assert len(policy.accept(request(policy, [(CT, [EXPLICIT])] * 128)).contexts) == 128
    with pytest.raises(ProtocolError, match="over 128 presentation contexts"):
        policy.accept(request(policy, [(CT, [EXPLICIT])] * 129, ids=[1 + 2 * (n % 128) for n in range(129)]))


@pytest.mark.parametrize(
    ("ids", "words"),
    [([1, 3, 1], "id 1 proposed twice"), ([1, 2], "id 2 is not odd"), ([0], "id 0 is not odd")],
)
def test_duplicate_and_invalid_context_ids_are_refused(ids: list[int], words: str) -> None:
    policy = Policy(Settings.from_env({}))
    # Built byte by byte: pynetdicom refuses to encode such ids.
    body = wire.associate_rq(contexts=[(context_id, CT, [EXPLICIT]) for context_id in ids])[6:]
    with pytest.raises(ProtocolError, match=words):
        policy.accept(policy.decode_request(body))


def test_refused_requests_never_displace_remembered_ones() -> None:
    policy = Policy(Settings.from_env({}))
    modality = request(policy, [(CT, [EXPLICIT])])
    remembered = policy.accept(modality).contexts
    for number in range(100):  # more than the negotiations remembered
        other = request(policy, [(CT, [EXPLICIT])], application_context=f"1.2.3.{number}")
        with pytest.raises(Rejected) as rejected:
            policy.accept(other)
        assert rejected.value.code == APPLICATION_CONTEXT_NOT_SUPPORTED
        with pytest.raises(ProtocolError):
            policy.accept(request(policy, [(CT, [EXPLICIT])] * 2, ids=[number * 2 + 1] * 2))
    assert policy.accept(modality).contexts is remembered
