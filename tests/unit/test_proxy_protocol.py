"""PROXY protocol v2 headers as a load balancer sends them, and every way one can be malformed."""

from __future__ import annotations

import socket
import struct

import pytest

from scp.proxy_protocol import MAX_PAYLOAD, ProxyHeader, ProxyHeaderError, local_header, parse, payload_length

SIGNATURE = bytes.fromhex("0d0a0d0a000d0a515549540a")  # written out here, not imported: the test checks the value
AWS_VPC_ENDPOINT = 0xEA


def header(
    command: int = 0x21, family: int = 0x11, payload: bytes | None = None, declared: int | None = None
) -> tuple[bytes, bytes]:
    """(fixed 16 bytes, payload) of a header; by default PROXY, TCP over IPv4, 10.0.3.7:40112 -> 10.0.1.5:11112."""
    if payload is None:
        payload = socket.inet_aton("10.0.3.7") + socket.inet_aton("10.0.1.5") + struct.pack(">HH", 40112, 11112)
    length = len(payload) if declared is None else declared
    return SIGNATURE + bytes([command, family]) + struct.pack(">H", length), payload


def decode(fixed: bytes, payload: bytes) -> ProxyHeader:
    assert payload_length(fixed) == len(payload)
    return parse(fixed, payload)


def tlv(tlv_type: int, value: bytes) -> bytes:
    return bytes([tlv_type]) + struct.pack(">H", len(value)) + value


def test_proxy_over_ipv4_names_the_client() -> None:
    parsed = decode(*header())
    assert parsed.source == ("10.0.3.7", 40112)
    assert parsed.destination == ("10.0.1.5", 11112)
    assert parsed.tlvs == ()


def test_proxy_over_ipv6() -> None:
    addresses = (
        socket.inet_pton(socket.AF_INET6, "2001:db8::7") + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
        + struct.pack(">HH", 50000, 104)
    )  # fmt: skip
    parsed = decode(*header(family=0x21, payload=addresses))
    assert parsed.source == ("2001:db8::7", 50000)


def test_the_nlb_vpc_endpoint_tlv_is_read() -> None:
    _, addresses = header()
    vpce = tlv(AWS_VPC_ENDPOINT, b"\x01vpce-08d2bf15fac5001c9")
    parsed = decode(*header(payload=addresses + vpce + tlv(0x04, b"")))  # and a NOOP
    assert parsed.tlvs == ((AWS_VPC_ENDPOINT, b"\x01vpce-08d2bf15fac5001c9"), (0x04, b""))


def test_local_is_accepted_and_names_no_client() -> None:
    assert decode(*header(command=0x20, family=0x00, payload=b"")).source is None
    # A LOCAL header's address block, if any, is ignored.
    assert decode(*header(command=0x20, family=0x11)).source is None
    assert parse(local_header()[:16], local_header()[16:]) == ProxyHeader(None, None, ())


def test_proxy_without_client_information_keeps_the_connection_address() -> None:
    # The specification lets a receiver accept PROXY with an unspecified family and use the real endpoints.
    assert decode(*header(command=0x21, family=0x00, payload=b"")).source is None


@pytest.mark.parametrize(
    ("fixed", "words"),
    [
        (b"\x01\x00\x00\x00\xce\x00\x01" + bytes(9), "signature"),  # an A-ASSOCIATE-RQ without a header
        (b"PROXY TCP4 10.0.3.7 10.0.1.5 40112 11112\r\n"[:16], "version 1"),
        (SIGNATURE[:-1] + b"X" + b"\x21\x11\x00\x0c", "signature"),
        (SIGNATURE + b"\x11\x11\x00\x0c", "version 1, expected 2"),
        (SIGNATURE + b"\x31\x11\x00\x0c", "version 3"),
        (SIGNATURE + b"\x22\x11\x00\x0c", "command 0x2"),
        (SIGNATURE + b"\x2f\x11\x00\x0c", "command 0xF"),
        (SIGNATURE + b"\x21\x41\x00\x0c", "family"),
        (SIGNATURE + b"\x21\x13\x00\x0c", "family"),
        (SIGNATURE + b"\x21\x12\x00\x0c", "not TCP over IP"),  # UDP
        (SIGNATURE + b"\x21\x31\x00\xd8", "not TCP over IP"),  # AF_UNIX
        (SIGNATURE + b"\x21\x11\x00\x0b", "cannot hold"),
        (SIGNATURE + b"\x21\x21\x00\x0c", "cannot hold"),  # IPv6 needs 36
        (SIGNATURE + b"\x21\x11" + struct.pack(">H", MAX_PAYLOAD + 1), "more than 512"),
        (SIGNATURE + b"\x21\x11\xff\xff", "more than 512"),
        (SIGNATURE + b"\x21\x11\x00", "truncated"),
        (b"", "truncated"),
    ],
    ids=[
        "dicom-first", "v1-text", "bad-signature", "version-1", "version-3", "command-2", "command-15",
        "family-4", "transport-3", "udp", "unix", "short-ipv4", "short-ipv6", "oversize",
        "oversize-max", "truncated-fixed", "empty",
    ],
)  # fmt: skip
def test_malformed_fixed_part_is_refused_before_reading_further(fixed: bytes, words: str) -> None:
    with pytest.raises(ProxyHeaderError, match=words):
        payload_length(fixed)


@pytest.mark.parametrize(
    "tlvs",
    [b"\xea", b"\xea\x00", b"\xea\x00\x05abc", b"\x04\x00\x00\xea\xff\xff"],
    ids=["type-only", "half-length", "value-short", "second-runs-past"],
)
def test_malformed_tlvs_are_refused(tlvs: bytes) -> None:
    _, addresses = header()
    fixed, payload = header(payload=addresses + tlvs)
    with pytest.raises(ProxyHeaderError, match="TLV"):
        parse(fixed, payload)


def test_payload_shorter_than_declared_is_refused() -> None:
    fixed, payload = header()
    with pytest.raises(ProxyHeaderError, match="truncated"):
        parse(fixed, payload[:-1])
