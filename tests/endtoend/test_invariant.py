"""Every instance that got Success ends in exactly one truthful state, under seeded faults on the whole path.

At the end: each acknowledged instance is imported (with the image set id HealthImaging gave it) or failed (with
a reason, and HealthImaging does not hold it), and `dicom-store-scp status` says exactly that; nothing the
modality was refused is reported imported; nothing is unfinished once the drain time has passed.

The short run is part of `make test`; `make soak` runs it for SOAK_SECONDS (default 3600) with SOAK_SEED.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import boto3
import pytest
from boto3.dynamodb.conditions import Key
from moto import mock_aws
from moto.stepfunctions.parser.asl.component.common.retry import retrier_decl
from moto.stepfunctions.parser.asl.component.state.exec.state_task import lambda_eval_utils
from moto.stepfunctions.parser.asl.utils.boto_client import boto_client_for

from batch_contract.layout import batch_id_from_manifest_key
from batch_contract.table import BATCH_UNCONFIRMED, BY_STATUS_INDEX, ENTITY_BATCH, batch_key, status_partition
from scp.import_status import command
from scp.import_status.report import FAILED, IMPORTED, NON_PRIMARY, PENDING
from tests.endtoend.harness import (
    Chaos,
    EventBridge,
    Ledger,
    Modality,
    Plan,
    Receivers,
    batch_ids,
    daemon_settings,
    listed_in_manifests,
    manifest_keys,
    moto_clients,
    poll,
    recheck_run,
    reconcile_run,
    s3_fault,
    sweeper_run,
)
from tests.functions.workflow import DATASTORE_ID, ROLE_ARN, create_table, load_app, unique
from tests.statemachine.test_import_execution import ASL, FUNCTIONS, REGION, LambdaService, function_arn
from tests.support.healthimaging import HealthImaging, Rates
from tests.support.moto import MotoServer
from tests.support.s3_faults import fault_proxy

pytestmark = pytest.mark.integration

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "0"))
SEED = int(os.environ.get("SOAK_SEED", "20261201"))
SHORT = Plan(seed=SEED, send_seconds=45, instances=300)
# The soak at a modality's pace (about five instances a second), with the daemon killed or stopped every minute or so.
SOAK = Plan(
    seed=SEED,
    send_seconds=SOAK_SECONDS,
    instances=None,
    pause_seconds=3.0,
    daemon_fault_every=(20.0, 90.0),
    sweep_every=(5.0, 20.0),
    reconcile_every=(20.0, 90.0),
    drain_seconds=240,
)
RATES = Rates(
    throttling=0.08,
    server_error=0.05,
    transport=0.05,
    late_output=0.25,
    very_late_output=0.05,
    file_server_error=0.04,
    customer_error=0.03,
    non_primary=0.03,
    warning=0.05,
    job_failed=0.03,
)
# The sweeper seals a batch once its newest object is older than this: the daemon's window (1 s) plus its upload
# deadline (0.75 x DIMSE_TIMEOUT) and shutdown grace, as the stack's setting must exceed them.
SWEEP_MIN_AGE_SECONDS = 12
RETRY_TIME_SCALE = 0.05
# The sweeper reads an unconfirmed batch's output again hourly; here every few seconds, as retry waits are scaled.
RECHECK_INTERVAL = timedelta(seconds=3)


@dataclass
class WholePath:
    """Everything the run touches."""

    s3: Any
    table: Any
    bucket: str
    results: str
    sfn: Any
    arn: str
    healthimaging: HealthImaging
    sweeper: ModuleType
    moto: MotoServer


@pytest.fixture
def whole_path(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[WholePath]:
    # S3 and DynamoDB on moto_server, shared with the daemon; Step Functions in this process.
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL_S3": moto.endpoint,
        "AWS_ENDPOINT_URL_DYNAMODB": moto.endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    s3, dynamodb = moto_clients(moto)
    bucket, results = unique("e2e-dicom"), unique("e2e-results")
    s3.create_bucket(Bucket=bucket)
    s3.create_bucket(Bucket=results)
    table = create_table(dynamodb, unique("e2e-imports"))
    env = {
        "TABLE_NAME": table.name,
        "DICOM_BUCKET": bucket,
        "RESULTS_BUCKET": results,
        "DATASTORE_ID": DATASTORE_ID,
        "DATA_ACCESS_ROLE_ARN": ROLE_ARN,
        "POLL_INTERVAL_SECONDS": "1",
        "BATCH_WINDOW_SECONDS": str(daemon_settings(bucket, None)["BATCH_WINDOW_SECONDS"]),
        "POWERTOOLS_METRICS_NAMESPACE": "DICOMStoreSCP",
    }
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        apps = {placeholder: load_app(name, monkeypatch, env) for placeholder, name in FUNCTIONS.items()}
        healthimaging = HealthImaging(s3, DATASTORE_ID, RATES, random.Random(SEED))
        healthimaging.attach(apps["StartImportFunctionArn"].MEDICAL_IMAGING)
        healthimaging.attach(apps["CheckImportFunctionArn"].MEDICAL_IMAGING)
        lambda_service = LambdaService({function_arn(p): app.handler for p, app in apps.items()})

        def client_for(region: str, service: str, state_credentials: Any = None) -> Any:
            if service == "lambda":
                return lambda_service
            return boto_client_for(region=region, service=service, state_credentials=state_credentials)

        monkeypatch.setattr(lambda_eval_utils, "boto_client_for", client_for)
        # Step Functions' retry intervals pass RETRY_TIME_SCALE times as fast: the definition's backoff still
        # decides the order of things (a job's late output against the retries that wait for it), in seconds.
        monkeypatch.setattr(
            retrier_decl, "time", SimpleNamespace(sleep=lambda seconds: time.sleep(seconds * RETRY_TIME_SCALE))
        )
        definition = ASL.read_text()
        for placeholder in FUNCTIONS:
            definition = definition.replace("${" + placeholder + "}", function_arn(placeholder))
        assert not re.search(r"\$\{", definition), "a placeholder the test does not substitute"
        sfn = boto3.client("stepfunctions", region_name=REGION)
        arn = sfn.create_state_machine(
            name=unique("import"), definition=definition, roleArn="arn:aws:iam::123456789012:role/sfn"
        )["stateMachineArn"]
        sweeper = load_app("sweeper", monkeypatch, {**env, "STATE_MACHINE_ARN": arn})
        monkeypatch.setattr(sweeper, "RECHECK_INTERVAL", RECHECK_INTERVAL)
        yield WholePath(s3, table, bucket, results, sfn, arn, healthimaging, sweeper, moto)
        healthimaging.stop()


def report_of(path: WholePath, study: str) -> dict[str, Any]:
    """`dicom-store-scp status --study` as the command computes it, with this run's table and bucket."""
    arguments = command.parser({}).parse_args(["--study", study, "--table", path.table.name, "--bucket", path.bucket])
    return command.run(arguments, path.table, path.s3, datetime.now(UTC)).to_json()


