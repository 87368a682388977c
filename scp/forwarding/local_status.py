"""`dicom-store-scp status` for a standalone gateway: the StoreDICOM results in the local forwarding database.

Used when no import table is configured (no ``--table``, no ``IMPORT_TABLE_NAME``): the per-instance results of
forwarding live in ``<STORAGE_DIR>/.forwarding/forwarding.sqlite``, written by the daemon (docs/forwarding.rst).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from scp.forwarding.results import FAILED, FORWARDING, IMPORTED, WARNING, Row, database_path, study_rows
from scp.import_status.report import (
    EXIT_ATTENTION,
    EXIT_IMPORTED,
    EXIT_PENDING,
    EXIT_UNKNOWN,
    image_sets_line,
    result_line,
)
from scp.uids import is_valid_uid

STATES = (FORWARDING, IMPORTED, WARNING, FAILED)
_LABELS = {
    FORWARDING: "on its way to HealthImaging (StoreDICOM)",
    IMPORTED: "stored in HealthImaging",
    WARNING: "stored in HealthImaging with a warning",
    FAILED: "not stored in HealthImaging",
}


def applies(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """True when the status command has no import table to read: the local database answers instead."""
    return not environ.get("IMPORT_TABLE_NAME") and not any(a == "--table" or a.startswith("--table=") for a in argv)


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    command = _Parser(
        prog="dicom-store-scp status",
        description="With no import table configured: what StoreDICOM forwarding did with each instance of a study, "
        "from the forwarding database under STORAGE_DIR. With --table (or IMPORT_TABLE_NAME) the import "
        "workflow's table is read instead.",
        epilog="Exit codes: 0 every instance is stored in HealthImaging; 1 something failed; 2 something is still on "
        "its way (and nothing failed); 3 the status could not be determined (no database, or the study is unknown).",
    )
    command.add_argument("--study", metavar="UID", required=True, help="Study Instance UID")
    command.add_argument(
        "--storage-dir",
        default=environ.get("STORAGE_DIR") or "./storage",
        help="the daemon's STORAGE_DIR (default: env STORAGE_DIR, else ./storage)",
    )
    command.add_argument("--json", action="store_true", help="print one JSON document for scripts")
    arguments = command.parse_args(argv)
    if not is_valid_uid(arguments.study):
        sys.stderr.write(
            f"dicom-store-scp status: invalid configuration: --study: not a valid UID: {arguments.study!r}\n"
        )
        return EXIT_UNKNOWN
    path = database_path(Path(arguments.storage_dir))
    if not path.is_file():
        sys.stderr.write(
            f"dicom-store-scp status: invalid configuration: no import table (--table or IMPORT_TABLE_NAME) and no "
            f"forwarding database at {path}\n"
        )
        return EXIT_UNKNOWN
    try:
        rows = study_rows(path, arguments.study)
    except sqlite3.Error as error:
        sys.stderr.write(f"dicom-store-scp status: cannot read {path}: {error}\n")
        return EXIT_UNKNOWN
    code = exit_code(rows)
    if arguments.json:
        sys.stdout.write(json.dumps(to_json(arguments.study, path, rows, code), indent=1) + "\n")
    else:
        sys.stdout.write(to_text(arguments.study, path, rows, code))
    return code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse exits 2 on a usage error, which this command uses for "pending".
        self.print_usage(sys.stderr)
        self.exit(EXIT_UNKNOWN, f"{self.prog}: invalid configuration: {message}\n")


def exit_code(rows: Sequence[Row]) -> int:
    states = Counter(row.status for row in rows)
    if not rows:
        return EXIT_UNKNOWN
    if states[FAILED]:
        return EXIT_ATTENTION
    if states[FORWARDING]:
        return EXIT_PENDING
    return EXIT_IMPORTED


def to_json(study: str, path: Path, rows: Sequence[Row], code: int) -> dict[str, Any]:
    states = Counter(row.status for row in rows)
    image_sets = Counter(row.image_set_id for row in rows if row.status != FAILED and row.image_set_id)
    return {
        "query": {"studyInstanceUid": study},
        "database": str(path),
        "exitCode": code,
        "counts": {"received": len(rows), **{state: states[state] for state in STATES}},
        "duplicates": sum(row.duplicates for row in rows),
        "imageSets": [{"imageSetId": key, "instances": n} for key, n in sorted(image_sets.items())],
        "instances": [
            {
                "sopInstanceUid": row.sop_instance_uid,
                "seriesInstanceUid": row.series_instance_uid,
                "callingAETitle": row.calling_ae_title,
                "receivedAt": row.received_at,
                "state": row.status,
                "imageSetId": row.image_set_id,
                "reason": row.reason,
                "attempts": row.attempts,
                "duplicates": row.duplicates,
                "lastError": row.last_error,
            }
            for row in rows
        ],
    }


def to_text(study: str, path: Path, rows: Sequence[Row], code: int) -> str:
    states = Counter(row.status for row in rows)
    lines = [f"Study {study}", f"  {'received':<12}{len(rows):>7}   (forwarding database {path})"]
    lines += [f"  {state:<12}{states[state]:>7}   {_LABELS[state]}" for state in STATES]
    image_sets = Counter(row.image_set_id for row in rows if row.status != FAILED and row.image_set_id)
    if image_sets:
        lines.append(image_sets_line(image_sets))
    for row in rows:
        if row.status == FAILED:
            lines.append(f"Failed: {row.sop_instance_uid}: {row.reason or 'no reason recorded'}")
        elif row.status == WARNING:
            lines.append(f"Warning: {row.sop_instance_uid}: {row.reason}")
        elif row.status == FORWARDING and row.last_error:
            lines.append(f"Waiting: {row.sop_instance_uid}: {row.attempts} attempts, last error: {row.last_error}")
    lines.append(result_line(code))
    return "\n".join(lines) + "\n"
