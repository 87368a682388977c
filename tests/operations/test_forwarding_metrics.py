"""The forwarding metrics: written only by a daemon that forwards, with their names, units and the backlog gauge."""

from __future__ import annotations

from scp.metrics import FORWARD_METRICS, METRICS, Metrics
from tests.operations.test_metrics import NOW, total, written


def test_a_forwarding_daemon_writes_its_counts_latencies_and_backlog() -> None:
    metrics = Metrics(write=lambda line: None, clock=lambda: NOW)
    metrics.forwarding_enabled()
    metrics.forward_backlog(7)
    metrics.forward_stored(420.0, 0)
    metrics.forward_stored(380.0, 1)
    metrics.forward_failed()
    metrics.forward_retried()
    metrics.forward_retried()
    metrics.forward_backlog(3)

    data = written(metrics)

    assert total(data, "ForwardStored") == 2
    assert total(data, "ForwardDuplicates") == 1
    assert total(data, "ForwardFailed") == 1
    assert total(data, "ForwardRetries") == 2
    assert total(data, "ForwardBacklog") == 3, "the last count, not a sum"
    assert sorted(v for d in data if d.name == "ForwardLatency" for v in d.values) == [380.0, 420.0]
    units = {d.name: d.unit for d in data}
    # StoreLatency is written only when objects were received in the interval.
    assert units == {spec.name: spec.unit for spec in METRICS + FORWARD_METRICS if spec.name != "StoreLatency"}

    # The gauge stays what it was in the next interval; the counts start over.
    data = written(metrics)
    assert total(data, "ForwardBacklog") == 3 and total(data, "ForwardStored") == 0


def test_a_daemon_that_does_not_forward_writes_none_of_them() -> None:
    metrics = Metrics(write=lambda line: None, clock=lambda: NOW)
    names = {d.name for d in written(metrics)}
    assert names == {spec.name for spec in METRICS if spec.name != "StoreLatency"}
