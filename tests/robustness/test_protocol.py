"""Malformed protocol: each lie in a PDU ends that association quickly (A-ABORT or close) and nothing else."""

from __future__ import annotations

import json
import struct
import time

import pytest
from pydicom.uid import generate_uid

from tests.robustness import wire
from tests.robustness.conftest import ACSE_TIMEOUT, NETWORK_TIMEOUT, Watched
from tests.robustness.wire import Peer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DEFAULT_MAXIMUM_PDU = 1_048_576
# How long the daemon may take to drop a peer that broke the protocol (it reacts at once; CI may be slow).
PROMPT = 5.0


def assert_dropped(peer: Peer, within: float = PROMPT) -> list[int]:
    """The daemon ends the connection (an A-ABORT, then close, or just close) within ``within`` seconds."""
    sent, took = peer.ending(within)
    assert set(sent) <= {wire.A_ABORT}, f"expected at most an A-ABORT before the close, got PDU types {sent}"
    assert took < within
    return sent


def assert_one_clear_line(watched: Watched, *words: str) -> list[dict[str, object]]:
    """The daemon said what happened in a warning that names ``words``, and logged no traceback."""
    time.sleep(0.2)  # the log line may follow the close by a moment
    entries = watched.logs()
    assert not [e for e in entries if "exception" in e], "a traceback was logged"
    warnings = [e for e in entries if e["level"] in ("WARNING", "ERROR")]
    said = [e for e in warnings if all(word.lower() in json.dumps(e).lower() for word in words)]
    assert said, f"no warning mentioning {words}; warnings: {warnings}"
    return said


@pytest.mark.parametrize(
    "first_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS ClientHello
        b"\x00" * 64,
        b"\xff" * 64,
        b"\x08\x00\x00\x00\x00\x04abcd",  # the type after A-ABORT
    ],
    ids=["http", "tls", "zeros", "ones", "type-8"],
)
def test_unknown_pdu_type_is_aborted_with_one_log_line(watched: Watched, first_bytes: bytes) -> None:
    with Peer(watched.port) as peer:
        peer.send(first_bytes)
        assert assert_dropped(peer) == [wire.A_ABORT]
    assert_one_clear_line(watched, "PDU")


@pytest.mark.parametrize("declared", [DEFAULT_MAXIMUM_PDU + 1, 0x7FFFFFFF, 0xFFFFFFFF])
def test_p_data_longer_than_the_negotiated_maximum_is_refused_before_reading(watched: Watched, declared: int) -> None:
    with Peer(watched.port) as peer:
        peer.associate()
        peer.send(struct.pack(">BBL", wire.P_DATA_TF, 0, declared) + bytes(4096))
        assert assert_dropped(peer) == [wire.A_ABORT]
    assert_one_clear_line(watched, "PDU", str(declared))


def test_p_data_of_exactly_the_negotiated_maximum_is_read(watched: Watched) -> None:
    with Peer(watched.port) as peer:
        peer.associate()
        command = wire.echo_rq()
        padding = DEFAULT_MAXIMUM_PDU - 6 - len(command) - 6  # a second PDV fills the PDU to the limit
        filler = struct.pack(">LBB", padding + 2, wire.ECHO_CONTEXT, 0x00) + bytes(padding)
        pdv = struct.pack(">LBB", len(command) + 2, wire.ECHO_CONTEXT, 0x03) + command
        peer.send(wire.pdu(wire.P_DATA_TF, filler + pdv))
        # A data fragment for a context before its command is a protocol error for DIMSE, not for the guard.
        peer.ending(PROMPT)
    assert not [e for e in watched.logs() if str(DEFAULT_MAXIMUM_PDU) in json.dumps(e)], "the PDU was refused"


@pytest.mark.parametrize("declared", [0xFFFFFFFF, 300 * 1024])
def test_association_request_longer_than_its_cap_is_refused(watched: Watched, declared: int) -> None:
    with Peer(watched.port) as peer:
        peer.send(struct.pack(">BBL", wire.A_ASSOCIATE_RQ, 0, declared))
        peer.send(bytes(1024))
        assert assert_dropped(peer) == [wire.A_ABORT]
    assert_one_clear_line(watched, "PDU", str(declared))


@pytest.mark.parametrize("pdu_type", [wire.A_RELEASE_RQ, wire.A_ABORT, wire.A_ASSOCIATE_RJ])
def test_fixed_length_pdu_declaring_more_is_refused(watched: Watched, pdu_type: int) -> None:
    with Peer(watched.port) as peer:
        peer.associate()
        peer.send(wire.pdu(pdu_type, bytes(4), declared=0xFFFFFFFF))
        assert_dropped(peer)
    assert_one_clear_line(watched, "PDU")


