"""The status command on a batch StoreDICOM stored whose manifest the workflow has not registered yet: its
instances are in HealthImaging already, reported imported from the manifest, never as waiting for an import job."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

import pytest

from scp.import_status import command
from tests.operations.conftest import Aws
from tests.operations.pipeline import Pipeline, uid

IMAGE_SET = "b9f8a7e6d5c4b3a29180f7e6d5c4b3a2"
WARNING_TEXT = "B000 coercion of data elements"


def status_json(aws: Aws, capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, dict[str, Any]]:
    code = command.main([*arguments, "--table", aws.table.name, "--bucket", aws.bucket, "--json"], os.environ)
    return code, json.loads(capsys.readouterr().out)


def test_a_stored_batch_not_registered_yet_is_imported_and_its_fallback_batched(
    aws: Aws, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = Pipeline(aws.s3, aws.table, aws.bucket, datetime.now(UTC))
    study, series = uid(21), uid(21, 1)
    sent = pipeline.send(5, study, series, [f"{series}.1", f"{series}.2", f"{series}.3"], calling="MR01")
    # The daemon's split: StoreDICOM stored two (one with a warning), the third goes to the fallback batch; both
    # manifests are written, and no execution has registered either.
    fallback = pipeline.split(sent, {f"{series}.1": None, f"{series}.2": WARNING_TEXT}, IMAGE_SET)
    assert fallback is not None
    pipeline.close(sent)

    for arguments in (("--study", study), ("--calling-ae", "MR01", "--since", "1h")):
        code, report = status_json(aws, capsys, *arguments)

        by_sop = {i["sopInstanceUid"]: i for i in report["instances"]}
        assert {sop: i["state"] for sop, i in by_sop.items()} == {
            f"{series}.1": "imported",
            f"{series}.2": "imported",
            f"{series}.3": "batched",
        }, arguments
        first, second = by_sop[f"{series}.1"], by_sop[f"{series}.2"]
        assert (first["storedBy"], first["imageSetId"], first["reason"]) == ("StoreDICOM", IMAGE_SET, None)
        assert (second["storedBy"], second["reason"]) == ("StoreDICOM", WARNING_TEXT)
        assert by_sop[f"{series}.3"]["storedBy"] is None
        assert (code, report["storedByStoreDICOM"]) == (2, 2), "the fallback batch is still on its way"
