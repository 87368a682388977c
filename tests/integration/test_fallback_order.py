"""The order of a split batch's manifests against the real daemon, with S3 behind the fault proxy.

A split batch's own manifest (what StoreDICOM stored, naming its fallback) is written before the fallback batch's.
Whichever write S3 refuses, and whoever seals first, every acknowledged instance is listed in exactly one manifest:
a fallback left without its manifest is sealed by the sweeper, and a batch the sweeper sealed whole before its own
manifest gets no fallback at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.support.corpus import read
from tests.support.daemon import Daemon, send_files
from tests.support.forwarded_bucket import ForwardedBucket
from tests.support.moto import MotoServer
from tests.support.s3 import objects, s3
from tests.support.s3_faults import SLOW_DOWN, FaultProxy, fault_proxy
from tests.support.sweeper import LOOKBACK_HOURS, Sweeper, seal_between
from tests.support.waits import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

STUDY = "1.2.826.0.1.3680043.8.498.13113"
COUNT = 6
# The sweeper's least minimum age (SWEEP_MIN_AGE_SECONDS' lower bound).
SWEEP_MIN_AGE_SECONDS = 60


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[FaultProxy]:
    with fault_proxy(moto.endpoint) as running:
        yield running


def split_batch(forwarded: ForwardedBucket, proxy: FaultProxy, window: int) -> tuple[Daemon, list[Path], str]:
    """A daemon storing through ``proxy`` whose one batch of COUNT instances is split: StoreDICOM refuses one of
    them. Returns the daemon, the files sent and the refused instance's UID."""
    sent = forwarded.series(STUDY, f"{STUDY}.1", COUNT, pixel_bytes=32 * 1024)
    refused = str(read(sent[2]).SOPInstanceUID)
    forwarded.standin.refuse_http = {refused}
    daemon = forwarded.start_daemon(BATCH_WINDOW_SECONDS=str(window), AWS_ENDPOINT_URL=proxy.endpoint)
    assert send_files(daemon, sent) == [0] * COUNT
    return daemon, sent, refused


def test_a_fallback_whose_manifest_s3_refuses_until_shutdown_is_sealed_by_the_sweeper(
    forwarded: ForwardedBucket, sweeper: Sweeper, proxy: FaultProxy
) -> None:
    # The first manifest of the close goes through; every later one is refused, until the daemon has stopped.
    proxy.fail(SLOW_DOWN, key_prefix="manifests/", after=1)
    daemon, sent, refused = split_batch(forwarded, proxy, window=2)
    wait_for(lambda: daemon.log_messages("batch manifest not written, will retry"), 30, "the second manifest refused")
    (split,) = daemon.log_messages("batch split by StoreDICOM's results")
    assert daemon.stop() == 0
    proxy.heal()

    (written,) = forwarded.manifests().values()
    # What the daemon left without a manifest is an abandoned batch to the sweeper.
    sealed = sweeper.seal()
    assert sweeper.recover_late() == [], "the objects the split batch's own manifest leaves out are not late"
    found = forwarded.each_in_one_manifest(sent)

    own = found[split["batch_id"]]
    assert written == own, "the split batch's own manifest is written first"
    assert own.stored_by_storedicom and own.fallback_batch_id == split["fallback_batch_id"]
    assert refused not in {item.sop_instance_uid for item in own.objects} and len(own.objects) == COUNT - 1
    assert sealed == [own.fallback_batch_id], "the fallback's copies are sealed from their listing"
    fallback = found[own.fallback_batch_id]
    assert [item.sop_instance_uid for item in fallback.objects] == [refused]
    assert fallback.closed_by == "sweeper" and not fallback.stored_by_storedicom
    original = f"{own.prefix}{STUDY}/{STUDY}.1/{refused}.dcm"
    bodies = objects(forwarded.server, forwarded.bucket, "batches/")
    assert bodies[fallback.objects[0].key] == bodies[original], "the fallback holds the refused object whole"