@pytest.mark.parametrize(
    "request_bytes",
    [
        wire.pdu(wire.A_ASSOCIATE_RQ, b""),  # length 0
        wire.pdu(wire.A_ASSOCIATE_RQ, wire.associate_rq()[6:40]),  # short: ends inside the fixed fields
        wire.pdu(wire.A_ASSOCIATE_RQ, wire.associate_rq()[6:], declared=len(wire.associate_rq()) - 20),
        wire.associate_rq()[:74] + wire.item(0x10, b"1.2.840.10008.3.1.1.1", declared=0xFFFF),  # item lies
    ],
    ids=["length-0", "short", "declared-shorter-than-sent", "item-length-lies"],
)
def test_association_request_that_cannot_be_decoded_is_aborted(watched: Watched, request_bytes: bytes) -> None:
    with Peer(watched.port) as peer:
        peer.send(request_bytes)
        # A request cut inside its fixed fields may decode as one with no presentation context and no application
        # context (rejected) or none at all (aborted); leftovers of a request declared shorter than sent are read
        # as a second PDU. Whatever the answer, it is a clear one and the connection ends.
        sent, _ = peer.ending(PROMPT + NETWORK_TIMEOUT + 3)
        assert set(sent) <= {wire.A_ASSOCIATE_AC, wire.A_ASSOCIATE_RJ, wire.A_ABORT}, sent


@pytest.mark.parametrize("missing", [1, 100])
def test_truncated_pdu_then_silence_is_dropped_by_the_per_pdu_deadline(watched: Watched, missing: int) -> None:
    # Before an association exists, the ARTIM timer (ACSE_TIMEOUT, PS3.8 9.1.2) bounds the whole request.
    request = wire.associate_rq()
    with Peer(watched.port) as peer:
        peer.send(request[:-missing])
        _, took = peer.ending(ACSE_TIMEOUT + PROMPT)
        assert took >= ACSE_TIMEOUT - 0.5
    assert_one_clear_line(watched, "PDU", f"{ACSE_TIMEOUT:g} s")


def test_truncated_pdu_then_close_is_logged_and_forgotten(watched: Watched) -> None:
    with Peer(watched.port) as peer:
        peer.associate()
        peer.send(wire.p_data(wire.ECHO_CONTEXT, wire.echo_rq(), command=True)[:20])
    time.sleep(0.5)
    assert_one_clear_line(watched)


@pytest.mark.parametrize(
    "pdv",
    [
        struct.pack(">LBB", 0, wire.ECHO_CONTEXT, 0x03),
        struct.pack(">LBB", 1, wire.ECHO_CONTEXT, 0x03),
        struct.pack(">LBB", 0xFFFFFFFF, wire.ECHO_CONTEXT, 0x03) + wire.echo_rq(),
        struct.pack(">LBB", 4000, wire.ECHO_CONTEXT, 0x03) + wire.echo_rq(),
        struct.pack(">LBB", 8, wire.ECHO_CONTEXT, 0x03) + wire.echo_rq(),
    ],
    ids=["pdv-length-0", "pdv-length-1", "pdv-length-ffffffff", "pdv-longer-than-pdu", "pdv-shorter"],
)
def test_lying_pdv_length_is_aborted(watched: Watched, pdv: bytes) -> None:
    with Peer(watched.port) as peer:
        peer.associate()
        peer.send(wire.pdu(wire.P_DATA_TF, pdv))
        assert assert_dropped(peer) == [wire.A_ABORT]


def test_p_data_before_association_is_aborted(watched: Watched) -> None:
    with Peer(watched.port) as peer:
        peer.send(wire.p_data(wire.ECHO_CONTEXT, wire.echo_rq(), command=True))
        assert assert_dropped(peer) == [wire.A_ABORT]


def test_wrong_protocol_version_is_rejected(watched: Watched) -> None:
    with Peer(watched.port) as peer:
        peer.send(wire.associate_rq(version=2))
        answer = peer.receive()
        assert answer is not None and answer.pdu_type == wire.A_ASSOCIATE_RJ
        # PS3.8 9.3.4: result 1 (permanent), source 2 (provider, ACSE), reason 2 (protocol version).
        assert tuple(answer.payload[1:4]) == (1, 2, 2)


