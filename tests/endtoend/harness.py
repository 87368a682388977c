"""The whole path under seeded faults: modality, daemon (S3 mode), S3, manifests, the workflow, HealthImaging.

Real parts: the daemon as a child process in S3 mode behind the S3 fault proxy in front of moto_server; the
sweeper's and the workflow functions' own code; statemachines/import.asl.json executed by moto's Step Functions
interpreter in this process with the real handlers as its Lambda functions (as in
tests/statemachine/test_import_execution.py), their S3 and DynamoDB on the same moto_server; HealthImaging's import
API answered per request and checked against botocore's model (tests/support/healthimaging.py). What stands in for
EventBridge starts an execution for every manifest that appears, and sometimes a second one, or never.

The daemon runs in either of the stack's two modes (the template's StoreDICOMForwarding): forwarding off, every
batch imported by a job; or forwarding on (DATASTORE_ID and HEALTHIMAGING_DICOMWEB_URL), each object sent to the
StoreDICOM stand-in (tests/support/stow.py, which checks SigV4 and the body's framing) once S3 has confirmed it,
and the import jobs taking what StoreDICOM did not store. The stand-in judges each instance as the import jobs do
(``HealthImaging.problem``) and is faulted in periods: 503 and 429 answers, dropped and held connections, answers
lost after storing, slow answers.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
import traceback
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from batch_contract.layout import (
    BATCHES_PREFIX,
    MANIFESTS_PREFIX,
    batch_id_from_manifest_key,
    batch_id_from_prefix,
    batch_id_time_part,
)
from tests.support.corpus import CT_IMAGE_STORAGE, make_instance
from tests.support.daemon import Daemon, start_daemon
from tests.support.moto import CREDENTIALS, MotoServer
from tests.support.s3_faults import HANG, INTERNAL_ERROR, SLOW_DOWN, FaultProxy
from tests.support.stow import StowStandIn

SUCCESS = 0x0000
# ECS's stopTimeout on Fargate: a daemon not gone by then is killed.
SHUTDOWN_LIMIT_SECONDS = 120
_RECENT_SECONDS = 600
EVENT = Path(__file__).resolve().parents[1] / "statemachine" / "events" / "manifest-created.json"


@dataclass(frozen=True)
class Plan:
    """How long and how hard: the short run in `make test`, the long one in `make soak`."""

    seed: int
    send_seconds: float
    instances: int | None  # stop after this many acknowledged (None: until send_seconds)
    senders: int = 3
    per_association: int = 6
    studies_in_flight: int = 6
    instances_per_study: int = 40
    pause_seconds: float = 0.0  # between associations of one sender: the soak's pace
    daemon_fault_every: tuple[float, float] = (4.0, 9.0)
    s3_fault_every: tuple[float, float] = (0.5, 3.0)
    sweep_every: tuple[float, float] = (1.0, 4.0)
    reconcile_every: tuple[float, float] = (2.0, 8.0)
    recheck_every: tuple[float, float] = (2.0, 8.0)
    stow_fault_every: tuple[float, float] = (1.0, 4.0)  # periods of trouble at the StoreDICOM stand-in
    duplicate_events: float = 0.15
    lost_events: float = 0.05  # manifests whose event never starts an execution: the reconcile pass must
    drain_seconds: float = 180.0  # an output that appears after the workflow stopped waiting takes up to 100 s


@dataclass
class Ledger:
    """What the modality was told, per SOP Instance UID."""

    study_of: dict[str, str] = field(default_factory=dict)
    acknowledged: set[str] = field(default_factory=set)
    refused: Counter[str] = field(default_factory=Counter)  # explicit failure statuses, per instance
    given_up: set[str] = field(default_factory=set)  # refused three times: the modality stops trying
    unanswered: Counter[str] = field(default_factory=Counter)  # no answer at all (association lost)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def never_acknowledged(self) -> set[str]:
        return set(self.study_of) - self.acknowledged


class Modality:
    """Senders that behave like modalities: resend what got no answer, retry a failure status twice, then stop."""

    def __init__(self, plan: Plan, ledger: Ledger, port: Callable[[], int], workdir: Path, rng: random.Random) -> None:
        self._plan = plan
        self._ledger = ledger
        self._port = port
        self._workdir = workdir
        self._rng = rng
        self._rng_lock = threading.Lock()
        self._pending: list[Path] = []
        self._uid_of: dict[Path, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._studies: list[tuple[str, str, int]] = []  # study, series, instances still to create
        self.associations = 0
        # A sender that died: what it sent after is missing from the ledger, so the run must fail, not shrink.
        self.errors: list[str] = []

    def start(self) -> None:
        for number in range(self._plan.senders):
            thread = threading.Thread(target=self._sender, args=(f"MOD{number:02d}",), name=f"sender-{number}")
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
            if thread.is_alive():
                self.errors.append(f"{thread.name} still sending 60 s after the stop")

    def _sender(self, calling: str) -> None:
        try:
            self._run(calling)
        except BaseException:
            self.errors.append(f"{threading.current_thread().name} died: {traceback.format_exc()}")
            raise

    def _next_files(self) -> list[Path]:
        with self._lock:
            while len(self._pending) < self._plan.per_association:
                if not self._create():
                    break
            with self._rng_lock:
                self._rng.shuffle(self._pending)
            count = self._plan.per_association
            chosen, self._pending = self._pending[:count], self._pending[count:]
            return chosen

    def _create(self) -> bool:
        """One new instance of a study in flight; new studies start as old ones are complete."""
        while len(self._studies) < self._plan.studies_in_flight:
            self._studies.append((generate_uid(), generate_uid(), self._plan.instances_per_study))
        with self._rng_lock:
            index = self._rng.randrange(len(self._studies))
        study, series, left = self._studies[index]
        sop = generate_uid()
        path = make_instance(self._workdir, pixel_bytes=1024, study_uid=study, series_uid=series, sop_instance_uid=sop)
        self._uid_of[path] = sop
        with self._ledger.lock:
            self._ledger.study_of[sop] = study
        if left <= 1:
            self._studies.pop(index)
        else:
            self._studies[index] = (study, series, left - 1)
        self._pending.append(path)
        return True

    def _give_back(self, files: list[Path]) -> None:
        with self._lock:
            self._pending.extend(files)

    def _run(self, calling: str) -> None:
        while not self._stop.is_set():
            files = self._next_files()
            statuses = self._send(calling, files)
            again = []
            with self._ledger.lock:
                for path, status in zip(files, statuses, strict=True):
                    sop = self._uid_of[path]
                    if status == SUCCESS:
                        self._ledger.acknowledged.add(sop)
                        self._ledger.given_up.discard(sop)
                    elif status is None:
                        self._ledger.unanswered[sop] += 1
                        if sop not in self._ledger.acknowledged:
                            again.append(path)
                    else:
                        self._ledger.refused[sop] += 1
                        if self._ledger.refused[sop] >= 3:
                            self._ledger.given_up.add(sop)
                        else:
                            again.append(path)
            self._give_back(again)
            if statuses and all(status is None for status in statuses):
                self._stop.wait(0.2)  # the daemon is restarting
            elif self._plan.pause_seconds:
                self._stop.wait(self._plan.pause_seconds)

    def _send(self, calling: str, files: list[Path]) -> list[int | None]:
        ae = AE(ae_title=calling)
        ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 10, 20, 20
        statuses: list[int | None] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                association = ae.associate("127.0.0.1", self._port(), ae_title="STORESCP")
            except (OSError, RuntimeError):
                return [None] * len(files)
            self.associations += 1
            try:
                for path in files:
                    if not association.is_established:
                        statuses.append(None)
                        continue
                    try:
                        answer = association.send_c_store(path)
                    except (OSError, RuntimeError, ValueError):
                        answer = None
                    statuses.append(int(answer.Status) if answer is not None and "Status" in answer else None)
            finally:
                if association.is_established:
                    association.release()
        return statuses


class Chaos:
    """Background faults at seeded random moments; each kind counted in ``injected``.

    An action may fail only with the exceptions ``expected`` names for it (an error the injected faults cause, which
    the next run of the action outlives); any other exception is a bug of the harness or of the product's code it
    runs, kept in ``errors`` to fail the run. Names, not classes: the functions' modules are loaded once per test.
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.injected: Counter[str] = Counter()
        self.errors: list[str] = []

    def every(
        self,
        name: str,
        interval: tuple[float, float],
        action: Callable[[random.Random], str | None],
        expected: frozenset[str] = frozenset(),
    ) -> None:
        rng = random.Random(self._rng.random())

        def loop() -> None:
            while not self._stop.wait(rng.uniform(*interval)):
                try:
                    kind = action(rng)
                except Exception as error:  # one failed injection must not end the faults of this kind
                    kind = f"{name} failed: {type(error).__name__}"
                    if type(error).__name__ not in expected:
                        self.errors.append(f"{name}: {traceback.format_exc()}")
                if kind:
                    self.injected[kind] += 1

        thread = threading.Thread(target=loop, name=f"chaos-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)


class Receivers:
    """The daemon, killed (SIGKILL) or stopped (SIGTERM) at random moments and started again on the same port.

    How each daemon ended is kept in ``exits``: a stopped one must have drained and exited 0, as ECS expects of a
    task it stops (docs/architecture.rst); a killed one's status says nothing, and one found gone before its fault
    exited by itself.
    """

    def __init__(self, workdir: Path, settings: dict[str, str | None]) -> None:
        self._workdir = workdir
        self._settings = settings
        self._lock = threading.Lock()
        self.started: list[Daemon] = []
        self.exits: list[tuple[str, int]] = []  # (how it was ended, its exit status), one per daemon ended
        self.current = self._start(None)

    def _start(self, port: int | None) -> Daemon:
        daemon = start_daemon(self._workdir, storage_dir=self._workdir / "spool", port=port, **self._settings)
        self.started.append(daemon)
        return daemon

    @property
    def port(self) -> int:
        return self.current.port

    def fault(self, rng: random.Random) -> str:
        with self._lock:
            daemon = self.current
            kind = "SIGKILL" if len(self.started) % 2 else "SIGTERM"
            if daemon.process.poll() is not None:
                kind = "exited by itself"
            daemon.signal(signal.SIGKILL if kind == "SIGKILL" else signal.SIGTERM)
            try:
                # The drain, then up to a minute more for the last manifests while S3 is faulted.
                status = daemon.wait(SHUTDOWN_LIMIT_SECONDS)
            except subprocess.TimeoutExpired:
                daemon.process.kill()  # as ECS does after stopTimeout
                status = daemon.wait(30)
                kind += " (killed after the stop timeout)"
            self.exits.append((kind, status))
            self.current = self._start(daemon.port)
            return f"daemon {kind}"

    def stop(self) -> None:
        with self._lock:
            running = self.current.process.poll() is None
            status = self.current.stop()
            self.exits.append(("SIGTERM at the end" if running else "exited by itself", status))

    def bad_exits(self) -> list[str]:
        """Every daemon that did not end as it should have: a stopped one exits 0 in time, none exits by itself."""
        return [
            f"daemon {kind}: exit status {status}"
            for kind, status in self.exits
            if kind == "exited by itself" or (not kind.startswith("SIGKILL") and status != 0)
        ]

    def logs(self, message: str) -> list[dict[str, Any]]:
        return [entry for daemon in self.started for entry in daemon.log_messages(message)]


def s3_fault(proxy: FaultProxy) -> Callable[[random.Random], str | None]:
    """Throttling, internal errors and hangs on the daemon's S3 writes; the proxy counts each request it faults."""

    def inject(rng: random.Random) -> str | None:
        draw = rng.random()
        if draw < 0.35:
            proxy.fail(SLOW_DOWN, times=rng.randint(1, 3))
        elif draw < 0.55:
            proxy.fail(INTERNAL_ERROR, times=rng.randint(1, 2))
        elif draw < 0.7:
            proxy.fail(HANG)
            time.sleep(rng.uniform(0.5, 2.0))
            proxy.heal()
        else:
            proxy.heal()
        return None

    return inject


def stow_fault(standin: StowStandIn) -> Callable[[random.Random], str | None]:
    """A period of StoreDICOM trouble at the stand-in, then the stand-in healed. Slow answers sometimes take longer
    than a closing batch waits for its requests under way (WITHDRAW_SECONDS, 10 s), so that a batch closes while
    StoreDICOM is still storing some of its instances; held requests are dropped unstored after up to 14 s."""

    def inject(rng: random.Random) -> str | None:
        draw = rng.random()
        value: object
        if draw < 0.15:
            kind, setting, value = "503 period", "answer_status", 503
        elif draw < 0.3:
            kind, setting, value = "429 period", "answer_status", 429
        elif draw < 0.4:
            kind, setting, value = "dropped connections", "drop_before_storing", True
        elif draw < 0.5:
            kind, setting, value = "held connections", "hang_seconds", rng.uniform(2.0, 14.0)
        elif draw < 0.6:
            kind, setting, value = "answers lost after storing", "close_without_answer", True
        elif draw < 0.75:
            slow = rng.uniform(0.5, 3.0) if rng.random() < 0.8 else rng.uniform(10.5, 14.0)
            kind, setting, value = "slow answers", "latency_seconds", slow
        else:
            return None
        setattr(standin, setting, value)
        time.sleep(rng.uniform(0.5, 3.0))
        standin.answer_status, standin.drop_before_storing, standin.close_without_answer = None, False, False
        standin.hang_seconds = standin.latency_seconds = 0.0
        return f"StoreDICOM {kind}"

    return inject


class EventBridge:
    """S3 Object Created under manifests/ -> StartExecution: sometimes twice, sometimes never (a lost trigger)."""

    def __init__(
        self,
        sfn: Any,
        state_machine_arn: str,
        s3: Any,
        bucket: str,
        duplicates: float,
        lost: float,
        rng: random.Random,
    ) -> None:
        self._sfn, self._arn, self._s3, self._bucket = sfn, state_machine_arn, s3, bucket
        self._duplicates, self._lost = duplicates, lost
        self._rng = rng
        self.seen: set[str] = set()
        self.executions: list[str] = []
        self.duplicated = 0
        self.lost = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eventbridge", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            # Every manifest of this run names a batch opened minutes ago at most (the sweeper's minimum age is
            # seconds here), so the listing starts there instead of growing with the run.
            since = datetime.now(UTC) - timedelta(seconds=_RECENT_SECONDS)
            for key in manifest_keys(self._s3, self._bucket, since):
                if key in self.seen:
                    continue
                self.seen.add(key)
                if self._rng.random() < self._lost:
                    self.lost += 1
                    continue
                self._start(key)
                if self._rng.random() < self._duplicates:
                    self.duplicated += 1
                    self._start(key)

    def _start(self, key: str) -> None:
        batch_id = batch_id_from_manifest_key(key)
        event = EVENT.read_text().replace("BUCKET", self._bucket).replace("BATCH", batch_id)
        started = self._sfn.start_execution(stateMachineArn=self._arn, name=uuid.uuid4().hex, input=event)
        self.executions.append(str(started["executionArn"]))

    def running(self) -> list[str]:
        """Every running execution of the state machine: these events' and the reconcile pass's."""
        pages = self._sfn.get_paginator("list_executions").paginate(stateMachineArn=self._arn, statusFilter="RUNNING")
        return [str(execution["executionArn"]) for page in pages for execution in page["executions"]]


def manifest_keys(s3: Any, bucket: str, since: datetime | None = None) -> list[str]:
    after = {"StartAfter": f"{MANIFESTS_PREFIX}{batch_id_time_part(since)}"} if since else {}
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=MANIFESTS_PREFIX, **after)
    return [entry["Key"] for page in pages for entry in page.get("Contents", [])]