def console_report(path: WholePath, study: str) -> dict[str, Any]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    environment.update({**path.moto.env(), "IMPORT_TABLE_NAME": path.table.name, "DICOM_BUCKET": path.bucket})
    result = subprocess.run(
        [sys.executable, "-m", "scp", "status", "--study", study, "--json"],
        capture_output=True, text=True, timeout=120, env=environment,
    )  # fmt: skip
    assert result.returncode in (0, 1, 2), result.stderr
    return dict(json.loads(result.stdout))


def test_every_acknowledged_instance_reaches_one_truthful_end_state(
    whole_path: WholePath, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = SOAK if SOAK_SECONDS else SHORT
    rng = random.Random(plan.seed)
    path = whole_path
    ledger = Ledger()
    chaos = Chaos(rng)
    with fault_proxy(path.moto.endpoint) as proxy:
        receivers = Receivers(tmp_path, daemon_settings(path.bucket, proxy))
        events = EventBridge(path.sfn, path.arn, path.s3, path.bucket, plan.duplicate_events, plan.lost_events, rng)
        events.start()
        modality = Modality(plan, ledger, lambda: receivers.port, tmp_path / "sent", rng)
        (tmp_path / "sent").mkdir()
        chaos.every("daemon", plan.daemon_fault_every, receivers.fault)
        chaos.every("s3", plan.s3_fault_every, s3_fault(proxy))
        eager_sweeper = sweeper_run(path.sweeper, path.bucket, SWEEP_MIN_AGE_SECONDS, eager=True)
        chaos.every("sweeper", plan.sweep_every, eager_sweeper)
        eager_reconcile = reconcile_run(path.sweeper, path.bucket, path.arn, SWEEP_MIN_AGE_SECONDS, eager=True)
        chaos.every("reconcile", plan.reconcile_every, eager_reconcile)
        rechecked: set[str] = set()
        chaos.every("recheck", plan.recheck_every, recheck_run(path.sweeper, path.bucket, rechecked))
        started = time.monotonic()
        modality.start()
        while time.monotonic() - started < plan.send_seconds:
            if plan.instances is not None and len(ledger.acknowledged) >= plan.instances:
                break
            time.sleep(0.5)
        modality.stop()
        chaos.stop()
        proxy.heal()
        sent_for = time.monotonic() - started

        # Drain: the daemon closes its batches, the sweeper seals what killed daemons left open, every manifest
        # becomes a registered batch (by its event or the reconcile pass), every execution ends. All within the
        # drain time.
        sweep = sweeper_run(path.sweeper, path.bucket, SWEEP_MIN_AGE_SECONDS)
        reconcile = reconcile_run(path.sweeper, path.bucket, path.arn, SWEEP_MIN_AGE_SECONDS)
        recheck = recheck_run(path.sweeper, path.bucket, rechecked)
        registered: set[str] = set()
        drained_at = time.monotonic()
        passes = (sweep, reconcile, recheck)
        for state in poll(lambda: _drained(path, events, passes, registered), plan.drain_seconds, 1.0):
            last = state
        drain_seconds = time.monotonic() - drained_at
        receivers.stop()
        events.stop()

    reports = {study: report_of(path, study) for study in sorted(set(ledger.study_of.values()))}
    seen: dict[str, dict[str, Any]] = {}
    for report in reports.values():
        for instance in report["instances"]:
            assert instance["sopInstanceUid"] not in seen, f"reported twice: {instance}"
            seen[instance["sopInstanceUid"]] = instance
    truth = path.healthimaging.imported
    listed = listed_in_manifests(path.s3, path.bucket)

    failed_reasons: Counter[str] = Counter()
    violations: list[str] = []
    for sop in sorted(ledger.acknowledged):
        instance = seen.get(sop)
        if instance is None:
            violations.append(f"{sop}: acknowledged, not reported at all (in {listed[sop]} manifests)")
            continue
        state = instance["state"]
        if state in PENDING:
            violations.append(f"{sop}: still {state} after the drain time (batch {instance['batchId']})")
        elif state in (IMPORTED, NON_PRIMARY):
            held = truth.get(sop)
            if held is None:
                violations.append(f"{sop}: reported {state}, HealthImaging never imported it")
            elif instance["imageSetId"] != held.image_set_id or (state == IMPORTED) != held.is_primary:
                violations.append(f"{sop}: reported {state} in {instance['imageSetId']}, HealthImaging has {held}")
        elif state == FAILED:
            if sop in truth:
                violations.append(f"{sop}: reported failed, HealthImaging imported it ({truth[sop]})")
            if not instance.get("reason"):
                violations.append(f"{sop}: failed without a reason")
            failed_reasons[_reason_kind(instance.get("reason") or "")] += 1
        else:
            violations.append(f"{sop}: ended {state}, neither imported nor failed")
        if listed[sop] == 0:
            violations.append(f"{sop}: acknowledged, listed in no manifest")
    for sop in sorted(ledger.given_up - ledger.acknowledged):
        if seen.get(sop, {}).get("state") in (IMPORTED, NON_PRIMARY):
            violations.append(f"{sop}: refused to the modality, reported imported")

    # The console command reports what the report model computed, for a sample of studies.
    for study in sorted(reports)[:3]:
        assert console_report(path, study)["counts"] == reports[study]["counts"], study

    states = Counter(instance["state"] for sop, instance in seen.items() if sop in ledger.acknowledged)
    faults = Counter(chaos.injected)
    faults.update({f"HealthImaging {kind}": n for kind, n in path.healthimaging.faults.items()})
    faults.update(Counter(f"S3 proxy {line.rsplit(' ', 1)[-1]}" for line in proxy.faulted))
    faults["duplicate events"] = events.duplicated
    faults["lost events"] = events.lost
    late_batches = len(receivers.logs("batch sealed elsewhere without some objects: copied into a batch of their own"))
    summary = {
        "seed": plan.seed,
        "sent seconds": round(sent_for),
        "drain seconds": round(drain_seconds),
        "drained": bool(last),
        "instances created": len(ledger.study_of),
        "acknowledged": len(ledger.acknowledged),
        "refused, given up": len(ledger.given_up - ledger.acknowledged),
        "never answered": len(ledger.never_acknowledged() - ledger.given_up),
        "imported": states[IMPORTED],
        "non-primary": states[NON_PRIMARY],
        "failed": states[FAILED],
        "failed by reason": dict(failed_reasons),
        "batches": len(batch_ids(path.s3, path.bucket)),
        "manifests": len(manifest_keys(path.s3, path.bucket)),
        "late batches (sealed elsewhere)": late_batches,
        "executions": len(_executions(path)),
        "unconfirmed batches recorded by the re-check": len(rechecked),
        "executions started by reconcile": sum(1 for arn in _executions(path) if ":reconcile-" in arn),
        "import jobs": len(path.healthimaging.jobs()),
        "daemons started": len(receivers.started),
        "faults injected": dict(sorted(faults.items())),
        "violations": len(violations),
    }
    with capsys.disabled():
        sys.stdout.write("\nend-to-end invariant: " + json.dumps(summary, indent=1) + "\n")
    assert ledger.acknowledged, "nothing was acknowledged: the run proves nothing"
    assert not violations, f"{len(violations)} violations, first ones:\n" + "\n".join(violations[:25])
    assert last, f"not drained within {plan.drain_seconds} s: {last!r}"


def _drained(path: WholePath, events: EventBridge, passes: tuple[Any, ...], registered: set[str]) -> bool:
    """Whether everything has ended; first the sweeper's passes, as its schedule runs them."""
    for sweeper_pass in passes:
        sweeper_pass(random.Random())
    manifests = set(manifest_keys(path.s3, path.bucket))
    closed = {batch_id_from_manifest_key(key) for key in manifests}
    if batch_ids(path.s3, path.bucket) - closed:
        return False  # a batch without a manifest yet
    if manifests - events.seen.copy():
        return False  # a manifest whose event has not come yet
    for batch_id in sorted(closed - registered):
        if "Item" not in path.table.get_item(Key=batch_key(batch_id), ConsistentRead=True, ProjectionExpression="pk"):
            return False  # a manifest no execution has registered yet (its event lost: the reconcile pass's)
        registered.add(batch_id)
    if any(not job.output_written and job.status in ("COMPLETED", "FAILED") for job in path.healthimaging.jobs()):
        return False
    unconfirmed = path.table.query(
        IndexName=BY_STATUS_INDEX,
        KeyConditionExpression=Key("gsi3pk").eq(status_partition(ENTITY_BATCH, BATCH_UNCONFIRMED)),
        Limit=1,
    )
    if unconfirmed["Items"]:
        return False  # the sweeper's next re-check reads its output
    return not events.running()


def _executions(path: WholePath) -> list[str]:
    pages = path.sfn.get_paginator("list_executions").paginate(stateMachineArn=path.arn)
    return [str(execution["executionArn"]) for page in pages for execution in page["executions"]]


def _reason_kind(reason: str) -> str:
    """The leading words of a failure reason, without the ids that differ per instance."""
    return re.sub(r"[0-9a-f]{32}", "<id>", reason)[:80]
