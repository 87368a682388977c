"""Fuzzing the receive path for a bounded number of examples: PDU streams on the wire and data set headers.

Examples are derived deterministically (``derandomize``), so a failure in CI reproduces on a developer's machine.
"""

from __future__ import annotations

import contextlib
import io
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scp.dataset_header import read_identity
from scp.status import StoreFailure
from tests.robustness import wire
from tests.robustness.conftest import Watched
from tests.robustness.wire import Peer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

WIRE_EXAMPLES = 120
DATA_SET_EXAMPLES = 1500

_SESSION = wire.associate_rq() + wire.p_data(wire.ECHO_CONTEXT, wire.echo_rq(), command=True) + wire.RELEASE_RQ


@st.composite
def mutated_session(draw: st.DrawFn) -> bytes:
    """A valid association, echo and release with some bytes replaced, inserted, or the stream cut short."""
    stream = bytearray(_SESSION)
    for _ in range(draw(st.integers(0, 6))):
        position = draw(st.integers(0, len(stream) - 1))
        action = draw(st.sampled_from(["replace", "insert", "length"]))
        if action == "replace":
            stream[position] = draw(st.integers(0, 255))
        elif action == "insert":
            stream[position:position] = draw(st.binary(min_size=1, max_size=16))
        else:  # a 4-byte field set to an edge value, where a length would be
            edge = draw(st.sampled_from([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, len(stream)]))
            stream[position : position + 4] = edge.to_bytes(4, "big")
    return bytes(stream[: draw(st.integers(1, len(stream)))])


@settings(max_examples=WIRE_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(stream=st.one_of(mutated_session(), st.binary(min_size=1, max_size=512)))
def test_any_byte_stream_ends_the_association_and_nothing_else(watched: Watched, stream: bytes) -> None:
    with Peer(watched.port) as peer:
        try:
            peer.send(stream)
            peer.sock.shutdown(socket.SHUT_WR)  # the daemon sees the end of the stream and must let go
            peer.ending(15)
        except OSError:  # reset, broken pipe, or not connected: the daemon hung up first, as it may
            pass
    assert watched.daemon.process.poll() is None


_SYNTAXES = [wire.EXPLICIT_VR_LITTLE_ENDIAN, wire.IMPLICIT_VR_LITTLE_ENDIAN, wire.EXPLICIT_VR_BIG_ENDIAN,
             wire.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN]  # fmt: skip


@settings(max_examples=DATA_SET_EXAMPLES, deadline=2000, derandomize=True, database=None)
@given(data=st.binary(max_size=4096), syntax=st.sampled_from(_SYNTAXES))
def test_data_set_header_reader_only_ever_refuses(data: bytes, syntax: str) -> None:
    """Whatever the bytes, reading the identifying elements returns or raises StoreFailure, in bounded time."""
    with contextlib.suppress(StoreFailure):
        read_identity(io.BytesIO(data), len(data), syntax)
