"""The daemon's CloudWatch metrics: outcomes counted in memory, written as Embedded Metric Format lines on stdout.

The receive path only adds to counters under a lock; a background thread writes the lines once per interval and
at shutdown, so the awslogs driver turns them into metrics with no agent and no API call from the daemon.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NAMESPACE = "DICOMStoreSCP"
SERVICE = "receiver"
FLUSH_SECONDS = 60.0  # CloudWatch's standard resolution: finer lines would cost more and show nothing new

# EMF specification: a metric's value may be an array of at most 100 numbers.
_VALUES_PER_LINE = 100
# Latency samples kept per interval; beyond this a uniform sample is kept, so memory stays bounded under any load
# (ObjectsStored still counts every object).
_LATENCY_SAMPLES_MAX = 10_000


@dataclass(frozen=True)
class MetricSpec:
    name: str
    unit: str
    dimension: str | None  # besides ``service``: a second, low-cardinality dimension some lines carry
    meaning: str


METRICS = (
    MetricSpec("AssociationsAccepted", "Count", None, "associations accepted (health checks excluded)"),
    MetricSpec("AssociationsRejected", "Count", "Reason", "associations rejected; per reason too"),
    MetricSpec("ActiveAssociations", "Count", None, "most associations open at once during the interval"),
    MetricSpec("ObjectsStored", "Count", None, "objects stored and acknowledged with success"),
    MetricSpec("BytesStored", "Bytes", None, "bytes of the objects stored"),
    MetricSpec("StoreLatency", "Milliseconds", None, "time from the C-STORE request to the stored object"),
    MetricSpec("StoreFailures", "Count", "Status", "C-STORE answered with a failure status; per status too"),
    MetricSpec("BatchesClosed", "Count", None, "S3 import batches closed (manifest written)"),
    MetricSpec("S3UploadRetries", "Count", None, "S3 uploads retried after a transient error"),
)
# Written only by a daemon that forwards to StoreDICOM (DATASTORE_ID set).
FORWARD_METRICS = (
    MetricSpec("ForwardStored", "Count", None, "instances StoreDICOM stored in HealthImaging"),
    MetricSpec("ForwardLatency", "Milliseconds", None, "time from the stored object to stored in HealthImaging"),
    MetricSpec("ForwardFailed", "Count", None, "instances recorded failed: refused by StoreDICOM or past the deadline"),
    MetricSpec(
        "ForwardRetries", "Count", None, "instances to send again after throttling, a server error or no answer"
    ),
    MetricSpec("ForwardDuplicates", "Count", None, "stores in HealthImaging of an instance it may already have had"),
    MetricSpec("ForwardBacklog", "Count", None, "instances waiting to be stored in HealthImaging, at the last count"),
    MetricSpec(
        "ForwardLeftToImport", "Count", None, "S3 mode: instances StoreDICOM had not stored when their batch closed"
    ),
    MetricSpec(
        "ForwardTagFailed", "Count", None, "S3 mode: instances StoreDICOM stored whose S3 object could not be tagged so"
    ),
)
_SPECS = {spec.name: spec for spec in METRICS + FORWARD_METRICS}
# Gauges and samples: written as they are, not as the interval's count.
_NOT_COUNTS = ("ActiveAssociations", "StoreLatency", "ForwardLatency", "ForwardBacklog")


def write_stdout(line: str) -> None:
    # One write per line, like the log handler, so lines from different threads never interleave.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Metrics:
    """Thread-safe aggregation of the daemon's outcomes; ``flush`` writes what the interval saw."""

    def __init__(
        self,
        write: Callable[[str], None] = write_stdout,
        interval: float = FLUSH_SECONDS,
        clock: Callable[[], float] = time.time,
        task_open: Callable[[int], int] = lambda here: here,
        receiver: int | None = None,
    ) -> None:
        """``task_open`` is told this process's open associations and answers the task's: with several receiver
        processes, ActiveAssociations is the task's peak, which each process sees when it accepts one.
        ``receiver``: this process's number among several, named in each line as in its log lines."""
        self._write = write
        self._receiver = receiver
        self._interval = interval
        self._clock = clock
        self._task_open = task_open
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()
        self._latencies: list[float] = []
        self._latencies_seen = 0
        self._forward_latencies: list[float] = []
        self._backlog = 0
        self._forwarding = False
        self._open: set[object] = set()
        self._peak_open = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the receive path ------------------------------------------------------------------------------------

    def association_accepted(self, association: object) -> None:
        with self._lock:
            self._counts["AssociationsAccepted"] += 1
            self._open.add(association)
            self._peak_open = max(self._peak_open, self._task_open(len(self._open)))

    def association_ended(self, association: object) -> None:
        with self._lock:
            self._open.discard(association)
            self._task_open(len(self._open))

    def association_rejected(self, reason: str) -> None:
        with self._lock:
            self._counts["AssociationsRejected"] += 1
            self._rejected[reason] += 1

    def object_stored(self, size: int, milliseconds: float) -> None:
        with self._lock:
            self._counts["ObjectsStored"] += 1
            self._counts["BytesStored"] += size
            self._latencies_seen += 1
            if len(self._latencies) < _LATENCY_SAMPLES_MAX:
                self._latencies.append(milliseconds)
            else:
                # Reservoir sampling (Vitter's algorithm R): every sample has the same chance to be kept.
                slot = random.randrange(self._latencies_seen)  # noqa: S311 - statistics, not security
                if slot < _LATENCY_SAMPLES_MAX:
                    self._latencies[slot] = milliseconds

    def store_failed(self, status: int) -> None:
        with self._lock:
            self._counts["StoreFailures"] += 1
            self._failures[f"0x{status:04X}"] += 1

    def batch_closed(self) -> None:
        with self._lock:
            self._counts["BatchesClosed"] += 1

    def s3_upload_retried(self) -> None:
        with self._lock:
            self._counts["S3UploadRetries"] += 1

    # -- StoreDICOM forwarding -----------------------------------------------------------------------------------

    def forwarding_enabled(self) -> None:
        with self._lock:
            self._forwarding = True

    def forward_stored(self, milliseconds: float, duplicates: int) -> None:
        with self._lock:
            self._counts["ForwardStored"] += 1
            self._counts["ForwardDuplicates"] += duplicates
            if len(self._forward_latencies) < _LATENCY_SAMPLES_MAX:
                self._forward_latencies.append(milliseconds)

    def forward_failed(self) -> None:
        with self._lock:
            self._counts["ForwardFailed"] += 1

    def forward_retried(self) -> None:
        with self._lock:
            self._counts["ForwardRetries"] += 1

    def forward_duplicated(self, instances: int) -> None:
        with self._lock:
            self._counts["ForwardDuplicates"] += instances

    def forward_left_to_import(self, instances: int) -> None:
        with self._lock:
            self._counts["ForwardLeftToImport"] += instances

    def forward_tag_failed(self) -> None:
        with self._lock:
            self._counts["ForwardTagFailed"] += 1

    def forward_backlog(self, instances: int) -> None:
        with self._lock:
            self._backlog = instances

    # -- writing -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the interval thread and write what is left (the last interval before exit)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()

    def flush(self) -> None:
        for document in self.take():
            self._write(json.dumps(document, ensure_ascii=True))

    def take(self) -> list[dict[str, Any]]:
        """The EMF documents for everything counted since the last call, and a fresh interval."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
            rejected, self._rejected = self._rejected, Counter()
            failures, self._failures = self._failures, Counter()
            latencies, self._latencies = self._latencies, []
            self._latencies_seen = 0
            peak, self._peak_open = self._peak_open, self._task_open(len(self._open))
            forward_latencies, self._forward_latencies = self._forward_latencies, []
            backlog = self._backlog
            forwarding = self._forwarding
        timestamp = int(self._clock() * 1000)
        totals: dict[str, float | list[float]] = {
            spec.name: counts[spec.name]
            for spec in METRICS + (FORWARD_METRICS if forwarding else ())
            if spec.name not in _NOT_COUNTS
        }
        totals["ActiveAssociations"] = peak
        if forwarding:
            totals["ForwardBacklog"] = backlog
        chunks = [latencies[start : start + _VALUES_PER_LINE] for start in range(0, len(latencies), _VALUES_PER_LINE)]
        if chunks:
            totals["StoreLatency"] = chunks.pop(0)
        documents = [_document(timestamp, totals)]
        documents += [_document(timestamp, {"StoreLatency": chunk}) for chunk in chunks]
        forward_chunks = [
            forward_latencies[i : i + _VALUES_PER_LINE] for i in range(0, len(forward_latencies), _VALUES_PER_LINE)
        ]
        documents += [_document(timestamp, {"ForwardLatency": chunk}) for chunk in forward_chunks]
        documents += [_document(timestamp, {"AssociationsRejected": n}, "Reason", r) for r, n in rejected.items()]
        documents += [_document(timestamp, {"StoreFailures": n}, "Status", s) for s, n in failures.items()]
        if self._receiver is not None:  # a field of the line only, not a dimension: the metrics stay the task's
            for document in documents:
                document["receiver"] = self._receiver
        return documents

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()


def _document(
    timestamp: int, values: dict[str, float | list[float]], dimension: str | None = None, value: str = ""
) -> dict[str, Any]:
    dimensions = ["service", dimension] if dimension else ["service"]
    document: dict[str, Any] = {
        # The fields of the daemon's own log lines, so every stdout line reads the same in Logs Insights and jq.
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp / 1000)) + f".{timestamp % 1000:03d}Z",
        "level": "INFO",
        "logger": "scp.metrics",
        "message": "metrics",
        "_aws": {
            "Timestamp": timestamp,
            "CloudWatchMetrics": [
                {
                    "Namespace": NAMESPACE,
                    "Dimensions": [dimensions],
                    "Metrics": [{"Name": name, "Unit": _SPECS[name].unit} for name in values],
                }
            ],
        },
        "service": SERVICE,
        **values,
    }
    if dimension:
        document[dimension] = value
    return document
