"""Every instance that got Success ends in exactly one truthful state, under seeded faults on the whole path.

It runs in both of the stack's modes: StoreDICOM forwarding off (every batch imported by a job) and on (the
daemon forwards to the StoreDICOM stand-in, the import jobs take what it did not store). At the end, for every
acknowledged instance, the DynamoDB records (read as `dicom-store-scp status` reads them) say exactly one of:
- imported by StoreDICOM: the stand-in stored it, into the image set the record names;
- imported by an import job: that job had it in its input and imported it into the image set the record names;
  either way primary or non-primary as HealthImaging put it, with its warning where it gave one;
- failed, with a reason: neither the stand-in nor any import job stored it, and the reason is the one the job the
  record names gave (its failure line, or its FAILED message) or a failure of the workflow's own.
Nothing the modality was refused is reported imported; nothing is unfinished once the drain time has passed. A
stopped daemon exits 0; a sender, a fault or a sweeper pass that fails unexpectedly fails the run; the console
shows, instance by instance, what the records say.

Duplicates, an instance stored more than once (twice by StoreDICOM, or by StoreDICOM and an import job, or by two
import jobs), are counted and printed. Delivery is at least once, so one is allowed exactly when the daemon could
not have known of the earlier store: the stand-in lost its answer after storing (the connection dropped), or
answered only after WITHDRAW_SECONDS (the wait of a closing batch for its requests under way), or the modality
sent the instance again after getting no answer (a stopped or killed daemon), or a manifest of the sweeper lists
it (it seals a batch whole when the daemon is gone, or, misconfigured, too early), or a late batch lists it (stored
into a batch after the sweeper sealed it, it is copied into the late batch, and the sealed batch's job may import
the copy left under its prefix, docs/s3-layout.rst). Any other duplicate is a violation.

The short runs are part of `make test`; `make soak` runs them for SOAK_SECONDS (default 3600, split between the
modes) with SOAK_SEED, and SOAK_FORWARDING (on, off, or both, the default) chooses the modes.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import boto3
import pytest
from boto3.dynamodb.conditions import Key
from moto import mock_aws
from moto.stepfunctions.parser.asl.component.common.retry import retrier_decl

from batch_contract.layout import batch_id_from_manifest_key
from batch_contract.manifest import CLOSED_BY_LATE, CLOSED_BY_SWEEPER
from batch_contract.table import (
    BATCH_UNCONFIRMED,
    BY_STATUS_INDEX,
    ENTITY_BATCH,
    STORED_BY_HEALTHIMAGING,
    STORED_BY_STOREDICOM,
    batch_key,
    status_partition,
)
from scp.forwarding.s3_batches import WITHDRAW_SECONDS
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
    manifest_documents,
    manifest_keys,
    moto_clients,
    poll,
    recheck_run,
    reconcile_run,
    s3_fault,
    stow_fault,
    sweeper_run,
)
from tests.functions.workflow import DATASTORE_ID, ROLE_ARN, create_table, load_app, unique
from tests.statemachine.test_import_execution import FUNCTIONS, REGION, create_import_state_machine, serve_functions
from tests.support.healthimaging import HealthImaging, Imported, Rates, Refusal
from tests.support.moto import MotoServer
from tests.support.s3_faults import fault_proxy
from tests.support.stow import NON_PRIMARY as STOW_NON_PRIMARY
from tests.support.stow import REFUSE, WARN, Received, StowStandIn

pytestmark = pytest.mark.integration

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "0"))
SEED = int(os.environ.get("SOAK_SEED", "20261201"))
_MODES = {"off": (False,), "on": (True,), "both": (False, True)}
_SOAK_FORWARDING = os.environ.get("SOAK_FORWARDING", "both")
if _SOAK_FORWARDING not in _MODES:
    raise ValueError(f"SOAK_FORWARDING={_SOAK_FORWARDING!r}: on, off or both")
MODES = _MODES[_SOAK_FORWARDING] if SOAK_SECONDS else _MODES["both"]
SHORT = Plan(seed=SEED, send_seconds=45, instances=300)
# Most batches end with no import job when StoreDICOM stores them, so fewer instances prove as much.
SHORT_FORWARDING = Plan(seed=SEED, send_seconds=30, instances=200)
# The soak at a modality's pace (about five instances a second), with the daemon killed or stopped every minute or so.
SOAK = Plan(
    seed=SEED,
    send_seconds=SOAK_SECONDS,
    instances=None,
    pause_seconds=3.0,
    daemon_fault_every=(20.0, 90.0),
    sweep_every=(5.0, 20.0),
    reconcile_every=(20.0, 90.0),
    stow_fault_every=(3.0, 15.0),
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


def plan_for(forwarding: bool) -> Plan:
    if SOAK_SECONDS:
        return replace(SOAK, send_seconds=SOAK_SECONDS / len(MODES))
    return SHORT_FORWARDING if forwarding else SHORT


def rates_for(forwarding: bool) -> Rates:
    """The faults HealthImaging's import API injects in a run.

    The short run with forwarding, in `make test`, leaves out one that the short run without forwarding and the
    soak in both modes keep: job output that appears only after the workflow stopped waiting (70 to 100 s of
    drain, so that the run keeps to about a minute).
    """
    if forwarding and not SOAK_SECONDS:
        return replace(RATES, very_late_output=0.0)
    return RATES


def _mode_id(forwarding: bool) -> str:
    return "storedicom-forwarding" if forwarding else "import-jobs-only"


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
def whole_path(moto: MotoServer, monkeypatch: pytest.MonkeyPatch, forwarding: bool) -> Iterator[WholePath]:
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
        # As the template sets it from StoreDICOMForwarding: failures are looked up in the data store first.
        "STOREDICOM_FORWARDING": "true" if forwarding else "false",
    }
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        apps = {placeholder: load_app(name, monkeypatch, env) for placeholder, name in FUNCTIONS.items()}
        healthimaging = HealthImaging(s3, DATASTORE_ID, rates_for(forwarding), random.Random(SEED))
        healthimaging.attach(apps["StartImportFunctionArn"].MEDICAL_IMAGING)
        healthimaging.attach(apps["CheckImportFunctionArn"].MEDICAL_IMAGING)
        serve_functions(apps, monkeypatch)
        # Step Functions' retry intervals pass RETRY_TIME_SCALE times as fast: the definition's backoff still
        # decides the order of things (a job's late output against the retries that wait for it), in seconds.
        monkeypatch.setattr(
            retrier_decl, "time", SimpleNamespace(sleep=lambda seconds: time.sleep(seconds * RETRY_TIME_SCALE))
        )
        sfn = boto3.client("stepfunctions", region_name=REGION)
        arn = create_import_state_machine(sfn, unique("import"))
        sweeper = load_app("sweeper", monkeypatch, {**env, "STATE_MACHINE_ARN": arn})
        monkeypatch.setattr(sweeper, "RECHECK_INTERVAL", RECHECK_INTERVAL)
        # The functions that record failures ask the data store, with forwarding on, what they would fail.
        for app in (apps["ProcessResultsFunctionArn"], apps["RecordFailureFunctionArn"], sweeper):
            assert (app.HEALTHIMAGING is not None) == forwarding
            if app.HEALTHIMAGING is not None:
                healthimaging.attach(app.HEALTHIMAGING.client)
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
    document = dict(json.loads(result.stdout))
    assert result.returncode == document["exitCode"], (result.returncode, document["verdict"])
    return document


@pytest.mark.parametrize("forwarding", MODES, ids=[_mode_id(on) for on in MODES])
def test_every_acknowledged_instance_reaches_one_truthful_end_state(
    whole_path: WholePath, tmp_path: Path, capsys: pytest.CaptureFixture[str], forwarding: bool
) -> None:
    plan = plan_for(forwarding)
    rng = random.Random(plan.seed)
    path = whole_path
    ledger = Ledger()
    chaos = Chaos(rng)
    standin = StowStandIn(
        region=REGION,
        datastore_id=DATASTORE_ID,
        verdict=verdict_of(path.healthimaging),
        on_stored=lambda stored, primary: path.healthimaging.hold(
            stored.study_instance_uid, stored.series_instance_uid, stored.sop_instance_uid, stored.image_set_id, primary
        ),
    )
    with fault_proxy(path.moto.endpoint) as proxy, running(standin if forwarding else None):
        receivers = Receivers(tmp_path, daemon_settings(path.bucket, proxy, standin if forwarding else None, tmp_path))
        events = EventBridge(path.sfn, path.arn, path.s3, path.bucket, plan.duplicate_events, plan.lost_events, rng)
        events.start()
        modality = Modality(plan, ledger, lambda: receivers.port, tmp_path / "sent", rng)
        (tmp_path / "sent").mkdir()
        chaos.every("daemon", plan.daemon_fault_every, receivers.fault)
        chaos.every("s3", plan.s3_fault_every, s3_fault(proxy))
        if forwarding:
            chaos.every("storedicom", plan.stow_fault_every, stow_fault(standin))
        eager_sweeper = sweeper_run(path.sweeper, path.bucket, SWEEP_MIN_AGE_SECONDS, eager=True)
        chaos.every("sweeper", plan.sweep_every, eager_sweeper)
        eager_reconcile = reconcile_run(path.sweeper, path.bucket, path.arn, SWEEP_MIN_AGE_SECONDS, eager=True)
        chaos.every("reconcile", plan.reconcile_every, eager_reconcile)
        rechecked: set[str] = set()
        # With forwarding on, the re-check asks HealthImaging, whose injected faults may outlast its attempts: the
        # sweeper's next run asks again.
        recheck = recheck_run(path.sweeper, path.bucket, rechecked)
        chaos.every("recheck", plan.recheck_every, recheck, expected=frozenset({"HealthImagingUnreadable"}))
        started = time.monotonic()
        modality.start()
        while time.monotonic() - started < plan.send_seconds and not modality.errors:
            if plan.instances is not None and len(ledger.acknowledged) >= plan.instances:
                break
            time.sleep(0.5)
        modality.stop()
        chaos.stop()
        assert not modality.errors, "\n".join(modality.errors)
        assert not chaos.errors, "faults or sweeper passes that failed unexpectedly:\n" + "\n".join(chaos.errors)
        proxy.heal()
        sent_for = time.monotonic() - started

        # Drain: the daemon closes its batches, the sweeper seals what killed daemons left open, every manifest
        # becomes a registered batch (by its event or the reconcile pass), every execution ends. All within the
        # drain time.
        sweep = sweeper_run(path.sweeper, path.bucket, SWEEP_MIN_AGE_SECONDS)
        reconcile = reconcile_run(path.sweeper, path.bucket, path.arn, SWEEP_MIN_AGE_SECONDS)
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
    documents = manifest_documents(path.s3, path.bucket)
    failed_jobs = {job.job_id: str(job.message) for job in path.healthimaging.jobs() if job.status == "FAILED"}
    side = HealthImagingSide(
        path.healthimaging.imported,
        stored_by_standin(standin),
        path.healthimaging.holders,
        documents,
        ledger,
        path.healthimaging.refused,
        failed_jobs,
        path.healthimaging.problem,
    )

    failed_reasons: Counter[str] = Counter()
    violations: list[str] = []
    for sop in sorted(ledger.acknowledged):
        instance = seen.get(sop)
        if instance is None:
            violations.append(f"{sop}: acknowledged, not reported at all (in {side.listed[sop]} manifests)")
            continue
        violations += side.check(sop, instance)
        if instance["state"] == FAILED:
            failed_reasons[_reason_kind(instance.get("reason") or "")] += 1
        if side.listed[sop] == 0:
            violations.append(f"{sop}: acknowledged, listed in no manifest")
    # Refused every time it was sent, whether the modality gave up or the run ended before it sent it again; one
    # sent again without an answer may have been stored by then, as the modality cannot know.
    only_refused = {sop for sop in ledger.refused if not ledger.unanswered[sop]} | ledger.given_up
    for sop in sorted(only_refused - ledger.acknowledged):
        if seen.get(sop, {}).get("state") in (IMPORTED, NON_PRIMARY):
            violations.append(f"{sop}: refused to the modality {ledger.refused[sop]} times, reported imported")
    duplicates = side.duplicates(ledger.study_of)
    violations += [f"{sop}: {why}" for sop, why in sorted(duplicates.items()) if why.startswith("stored")]
    violations += receivers.bad_exits()  # a stopped daemon drains and exits 0 (docs/architecture.rst)

    # The console command reports what the report model computed, instance by instance, for a sample of studies:
    # those with the most different states first, so that failed and non-primary instances are among them.
    def variety(study: str) -> tuple[int, str]:
        return -len({instance["state"] for instance in reports[study]["instances"]}), study

    for study in sorted(reports, key=variety)[:3]:
        console = console_report(path, study)
        assert console["counts"] == reports[study]["counts"], study
        shown, computed = _by_instance(console), _by_instance(reports[study])
        differing = sorted(sop for sop in shown.keys() | computed.keys() if shown.get(sop) != computed.get(sop))
        assert not differing, [(sop, shown.get(sop), computed.get(sop)) for sop in differing[:5]]

    acknowledged = [instance for sop, instance in seen.items() if sop in ledger.acknowledged]
    states = Counter(instance["state"] for instance in acknowledged)
    faults = Counter(chaos.injected)
    faults.update({f"HealthImaging {kind}": n for kind, n in path.healthimaging.faults.items()})
    faults.update(Counter(f"S3 proxy {line.rsplit(' ', 1)[-1]}" for line in proxy.faulted))
    faults.update({f"StoreDICOM stand-in {kind}": n for kind, n in standin.faults.items()})
    faults.update({f"StoreDICOM stand-in answered HTTP {code}": n for code, n in standin.requests.items()})
    faults["duplicate events"] = events.duplicated
    faults["lost events"] = events.lost
    late_batches = len(receivers.logs("batch sealed elsewhere without some objects: copied into a batch of their own"))
    summary = {
        "seed": plan.seed,
        "StoreDICOM forwarding": "on" if forwarding else "off",
        "sent seconds": round(sent_for),
        "drain seconds": round(drain_seconds),
        "drained": bool(last),
        "instances created": len(ledger.study_of),
        "acknowledged": len(ledger.acknowledged),
        "refused, given up": len(ledger.given_up - ledger.acknowledged),
        "refused, not given up, never acknowledged": len(set(ledger.refused) - ledger.acknowledged - ledger.given_up),
        "never answered": len(ledger.never_acknowledged() - ledger.given_up),
        "imported": states[IMPORTED],
        "non-primary": states[NON_PRIMARY],
        "failed": states[FAILED],
        "failed by reason": dict(failed_reasons),
        "recorded stored by StoreDICOM": sum(1 for i in acknowledged if i.get("storedBy") == STORED_BY_STOREDICOM),
        "recorded found by asking HealthImaging": sum(
            1 for i in acknowledged if i.get("storedBy") == STORED_BY_HEALTHIMAGING
        ),
        "recorded imported by a job": sum(
            1 for i in acknowledged if i["state"] in (IMPORTED, NON_PRIMARY) and not i.get("storedBy")
        ),
        "instances the stand-in stored": len(side.standin),
        "batches": len(batch_ids(path.s3, path.bucket)),
        "manifests": len(documents),
        "manifests of objects StoreDICOM stored (no import job)": sum(1 for d in documents if _stored_by_storedicom(d)),
        "fallback batches": sum(1 for d in documents if d.get("fallbackFrom")),
        "late batches (sealed elsewhere)": late_batches,
        "instances in a sealed batch and in its fallback batch": len(side.sealed_and_split),
        "executions": len(_executions(path)),
        "unconfirmed batches recorded by the re-check": len(rechecked),
        "executions started by reconcile": sum(1 for arn in _executions(path) if ":reconcile-" in arn),
        "import jobs": len(path.healthimaging.jobs()),
        "daemons started": len(receivers.started),
        "daemon exits": dict(Counter(f"{kind}: {status}" for kind, status in receivers.exits)),
        "duplicates (stored more than once), by why": dict(
            Counter(why if why.startswith("allowed") else "not allowed (a violation)" for why in duplicates.values())
        ),
        "faults injected": dict(sorted(faults.items())),
        "violations": len(violations),
    }
    with capsys.disabled():
        sys.stdout.write("\nend-to-end invariant: " + json.dumps(summary, indent=1) + "\n")
    assert ledger.acknowledged, "nothing was acknowledged: the run proves nothing"
    assert standin.problems == [], f"the stand-in refused what the daemon sent: {standin.problems[:5]}"
    if forwarding:
        assert side.standin, "StoreDICOM stored nothing: the forwarding run proves nothing"
    assert not violations, f"{len(violations)} violations, first ones:\n" + "\n".join(violations[:25])
    assert last, f"not drained within {plan.drain_seconds} s: {last!r}"


def verdict_of(healthimaging: HealthImaging) -> Any:
    """The stand-in judges an instance as the import jobs do: one data store, one answer for the same data."""
    words = {"customer": REFUSE, "nonprimary": STOW_NON_PRIMARY, "warning": WARN}

    def verdict(sop: str) -> str | None:
        return words.get(healthimaging.problem(sop) or "")

    return verdict


@contextmanager
def running(standin: StowStandIn | None) -> Iterator[None]:
    if standin is None:
        yield
        return
    standin.start()
    try:
        yield
    finally:
        standin.stop()


def stored_by_standin(standin: StowStandIn) -> dict[str, list[Received]]:
    stored: dict[str, list[Received]] = {}
    with standin.lock:
        for item in standin.received:
            stored.setdefault(item.sop_instance_uid, []).append(item)
    return stored


def _stored_by_storedicom(document: dict[str, Any]) -> bool:
    return bool(document["objects"]) and all(entry.get("storeDICOM") for entry in document["objects"])


@dataclass
class HealthImagingSide:
    """What HealthImaging holds, by either path, beside what the manifests say: the truth records are checked by."""

    jobs: dict[str, Imported]  # imported by import jobs (the responder's truth)
    standin: dict[str, list[Received]]  # stored by StoreDICOM, each time
    holders: Callable[[str], dict[str, bool]]  # what the data store's search finds: image set -> isPrimary
    documents: list[dict[str, Any]]
    ledger: Ledger
    refused: dict[str, dict[str, Refusal]]  # per instance, every import job that failed it: its failure line
    failed_jobs: dict[str, str]  # import jobs that FAILED whole -> their message
    problem: Callable[[str], str | None]  # what the data store finds wrong with an instance, by either path
    listed: Counter[str] = field(init=False)
    closed_by: dict[str, set[str]] = field(init=False)
    # Instances whose one received copy is listed twice: in the sweeper's manifest of a batch it sealed whole and in
    # the fallback batch the daemon split from that batch (fallback batch id -> sealed batch id, per instance).
    sealed_and_split: dict[str, tuple[str, str]] = field(init=False)

    def __post_init__(self) -> None:
        self.listed = listed_in_manifests(self.documents)
        self.closed_by = {}
        sealed: dict[str, set[str]] = {}
        for document in self.documents:
            for entry in document["objects"]:
                sop = str(entry["sopInstanceUid"])
                self.closed_by.setdefault(sop, set()).add(str(document["closedBy"]))
                if document["closedBy"] == CLOSED_BY_SWEEPER:
                    sealed.setdefault(sop, set()).add(str(document["batchId"]))
        self.sealed_and_split = {
            str(entry["sopInstanceUid"]): (str(document["batchId"]), str(document["fallbackFrom"]))
            for document in self.documents
            if document.get("fallbackFrom")
            for entry in document["objects"]
            if document["fallbackFrom"] in sealed.get(str(entry["sopInstanceUid"]), set())
        }

    def check(self, sop: str, instance: dict[str, Any]) -> list[str]:
        """What is untrue in one acknowledged instance's reported state."""
        state = instance["state"]
        if state in PENDING:
            return [f"{sop}: still {state} after the drain time (batch {instance['batchId']})"]
        if state in (IMPORTED, NON_PRIMARY) and instance.get("storedBy") == STORED_BY_STOREDICOM:
            stored = self.standin.get(sop, [])
            if not stored:
                return [f"{sop}: reported {state} by StoreDICOM, which never stored it"]
            if instance["imageSetId"] not in {item.image_set_id for item in stored}:
                image_sets = sorted({item.image_set_id for item in stored})
                return [f"{sop}: reported {state} by StoreDICOM in {instance['imageSetId']}, it stored {image_sets}"]
            return self._verdict_kept(sop, instance)
        if state in (IMPORTED, NON_PRIMARY) and instance.get("storedBy") == STORED_BY_HEALTHIMAGING:
            holders, image_set = self.holders(sop), instance["imageSetId"]
            if image_set not in holders:
                return [f"{sop}: reported {state} in {image_set} by asking HealthImaging, held in {holders}"]
            if (state == IMPORTED) != holders[image_set]:
                return [f"{sop}: reported {state}, but image set {image_set} has isPrimary {holders[image_set]}"]
            return []
        if state in (IMPORTED, NON_PRIMARY):
            held = self.jobs.get(sop)
            if held is None:
                return [f"{sop}: reported {state} by an import job, no import job imported it"]
            if instance["imageSetId"] != held.image_set_id or (state == IMPORTED) != held.is_primary:
                return [f"{sop}: reported {state} in {instance['imageSetId']}, HealthImaging has {held}"]
            if instance.get("jobId") not in held.jobs:
                return [f"{sop}: reported imported by job {instance.get('jobId')}, imported by jobs {held.jobs}"]
            return self._verdict_kept(sop, instance)
        if state == FAILED:
            problems = []
            if sop in self.jobs:
                twice = self.sealed_and_split.get(sop)
                where = f"; listed in fallback batch {twice[0]} and in {twice[1]}, sealed whole" if twice else ""
                problems.append(f"{sop}: reported failed, an import job imported it ({self.jobs[sop]}{where})")
            if sop in self.standin:
                stored = self.standin[sop]
                lost = sum(1 for item in stored if item.answer_lost or item.answer_seconds > WITHDRAW_SECONDS)
                problems.append(
                    f"{sop}: reported failed in batch {instance['batchId']} ({instance.get('reason')}), StoreDICOM "
                    f"stored it {len(stored)} times ({lost} answers lost or late); listed in manifests closed by "
                    f"{sorted(self.closed_by.get(sop, set()))}"
                )
            return problems + self._failure_reason_true(sop, instance)
        return [f"{sop}: ended {state}, neither imported nor failed"]

    def _verdict_kept(self, sop: str, instance: dict[str, Any]) -> list[str]:
        """An instance StoreDICOM or an import job stored is recorded as it was stored: into a non-primary image set
        (its metadata conflicts), with a warning (the record's reason), or cleanly."""
        problem, state, reason = self.problem(sop), instance["state"], instance.get("reason")
        how = f"stored by {instance.get('storedBy') or 'import job ' + str(instance.get('jobId'))}"
        where = f"image set {instance.get('imageSetId')} (holders {self.holders(sop)})"
        # StoreDICOM's answer is not documented to say whether an instance went into a primary image set, so the
        # product records what StoreDICOM stored "imported" (docs/forwarding.rst, "Limits of this release").
        unknowable = instance.get("storedBy") == STORED_BY_STOREDICOM and (state, problem) == (IMPORTED, "nonprimary")
        if (state == NON_PRIMARY) != (problem == "nonprimary") and not unknowable:
            return [f"{sop}: reported {state}, {how} into {where}, HealthImaging found {problem or 'nothing'} wrong"]
        if bool(reason) != (problem == "warning"):
            warned = problem == "warning"
            return [f"{sop}: reported {state} with reason {reason!r}, {how}, HealthImaging warned: {warned}"]
        return []

    def _failure_reason_true(self, sop: str, instance: dict[str, Any]) -> list[str]:
        """A failed instance's reason says what failed it: the failure line of the import job the record names
        (HealthImaging's own words), that job's failure as a whole, or the workflow's failure."""
        reason, job_id = str(instance.get("reason") or ""), instance.get("jobId")
        # An instance can be in more than one batch (the sweeper sealed one whole, the daemon split its fallback
        # batch from it): the reason is the named job's.
        refusal = self.refused.get(sop, {}).get(str(job_id))
        if not reason:
            return [f"{sop}: failed without a reason"]
        if refusal is not None:
            if refusal.exception_type not in reason or refusal.message not in reason:
                return [f"{sop}: failed with {reason!r}, import job {job_id} failed it with {refusal}"]
            return []
        if job_id in self.failed_jobs:
            if f"{job_id} FAILED: {self.failed_jobs[job_id]}" not in reason:
                return [f"{sop}: failed with {reason!r}, import job {job_id} FAILED: {self.failed_jobs[job_id]}"]
            return []
        claimed = re.match(r"import job (\S+) FAILED: ", reason)
        if claimed:
            return [f"{sop}: failed with {reason!r}, import job {claimed[1]} did not fail"]
        if reason != NO_OUTCOME_REASON and not WORKFLOW_FAILURE.match(reason):
            return [f"{sop}: failed for no known reason: {reason!r} (job {job_id}, refused by {self.refused.get(sop)})"]
        return []

    def duplicates(self, study_of: dict[str, str]) -> dict[str, str]:
        """Every instance stored more than once, with what at-least-once delivery allows it for, or, starting
        with "stored", why it is a violation."""
        found = {}
        for sop in sorted(set(self.standin) | set(self.jobs)):
            by_stow = self.standin.get(sop, [])
            by_jobs = self.jobs[sop].jobs if sop in self.jobs else []
            if len(by_stow) + len(by_jobs) < 2:
                continue
            if any(item.answer_lost for item in by_stow):
                found[sop] = "allowed: StoreDICOM's answer lost after storing"
            elif any(item.answer_seconds > WITHDRAW_SECONDS for item in by_stow):
                found[sop] = "allowed: StoreDICOM answered after its batch stopped waiting"
            elif self.ledger.unanswered[sop]:
                found[sop] = "allowed: sent again after no answer (the daemon stopped or killed)"
            elif CLOSED_BY_SWEEPER in self.closed_by.get(sop, set()):
                found[sop] = "allowed: in a batch the sweeper sealed whole"
            elif CLOSED_BY_LATE in self.closed_by.get(sop, set()):
                found[sop] = "allowed: in a late batch, its copy left under the batch the sweeper sealed"
            else:
                found[sop] = (
                    f"stored {len(by_stow)} times by StoreDICOM and by import jobs {by_jobs}, with no lost answer, "
                    f"re-send or sealed batch to allow it (study {study_of.get(sop)}, manifests closed by "
                    f"{sorted(self.closed_by.get(sop, set()))})"
                )
        return found