def batch_ids(s3: Any, bucket: str) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=BATCHES_PREFIX, Delimiter="/")
    return {batch_id_from_prefix(p["Prefix"]) for page in pages for p in page.get("CommonPrefixes", [])}


def manifest_documents(s3: Any, bucket: str) -> list[dict[str, Any]]:
    return [json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read()) for key in manifest_keys(s3, bucket)]


def listed_in_manifests(documents: list[dict[str, Any]]) -> Counter[str]:
    """How many manifests list each SOP Instance UID."""
    return Counter(str(entry["sopInstanceUid"]) for document in documents for entry in document["objects"])


def moto_clients(moto: MotoServer) -> tuple[Any, Any]:
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    return session.client("s3", endpoint_url=moto.endpoint), session.resource("dynamodb", endpoint_url=moto.endpoint)


def daemon_settings(
    bucket: str, proxy: FaultProxy | None, standin: StowStandIn | None = None, workdir: Path | None = None
) -> dict[str, str | None]:
    """The daemon's environment: S3 through ``proxy``, small batches, a short window and a short deadline; with
    ``standin``, StoreDICOM forwarding to it, signed with its credentials (moto_server accepts any).

    The functions' variables in this process's environment are not the receiver task's: without ``standin`` the
    daemon has no DATASTORE_ID, as the receivers of a stack with StoreDICOMForwarding disabled.
    """
    forwarding: dict[str, str | None] = {"DATASTORE_ID": None}
    if standin is not None:
        assert workdir is not None and standin.region == CREDENTIALS["AWS_REGION"], "one Region for S3 and StoreDICOM"
        forwarding = {**standin.daemon_settings(workdir), "AWS_SESSION_TOKEN": None}
    return {
        "DICOM_BUCKET": bucket,
        **CREDENTIALS,
        **forwarding,
        **({"AWS_ENDPOINT_URL": proxy.endpoint} if proxy else {}),
        "BATCH_WINDOW_SECONDS": "1",
        "BATCH_MAX_FILES": "25",
        "DIMSE_TIMEOUT": "6",
        "SHUTDOWN_GRACE_SECONDS": "5",
        "LOG_LEVEL": "INFO",
    }