def test_hundreds_of_presentation_contexts_are_answered(watched: Watched) -> None:
    # Context IDs are one byte: 300 contexts repeat IDs, which a decoder must survive.
    contexts = [(1 + 2 * (n % 128), wire.VERIFICATION, [wire.IMPLICIT_VR_LITTLE_ENDIAN]) for n in range(300)]
    with Peer(watched.port) as peer:
        peer.send(wire.associate_rq(contexts=contexts))
        answer = peer.receive()
        assert answer is not None and answer.pdu_type in (wire.A_ASSOCIATE_AC, wire.A_ASSOCIATE_RJ, wire.A_ABORT)


def test_largest_legitimate_association_request_is_accepted(watched: Watched) -> None:
    from scp.contexts import IMPORTABLE_TRANSFER_SYNTAXES, storage_sop_classes

    # 128 contexts (all the 8-bit odd IDs) each proposing every importable syntax, plus a 64 KiB user identity.
    classes = storage_sop_classes()
    contexts = [(1 + 2 * n, classes[n], list(IMPORTABLE_TRANSFER_SYNTAXES)) for n in range(128)]
    identity = wire.item(0x58, struct.pack(">BBH", 1, 0, 65000) + b"u" * 65000 + struct.pack(">H", 0))
    request = wire.associate_rq(contexts=contexts, extra_user_items=identity)
    assert 128 * 1024 < len(request) < 256 * 1024
    with Peer(watched.port) as peer:
        answer = peer.associate(request)
        assert answer.pdu_type == wire.A_ASSOCIATE_AC
        peer.release()


def _store_header(peer: Peer, sop_instance_uid: str) -> None:
    peer.send(wire.p_data(wire.STORE_CONTEXT, wire.store_rq(sop_instance_uid), command=True))
    peer.send(wire.p_data(wire.STORE_CONTEXT, bytes(8192), command=False, last=False))


def test_release_while_a_data_set_is_half_sent_stores_nothing(watched: Watched) -> None:
    with Peer(watched.port) as peer:
        peer.associate()
        _store_header(peer, generate_uid())
        peer.send(wire.RELEASE_RQ)
        peer.ending(PROMPT + NETWORK_TIMEOUT)
    time.sleep(0.5)
    assert watched.daemon.stored_files() == []
    assert watched.daemon.spool_files() == []


def test_abort_mid_data_set_removes_the_partial_file(watched: Watched) -> None:
    with Peer(watched.port) as peer:
        peer.associate()
        _store_header(peer, generate_uid())
        peer.send(wire.ABORT)
        peer.ending(PROMPT)
    time.sleep(0.5)
    assert watched.daemon.stored_files() == []
    assert watched.daemon.spool_files() == []
    assert watched.log_messages("incomplete objects discarded")


def test_second_release_request_after_the_first(watched: Watched) -> None:
    # The daemon never requests a release itself, so a release collision (PS3.8 7.2.2) cannot arise; the nearest a
    # peer can get is asking twice.
    with Peer(watched.port) as peer:
        peer.associate()
        peer.send(wire.RELEASE_RQ + wire.RELEASE_RQ)
        sent, _ = peer.ending(PROMPT + NETWORK_TIMEOUT)
        # PS3.8 9.2 (Sta8 + Evt12 -> AA-8): the second request is unexpected and aborts the association.
        assert sent in ([wire.A_RELEASE_RP], [wire.A_ABORT], [wire.A_RELEASE_RP, wire.A_ABORT]), sent


@pytest.mark.parametrize("associated", [False, True], ids=["before-association", "after-association"])
def test_trickling_peer_is_dropped_by_the_per_pdu_deadline(watched: Watched, associated: bool) -> None:
    """One byte every 0.2 s never lets a read time out, yet the whole PDU must arrive within its deadline.

    Before the association exists the ARTIM timer (ACSE_TIMEOUT) is that deadline, afterwards NETWORK_TIMEOUT.
    """
    deadline = NETWORK_TIMEOUT if associated else ACSE_TIMEOUT
    with Peer(watched.port) as peer:
        if associated:
            peer.associate()
        data = wire.p_data(wire.ECHO_CONTEXT, wire.echo_rq(), command=True) if associated else wire.associate_rq()
        started = time.monotonic()
        try:
            for byte in data:
                peer.send(bytes([byte]))
                time.sleep(0.2)
                assert time.monotonic() - started < deadline + PROMPT, "the trickling peer was never dropped"
        except (BrokenPipeError, ConnectionResetError):
            pass
        else:
            pytest.fail("the whole trickled PDU was accepted")
        assert time.monotonic() - started >= deadline - 0.5
    # The whole phrase: a bare number could match the peer's port.
    assert_one_clear_line(watched, f"incomplete after {deadline:g} s")
