"""Bad data sets on a valid association: each gets a C-STORE status (never a hang or a crash); none leaves a trace."""

from __future__ import annotations

import json
import os
import struct
import time
import warnings
import zlib
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid

from tests.robustness import wire
from tests.robustness.conftest import Watched
from tests.robustness.wire import Peer
from tests.support.corpus import make_instance, read

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CANNOT_UNDERSTAND = range(0xC000, 0xD000)
MISMATCH = range(0xA900, 0xAA00)


def encode(dataset: Dataset, implicit: bool = False, big_endian: bool = False) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = not big_endian, implicit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the crafted values sent on purpose
        write_dataset(buffer, dataset)
    return bytes(buffer.getvalue())


def ct(tmp_path: Path, pixel_bytes: int = 2048) -> Dataset:
    dataset = read(make_instance(tmp_path, pixel_bytes=pixel_bytes))
    del dataset.file_meta
    return dataset


def explicit(group: int, element: int, vr: bytes, value: bytes, declared: int | None = None) -> bytes:
    length = len(value) if declared is None else declared
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHL", group, element, vr, 0, length) + value
    return struct.pack("<HH2sH", group, element, vr, length) + value


def identity(dataset: Dataset) -> bytes:
    """SOP class/instance, study and series elements, explicit VR little endian, in tag order."""
    return b"".join(
        explicit(group, element, b"UI", wire.uid(str(value)))
        for group, element, value in (
            (0x0008, 0x0016, dataset.SOPClassUID),
            (0x0008, 0x0018, dataset.SOPInstanceUID),
            (0x0020, 0x000D, dataset.StudyInstanceUID),
            (0x0020, 0x000E, dataset.SeriesInstanceUID),
        )
    )


def store(watched: Watched, sop_instance_uid: str, data_set: bytes, syntax: str = wire.EXPLICIT_VR_LITTLE_ENDIAN,
          ) -> int:
    with Peer(watched.port) as peer:
        peer.associate()
        status = peer.store(sop_instance_uid, data_set, syntax)
        assert status is not None, "the daemon must answer a bad data set with a status, not hang up"
        peer.release()
    return status


def assert_refused_without_trace(watched: Watched, status: int, expected: range) -> None:
    assert status in expected, hex(status)
    assert not any(p.stem.startswith("1.2.") and p.stat().st_size == 0 for p in watched.daemon.stored_files())
    assert watched.daemon.spool_files() == []


def test_element_longer_than_the_data_set_before_the_identifying_elements(watched: Watched, tmp_path: Path) -> None:
    dataset = ct(tmp_path)
    body = explicit(0x0008, 0x0005, b"CS", b"ISO_IR 100", declared=0xFFF0) + identity(dataset)
    before = len(watched.daemon.stored_files())
    assert_refused_without_trace(watched, store(watched, dataset.SOPInstanceUID, body), CANNOT_UNDERSTAND)
    assert len(watched.daemon.stored_files()) == before


def test_pixel_data_longer_than_the_data_set_is_refused_or_kept_as_received(watched: Watched, tmp_path: Path) -> None:
    """Past the identifying elements the daemon does not parse; what it stores must be exactly what it got."""
    dataset = ct(tmp_path)
    body = identity(dataset) + explicit(0x7FE0, 0x0010, b"OW", bytes(100), declared=1 << 30)
    status = store(watched, dataset.SOPInstanceUID, body)
    assert status == 0 or status in CANNOT_UNDERSTAND, hex(status)
    stored = [p for p in watched.daemon.stored_files() if p.stem == dataset.SOPInstanceUID]
    if status == 0:
        (path,) = stored
        assert path.read_bytes().endswith(body)
    else:
        assert stored == []


def test_deeply_nested_sequences_are_refused(watched: Watched, tmp_path: Path) -> None:
    dataset = ct(tmp_path)
    depth = 2000
    item_start = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    sequence_end = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    opening = explicit(0x0008, 0x0006, b"SQ", b"", declared=0xFFFFFFFF) + item_start
    nested = opening * depth + (item_end + sequence_end) * depth
    status = store(watched, dataset.SOPInstanceUID, nested + identity(dataset))
    assert_refused_without_trace(watched, status, CANNOT_UNDERSTAND)


def test_deflated_data_set_that_inflates_without_bound_is_refused(watched: Watched, tmp_path: Path) -> None:
    dataset = ct(tmp_path)
    # 1 GiB of zeros declared as one OB element ahead of the identifying elements: about 1 MiB compressed.
    inflated_size = 1 << 30
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = [compressor.compress(explicit(0x0008, 0x0001, b"OB", b"", declared=inflated_size))]
    zeros = bytes(1 << 20)
    chunks.extend(compressor.compress(zeros) for _ in range(inflated_size >> 20))
    chunks.append(compressor.compress(identity(dataset)) + compressor.flush())
    bomb = b"".join(chunks)
    assert len(bomb) < 2 << 20
    status = store(watched, dataset.SOPInstanceUID, bomb, wire.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN)
    assert_refused_without_trace(watched, status, CANNOT_UNDERSTAND)


def test_command_and_data_set_naming_different_instances_is_a900(watched: Watched, tmp_path: Path) -> None:
    dataset = ct(tmp_path)
    status = store(watched, generate_uid(), encode(dataset))
    assert_refused_without_trace(watched, status, MISMATCH)


