"""The DICOM Part-10 header (preamble, "DICM", file meta) the daemon writes before every data set, and its reader."""

from __future__ import annotations

import struct
from collections.abc import Iterator

from scp import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

_PREAMBLE = b"\x00" * 128 + b"DICM"
# PS3.5 7.1.2: these VRs have two reserved bytes and a 4-byte length; the others a 2-byte length.
_LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
SOURCE_AE_TITLE = 0x0016


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


def file_meta(head: bytes) -> Iterator[tuple[int, bytes]]:
    """(element, value) of each File Meta element found in ``head``, the first bytes of a Part-10 file.

    The file meta is always explicit VR little endian (PS3.10 7.1); reading stops at the first element outside
    group 0002 or at the end of ``head``, so a truncated or foreign file yields what it holds and nothing more.
    """
    if head[128:132] != b"DICM":
        return
    offset = len(_PREAMBLE)
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if group != 0x0002:
            return
        if head[offset + 4 : offset + 6] in _LONG_LENGTH_VRS:
            if offset + 12 > len(head):
                return
            (length,) = struct.unpack_from("<L", head, offset + 8)
            value_at = offset + 12
        else:
            (length,) = struct.unpack_from("<H", head, offset + 6)
            value_at = offset + 8
        if value_at + length > len(head):
            return
        yield element, head[value_at : value_at + length]
        offset = value_at + length


def source_ae_title(head: bytes) -> str | None:
    """Source Application Entity Title (0002,0016): the calling AE title the daemon received the object from."""
    for element, value in file_meta(head):
        if element == SOURCE_AE_TITLE:
            return value.decode("ascii", "replace").strip(" \0") or None
    return None
