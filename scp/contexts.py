"""The presentation contexts the SCP accepts: which SOP classes, in which transfer syntaxes."""

from __future__ import annotations

from functools import cache

from pydicom.uid import UID_dictionary  # type: ignore[attr-defined]
from pynetdicom import sop_class
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.service_class import StorageServiceClass

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"

# Exactly what AWS HealthImaging imports (its "Supported transfer syntaxes" page). Anything else is refused at
# negotiation so the modality falls back to a syntax that will import, instead of being told "stored" for an
# object that would then fail in HealthImaging. When one presentation context proposes several, the first in
# this order wins (PS3.8 9.3.3.2 leaves the choice to the acceptor): uncompressed, then lossless, then lossy, so a
# modality is never led to compress lossily an image it offered to send intact.
IMPORTABLE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Multi-component Lossless Only
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless Only
    "1.2.840.10008.1.2.4.202",  # HTJ2K with RPCL Options Lossless Only
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 Multi-component
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.4.100",  # MPEG2 Main Profile / Main Level
    "1.2.840.10008.1.2.4.100.1",
    "1.2.840.10008.1.2.4.101",  # MPEG2 Main Profile / High Level
    "1.2.840.10008.1.2.4.101.1",
    "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC/H.264 High Profile / Level 4.1
    "1.2.840.10008.1.2.4.102.1",
    "1.2.840.10008.1.2.4.103",  # MPEG-4 AVC/H.264 BD-compatible High Profile / Level 4.1
    "1.2.840.10008.1.2.4.103.1",
    "1.2.840.10008.1.2.4.104",  # MPEG-4 AVC/H.264 High Profile / Level 4.2 For 2D Video
    "1.2.840.10008.1.2.4.104.1",
    "1.2.840.10008.1.2.4.105",  # MPEG-4 AVC/H.264 High Profile / Level 4.2 For 3D Video
    "1.2.840.10008.1.2.4.105.1",
    "1.2.840.10008.1.2.4.106",  # MPEG-4 AVC/H.264 Stereo High Profile / Level 4.2
    "1.2.840.10008.1.2.4.106.1",
    "1.2.840.10008.1.2.4.107",  # HEVC/H.265 Main Profile / Level 5.1
    "1.2.840.10008.1.2.4.108",  # HEVC/H.265 Main 10 Profile / Level 5.1
)


# Named "... Storage ..." in the standard's UID registry without being a storage SOP class.
_NOT_STORAGE = ("Commitment", "Print", "Hardcopy", "Media Storage Directory")


@cache
def storage_sop_classes() -> tuple[str, ...]:
    """Every storage SOP class the DICOM standard defines, retired ones included (old modalities still send
    Ultrasound and Nuclear Medicine objects under their retired classes)."""
    current = {
        str(value)
        for value in vars(sop_class).values()
        if isinstance(value, sop_class.SOPClass) and getattr(value, "service_class", None) is StorageServiceClass
    }
    retired = {
        str(uid)
        for uid, (name, kind, *_) in UID_dictionary.items()
        if kind == "SOP Class" and "Storage" in name and not any(word in name for word in _NOT_STORAGE)
    }
    return tuple(sorted(current | retired))


def is_standard_uid(uid: str) -> bool:
    """Whether the DICOM standard registers ``uid``; a valid UID it does not know is private (or newer)."""
    return uid in UID_dictionary


def supported_contexts(sop_classes: tuple[str, ...]) -> list[PresentationContext]:
    """Verification plus storage of ``sop_classes`` (every storage SOP class when empty)."""
    storage = sop_classes or storage_sop_classes()
    contexts = [build_context(VERIFICATION_SOP_CLASS, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])]
    contexts.extend(build_context(uid, list(IMPORTABLE_TRANSFER_SYNTAXES)) for uid in storage)
    return contexts
