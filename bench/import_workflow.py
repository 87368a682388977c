"""The import-job path after a batch's manifest exists: HealthImaging's job time plus the import workflow's polling.

Neither can run here. The job time is a parameter (BENCH_IMPORT_JOB_SECONDS, default 95): HealthImaging publishes
no import job duration; the only timing its developer guide shows is the example output of ListDICOMImportJobs
("Listing import jobs", https://docs.aws.amazon.com/healthimaging/latest/devguide/list-dicom-import-jobs.html), a
COMPLETED job submitted at 11:20:21.734 and ended at 11:21:56.504, 95 s, for a job of unstated size. The default is
that example, an assumption, not a measurement.

The polling is the product's own: statemachines/import.asl.json waits ``$.job.pollIntervalSeconds`` (start_import's
POLL_INTERVAL_SECONDS, which the template leaves at its default) before the first GetDICOMImportJob, then
``$.jobStatus.waitSeconds`` (check_import's ``next_wait_seconds`` for the job's age) between checks; the check that
first sees the job finished is when ProcessResults records its instances imported. The model takes both from the
functions themselves and fails if the ASL's waits read anything else. Not modelled, so the figure is a lower bound:
the EventBridge delivery of the manifest's event, each Lambda function's own run time, and ProcessResults reading the
job's output.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from types import ModuleType

import pytest

from bench.receivers import REPOSITORY
from tests.functions.workflow import load_app

ASL = REPOSITORY / "statemachines" / "import.asl.json"
# The ASL's Wait states and where each takes its seconds from: the model below is right only while these hold.
WAITS = {"WaitBeforeFirstCheck": "$.job.pollIntervalSeconds", "WaitForImportJob": "$.jobStatus.waitSeconds"}
DEFAULT_JOB_SECONDS = 95.0
JOB_SECONDS_SOURCE = (
    "no import job duration is published; the default is the job in the example output of ListDICOMImportJobs in "
    "the HealthImaging developer guide (Listing import jobs: submitted 11:20:21.734, ended 11:21:56.504), an "
    "assumption"
)


@dataclass(frozen=True)
class Workflow:
    """The waits of the import workflow between StartDICOMImportJob and the check that sees the job finished."""

    poll_interval_seconds: int
    next_wait: Callable[[float], float]  # the wait after a check at this job age, seconds

    def checks(self, until: float) -> list[float]:
        """Job ages (seconds after the start) of every check up to the first one at or after ``until``."""
        ages = [float(self.poll_interval_seconds)]
        while ages[-1] < until:
            ages.append(ages[-1] + self.next_wait(ages[-1]))
        return ages

    def recorded_after(self, job_seconds: float) -> float:
        """Seconds from the job's start to the check that sees it finished: the record says imported from then."""
        return self.checks(job_seconds)[-1]


def _asl_waits() -> dict[str, str]:
    states = json.loads(ASL.read_text())["States"]
    return {name: state.get("SecondsPath", "") for name, state in states.items() if state.get("Type") == "Wait"}


def _function(name: str, environment: dict[str, str]) -> ModuleType:
    patch = pytest.MonkeyPatch()
    try:
        patch.delenv("POLL_INTERVAL_SECONDS", raising=False)  # the default, as the template deploys it
        return load_app(name, patch, {"AWS_DEFAULT_REGION": "us-east-1", **environment})
    finally:
        patch.undo()


def product_workflow() -> Workflow:
    """The workflow as deployed: the start function's default poll interval and the check function's own rule."""
    waits = _asl_waits()
    if waits != WAITS:
        raise RuntimeError(f"the import workflow's waits changed ({waits}); bench/import_workflow.py models {WAITS}")
    start = _function("start_import", {
        "TABLE_NAME": "t", "DATASTORE_ID": "0" * 32, "RESULTS_BUCKET": "b",
        "DATA_ACCESS_ROLE_ARN": "arn:aws:iam::123456789012:role/r",
    })  # fmt: skip
    check = _function("check_import", {"TABLE_NAME": "t", "DICOM_BUCKET": "b"})
    interval = int(start.SETTINGS.poll_interval_seconds)
    return Workflow(
        interval, lambda age: float(check.next_wait_seconds(timedelta(seconds=age), interval, stuck=False))
    )
