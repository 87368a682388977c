"""The DICOM Part-10 header (preamble, "DICM", file meta) this product writes in front of every data set."""

from __future__ import annotations

import struct

from scp import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

_PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    # PS3.10 7.1: file meta is always explicit VR little endian.
    if vr in (b"OB",):
        return struct.pack("<HH2sHL", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae_title: str) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1) for one received object."""
    elements = b"".join(
        (
            _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, 0x0002, b"UI", _uid(sop_class_uid)),
            _element(0x0002, 0x0003, b"UI", _uid(sop_instance_uid)),
            _element(0x0002, 0x0010, b"UI", _uid(transfer_syntax)),
            _element(0x0002, 0x0012, b"UI", _uid(IMPLEMENTATION_CLASS_UID)),
            _element(0x0002, 0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME)),
            _element(0x0002, 0x0016, b"AE", _text(source_ae_title)),
        )
    )
    group_length = _element(0x0002, 0x0000, b"UL", struct.pack("<L", len(elements)))
    return _PREAMBLE + group_length + elements
