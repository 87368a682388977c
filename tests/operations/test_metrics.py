"""The daemon's metrics aggregator: EMF documents with the documented names, units and dimensions."""

from __future__ import annotations

import json
import re
import threading

from scp.metrics import METRICS, NAMESPACE, SERVICE, Metrics
from tests.operations.emf import Datum, extract
from tests.support.waits import wait_for

NOW = 1_795_000_000.0


def written(metrics: Metrics) -> list[Datum]:
    return [datum for document in metrics.take() for datum in extract(document)]


def total(data: list[Datum], name: str, **dimensions: str) -> float:
    wanted = (("service", SERVICE), *dimensions.items())
    return sum(sum(d.values) for d in data if d.name == name and d.dimensions == wanted)


def test_an_interval_is_summed_under_the_service_dimension() -> None:
    metrics = Metrics(write=lambda line: None, clock=lambda: NOW)
    first, second = object(), object()
    metrics.association_accepted(first)
    metrics.association_accepted(second)
    metrics.association_ended(first)
    metrics.association_rejected("calling AE title not recognised")
    metrics.association_rejected("calling AE title not recognised")
    metrics.association_rejected("local limit exceeded")
    metrics.object_stored(1000, 12.5)
    metrics.object_stored(3000, 7.5)
    metrics.store_failed(0xA700)
    metrics.store_failed(0xA700)
    metrics.store_failed(0xC000)
    metrics.batch_closed()
    metrics.s3_upload_retried()

    data = written(metrics)

    assert {d.namespace for d in data} == {NAMESPACE}
    assert total(data, "AssociationsAccepted") == 2
    assert total(data, "ActiveAssociations") == 2, "the peak of the interval"
    assert total(data, "AssociationsRejected") == 3
    assert total(data, "AssociationsRejected", Reason="calling AE title not recognised") == 2
    assert total(data, "AssociationsRejected", Reason="local limit exceeded") == 1
    assert total(data, "ObjectsStored") == 2
    assert total(data, "BytesStored") == 4000
    assert sorted(v for d in data if d.name == "StoreLatency" for v in d.values) == [7.5, 12.5]
    assert total(data, "StoreFailures") == 3
    assert total(data, "StoreFailures", Status="0xA700") == 2
    assert total(data, "StoreFailures", Status="0xC000") == 1
    assert total(data, "BatchesClosed") == 1
    assert total(data, "S3UploadRetries") == 1
    units = {d.name: d.unit for d in data}
    assert units == {spec.name: spec.unit for spec in METRICS}
    assert units["BytesStored"] == "Bytes" and units["StoreLatency"] == "Milliseconds"


def test_dimensions_are_few_and_never_uids() -> None:
    metrics = Metrics(write=lambda line: None, clock=lambda: NOW)
    metrics.association_rejected("called AE title not recognised")
    metrics.store_failed(0xA900)
    data = written(metrics)
    keys = {key for d in data for key, _ in d.dimensions}
    assert keys == {"service", "Reason", "Status"}
    assert not [value for d in data for _, value in d.dimensions if re.fullmatch(r"[0-9]+(\.[0-9]+)+", value)]


def test_a_quiet_interval_still_reports_zeros_and_the_open_associations() -> None:
    metrics = Metrics(write=lambda line: None, clock=lambda: NOW)
    metrics.association_accepted("long-lived")
    written(metrics)
    data = written(metrics)
    assert total(data, "ObjectsStored") == 0
    assert total(data, "ActiveAssociations") == 1, "still open in the next interval"
    assert not [d for d in data if d.name == "StoreLatency"], "no latency sample, no latency datum"


def test_many_latencies_are_split_into_arrays_of_at_most_100() -> None:
    metrics = Metrics(write=lambda line: None, clock=lambda: NOW)
    for number in range(250):
        metrics.object_stored(10, float(number))
    documents = metrics.take()
    latency_arrays = [d["StoreLatency"] for d in documents if "StoreLatency" in d]
    assert [len(values) for values in latency_arrays] == [100, 100, 50]
    assert sorted(v for values in latency_arrays for v in values) == [float(n) for n in range(250)]


def test_latency_samples_stay_bounded_under_heavy_load() -> None:
    metrics = Metrics(write=lambda line: None, clock=lambda: NOW)
    for _ in range(25_000):
        metrics.object_stored(1, 5.0)
    data = written(metrics)
    assert total(data, "ObjectsStored") == 25_000
    assert sum(len(d.values) for d in data if d.name == "StoreLatency") == 10_000


def test_counting_from_many_threads_loses_nothing() -> None:
    metrics = Metrics(write=lambda line: None, clock=lambda: NOW)

    def work() -> None:
        for _ in range(2000):
            metrics.object_stored(2, 1.0)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    data = written(metrics)
    assert total(data, "ObjectsStored") == 16_000
    assert total(data, "BytesStored") == 32_000


def test_the_background_thread_writes_one_line_per_interval_and_the_rest_at_stop() -> None:
    lines: list[str] = []
    metrics = Metrics(write=lines.append, interval=0.05)
    metrics.start()
    metrics.object_stored(100, 3.0)
    wait_for(lambda: any(json.loads(line).get("ObjectsStored") == 1 for line in lines), 5, "a periodic EMF line")
    metrics.batch_closed()
    metrics.stop()
    documents = [json.loads(line) for line in lines]
    assert sum(document.get("BatchesClosed", 0) for document in documents) == 1, "counted once, written by stop()"
    assert sum(document.get("ObjectsStored", 0) for document in documents) == 1
    assert all(d["logger"] == "scp.metrics" and d["message"] == "metrics" and d["level"] == "INFO" for d in documents)


def test_a_receiver_process_names_itself_in_each_line_without_a_dimension() -> None:
    metrics = Metrics(write=lambda line: None, clock=lambda: NOW, receiver=1)
    metrics.association_rejected("local limit exceeded")
    documents = metrics.take()
    assert len(documents) > 1 and all(document["receiver"] == 1 for document in documents)
    dimensions = {name for document in documents for datum in extract(document) for name, _ in datum.dimensions}
    assert "receiver" not in dimensions, "the metrics stay the task's"
    alone = Metrics(write=lambda line: None, clock=lambda: NOW).take()
    assert all("receiver" not in document for document in alone)