@pytest.mark.parametrize(
    ("syntax", "implicit", "big_endian"),
    [
        (wire.EXPLICIT_VR_LITTLE_ENDIAN, True, False),
        (wire.IMPLICIT_VR_LITTLE_ENDIAN, False, False),
        (wire.EXPLICIT_VR_LITTLE_ENDIAN, False, True),
        (wire.EXPLICIT_VR_BIG_ENDIAN, False, False),
        (wire.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, False, False),
    ],
    ids=["implicit-on-explicit", "explicit-on-implicit", "big-on-little", "little-on-big", "plain-on-deflated"],
)
def test_encoding_not_matching_the_negotiated_syntax_cannot_be_understood(
    watched: Watched, tmp_path: Path, syntax: str, implicit: bool, big_endian: bool
) -> None:
    dataset = ct(tmp_path)
    status = store(watched, dataset.SOPInstanceUID, encode(dataset, implicit, big_endian), syntax)
    assert_refused_without_trace(watched, status, range(0xA900, 0xD000))
    assert dataset.SOPInstanceUID not in {p.stem for p in watched.daemon.stored_files()}


@pytest.mark.parametrize("crafted", ["../../../../tmp/escaped", "1.2.3/../../4", "1.2.3\r\n{\"level\":\"CRITICAL\"}"])
def test_crafted_uid_in_the_command_is_refused(watched: Watched, tmp_path: Path, crafted: str) -> None:
    dataset = ct(tmp_path)
    dataset.SOPInstanceUID = crafted
    status = store(watched, crafted, encode(dataset))
    assert_refused_without_trace(watched, status, range(0xA900, 0xD000))
    assert not list(Path("/tmp").glob("escaped*"))
    assert_log_is_clean(watched)


def test_crafted_patient_id_and_name_are_stored_as_data_and_stay_out_of_paths_and_logs(
    watched: Watched, tmp_path: Path
) -> None:
    dataset = ct(tmp_path)
    dataset.PatientID = "../../../../etc/passwd\r\n{\"level\":\"CRITICAL\"}\x1b[2J"
    dataset.PatientName = "Robert'); DROP TABLE Students;--^\x00\x1b]0;pwned\x07"
    status = store(watched, dataset.SOPInstanceUID, encode(dataset))
    assert status == 0, hex(status)
    (path,) = [p for p in watched.daemon.stored_files() if p.stem == dataset.SOPInstanceUID]
    assert path.relative_to(watched.daemon.storage_dir).parts == (
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID, f"{dataset.SOPInstanceUID}.dcm"
    )
    assert read(path).PatientID == dataset.PatientID
    watched.acknowledged[dataset.SOPInstanceUID] = dataset.PixelData
    assert_log_is_clean(watched)


def assert_log_is_clean(watched: Watched) -> None:
    """Every log line of this case is one JSON object (so a value from the wire cannot forge a line or hide from
    a log query), and no control character from the wire reached the log file."""
    text = watched.log_text()
    not_json = [line for line in text.splitlines() if not line.startswith("{")]
    assert not not_json, f"log lines that are not JSON: {not_json[:3]}"
    for line in text.splitlines():
        json.loads(line)
    assert not any(ord(char) < 0x20 and char != "\n" for char in text)


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_a_million_small_elements_are_refused_with_a_clear_status_in_bounded_time(
    watched: Watched, tmp_path: Path
) -> None:
    dataset = ct(tmp_path)
    tiny = b"".join(
        struct.pack("<HH2sH", 0x0009 + 2 * (index // 0xF000), 0x1000 + index % 0xF000, b"LO", 0)
        for index in range(1_000_000)
    )
    sop = explicit(0x0008, 0x0016, b"UI", wire.uid(str(dataset.SOPClassUID))) + explicit(
        0x0008, 0x0018, b"UI", wire.uid(str(dataset.SOPInstanceUID))
    )
    study_series = explicit(0x0020, 0x000D, b"UI", wire.uid(str(dataset.StudyInstanceUID))) + explicit(
        0x0020, 0x000E, b"UI", wire.uid(str(dataset.SeriesInstanceUID))
    )
    cpu_before, started = process_cpu_seconds(watched.pid), time.monotonic()
    status = store(watched, dataset.SOPInstanceUID, sop + tiny + study_series)
    elapsed, cpu = time.monotonic() - started, process_cpu_seconds(watched.pid) - cpu_before
    assert_refused_without_trace(watched, status, CANNOT_UNDERSTAND)
    (failure,) = watched.log_messages("store failed")
    assert "elements before its UIDs" in failure["reason"], failure
    # Receiving 8 MB and walking the capped number of elements; a full walk of a million costs several times this.
    assert cpu < 1.5 and elapsed < 10, (cpu, elapsed)


def test_file_meta_elements_inside_the_data_set_are_refused(watched: Watched, tmp_path: Path) -> None:
    dataset = ct(tmp_path)
    # Group 0002 sorts first: readers that take leading group 0002 elements as file meta would believe these.
    forged = explicit(0x0002, 0x0010, b"UI", wire.uid("1.2.840.10008.1.2.4.50"))
    status = store(watched, dataset.SOPInstanceUID, forged + encode(dataset))
    assert_refused_without_trace(watched, status, CANNOT_UNDERSTAND)
    (failure,) = watched.log_messages("store failed")
    assert "file meta element (0002,0010)" in failure["reason"]
    assert not [p for p in watched.daemon.stored_files() if p.stem == dataset.SOPInstanceUID]