def sweeper_run(
    sweeper: ModuleType, bucket: str, min_age_seconds: int, eager: bool = False
) -> Callable[[random.Random], str | None]:
    """The sweeper's own ``sweep``; ``eager`` runs sometimes use a minimum age shorter than the daemon's window
    and its upload deadline, as a misconfigured stack would, so that it seals batches a live daemon still fills."""

    def run(rng: random.Random) -> str | None:
        min_age = rng.choice([1, 2, min_age_seconds]) if eager else min_age_seconds
        closed = sweeper.sweep(sweeper.S3, bucket, datetime.now(UTC), min_age, 72)
        if not closed:
            return "sweeper ran"
        return "sweeper sealed a batch too early" if min_age < min_age_seconds else "sweeper sealed a batch"

    return run


def reconcile_run(
    sweeper: ModuleType, bucket: str, state_machine_arn: str, min_age_seconds: int, eager: bool = False
) -> Callable[[random.Random], str | None]:
    """The sweeper's own ``reconcile``: it starts the workflow for every settled manifest without a batch item.

    ``eager`` runs sometimes take a manifest a second old for settled, so that they start a second execution
    while the event's own one has not registered the batch yet.
    """

    def run(rng: random.Random) -> str | None:
        min_age = rng.choice([1, min_age_seconds]) if eager else min_age_seconds
        started = sweeper.reconcile(
            sweeper.S3, sweeper.SFN, sweeper.TABLE, bucket, state_machine_arn, datetime.now(UTC), min_age, 72
        )
        if not started:
            return "reconcile ran"
        return "reconcile started an import early" if min_age < min_age_seconds else "reconcile started an import"

    return run


def recheck_run(sweeper: ModuleType, bucket: str, recorded: set[str]) -> Callable[[random.Random], str | None]:
    """The sweeper's own re-check of unconfirmed batches (its interval shortened by the test, as retry waits are);
    the batches whose outcomes it recorded are added to ``recorded``."""

    def run(rng: random.Random) -> str | None:
        rechecked = sweeper.recheck_unconfirmed(
            sweeper.S3,
            sweeper.TABLE,
            bucket,
            sweeper.HEALTHIMAGING,
            sweeper.RETENTION,
            datetime.now(UTC),
            lambda: 300.0,
        )
        recorded.update(rechecked.recorded)
        return "re-check recorded an unconfirmed batch" if rechecked.recorded else "re-check ran"

    return run


def poll(check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Iterator[Any]:
    """Yield ``check()`` until it is truthy or ``timeout`` passes (the last value is yielded either way)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        yield value
        if value or time.monotonic() >= deadline:
            return
        time.sleep(interval)
