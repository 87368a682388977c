"""The time-to-HealthImaging benchmark's arithmetic: nearest-rank percentiles, the import workflow's checks as the
product deploys them, and the import path as the measured window plus the modelled rest."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.forwarding import Latencies, PathRow, percentile
from bench.import_workflow import DEFAULT_JOB_SECONDS, Workflow, product_workflow


def test_percentiles_are_nearest_rank() -> None:
    values = [float(n) for n in range(100, 0, -1)]  # 1..100, unordered
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([1.0, 2.0, 3.0], 0.5) == 2.0
    assert math.isnan(percentile([], 0.5))


def test_the_deployed_workflow_checks_every_minute_then_a_tenth_of_the_jobs_age() -> None:
    workflow = product_workflow()
    assert workflow.poll_interval_seconds == 60  # start_import's default; the template does not set it
    assert workflow.checks(95) == [60.0, 120.0]
    assert workflow.recorded_after(DEFAULT_JOB_SECONDS) == 120.0
    # Up to ten minutes the floor of 60 s holds; then a tenth of the age: 660 s + 66 s, 726 s + 72 s.
    assert workflow.checks(700)[-3:] == [600.0, 660.0, 726.0]
    assert workflow.recorded_after(727) == 798.0
    # A job done exactly at a check is seen by that check.
    assert workflow.recorded_after(120) == 120.0


def test_a_job_shorter_than_the_first_wait_is_seen_at_the_first_check() -> None:
    assert Workflow(60, lambda age: 60.0).recorded_after(5) == 60.0


def test_the_import_path_adds_the_modelled_rest_to_each_measured_window() -> None:
    row = PathRow(
        associations=1,
        forwarding=Latencies([0.4, 0.5]),
        to_manifest=Latencies([61.0, 62.0, 70.0]),
        after_manifest=120.0,
        received_per_second_forwarding=18.0,
        received_per_second_plain=19.0,
        forwarded_per_second=18.0,
    )
    assert row.import_job.seconds == [181.0, 182.0, 190.0]
    assert row.import_job.p50 == 182.0
    assert row.import_job.p99 == pytest.approx(190.0)


def test_the_report_judges_the_median_goal_and_the_receive_rate_per_row() -> None:
    from bench.forwarding import LocalRow, Parameters
    from bench.report import forwarding_section

    workflow = Workflow(60, lambda age: 60.0)
    parameters = Parameters(
        files=3, kib=256, levels=[1, 16], repeats=1, stow_latency=0.25, s3_latency=0.05, job_seconds=95.0,
        batch_window=60.0, default_batch_window=60.0, workflow=workflow,
    )  # fmt: skip
    paths = [
        PathRow(1, Latencies([1.9, 1.9, 3.0]), Latencies([61.0, 62.0, 63.0]), 120.0, 19.0, 20.0, 17.0),
        PathRow(
            16, Latencies([2.1, 2.1, 2.2], left_to_import=1), Latencies([60.5, 61.0, 61.5]), 120.0, 150.0, 100.0, 90.0
        ),
    ]
    local = [LocalRow(1, Latencies([0.5]), 90.0, 96.0, 100.0, 8.0, 3.0, 2.0),
             LocalRow(16, Latencies([0.7]), 90.0, 94.0, 100.0, 20.0, 3.0, 2.0)]  # fmt: skip
    rows = [line.split(" | ") for line in forwarding_section(paths, local, parameters).splitlines()]
    forwarding = {row[1]: row for row in rows if row[0] == "| StoreDICOM forwarding"}
    assert forwarding["1"][2:4] == ["1.90", "3.00"] and forwarding["1"][-1] == "yes |"
    assert forwarding["16"][-1] == "no |" and "1 left to the import job" in forwarding["16"][4]
    imports = {row[1]: row for row in rows if row[0] == "| import job"}
    assert imports["1"][2:4] == ["182", "183"]  # 62 s to the manifest + the job seen at the check at 120 s
    # Per association count: the S3-mode receive row (6 cells), then the local-store row (11 cells).
    s3_rows = {row[0]: row for row in rows if len(row) == 6 and row[0] in ("| 1", "| 16")}
    assert s3_rows["| 1"][3:6] == ["0.950", "yes", "17 |"]  # 19 of 20 files/s
    assert s3_rows["| 16"][3:6] == ["1.500", "yes", "90 |"]
    local_rows = {row[0]: row for row in rows if len(row) == 11 and row[0] in ("| 1", "| 16")}
    assert local_rows["| 1"][3:5] == ["0.960", "yes"]
    assert local_rows["| 16"][3:5] == ["0.940", "no"]


def test_the_model_refuses_an_import_workflow_whose_waits_read_something_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench.import_workflow as model

    definition = json.loads(model.ASL.read_text())
    definition["States"]["WaitForImportJob"] = {"Type": "Wait", "Seconds": 30, "Next": "CheckImportJob"}
    changed = tmp_path / "import.asl.json"
    changed.write_text(json.dumps(definition))
    monkeypatch.setattr(model, "ASL", changed)
    with pytest.raises(RuntimeError, match="waits changed"):
        model.product_workflow()


def test_the_report_gives_each_process_its_cpu_per_object_with_forwarding_on_and_off() -> None:
    from bench.forwarding import CpuPerObject, Parameters
    from bench.report import forwarding_section

    parameters = Parameters(
        files=3, kib=256, levels=[16], repeats=1, stow_latency=0.25, s3_latency=0.05, job_seconds=95.0,
        batch_window=60.0, default_batch_window=60.0, workflow=Workflow(60, lambda age: 60.0),
    )  # fmt: skip
    row = PathRow(
        16, Latencies([0.5]), Latencies([61.0]), 120.0, 55.0, 74.0, 50.0,
        cpu_forwarding=CpuPerObject(daemon=7.2, s3_stand_in=9.25, stow_stand_in=1.65),
        cpu_plain=CpuPerObject(daemon=4.7, s3_stand_in=6.7),
    )  # fmt: skip
    rows = [line.split(" | ") for line in forwarding_section([row], [], parameters).splitlines()]
    cpu = [row for row in rows if len(row) == 7 and row[0] == "| 16"]
    assert cpu == [["| 16", "7.20", "4.70", "+2.50", "9.25", "6.70", "1.65 |"]]
