from __future__ import annotations

import io
import struct

import pydicom

from scp import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from scp.part10 import file_meta, part10_header, source_ae_title


def test_header_is_a_valid_file_meta_that_pydicom_reads() -> None:
    header = part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1", "CT1")
    meta = pydicom.dcmread(io.BytesIO(header + b"\x08\x00\x05\x00CS\x00\x00")).file_meta
    assert meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert meta.MediaStorageSOPInstanceUID == "1.2.3"
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert meta.SourceApplicationEntityTitle == "CT1"
    # The group length covers exactly what follows it: the data set starts where the header ends.
    assert struct.unpack("<L", header[140:144])[0] == len(header) - 144


def test_the_source_ae_title_is_read_back_from_the_header_and_from_a_file_written_elsewhere() -> None:
    header = part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1", "CT1")
    assert source_ae_title(header + b"\x08\x00\x16\x00") == "CT1"
    written = io.BytesIO()
    dataset = pydicom.Dataset()
    dataset.SOPClassUID, dataset.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3"
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    dataset.file_meta.SourceApplicationEntityTitle = "MR_02"
    dataset.save_as(written, enforce_file_format=True)
    assert source_ae_title(written.getvalue()) == "MR_02"


def test_a_truncated_or_foreign_header_has_no_source_ae_title() -> None:
    header = part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1", "CT1")
    assert source_ae_title(header[:-2]) is None, "the title's value is cut off"
    assert source_ae_title(header[:150]) is None
    assert source_ae_title(b"\0" * 128 + b"DICX" + header[132:]) is None
    assert source_ae_title(b"") is None
    without = part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1", "CT1")[:-12]
    assert [element for element, _ in file_meta(without)][-1] == 0x0013
