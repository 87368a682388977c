"""PROXY protocol version 2 (HAProxy's proxy-protocol.txt, section 2.2): the binary header a load balancer sends
before a connection's first byte, naming the client it accepted the connection from.

The Network Load Balancer sends it when its target group enables it: PROXY with the modality's address on every
client connection, LOCAL on its own health check connections (Elastic Load Balancing, "Proxy protocol" in the
Network Load Balancer guide). Only the header's structure is trusted here; that it comes from the load balancer is
the security group's job.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
FIXED_LENGTH = 16  # signature, version and command, family and transport, length
# Addresses (at most 216 bytes, for AF_UNIX) plus TLVs; the NLB adds at most its VPC endpoint id. Anything longer
# is refused before it is read.
MAX_PAYLOAD = 512

_VERSION = 0x2
_LOCAL, _PROXY = 0x0, 0x1
_UNSPEC, _INET, _INET6, _UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM = 0x1
_KNOWN_TRANSPORTS = (0x0, 0x1, 0x2)  # UNSPEC, STREAM, DGRAM
_ADDRESS_LENGTHS = {_INET: 12, _INET6: 36}
_TLV_HEADER = 3


class ProxyHeaderError(ValueError):
    """The connection does not start with a valid PROXY protocol v2 header; it is refused."""


@dataclass(frozen=True)
class ProxyHeader:
    """``source`` is the client (for PROXY); None for LOCAL (the connection is the load balancer's own) and for an
    unspecified address family (the load balancer sent no client information)."""

    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...]


def payload_length(fixed: bytes) -> int:
    """Check the 16 fixed bytes; the number of bytes of addresses and TLVs that follow them."""
    if len(fixed) != FIXED_LENGTH:
        raise ProxyHeaderError(f"header truncated: {len(fixed)} of {FIXED_LENGTH} bytes")
    if fixed[:12] != SIGNATURE:
        if fixed.startswith(b"PROXY "):
            raise ProxyHeaderError("PROXY protocol version 1 (text) header; version 2 is required")
        raise ProxyHeaderError("no PROXY protocol v2 signature")
    version, command = fixed[12] >> 4, fixed[12] & 0x0F
    if version != _VERSION:
        raise ProxyHeaderError(f"PROXY protocol version {version}, expected 2")
    if command not in (_LOCAL, _PROXY):
        raise ProxyHeaderError(f"unknown PROXY protocol command 0x{command:X}")
    family, transport = fixed[13] >> 4, fixed[13] & 0x0F
    if family > _UNIX or transport not in _KNOWN_TRANSPORTS:
        raise ProxyHeaderError(f"unknown address family and transport 0x{fixed[13]:02X}")
    length = int.from_bytes(fixed[14:16], "big")
    if length > MAX_PAYLOAD:
        raise ProxyHeaderError(f"header declares {length} bytes of addresses and TLVs, more than {MAX_PAYLOAD}")
    if command == _PROXY and family != _UNSPEC:
        if family not in _ADDRESS_LENGTHS or transport != _STREAM:
            raise ProxyHeaderError(f"PROXY command for family and transport 0x{fixed[13]:02X}, not TCP over IP")
        if length < _ADDRESS_LENGTHS[family]:
            raise ProxyHeaderError(f"{length} bytes cannot hold the addresses of family 0x{family:X}")
    return length


def parse(fixed: bytes, payload: bytes) -> ProxyHeader:
    """The header made of ``fixed`` (checked by :func:`payload_length`) and the ``payload`` that followed it."""
    length = payload_length(fixed)
    if len(payload) != length:
        raise ProxyHeaderError(f"header truncated: {len(payload)} of {length} bytes of addresses and TLVs")
    command, family = fixed[12] & 0x0F, fixed[13] >> 4
    if command == _LOCAL or family == _UNSPEC:
        # The specification: a receiver ignores a LOCAL header's address block and uses the real endpoints; for
        # PROXY with an unspecified family it may do the same, which a load balancer's health check without
        # client information gets here.
        return ProxyHeader(source=None, destination=None, tlvs=())
    address_length = _ADDRESS_LENGTHS[family]
    addresses = payload[:address_length]
    size = 4 if family == _INET else 16
    source_ip = ipaddress.ip_address(addresses[0:size])
    destination_ip = ipaddress.ip_address(addresses[size : 2 * size])
    source_port, destination_port = struct.unpack_from(">HH", addresses, address_length - 4)
    return ProxyHeader(
        source=(str(source_ip), source_port),
        destination=(str(destination_ip), destination_port),
        tlvs=_tlvs(payload[address_length:]),
    )


def _tlvs(raw: bytes) -> tuple[tuple[int, bytes], ...]:
    """Type-length-value items after the addresses; each must fit exactly. Their meaning is not needed here."""
    found = []
    offset = 0
    while offset < len(raw):
        if offset + _TLV_HEADER > len(raw):
            raise ProxyHeaderError("TLV header truncated")
        tlv_type, tlv_length = raw[offset], int.from_bytes(raw[offset + 1 : offset + 3], "big")
        if offset + _TLV_HEADER + tlv_length > len(raw):
            raise ProxyHeaderError(f"TLV 0x{tlv_type:02X} of {tlv_length} bytes runs past the header")
        found.append((tlv_type, bytes(raw[offset + _TLV_HEADER : offset + _TLV_HEADER + tlv_length])))
        offset += _TLV_HEADER + tlv_length
    return tuple(found)


def local_header() -> bytes:
    """A LOCAL header: the connection is the sender's own (the container health check's), not a client's."""
    return SIGNATURE + bytes([_VERSION << 4 | _LOCAL, _UNSPEC << 4 | 0x0]) + struct.pack(">H", 0)
