"""The benchmark corpus: deterministic CT-like slices (512x512, 16-bit, Explicit VR Little Endian), several studies.

The same seed gives byte-identical files on every machine, so two reports compare the same bytes on the wire.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# UIDs under the UUID-derived root 2.25 (PS3.5 B.2), numbered so every run uses the same ones.
_ROOT = "2.25.31415926535897932384626433832795"
SLICES_PER_SERIES = 100
ROWS = COLUMNS = 512


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    sop_instance_uid: str
    pixel_sha256: str
    size: int


def _dataset(index: int, rows: int, columns: int, frames: int) -> Dataset:
    series = index // SLICES_PER_SERIES
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = UID(f"{_ROOT}.3.{index}")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = CT_IMAGE_STORAGE
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID = f"{_ROOT}.1.{series // 2}"  # two series per study
    dataset.SeriesInstanceUID = f"{_ROOT}.2.{series}"
    dataset.PatientID = f"BENCH{series // 2:04d}"
    dataset.PatientName = f"Bench^Patient{series // 2}"
    dataset.Modality = "CT"
    dataset.InstanceNumber = index % SLICES_PER_SERIES + 1
    dataset.Rows, dataset.Columns = rows, columns
    if frames > 1:
        dataset.NumberOfFrames = frames
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.SamplesPerPixel, dataset.PixelRepresentation = 1, 0
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.RescaleIntercept, dataset.RescaleSlope = -1024, 1
    return dataset


def _pixels(index: int, length: int) -> bytes:
    # 12-bit noise (high nibble clear) like a CT slice's entropy, from a per-file seed.
    generator = random.Random(index)
    block = bytes(b & 0x0F if i % 2 else b for i, b in enumerate(generator.randbytes(min(length, 1 << 20))))
    return (block * (length // len(block) + 1))[:length]


def build(directory: Path, count: int, large_frames: tuple[int, ...] = ()) -> list[CorpusFile]:
    """``count`` slices (and one multi-frame object per entry of ``large_frames``), reusing files already built."""
    directory.mkdir(parents=True, exist_ok=True)
    plan = [(index, 1) for index in range(count)]
    plan += [(1_000_000 + n, frames) for n, frames in enumerate(large_frames)]
    files = []
    for index, frames in plan:
        path = directory / f"{index:07d}.dcm"
        length = ROWS * COLUMNS * 2 * frames
        pixels = _pixels(index, length)
        if not path.exists():
            dataset = _dataset(index, ROWS, COLUMNS, frames)
            dataset.PixelData = pixels
            dataset.save_as(path, enforce_file_format=True)
        files.append(
            CorpusFile(path, f"{_ROOT}.3.{index}", hashlib.sha256(pixels).hexdigest(), path.stat().st_size)
        )
    return files
