"""The receive file: every byte received is in the file, or the object is refused with 0xA700 and the file gone."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from scp.part10 import part10_header
from scp.receive_file import HEAD_BYTES, WRITEBACK_EVERY, ReceiveFile
from scp.status import Status

EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def ui(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HH2sH", group, element, b"UI", len(value)) + value


DATA_SET = (
    ui(0x0008, 0x0016, CT.encode() + b"\x00")
    + ui(0x0008, 0x0018, b"1.2.3.4.5\x00")
    + ui(0x0020, 0x000D, b"1.2.3\x00")
    + ui(0x0020, 0x000E, b"1.2.3.4\x00")
    + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 30_000)
    + bytes(range(256)) * 117
    + b"\x00" * 48
)
HEADER = part10_header(CT, "1.2.3.4.5", EXPLICIT_LE, "CT1")


def fragments(size: int) -> Iterator[memoryview]:
    view = memoryview(DATA_SET)
    for start in range(0, len(DATA_SET), size):
        yield view[start : start + size]


def test_every_byte_is_written_behind_the_header_and_the_identity_read_back(tmp_path: Path) -> None:
    received = ReceiveFile(tmp_path / "object.rx", HEADER)
    for fragment in fragments(7_001):
        received.write(fragment)
    identity = received.complete(EXPLICIT_LE)
    assert (identity.sop_instance_uid, identity.series_instance_uid) == ("1.2.3.4.5", "1.2.3.4")
    assert received.header_length == len(HEADER) and received.bytes_received == len(DATA_SET)
    assert received.path.read_bytes() == HEADER + DATA_SET
    received.discard()
    assert not received.path.exists()


def test_identifying_elements_past_the_head_kept_in_memory_are_read_from_the_file(tmp_path: Path) -> None:
    private = struct.pack("<HH2sHL", 0x0009, 0x1010, b"OB", 0, 2 * HEAD_BYTES) + b"\x01" * (2 * HEAD_BYTES)
    study = DATA_SET.index(struct.pack("<HH", 0x0020, 0x000D))
    data_set = DATA_SET[:study] + private + DATA_SET[study:]  # study and series UIDs behind 32 KiB of a private value
    received = ReceiveFile(tmp_path / "object.rx", HEADER)
    for start in range(0, len(data_set), 7_001):
        received.write(memoryview(data_set)[start : start + 7_001])
    identity = received.complete(EXPLICIT_LE)
    assert (identity.sop_class_uid, identity.sop_instance_uid) == (CT, "1.2.3.4.5")
    assert (identity.study_instance_uid, identity.series_instance_uid) == ("1.2.3", "1.2.3.4")
    received.discard()


def test_a_file_the_store_took_over_is_left_where_it_went(tmp_path: Path) -> None:
    received = ReceiveFile(tmp_path / "object.rx", HEADER, writeback=True)
    for fragment in fragments(7_001):
        received.write(fragment)
    received.complete(EXPLICIT_LE)
    final = tmp_path / "final.dcm"
    received.path.rename(final)
    received.path.write_bytes(b"another object's spool file, by chance under the same name")
    received.taken_over()
    received.discard()
    assert received.path.exists() and final.read_bytes() == HEADER + DATA_SET


# Run in one child process: RLIMIT_FSIZE binds every file the process writes, the test runner's own included. The
# kernel answers a write crossing it with a short count, then EFBIG, just as a full disk does with ENOSPC.
_UNDER_FILE_SIZE_LIMITS = """
import json, resource, signal, sys
from pathlib import Path
from scp.receive_file import WRITEBACK_EVERY, ReceiveFile
from scp.status import StoreFailure
header, data_set = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2]).read_bytes()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the limit is an error, not the end of the process
outcomes = []
for limit, directory in zip(sys.argv[3::2], sys.argv[4::2]):
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), resource.RLIM_INFINITY))
    received = ReceiveFile(Path(directory) / "object.rx", header)
    present = []
    for start in range(0, len(data_set), 7_001):
        received.write(memoryview(data_set)[start : start + 7_001])
        present.append(received.path.exists())
    try:
        received.complete("1.2.840.10008.1.2.1")
        outcome = {"status": 0, "reason": ""}
    except StoreFailure as refused:
        outcome = {"status": int(refused.status), "reason": refused.reason}
    received.discard()
    left = [p.name for p in Path(directory).iterdir()]
    outcomes.append({**outcome, "present": present, "received": received.bytes_received, "left": left})
