"""DICOM files to send: pydicom's bundled test files (one per transfer syntax) and generated objects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class CorpusFile:
    name: str
    transfer_syntax: str
    storescu_options: tuple[str, ...]  # DCMTK proposes compressed syntaxes only when asked

    @property
    def path(self) -> Path:
        found = get_testdata_file(self.name)
        assert found, f"pydicom test file {self.name} is not bundled"
        return Path(str(found))


# Only files bundled inside the pydicom wheel: the suite never downloads anything.
PYDICOM_CORPUS = (
    CorpusFile("CT_small.dcm", "1.2.840.10008.1.2.1", ()),
    CorpusFile("MR_small_implicit.dcm", "1.2.840.10008.1.2", ()),
    CorpusFile("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2", ("-xb",)),
    CorpusFile("image_dfl.dcm", "1.2.840.10008.1.2.1.99", ("-xd",)),
    CorpusFile("rtplan.dcm", "1.2.840.10008.1.2", ()),
    CorpusFile("waveform_ecg.dcm", "1.2.840.10008.1.2.1", ()),
    CorpusFile("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50", ("-xy",)),
    CorpusFile("JPEG-lossy.dcm", "1.2.840.10008.1.2.4.51", ("-xx",)),
    CorpusFile("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80", ("-xt",)),
    CorpusFile("JPEG2000.dcm", "1.2.840.10008.1.2.4.91", ("-xw",)),
    CorpusFile("MR_small_RLE.dcm", "1.2.840.10008.1.2.5", ("-xr",)),
)


def comparable(dataset: Dataset) -> dict[int, object]:
    """A data set by value, without what DCMTK's storescu legitimately drops when it re-serialises a file:
    group lengths and trailing padding (FFFC,FFFC)."""
    return {
        int(element.tag): element.value
        for element in dataset
        if element.tag.element != 0x0000 and element.tag != 0xFFFCFFFC
    }


def read(path: Path) -> Dataset:
    return pydicom.dcmread(path)


def make_instance(
    directory: Path,
    *,
    pixel_bytes: int = 512 * 512 * 2,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    sop_class_uid: str = CT_IMAGE_STORAGE,
) -> Path:
    """A CT-like object written as a Part-10 file, its pixel data ``pixel_bytes`` long."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = sop_class_uid
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID = study_uid or generate_uid()
    dataset.SeriesInstanceUID = series_uid or generate_uid()
    dataset.Modality = "CT"
    dataset.PatientID = "TEST-PATIENT"
    dataset.PatientName = "Test^Patient"
    columns = 512
    frame_bytes = 512 * columns * 2
    frames = max(1, pixel_bytes // frame_bytes)
    rows = 512 if pixel_bytes >= frame_bytes else max(1, pixel_bytes // (columns * 2))
    if frames > 1:
        dataset.NumberOfFrames = frames
    dataset.Rows, dataset.Columns = rows, columns
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.SamplesPerPixel, dataset.PixelRepresentation = 1, 0
    dataset.PhotometricInterpretation = "MONOCHROME2"
    size = frames * rows * columns * 2
    dataset.PixelData = bytes(range(256)) * (size // 256) + bytes(size % 256)
    path = directory / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path
