"""Read the identifying UIDs from a received data set without decoding it or holding it in memory.

The walker steps over top-level elements (seeking past values and nested sequences) until it has read the four
identifying UIDs, so its cost does not depend on the size of the pixel data; a crafted data set can make it read
at most a bounded amount and step over at most a bounded number of elements.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Protocol

from scp.contexts import DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
from scp.status import Status, StoreFailure

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"

SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
PIXEL_DATA = 0x7FE00010
_WANTED = (SOP_CLASS_UID, SOP_INSTANCE_UID, STUDY_INSTANCE_UID, SERIES_INSTANCE_UID)

_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF

# PS3.5 7.1.2: these VRs have a 2-byte reserved field and a 4-byte length in explicit VR encodings.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL",
     b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)  # fmt: skip

# Real data sets carry a few nested levels; hundreds mean an attack on the receiver.
_MAX_DEPTH = 16
# How much inflated data a deflated data set may take before its identifying elements must have appeared.
_MAX_INFLATED_HEADER = 16 * 1024 * 1024
# A UID is at most 64 characters; a longer value is read only far enough to reject it.
_MAX_UID_VALUE = 128
# Element headers (nested ones and sequence items included) the walker reads before it must have found the
# identifying UIDs. Real objects carry a few hundred before (0020,000E); each costs microseconds of CPU, so this
# keeps a crafted data set of millions of tiny elements to a fraction of a second.
MAX_ELEMENTS = 100_000
_FILE_META_GROUP = 0x0002


@dataclass(frozen=True)
class DatasetIdentity:
    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None


class Readable(Protocol):
    """What the walker reads through: a binary file, or anything else that reads and seeks forward like one."""

    def read(self, size: int, /) -> bytes: ...

    def seek(self, offset: int, whence: int, /) -> int: ...


def _malformed(detail: str) -> StoreFailure:
    return StoreFailure(Status.CANNOT_UNDERSTAND, f"data set cannot be parsed: {detail}")


class _Source:
    """Forward-only reading of the data set bytes with a hard end, from a file or through inflation."""

    def __init__(self, file: Readable, length: int, deflated: bool) -> None:
        self._file = file
        self._remaining = length
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS) if deflated else None
        self._pending = b""
        self._inflated = 0

    def read(self, count: int) -> bytes:
        data = self._inflate(count) if self._inflater else self._read_raw(count)
        if len(data) != count:
            raise _malformed("element runs past the end of the data set")
        return data

    def skip(self, count: int) -> None:
        if self._inflater is None:
            if count > self._remaining:
                raise _malformed("element runs past the end of the data set")
            self._file.seek(count, 1)
            self._remaining -= count
            return
        while count:
            count -= len(self.read(min(count, 65536)))

    def exhausted(self) -> bool:
        """True when every byte has been consumed, so a failed read means "no more elements"."""
        if self._inflater is None:
            return self._remaining == 0
        return self._inflater.eof and not self._pending

    def _read_raw(self, count: int) -> bytes:
        if count > self._remaining:
            return b""
        data = self._file.read(count)
        self._remaining -= len(data)
        return data

    def _inflate(self, count: int) -> bytes:
        assert self._inflater is not None
        self._inflated += count
        if self._inflated > _MAX_INFLATED_HEADER:
            raise _malformed("deflated data set inflates too far before its identifying elements")
        while len(self._pending) < count:
            if self._inflater.unconsumed_tail:
                compressed = self._inflater.unconsumed_tail
            else:
                compressed = self._read_raw(min(65536, self._remaining))
                if not compressed:
                    break
            try:
                self._pending += self._inflater.decompress(compressed, count - len(self._pending))
            except zlib.error as error:
                raise _malformed(f"deflate stream is corrupt ({error})") from None
        data, self._pending = self._pending[:count], self._pending[count:]
        return data


class _Walker:
    def __init__(self, source: _Source, transfer_syntax: str) -> None:
        self._source = source
        self._implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
        self._endian = ">" if transfer_syntax == EXPLICIT_VR_BIG_ENDIAN else "<"
        self._elements_left = MAX_ELEMENTS

    def _tag(self, implicit: bool) -> int:
        self._elements_left -= 1
        if self._elements_left < 0:
            raise StoreFailure(Status.CANNOT_UNDERSTAND, f"data set has over {MAX_ELEMENTS} elements before its UIDs")
        endian = "<" if implicit else self._endian
        group, element = struct.unpack(endian + "HH", self._source.read(4))
        return int(group << 16 | element)

    def _header(self, implicit: bool) -> tuple[int, bytes | None, int]:
        """(tag, VR or None when implicit, value length) of the next element."""
        tag = self._tag(implicit)
        if tag in (_ITEM, _ITEM_DELIMITER, _SEQUENCE_DELIMITER) or implicit:
            (length,) = struct.unpack("<L" if implicit else self._endian + "L", self._source.read(4))
            return tag, None, int(length)
        vr = self._source.read(2)
        if vr in _LONG_VRS:
            self._source.read(2)
            (length,) = struct.unpack(self._endian + "L", self._source.read(4))
        elif vr in _SHORT_VRS:
            (length,) = struct.unpack(self._endian + "H", self._source.read(2))
        else:
            raise _malformed(f"unknown VR {vr!r} in element ({tag >> 16:04X},{tag & 0xFFFF:04X})")
        return tag, vr, int(length)

    def identity(self) -> DatasetIdentity:
        found: dict[int, str] = {}
        elements = 0
        # Elements out of ascending order break PS3.5 7.1 but occur in real archives; they are read on, so such
        # objects are kept. A wrong encoding still shows up as an unknown VR or a length past the end.
        while len(found) < len(_WANTED):
            try:
                tag, vr, length = self._header(self._implicit)
            except StoreFailure:
                if elements and self._source.exhausted():
                    break  # the data set simply lacks some of the identifying elements
                raise
            elements += 1
            if tag >= PIXEL_DATA:
                break  # nothing identifying follows the pixel data
            if tag >> 16 == _FILE_META_GROUP:
                # PS3.10 7.1: group 0002 belongs to the file meta, which we write from the command. Readers that
                # take every leading group 0002 element as file meta would read these as ours (a transfer
                # syntax, a SOP instance), so the stored file would say something other than what was sent.
                raise StoreFailure(
                    Status.CANNOT_UNDERSTAND,
                    f"data set holds file meta element (0002,{tag & 0xFFFF:04X})",
                )
            if tag in _WANTED:
                found[tag] = self._uid_value(length)
            elif length == _UNDEFINED:
                # Undefined length: a sequence, or UN whose content is implicit VR little endian (PS3.5 6.2.2).
                self._skip_sequence(self._implicit or vr == b"UN", depth=1)
            else:
                self._source.skip(length)
        return DatasetIdentity(*(found.get(tag) for tag in _WANTED))

    def _uid_value(self, length: int) -> str:
        if length == _UNDEFINED or length > _MAX_UID_VALUE:
            raise StoreFailure(Status.CANNOT_UNDERSTAND, "a UID element is longer than any valid UID")
        raw = self._source.read(length)
        try:
            return raw.decode("ascii").rstrip("\x00 ")
        except UnicodeDecodeError:
            raise StoreFailure(Status.CANNOT_UNDERSTAND, "a UID element is not ASCII") from None

    def _skip_sequence(self, implicit: bool, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise _malformed(f"sequences nested deeper than {_MAX_DEPTH} levels")
        while True:
            tag = self._tag(implicit)
            (length,) = struct.unpack("<L" if implicit else self._endian + "L", self._source.read(4))
            if tag == _SEQUENCE_DELIMITER:
                return
            if tag != _ITEM:
                raise _malformed("expected a sequence item")
            if length == _UNDEFINED:
                self._skip_item(implicit, depth)
            else:
                self._source.skip(length)

    def _skip_item(self, implicit: bool, depth: int) -> None:
        while True:
            tag, vr, length = self._header(implicit)
            if tag == _ITEM_DELIMITER:
                return
            if length == _UNDEFINED:
                self._skip_sequence(implicit or vr == b"UN", depth + 1)
            else:
                self._source.skip(length)


def read_identity(file: Readable, length: int, transfer_syntax: str) -> DatasetIdentity:
    """The SOP class/instance and study/series UIDs of the data set of ``length`` bytes at ``file``'s position."""
    source = _Source(file, length, deflated=transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN)
    return _Walker(source, transfer_syntax).identity()
