"""The command line of `dicom-store-scp status`: options, the study and calling-AE reports, output, exit code."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from batch_contract.timestamps import iso_millis
from scp.config import parse_ae_title
from scp.import_status import bucket as batches
from scp.import_status import table as records
from scp.import_status.report import EXIT_UNKNOWN, Report, newest_per_instance
from scp.uids import is_valid_uid

DEFAULT_LOOKBACK_HOURS = 72  # the sweeper's default: older batches without a manifest have been closed by it
DEFAULT_WINDOW = timedelta(hours=24)
_RELATIVE = re.compile(r"([0-9]+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class StatusError(Exception):
    """The status cannot be determined (bad option, unreachable table); the message says why."""


def study_report(table: Any, s3: Any, bucket: str | None, study_uid: str, now: datetime, lookback: timedelta) -> Report:
    report = Report({"studyInstanceUid": study_uid}, table.name, bucket, now)
    found = records.instances(table, records.study_items(table, study_uid))
    if bucket is not None:
        unregistered = batches.unregistered_batches(s3, bucket, table, now - lookback)
        found += batches.study_in_s3(s3, bucket, unregistered, study_uid)
    report.instances = newest_per_instance(found)
    return report


def calling_ae_report(
    table: Any,
    s3: Any,
    bucket: str | None,
    calling_ae_title: str,
    window: tuple[datetime, datetime],
    now: datetime,
    lookback: timedelta,
) -> Report:
    since, until = window
    query = {"callingAETitle": calling_ae_title, "since": iso_millis(since), "until": iso_millis(until)}
    report = Report(query, table.name, bucket, now)
    found = records.instances(table, records.calling_ae_items(table, calling_ae_title, since, until))
    if bucket is not None:
        # A batch opened before ``since`` may still hold objects received after it (a steady stream keeps a
        # batch open), so batches are looked for from ``lookback`` before the range.
        unregistered = batches.unregistered_batches(s3, bucket, table, since - lookback)
        found += batches.calling_ae_in_s3(s3, bucket, unregistered, calling_ae_title, since, until)
    report.instances = newest_per_instance(found)
    return report


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse exits 2 on a usage error, which this command uses for "pending".
        self.print_usage(sys.stderr)
        self.exit(EXIT_UNKNOWN, f"{self.prog}: invalid configuration: {message}\n")


def parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    command = _Parser(
        prog="dicom-store-scp status",
        description="Did everything a modality sent reach AWS HealthImaging? Reports, per study or per calling AE "
        "title and time range, how many instances were received, are in an open batch, waiting for or in an "
        "import job, imported (with image set ids), imported as non-primary, or failed (with reasons).",
        epilog="Exit codes: 0 everything received is imported; 1 something failed or landed in a non-primary "
        "image set (a human must look); 2 something is still on its way (and nothing failed); 3 the status "
        "could not be determined (invalid configuration, table unreachable, or the study was not found).",
    )
    which = command.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", metavar="UID", help="Study Instance UID")
    which.add_argument("--calling-ae", metavar="AE", help="calling AE title of the modality")
    command.add_argument(
        "--since", metavar="TIME", help="with --calling-ae: start, ISO 8601 UTC or relative (90m, 2h, 1d); default 24h"
    )
    command.add_argument("--until", metavar="TIME", help="with --calling-ae: end, ISO 8601 UTC; default now")
    command.add_argument(
        "--table",
        default=environ.get("IMPORT_TABLE_NAME"),
        help="the import workflow's DynamoDB table (stack output ImportTableName); env IMPORT_TABLE_NAME",
    )
    command.add_argument(
        "--bucket",
        default=environ.get("DICOM_BUCKET") or None,
        help="the DICOM bucket, to count objects in batches the table does not hold yet; env DICOM_BUCKET",
    )
    command.add_argument("--no-s3", action="store_true", help="read the table only, even if a bucket is known")
    command.add_argument(
        "--lookback-hours",
        type=int,
        default=DEFAULT_LOOKBACK_HOURS,
        help=f"how far back to look for unregistered batches in S3 (default {DEFAULT_LOOKBACK_HOURS})",
    )
    command.add_argument("--region", default=None, help="AWS Region; default from the standard AWS configuration")
    command.add_argument("--json", action="store_true", help="print one JSON document for scripts")
    return command


def _problems(arguments: argparse.Namespace) -> list[str]:
    problems = []
    if not arguments.table:
        problems.append("--table (or IMPORT_TABLE_NAME) is required")
    if arguments.study is not None and not is_valid_uid(arguments.study):
        problems.append(f"--study: not a valid UID: {arguments.study!r}")
    if arguments.calling_ae is not None:
        try:
            arguments.calling_ae = parse_ae_title(arguments.calling_ae)
        except ValueError as error:
            problems.append(f"--calling-ae: {error}")
    elif arguments.since or arguments.until:
        problems.append("--since and --until go with --calling-ae")
    if not 1 <= arguments.lookback_hours <= 8760:
        problems.append("--lookback-hours: expected 1-8760")
    return problems


def parse_time(text: str, now: datetime) -> datetime:
    """ISO 8601 (UTC unless it says otherwise) or a span back from now such as ``90m``, ``2h``, ``1d``."""
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        return now - timedelta(**{_UNITS[relative[2]]: int(relative[1])})
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise StatusError(f"not a time: {text!r} (use ISO 8601 such as 2026-11-23T08:00Z, or 90m, 2h, 1d)") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def run(arguments: argparse.Namespace, table: Any, s3: Any, now: datetime) -> Report:
    bucket = None if arguments.no_s3 else arguments.bucket
    if arguments.study is not None:
        return study_report(table, s3, bucket, arguments.study, now, timedelta(hours=arguments.lookback_hours))
    until = parse_time(arguments.until, now) if arguments.until else now
    since = parse_time(arguments.since, now) if arguments.since else until - DEFAULT_WINDOW
    if since > until:
        raise StatusError("--since is after --until")
    lookback = timedelta(hours=arguments.lookback_hours)
    return calling_ae_report(table, s3, bucket, arguments.calling_ae, (since, until), now, lookback)


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    arguments = parser(environ).parse_args(argv)
    problems = _problems(arguments)
    if problems:
        sys.stderr.write("dicom-store-scp status: invalid configuration:\n" + "".join(f"  {p}\n" for p in problems))
        return EXIT_UNKNOWN
    import boto3  # loads only for this command
    from botocore.exceptions import BotoCoreError, ClientError

    session = boto3.session.Session(region_name=arguments.region)
    try:
        table = session.resource("dynamodb").Table(arguments.table)
        report = run(arguments, table, session.client("s3"), datetime.now(UTC))
    except StatusError as error:
        sys.stderr.write(f"dicom-store-scp status: invalid configuration: {error}\n")
        return EXIT_UNKNOWN
    except (BotoCoreError, ClientError) as error:
        sys.stderr.write(f"dicom-store-scp status: cannot read the import status: {error}\n")
        return EXIT_UNKNOWN
    if arguments.json:
        sys.stdout.write(json.dumps(report.to_json(), indent=1) + "\n")
    else:
        sys.stdout.write(report.to_text())
    return report.exit_code