def test_a_split_batch_the_sweeper_sealed_whole_first_gets_no_fallback(
    forwarded: ForwardedBucket, sweeper: Sweeper, proxy: FaultProxy
) -> None:
    proxy.fail(SLOW_DOWN, key_prefix="manifests/")
    daemon, sent, refused = split_batch(forwarded, proxy, window=4)
    wait_for(lambda: daemon.log_messages("batch manifest not written, will retry"), 30, "a manifest refused")
    (split,) = daemon.log_messages("batch split by StoreDICOM's results")
    batch_id, fallback_id = split["batch_id"], split["fallback_batch_id"]
    assert sorted(forwarded.open_batch_ids()) == sorted([batch_id, fallback_id]), "the fallback's copies made"

    # A sweeper run at a moment the batch's objects are older than its minimum age and the fallback's copies,
    # made at least a window later, are not: it seals the batch whole, from its listing.
    listing = s3(forwarded.server).list_objects_v2(Bucket=forwarded.bucket, Prefix=f"batches/{batch_id}/")["Contents"]
    assert len(listing) == COUNT
    now = max(entry["LastModified"] for entry in listing) + timedelta(seconds=SWEEP_MIN_AGE_SECONDS + 1)
    assert sweeper.app.sweep(sweeper.app.S3, forwarded.bucket, now, SWEEP_MIN_AGE_SECONDS, LOOKBACK_HOURS) == [batch_id]

    proxy.heal()
    wait_for(lambda: daemon.log_messages("batch manifest written elsewhere, listing every object"), 30,
             "the daemon to find the batch sealed")  # fmt: skip
    assert daemon.stop() == 0

    found = forwarded.each_in_one_manifest(sent)
    assert daemon.log_messages("split batch sealed elsewhere first: its fallback batch withdrawn")
    assert forwarded.open_batch_ids() == [batch_id], "the fallback's copies deleted"
    assert list(found) == [batch_id] and found[batch_id].closed_by == "sweeper"
    assert refused in {item.sop_instance_uid for item in found[batch_id].objects}
    # Nothing is left for a later sweeper run: no fallback prefix to seal, no late object.
    assert sweeper.seal() == [] and sweeper.recover_late() == []
    assert list(forwarded.manifests()) == [batch_id]


def test_a_split_batch_sealed_without_its_last_objects_puts_them_all_in_one_late_batch(
    forwarded: ForwardedBucket, sweeper: Sweeper
) -> None:
    """The sweeper seals the batch while the daemon still fills it; of the objects stored after, StoreDICOM refuses
    one. The fallback is withdrawn, and the objects the sweeper's manifest leaves out, stored and refused alike, go
    to the batch's one late batch, for its import job (a manifest's objects are all stored by StoreDICOM or none)."""
    sent = forwarded.series(STUDY, f"{STUDY}.2", COUNT, pixel_bytes=32 * 1024)
    refused = str(read(sent[4]).SOPInstanceUID)
    forwarded.standin.refuse_http = {refused}
    daemon = forwarded.start_daemon(BATCH_WINDOW_SECONDS="4")
    sealed_id = seal_between(daemon, sweeper, forwarded.server, sent[:3], sent[3:])
    wait_for(lambda: daemon.log_messages("batch sealed elsewhere without some objects: copied into a batch of their "
                                         "own"), 30, "the late batch")  # fmt: skip
    assert daemon.stop() == 0

    found = forwarded.each_in_one_manifest(sent)
    late = next(manifest for manifest in found.values() if manifest.late_from == sealed_id)
    assert sorted(found) == sorted([sealed_id, late.batch_id])
    assert late.closed_by == "late" and not late.stored_by_storedicom and len(late.objects) == 3
    assert refused in {item.sop_instance_uid for item in late.objects}
    assert sorted(forwarded.open_batch_ids()) == sorted([sealed_id, late.batch_id]), "no fallback copies left"
    assert sweeper.seal() == [] and sweeper.recover_late() == []
