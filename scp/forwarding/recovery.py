"""After a power loss, find the stored objects whose outbox rows had not reached the disk yet, and record them.

The local store fsyncs every object before its acknowledgement; the forwarding database makes its rows durable once
a second (``Results.checkpoint``). If the machine, not just the process, went down while the daemon ran (the boot id
changed and the last run did not stop cleanly), objects stored since the last durable checkpoint may have lost
their rows. Only series directories changed since then are read, so the scan costs one ``stat`` per series.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from scp.forwarding.results import Results
from scp.instances import ReceivedInstance
from scp.uids import is_valid_uid

LOG = logging.getLogger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# Directory and file times and the recorded checkpoint time come from the same clock; the margin covers the
# coarse timestamps of some filesystems.
_MARGIN_SECONDS = 5.0


def boot_id() -> str | None:
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def needs_recovery(results: Results, current_boot: str | None) -> float | None:
    """The time from which to look, if the last run ended with the machine going down; else None."""
    previous_boot, clean, durable_until = results.previous_run()
    if previous_boot is None or clean:
        return None
    # A run killed on a machine that kept running lost nothing: its commits were in the page cache.
    if current_boot is not None and previous_boot == current_boot:
        return None
    return durable_until - _MARGIN_SECONDS


def recover(results: Results, root: Path, since: float, now: float) -> int:
    """Record every object stored under ``root`` at or after ``since`` that the database does not know as it is."""
    recorded = 0
    for study in _directories(root):
        for series in _directories(study.path):
            if series.stat().st_mtime < since:
                continue  # nothing was renamed into it since the last durable checkpoint
            for entry in os.scandir(series.path):
                if entry.name.endswith(".dcm") and entry.is_file() and entry.stat().st_mtime >= since:
                    recorded += _record(results, Path(entry.path), study.name, series.name, now)
    LOG.warning("forwarding outbox recovered after the machine went down", extra={"instances_recorded": recorded})
    return recorded


def _directories(path: Path | str) -> list[os.DirEntry[str]]:
    # The store's own hidden directories (the receive spool, this database) are not studies.
    return [e for e in os.scandir(path) if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]


def _record(results: Results, path: Path, study: str, series: str, now: float) -> int:
    sop_instance_uid = path.name[: -len(".dcm")]
    stat = path.stat()
    known = results.enqueued_at(sop_instance_uid)
    if known is not None and known >= stat.st_mtime:
        return 0  # its row is the one for this very file
    try:
        meta = read_file_meta_info(path)
        sop_class_uid = str(meta.MediaStorageSOPClassUID)
        transfer_syntax = str(meta.TransferSyntaxUID)
        calling_ae_title = str(meta.get("SourceApplicationEntityTitle", "")).strip()
    except (OSError, InvalidDicomError, AttributeError) as error:
        LOG.error("stored object unreadable, not forwarded", extra={"path": str(path), "error": str(error)})
        return 0
    if not all(is_valid_uid(uid) for uid in (sop_instance_uid, study, series, sop_class_uid)):
        return 0
    instance = ReceivedInstance(
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        study_instance_uid=study,
        series_instance_uid=series,
        transfer_syntax=transfer_syntax,
        calling_ae_title=calling_ae_title,
        size=stat.st_size,
        received_at=datetime.fromtimestamp(stat.st_mtime, UTC),
    )
    results.enqueue(instance, path, now)
    return 1
