"""The streaming header reader: finds the identifying UIDs in every encoding and refuses crafted input."""

from __future__ import annotations

import io
import struct
import time
import zlib

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from scp.dataset_header import MAX_ELEMENTS, read_identity
from scp.status import Status, StoreFailure

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"


def dataset(nested: int = 0) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4.5"
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = "9.9.9"
    ds.ReferencedImageSequence = Sequence([inner])
    current = inner
    for _ in range(nested):
        child = Dataset()
        current.ReferencedImageSequence = Sequence([child])
        current = child
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00" * 1024
    return ds


def encode(ds: Dataset, syntax: str, undefined_lengths: bool = False) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = syntax != EXPLICIT_BE
    buffer.is_implicit_VR = syntax == IMPLICIT_LE
    if undefined_lengths:
        for element in ds.iterall():
            if element.VR == "SQ":
                element.is_undefined_length = True
    write_dataset(buffer, ds)
    raw = buffer.getvalue()
    if syntax == DEFLATED:
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        raw = compressor.compress(raw) + compressor.flush()
    return raw


def identity_of(raw: bytes, syntax: str) -> tuple[str | None, ...]:
    found = read_identity(io.BytesIO(raw), len(raw), syntax)
    return (found.sop_class_uid, found.sop_instance_uid, found.study_instance_uid, found.series_instance_uid)


EXPECTED = ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.3", "1.2.3.4")


@pytest.mark.parametrize("syntax", [EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE, DEFLATED])
@pytest.mark.parametrize("undefined", [False, True])
def test_identity_in_every_encoding(syntax: str, undefined: bool) -> None:
    assert identity_of(encode(dataset(nested=3), syntax, undefined), syntax) == EXPECTED


def test_missing_elements_are_reported_as_missing() -> None:
    ds = dataset()
    del ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PixelData
    assert identity_of(encode(ds, EXPLICIT_LE), EXPLICIT_LE) == (*EXPECTED[:2], None, None)


def refuses(raw: bytes, syntax: str, status: Status = Status.CANNOT_UNDERSTAND) -> StoreFailure:
    with pytest.raises(StoreFailure) as raised:
        identity_of(raw, syntax)
    assert raised.value.status == status
    return raised.value


def test_explicit_bytes_on_an_implicit_context_are_refused() -> None:
    refuses(encode(dataset(), EXPLICIT_LE), IMPLICIT_LE)


def test_element_longer_than_the_data_is_refused() -> None:
    raw = (
        struct.pack("<HH2sH", 0x0008, 0x0005, b"CS", 10)
        + b"ISO_IR 100"
        + struct.pack("<HH2sH", 0x0008, 0x0016, b"UI", 60)
    )
    assert "past the end" in refuses(raw + b"1.2", EXPLICIT_LE).reason


def test_lying_sequence_length_is_refused() -> None:
    raw = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFF0)
    refuses(raw, EXPLICIT_LE)


def test_deep_nesting_is_refused_without_recursion_blowup() -> None:
    sequence = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    raw = (sequence + item) * 5000
    assert "nested deeper" in refuses(raw, EXPLICIT_LE).reason


def test_deflate_bomb_stops_early() -> None:
    # A huge private element before the identifying ones, inflating to 64 MiB from a few KiB.
    header = struct.pack("<HH2sHL", 0x0007, 0x0010, b"OB", 0, 64 * 1024 * 1024)
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw = compressor.compress(header) + compressor.compress(b"\x00" * 64 * 1024 * 1024) + compressor.flush()
    assert len(raw) < 200_000
    assert "inflates too far" in refuses(raw, DEFLATED).reason


def test_corrupt_deflate_stream_is_refused() -> None:
    refuses(b"\xff" * 100, DEFLATED)


def test_overlong_uid_value_is_refused() -> None:
    raw = struct.pack("<HH2sH", 0x0008, 0x0016, b"UI", 200) + b"1" * 200
    assert "longer than any valid UID" in refuses(raw, EXPLICIT_LE).reason


def test_elements_out_of_order_are_read_on() -> None:
    # Real archives hold such objects; they are kept rather than refused.
    def ui(element: int, value: bytes) -> bytes:
        return struct.pack("<HH2sH", 0x0008 if element < 0x100 else 0x0020, element & 0xFF, b"UI", len(value)) + value

    raw = ui(0x18, b"1.2\x00") + ui(0x16, b"1.5\x00") + ui(0x10E, b"3.4\x00") + ui(0x10D, b"3.3\x00")
    assert identity_of(raw, EXPLICIT_LE) == ("1.5", "1.2", "3.3", "3.4")


def tiny_elements(count: int) -> bytes:
    """``count`` empty private elements in tag order, between the SOP and the study elements."""
    return b"".join(
        struct.pack("<HH2sH", 0x0009 + 2 * (index // 0xF000), 0x1000 + index % 0xF000, b"LO", 0)
        for index in range(count)
    )


def ui(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HH2sH", group, element, b"UI", len(value)) + value


SOP = ui(0x0008, 0x0016, b"1.2.840.10008.5.1.4.1.1.2\x00") + ui(0x0008, 0x0018, b"1.2.3.4.5\x00")
STUDY_SERIES = ui(0x0020, 0x000D, b"1.2.3\x00") + ui(0x0020, 0x000E, b"1.2.3.4\x00")


def test_elements_up_to_the_cap_are_read() -> None:
    raw = SOP + tiny_elements(MAX_ELEMENTS - 10) + STUDY_SERIES
    assert identity_of(raw, EXPLICIT_LE) == EXPECTED


def test_a_million_tiny_elements_are_refused_at_the_cap_in_bounded_time() -> None:
    raw = SOP + tiny_elements(1_000_000) + STUDY_SERIES
    started = time.process_time()
    failure = refuses(raw, EXPLICIT_LE)
    assert f"over {MAX_ELEMENTS} elements" in failure.reason
    # The cap, not the data set, bounds the work: well under the seconds a full walk of a million costs.
    assert time.process_time() - started < 1.0


def test_items_of_a_sequence_count_toward_the_cap() -> None:
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0)
    sequence = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF) + item * (MAX_ELEMENTS + 1)
    raw = SOP + sequence + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0) + STUDY_SERIES
    assert "elements" in refuses(raw, EXPLICIT_LE).reason


def test_the_walk_stops_once_the_identifying_uids_are_read() -> None:
    # What follows the series element is never looked at, however much of it there is and whatever it is.
    raw = SOP + STUDY_SERIES + b"\xff" * 100_000
    assert identity_of(raw, EXPLICIT_LE) == EXPECTED


@pytest.mark.parametrize("syntax", [EXPLICIT_LE, IMPLICIT_LE])
def test_file_meta_elements_inside_the_data_set_are_refused(syntax: str) -> None:
    ds = dataset()
    ds.add_new(0x00020010, "UI", "1.2.840.10008.1.2.4.50")  # a transfer syntax that would misname the pixel data
    assert "(0002,0010)" in refuses(encode(ds, syntax), syntax).reason
