"""Bad Storage Commitment requests from a raw peer: each gets an N-ACTION-RSP failure status and one log line, and
the association and the daemon go on, memory bounded."""

from __future__ import annotations

import struct
import uuid

import pytest

from tests.robustness import wire
from tests.robustness.conftest import Watched
from tests.robustness.wire import Peer
from tests.support.waits import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

COMMITMENT = "1.2.840.10008.1.20.1"
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
COMMITMENT_CONTEXT = 11
INVALID_ARGUMENT_VALUE = 0x0115
RESOURCE_LIMITATION = 0x0213
CONTEXTS = [*wire.DEFAULT_CONTEXTS, (COMMITMENT_CONTEXT, COMMITMENT, [wire.EXPLICIT_VR_LITTLE_ENDIAN])]


def n_action_rq(has_data_set: bool = True, message_id: int = 1) -> bytes:
    return wire.command_set([
        (0x0003, wire.uid(COMMITMENT)),
        (0x0100, struct.pack("<H", 0x0130)),
        (0x0110, struct.pack("<H", message_id)),
        (0x0800, struct.pack("<H", 0x0000 if has_data_set else 0x0101)),
        (0x1001, wire.uid(COMMITMENT_INSTANCE)),
        (0x1008, struct.pack("<H", 1)),
    ])  # fmt: skip


def explicit(group: int, element: int, vr: bytes, value: bytes, declared: int | None = None) -> bytes:
    length = len(value) if declared is None else declared
    if vr in (b"SQ", b"UN"):
        return struct.pack("<HH2sHL", group, element, vr, 0, length) + value
    return struct.pack("<HH2sH", group, element, vr, length) + value


def transaction() -> bytes:
    return explicit(0x0008, 0x1195, b"UI", wire.uid("1.2.3.4.5"))


def request(peer: Peer, data_set: bytes | None, fragment: int = 16_000) -> int | None:
    peer.send(wire.p_data(COMMITMENT_CONTEXT, n_action_rq(data_set is not None), command=True))
    if data_set is not None:
        for start in range(0, len(data_set), fragment):
            piece = data_set[start : start + fragment]
            peer.send(wire.p_data(COMMITMENT_CONTEXT, piece, command=False, last=start + fragment >= len(data_set)))
    answer = peer.receive(timeout=30)
    assert answer is not None and answer.pdu_type == wire.P_DATA_TF, answer
    return wire.command_status(answer.payload[6:])


def nested_sequences(depth: int) -> bytes:
    """A Referenced SOP Sequence whose item holds a sequence whose item holds a sequence ... ``depth`` deep."""
    inner = b""
    for _ in range(depth):
        item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
        inner = explicit(0x0008, 0x1199, b"SQ", item + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0), 0xFFFFFFFF)
    return transaction() + inner


def empty_items(count: int) -> bytes:
    """A request whose Referenced SOP Sequence holds ``count`` empty items of undefined length (16 bytes each)."""
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    items = item * count + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return transaction() + explicit(0x0008, 0x1199, b"SQ", items, 0xFFFFFFFF)


@pytest.mark.parametrize(
    ("name", "data_set", "status"),
    [
        ("no data set", None, INVALID_ARGUMENT_VALUE),
        ("element longer than the data set", transaction() + explicit(0x0008, 0x1199, b"SQ", b"", 0x7FFFFFF0),
         INVALID_ARGUMENT_VALUE),
        ("item longer than its sequence", transaction() + explicit(
            0x0008, 0x1199, b"SQ", struct.pack("<HHL", 0xFFFE, 0xE000, 1000) + bytes(8)), INVALID_ARGUMENT_VALUE),
        ("sequence nested 5,000 deep", nested_sequences(5000), INVALID_ARGUMENT_VALUE),
        ("130,000 empty items in 2 MiB", empty_items(130_000), RESOURCE_LIMITATION),
        ("3 MiB data set", transaction() + explicit(0x0009, 0x0010, b"UN", bytes(3 * 1024 * 1024)),
         RESOURCE_LIMITATION),
    ],
)  # fmt: skip
def test_bad_request_gets_a_failure_status_and_the_association_goes_on(
    watched: Watched, name: str, data_set: bytes | None, status: int
) -> None:
    with Peer(watched.port) as peer:
        peer.associate(wire.associate_rq(contexts=CONTEXTS))
        assert request(peer, data_set) == status, name
        assert peer.echo(message_id=2) == 0x0000
        peer.release()
    assert [entry["status"] for entry in watched.log_messages("commitment request refused")] == [f"0x{status:04X}"]


def test_an_unexpected_n_event_report_response_is_logged_and_ignored(watched: Watched) -> None:
    response = wire.command_set([
        (0x0002, wire.uid(COMMITMENT)),
        (0x0100, struct.pack("<H", 0x8100)),
        (0x0120, struct.pack("<H", 77)),
        (0x0800, struct.pack("<H", 0x0101)),
        (0x0900, struct.pack("<H", 0x0000)),
    ])  # fmt: skip
    with Peer(watched.port) as peer:
        peer.associate(wire.associate_rq(contexts=CONTEXTS))
        peer.send(wire.p_data(COMMITMENT_CONTEXT, response, command=True))
        assert peer.echo(message_id=2) == 0x0000
        peer.release()
    [logged] = watched.log_messages("unexpected N-EVENT-REPORT response")
    assert logged["message_id"] == 77


def one_reference(transaction_uid: str) -> bytes:
    references = explicit(0x0008, 0x1150, b"UI", wire.uid(wire.CT_IMAGE_STORAGE)) + explicit(
        0x0008, 0x1155, b"UI", wire.uid(f"{transaction_uid}.1")
    )
    item = struct.pack("<HHL", 0xFFFE, 0xE000, len(references)) + references
    return explicit(0x0008, 0x1195, b"UI", wire.uid(transaction_uid)) + explicit(0x0008, 0x1199, b"SQ", item)


def test_requests_cut_short_give_back_what_they_held(watched: Watched) -> None:
    # Eight data sets of the largest size a request may have (2 MiB), each dropped with its connection before its
    # last fragment: together all that every association may hold (16 MiB), so that any byte of them kept would
    # crowd out the request that follows.
    header = transaction() + explicit(0x0009, 0x0010, b"UN", b"", 0)
    partial = transaction() + explicit(0x0009, 0x0010, b"UN", bytes(2 * 1024 * 1024 - len(header)))
    for _ in range(8):
        with Peer(watched.port) as peer:
            peer.associate(wire.associate_rq(contexts=CONTEXTS))
            peer.send(wire.p_data(COMMITMENT_CONTEXT, n_action_rq(), command=True))
            for start in range(0, len(partial), 16_000):
                peer.send(wire.p_data(COMMITMENT_CONTEXT, partial[start : start + 16_000], command=False, last=False))
    wait_for(lambda: len(watched.log_messages("association aborted")) >= 8, 30, "eight associations ended")
    transaction_uid = f"2.25.{uuid.uuid4().int}"

    def accepted() -> bool:
        with Peer(watched.port) as peer:
            peer.associate(wire.associate_rq(contexts=CONTEXTS))
            status = request(peer, one_reference(transaction_uid))
            peer.release()
        return status == 0x0000

    # Polled only because an ended association gives its bytes back just after its log line.
    wait_for(accepted, 10, "a commitment request accepted after the cut-short ones")
