"""A batch sealed by the sweeper while the daemon still fills it: every acknowledged object in exactly one manifest.

The sweeper writes a manifest for a batch it judges abandoned from a listing of the prefix. Objects the daemon
stores into that batch afterwards are not in that manifest; the daemon, finding the manifest written when it
closes the batch, copies them into a batch of their own and writes its manifest (closedBy "late"); copies that
fail are made again, into the same late batch, when the close is retried. Copies never made, because S3 refused
them until the daemon stopped or the daemon died, the sweeper makes into the same late batch, or the next one
along the chain.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from batch_contract.layout import BATCHES_PREFIX, late_batch_id, object_key, parse_object_key
from tests.support.corpus import make_instance, read
from tests.support.daemon import Daemon
from tests.support.moto import MotoServer
from tests.support.s3 import manifests, objects, read_part10
from tests.support.s3_faults import INTERNAL_ERROR, FaultProxy, fault_proxy
from tests.support.sweeper import Sweeper, seal_between
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration

# One receiver process: the objects sent after the seal must go into the batch it sealed, and each receiver fills
# a batch of its own; the other receivers' batches follow the same code.
ONE_RECEIVER = {"RECEIVER_PROCESSES": "1"}


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[FaultProxy]:
    """S3 as the daemon sees it when told AWS_ENDPOINT_URL=proxy.endpoint; the sweeper goes to moto_server."""
    with fault_proxy(moto.endpoint) as faults:
        yield faults


@dataclass
class SealedMidBatch:
    daemon: Daemon
    files: list[Path]
    acknowledged: list[str]  # their SOP Instance UIDs
    sealed_id: str


@pytest.fixture
def sealed_mid_batch(
    s3_daemon: Callable[..., Daemon], moto: MotoServer, sweeper: Sweeper, proxy: FaultProxy, tmp_path: Path
) -> Callable[..., SealedMidBatch]:
    """Starts a daemon storing through ``proxy`` and sends it five objects, its batch sealed by the sweeper after
    the first two."""

    def start(**settings: str) -> SealedMidBatch:
        daemon = s3_daemon(AWS_ENDPOINT_URL=proxy.endpoint, **ONE_RECEIVER, **settings)
        files, acknowledged = sent_files(tmp_path, 5)
        return SealedMidBatch(daemon, files, acknowledged, seal_between(daemon, sweeper, moto, files[:2], files[2:]))

    return start


def sent_files(tmp_path: Path, count: int) -> tuple[list[Path], list[str]]:
    """``count`` small objects, and their SOP Instance UIDs."""
    files = [make_instance(tmp_path, pixel_bytes=2048) for _ in range(count)]
    return files, [str(read(f).SOPInstanceUID) for f in files]


def assert_each_in_one_manifest(found: Iterable[dict[str, Any]], acknowledged: list[str]) -> None:
    listed = Counter(str(o["sopInstanceUid"]) for m in found for o in m["objects"])
    assert sorted(listed) == sorted(acknowledged) and set(listed.values()) == {1}, listed


@pytest.mark.parametrize("closed_by", ["window", "shutdown"])
def test_objects_stored_after_the_sweeper_sealed_their_batch_get_a_manifest_of_their_own(
    s3_daemon: Callable[..., Daemon],
    moto: MotoServer,
    bucket: str,
    sweeper: Sweeper,
    tmp_path: Path,
    closed_by: str,
) -> None:
    daemon = s3_daemon(BATCH_WINDOW_SECONDS="6" if closed_by == "window" else "600", **ONE_RECEIVER)
    files, acknowledged = sent_files(tmp_path, 8)
    sealed_id = seal_between(daemon, sweeper, moto, files[:3], files[3:])

    if closed_by == "shutdown":
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0

    def two_manifests() -> list[dict[str, Any]]:
        found = manifests(moto, bucket)
        return found if len(found) == 2 else []

    found = {m["closedBy"]: m for m in wait_for(two_manifests, 30, "the sweeper's and the daemon's manifests")}
    assert set(found) == {"sweeper", "late"}
    assert_each_in_one_manifest(found.values(), acknowledged)
    late = found["late"]
    assert late["lateFrom"] == sealed_id and late["objectCount"] == 5
    assert {o["sopInstanceUid"] for o in late["objects"]} == set(acknowledged[3:])
    stored = objects(moto, bucket, BATCHES_PREFIX)
    for entry in late["objects"]:
        copy = stored[entry["key"]]
        original = stored[entry["key"].replace(str(late["batchId"]), sealed_id)]
        assert copy == original and read_part10(copy).SOPInstanceUID == entry["sopInstanceUid"]
        assert parse_object_key(entry["key"]).batch_id == late["batchId"]
    (logged,) = daemon.log_messages("batch sealed elsewhere without some objects: copied into a batch of their own")
    assert (logged["batch_id"], logged["late_batch_id"], logged["objects"]) == (sealed_id, late["batchId"], 5)


def test_late_objects_whose_copies_fail_are_copied_again_into_the_same_late_batch(
    sealed_mid_batch: Callable[..., SealedMidBatch], moto: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    sealed = sealed_mid_batch(BATCH_WINDOW_SECONDS="600")
    daemon, acknowledged, sealed_id = sealed.daemon, sealed.acknowledged, sealed.sealed_id
    # Every write under batches/ from now on is a late object's copy: two of the three fail the first close.
    proxy.fail(INTERNAL_ERROR, times=2, key_prefix=BATCHES_PREFIX)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0
    found = {m["closedBy"]: m for m in manifests(moto, bucket)}
    assert set(found) == {"sweeper", "late"}, found
    assert_each_in_one_manifest(found.values(), acknowledged)
    late_id = str(found["late"]["batchId"])
    assert (late_id, found["late"]["lateFrom"]) == (late_batch_id(sealed_id), sealed_id)
    assert len(proxy.faulted) == 2 and all(f"/{BATCHES_PREFIX}{late_id}/" in line for line in proxy.faulted)
    assert daemon.log_messages("batch manifest not written, will retry"), "the first close did not fail"
    stored = objects(moto, bucket, f"{BATCHES_PREFIX}{late_id}/")
    assert sorted(read_part10(body).SOPInstanceUID for body in stored.values()) == sorted(acknowledged[2:])


@pytest.mark.parametrize("end", ["stopped", "killed"])
def test_late_objects_the_daemon_never_copied_are_put_into_exactly_one_manifest_by_the_sweeper(
    sealed_mid_batch: Callable[..., SealedMidBatch],
    moto: MotoServer,
    bucket: str,
    sweeper: Sweeper,
    proxy: FaultProxy,
    end: str,
) -> None:
    # Killed: the batch closes on its window, so that the daemon has tried its copies before it dies. Stopped:
    # the shortest grace, so that the close retries the refused copies for its shortest time (15 s).
    settings = (
        {"BATCH_WINDOW_SECONDS": "600", "SHUTDOWN_GRACE_SECONDS": "1"}
        if end == "stopped"
        else {"BATCH_WINDOW_SECONDS": "6"}
    )
    sealed = sealed_mid_batch(**settings)
    daemon, acknowledged, sealed_id = sealed.daemon, sealed.acknowledged, sealed.sealed_id
    late_id = late_batch_id(sealed_id)
    if end == "stopped":
        # S3 refuses every copy into the late batch until the daemon has stopped.
        proxy.fail(INTERNAL_ERROR, key_prefix=f"{BATCHES_PREFIX}{late_id}/")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(45) == 0
        (logged,) = daemon.log_messages("late objects of a batch sealed elsewhere not copied: left to the sweeper")
        assert (logged["batch_id"], logged["late_batch_id"], logged["instances"]) == (sealed_id, late_id, 3)
    else:
        # One copy is refused, the two others made; the daemon dies before its late batch has a manifest.
        last = read(sealed.files[-1])
        refused = object_key(late_id, last.StudyInstanceUID, last.SeriesInstanceUID, last.SOPInstanceUID)
        proxy.fail(INTERNAL_ERROR, key_prefix=refused)
        wait_for(lambda: daemon.log_messages("batch manifest not written, will retry"), 30, "a failed close")
        daemon.signal(signal.SIGKILL)
        daemon.wait(30)
    assert proxy.faulted, "no copy was refused"
    assert {m["closedBy"] for m in manifests(moto, bucket)} == {"sweeper"}, "the daemon's late manifest was written"

    # The sweeper's next run, once the objects have settled: the sealing pass, then the late-object pass.
    closed = sweeper.seal()
    recovered = sweeper.recover_late()
    if end == "stopped":
        # Nothing was copied: the late batch takes all three.
        assert (closed, recovered) == ([], [late_id])
    else:
        # The late batch the daemon began is sealed from its copies like any abandoned batch; the object it
        # could not copy goes into the next late batch along the chain.
        assert (closed, recovered) == ([late_id], [late_batch_id(late_id)])
    found = manifests(moto, bucket)
    assert_each_in_one_manifest(found, acknowledged)
    stored = objects(moto, bucket, BATCHES_PREFIX)
    for entry in (o for m in found if m["batchId"] != sealed_id for o in m["objects"]):
        original = stored[entry["key"].replace(parse_object_key(entry["key"]).batch_id, sealed_id)]
        assert stored[entry["key"]] == original and read_part10(original).SOPInstanceUID == entry["sopInstanceUid"]
    # Another run finds nothing more to do.
    assert sweeper.seal() == []
    assert sweeper.recover_late() == []


def test_a_daemon_whose_late_batch_the_sweeper_closed_first_converges_on_that_manifest(
    sealed_mid_batch: Callable[..., SealedMidBatch], moto: MotoServer, bucket: str, sweeper: Sweeper, proxy: FaultProxy
) -> None:
    sealed = sealed_mid_batch(BATCH_WINDOW_SECONDS="6")
    daemon, acknowledged, sealed_id = sealed.daemon, sealed.acknowledged, sealed.sealed_id
    late_id = late_batch_id(sealed_id)
    proxy.fail(INTERNAL_ERROR, key_prefix=f"{BATCHES_PREFIX}{late_id}/")
    wait_for(lambda: daemon.log_messages("batch manifest not written, will retry"), 30, "a failed close")
    # While the daemon retries, the sweeper's late-object pass closes the same late batch.
    assert sweeper.recover_late() == [late_id]
    proxy.heal()

    def converged() -> list[dict[str, Any]]:
        found = daemon.log_messages("batch manifest written elsewhere, listing every object")
        return [entry for entry in found if entry["batch_id"] == late_id]

    wait_for(converged, 60, "the daemon finding the late batch's manifest written")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    found = {m["batchId"]: m for m in manifests(moto, bucket)}
    assert set(found) == {sealed_id, late_id}, "the daemon went on to another late batch"
    assert (found[late_id]["closedBy"], found[late_id]["lateFrom"]) == ("late", sealed_id)
    assert_each_in_one_manifest(found.values(), acknowledged)
