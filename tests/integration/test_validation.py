"""Crafted and inconsistent objects: each gets a failure status, one log line, and nothing is stored."""

from __future__ import annotations

import uuid
import warnings
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import _config

from tests.support.corpus import CT_IMAGE_STORAGE, make_instance, read
from tests.support.daemon import Daemon

pytestmark = pytest.mark.integration

CRAFTED = {
    "parent traversal": "../../../../tmp/escaped",
    "absolute path": "/tmp/escaped-absolute",
    "over 64 characters": "1." + "2" * 70,
    "embedded NUL": "1.2.3\x00.4",
    "backslash": "1.2\\..\\..\\3",
    "empty component": "1..2",
}


def send(
    daemon: Daemon,
    dataset: Dataset,
    command_uid: str | None = None,
    context_syntax: str = ExplicitVRLittleEndian,
    encode_implicit: bool = False,
) -> Dataset:
    """One C-STORE whose command and data set may disagree and carry any bytes.

    pynetdicom sends a Part-10 file's data set bytes as they are, under the UIDs and syntax of its file meta,
    so a hand-built file is how a test puts exactly the bytes it wants on the wire.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.TransferSyntaxUID = context_syntax
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, encode_implicit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UIDs sent on purpose
        meta.MediaStorageSOPInstanceUID = command_uid or dataset.SOPInstanceUID
        write_dataset(body, dataset)
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_file_meta_info(header, meta)
    path = daemon.storage_dir.parent / f"crafted-{uuid.uuid4().hex}.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + header.getvalue() + body.getvalue())

    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, not a re-encoding of them
    association = daemon.associate(contexts=[(CT_IMAGE_STORAGE, [context_syntax])])
    assert association.is_established
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            response = association.send_c_store(path)
        assert "Status" in response, "the daemon must answer, not abort"
        return response
    finally:
        association.release()


def base_dataset(tmp_path: Path) -> Dataset:
    return read(make_instance(tmp_path, pixel_bytes=1024))


def assert_nothing_stored(daemon: Daemon, tmp_path: Path) -> None:
    assert daemon.stored_files() == []
    assert not list(Path("/tmp").glob("escaped*"))
    assert not list(tmp_path.parent.glob("escaped*"))
    assert daemon.spool_files() == []
    assert daemon.echo_ok(), "the daemon must keep serving"


@pytest.mark.parametrize("field", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
@pytest.mark.parametrize("crafted", list(CRAFTED.values()), ids=list(CRAFTED))
def test_crafted_uid_is_refused_and_never_becomes_a_path(
    daemon: Daemon, tmp_path: Path, field: str, crafted: str
) -> None:
    dataset = base_dataset(tmp_path)
    setattr(dataset, field, crafted)
    # Some values cannot even be put in a command (over 64 characters; a backslash makes two values): the data
    # set carries them under a valid command UID instead.
    unsendable = len(crafted) > 64 or "\\" in crafted
    status = send(daemon, dataset, command_uid=generate_uid() if unsendable else None)
    assert status.Status in (0xC000, 0xA900), hex(status.Status)
    assert_nothing_stored(daemon, tmp_path)
    (line,) = daemon.log_messages("store failed")
    assert line["status"] == f"0x{status.Status:04X}"
    assert "\x00" not in daemon.log_path.read_text()


def test_data_set_uid_differing_from_the_command_is_a900(daemon: Daemon, tmp_path: Path) -> None:
    response = send(daemon, base_dataset(tmp_path), command_uid=generate_uid())
    assert response.Status == 0xA900
    assert "SOP Instance UID differs" in response.ErrorComment
    assert daemon.stored_files() == []


def test_missing_study_uid_is_a900(daemon: Daemon, tmp_path: Path) -> None:
    dataset = base_dataset(tmp_path)
    del dataset.StudyInstanceUID
    assert send(daemon, dataset).Status == 0xA900
    assert daemon.stored_files() == []


def test_data_set_in_the_wrong_encoding_cannot_be_understood(daemon: Daemon, tmp_path: Path) -> None:
    # Explicit VR bytes on an implicit VR context.
    response = send(daemon, base_dataset(tmp_path), context_syntax=ImplicitVRLittleEndian)
    assert response.Status == 0xC000
    assert daemon.stored_files() == []


def test_implicit_data_set_on_an_implicit_context_is_stored(daemon: Daemon, tmp_path: Path) -> None:
    response = send(daemon, base_dataset(tmp_path), context_syntax=ImplicitVRLittleEndian, encode_implicit=True)
    assert response.Status == 0x0000
    assert len(daemon.stored_files()) == 1