print(json.dumps(outcomes))
"""


def test_a_short_write_refuses_the_object_and_frees_the_room_mid_fragment_or_in_the_header(tmp_path: Path) -> None:
    (tmp_path / "header.bin").write_bytes(HEADER)
    (tmp_path / "data.bin").write_bytes(DATA_SET)
    limits = {"mid-fragment": len(HEADER) + 10_000, "header": 100}  # the first inside the second fragment
    arguments = []
    for name, limit in limits.items():
        (tmp_path / name).mkdir()
        arguments += [str(limit), str(tmp_path / name)]
    result = subprocess.run(
        [sys.executable, "-c", _UNDER_FILE_SIZE_LIMITS, str(tmp_path / "header.bin"), str(tmp_path / "data.bin"),
         *arguments],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    mid_fragment, header = json.loads(result.stdout)
    assert mid_fragment["present"][0] and not mid_fragment["present"][-1], "removed as soon as a write fails"
    assert not any(header["present"])
    for outcome in (mid_fragment, header):
        assert outcome["received"] == len(DATA_SET)
        assert outcome["status"] == Status.OUT_OF_RESOURCES and "write failed" in outcome["reason"]
        assert outcome["left"] == []


# Traced in a child process: writeback started shows only as system calls (it changes no byte of the file).
_WRITE_IN_FRAGMENTS = """
import sys
from pathlib import Path
from scp.receive_file import WRITEBACK_EVERY, ReceiveFile
writeback, fragment = sys.argv[2] == "writeback", int(sys.argv[3])
data_set = bytes(range(256)) * (4 * WRITEBACK_EVERY // 256 + 1)
received = ReceiveFile(Path(sys.argv[1]), b"H" * 132, writeback)
starts = range(0, len(data_set), fragment)
for start in starts:
    received.write(memoryview(data_set)[start : start + fragment], last=start == starts[-1])
assert received.path.read_bytes() == b"H" * 132 + data_set
received.discard()
"""
_SYNC_FILE_RANGE = re.compile(r"sync_file_range\(\d+</[^>]*\.rx>, (\d+), (\d+), SYNC_FILE_RANGE_WRITE\) = 0")


def traced_ranges(tmp_path: Path, mode: str, fragment: int) -> list[tuple[int, int]]:
    assert shutil.which("strace"), "strace is not installed; `make test` installs it"
    trace = tmp_path / f"{mode}-{fragment}.trace"
    subprocess.run(
        ["strace", "-f", "-qq", "-y", "-e", "trace=sync_file_range", "-o", str(trace), sys.executable, "-c",
         _WRITE_IN_FRAGMENTS, str(tmp_path / f"{mode}-{fragment}.rx"), mode, str(fragment)],
        check=True, timeout=60,
    )  # fmt: skip
    return [(int(offset), int(length)) for offset, length in _SYNC_FILE_RANGE.findall(trace.read_text())]


def test_writeback_starts_every_so_many_bytes_while_fragments_arrive_but_not_for_the_last(tmp_path: Path) -> None:
    size = 132 + 256 * (4 * WRITEBACK_EVERY // 256 + 1)
    for fragment in (16_378, 131_060, 1_000_000):
        ranges = traced_ranges(tmp_path, "writeback", fragment)
        assert ranges, f"no writeback started for fragments of {fragment} bytes"
        # Contiguous from the start of the file, each once the given number of bytes have been written since the
        # last, never for the last fragment: the store's fdatasync, at once, covers that one.
        assert ranges[0][0] == 0
        assert all(offset == previous + length for (previous, length), (offset, _) in itertools.pairwise(ranges))
        assert all(length >= WRITEBACK_EVERY for _, length in ranges)
        ended = ranges[-1][0] + ranges[-1][1]
        last_fragment = (size - 132) % fragment or fragment
        assert size - last_fragment - ended < WRITEBACK_EVERY, "writeback lags by more than its interval"
        assert ended <= size - last_fragment


def test_a_file_only_read_back_gets_no_writeback(tmp_path: Path) -> None:
    assert traced_ranges(tmp_path, "none", 16_378) == []
