from __future__ import annotations

import io
import struct

import pydicom

from scp import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from scp.part10 import part10_header


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