# The reasons a failed instance can carry besides an import job's own words (functions/common/job_results.py):
# the job's output did not mention the file, or the workflow failed (functions/record_failure/app.py: the error a
# Catch caught, "Error: cause"). The workflow's errors are the ones the product raises by name, those its Retry
# and Catch name in statemachines/import.asl.json, and Step Functions' own; an unforeseen Python exception (a bug
# that failed the batch) is none of these.
NO_OUTCOME_REASON = "the import job reported no outcome for this file"
WORKFLOW_FAILURE = re.compile(
    r"(States\.\w+|Lambda\.\w+|Sandbox\.Timedout|ImportThrottled|ImportQuotaExceeded|ImportRejected|ImportJobStuck"
    r"|HealthImagingServerError|HealthImagingUnreachable|HealthImagingUnreadable|JobOutputNotReady|DuplicateBatch"
    r"|StoredTagsUnreadable|ThrottlingException|ProvisionedThroughputExceededException|RequestLimitExceeded)(: |$)"
)


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


def _by_instance(report: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    """What a report says of each instance: its state, where HealthImaging holds it, by what, and why."""
    return {
        instance["sopInstanceUid"]: (
            instance["state"],
            instance.get("imageSetId"),
            instance.get("storedBy"),
            instance.get("reason"),
        )
        for instance in report["instances"]
    }


def _reason_kind(reason: str) -> str:
    """The leading words of a failure reason, without the ids that differ per instance."""
    return re.sub(r"[0-9a-f]{32}", "<id>", reason)[:80]
