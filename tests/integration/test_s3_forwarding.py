"""StoreDICOM forwarding in S3 mode against the real daemon: moto_server as S3, the STOW-RS stand-in as HealthImaging.

Each closing batch is split by what StoreDICOM stored; every acknowledged instance is listed in exactly one
manifest, a manifest's objects are all stored by StoreDICOM or none, and what a manifest says StoreDICOM stored
arrived there byte for byte.
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest

from batch_contract.manifest import Manifest
from tests.support.corpus import make_instance, read
from tests.support.daemon import Daemon, send_files
from tests.support.forwarded_bucket import ForwardedBucket
from tests.support.s3 import objects, s3
from tests.support.sweeper import Sweeper, seal_between
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration

STUDY = "1.2.826.0.1.3680043.8.498.13013"


def instances(directory: Path, count: int) -> list[Path]:
    """``count`` new instances of the one series these tests send, as Part-10 files in ``directory``."""
    series = f"{STUDY}.1"
    return [make_instance(directory, pixel_bytes=48 * 1024, study_uid=STUDY, series_uid=series) for _ in range(count)]


def forwarding_under_way(forwarded: ForwardedBucket, count: int, latency: float) -> tuple[Daemon, list[Path]]:
    """A daemon with ``count`` instances acknowledged in one open batch, StoreDICOM taking ``latency`` seconds a
    request and the first of them stored."""
    forwarded.standin.latency_seconds = latency
    daemon = forwarded.start_daemon(BATCH_WINDOW_SECONDS="600")
    sent = instances(forwarded.workdir, count)
    assert send_files(daemon, sent) == [0] * count
    wait_for(lambda: forwarded.standin.arrivals(), 10, "StoreDICOM to store the first instances")
    return daemon, sent


def consistent(forwarded: ForwardedBucket, sent: list[Path]) -> dict[str, Manifest]:
    """Check every invariant of a forwarded bucket; returns the manifests by batch id."""
    found = forwarded.each_in_one_manifest(sent)
    client, standin = s3(forwarded.server), forwarded.standin
    arrivals = standin.arrivals()
    for manifest in found.values():
        for item in manifest.objects:
            body = client.get_object(Bucket=forwarded.bucket, Key=item.key)["Body"].read()
            assert item.size == len(body)
            if item.stored_by_storedicom is not None:
                assert arrivals[item.sop_instance_uid] >= 1
                assert standin.last_bytes(item.sop_instance_uid) == body, "StoreDICOM got the bytes S3 holds"
                assert item.stored_by_storedicom.image_set_id == standin.image_set_id(STUDY)
        if manifest.fallback_batch_id is not None:
            assert manifest.stored_by_storedicom
            fallback = found[manifest.fallback_batch_id]
            assert fallback.fallback_from == manifest.batch_id and not fallback.stored_by_storedicom
    return found


def test_a_batch_stored_whole_by_storedicom_has_one_manifest_saying_so(forwarded: ForwardedBucket) -> None:
    daemon = forwarded.start_daemon(BATCH_WINDOW_SECONDS="2")
    sent = instances(forwarded.workdir, 12)
    assert send_files(daemon, sent) == [0] * len(sent)

    (manifest,) = wait_for(lambda: list(forwarded.manifests().values()), 30, "the batch manifest")

    consistent(forwarded, sent)
    assert manifest.stored_by_storedicom and manifest.fallback_batch_id is None
    assert all(item.stored_by_storedicom and item.stored_by_storedicom.warning is None for item in manifest.objects)
    assert set(forwarded.standin.arrivals()) == {str(read(path).SOPInstanceUID) for path in sent}
    assert forwarded.standin.problems == []
    (split,) = daemon.log_messages("batch split by StoreDICOM's results")
    assert (split["stored_by_storedicom"], split["left_to_import"]) == (12, 0)
    assert not list((daemon.storage_dir / ".forwarding" / "s3" / "copies").iterdir()), "local copies removed"


def test_a_refused_instance_goes_to_the_fallback_batch_and_the_rest_stay_stored(forwarded: ForwardedBucket) -> None:
    sent = instances(forwarded.workdir, 8)
    refused = str(read(sent[3]).SOPInstanceUID)
    forwarded.standin.refuse_http = {refused}  # HTTP 400 for any request carrying it
    daemon = forwarded.start_daemon(BATCH_WINDOW_SECONDS="2")
    assert send_files(daemon, sent) == [0] * len(sent)

    wait_for(lambda: len(forwarded.manifests()) == 2, 30, "the manifests of the split batch and its fallback")
    found = forwarded.manifests()

    consistent(forwarded, sent)
    (split,) = [manifest for manifest in found.values() if manifest.fallback_batch_id is not None]
    fallback = found[split.fallback_batch_id]  # type: ignore[index]
    assert [item.sop_instance_uid for item in fallback.objects] == [refused]
    assert refused not in {item.sop_instance_uid for item in split.objects} and len(split.objects) == 7
    bodies = objects(forwarded.server, forwarded.bucket, "batches/")
    original = bodies[f"{split.prefix}{STUDY}/{STUDY}.1/{refused}.dcm"]
    assert bodies[fallback.objects[0].key] == original, "the fallback holds the refused object whole"
    assert fallback.closed_by == split.closed_by == "window"


def test_storedicom_unavailable_throughout_leaves_the_batch_to_its_import_job(forwarded: ForwardedBucket) -> None:
    forwarded.standin.answer_status = 503
    daemon = forwarded.start_daemon(BATCH_WINDOW_SECONDS="2")
    sent = instances(forwarded.workdir, 6)
    assert send_files(daemon, sent) == [0] * len(sent)

    (manifest,) = wait_for(lambda: list(forwarded.manifests().values()), 30, "the batch manifest")

    consistent(forwarded, sent)
    assert not manifest.stored_by_storedicom and manifest.fallback_batch_id is None and len(manifest.objects) == 6
    assert forwarded.standin.requests["503"] >= 1
    forwarded.standin.answer_status = None  # StoreDICOM is back: nothing of the closed batch is sent any more
    assert daemon.stop() == 0
    (stopped,) = daemon.log_messages("StoreDICOM forwarding stopped")
    assert stopped["instances_waiting"] == 0
    assert forwarded.standin.arrivals() == Counter()


def test_sigterm_mid_forwarding_leaves_consistent_manifests(forwarded: ForwardedBucket) -> None:
    # Each request takes a second, so the SIGTERM finds some instances stored, some under way and some waiting.
    daemon, sent = forwarding_under_way(forwarded, 20, latency=1.0)

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0

    found = consistent(forwarded, sent)
    assert all(manifest.closed_by == "shutdown" for manifest in found.values())
    stored = {item.sop_instance_uid for m in found.values() if m.stored_by_storedicom for item in m.objects}
    # Every request under way at SIGTERM was waited for: what StoreDICOM stored is what the manifests say it stored.
    assert stored == set(forwarded.standin.arrivals())
    assert 0 < len(stored) <= len(sent)


def test_sigkill_leaves_the_whole_batch_to_the_sweeper_and_a_restart_sends_nothing_of_it(
    forwarded: ForwardedBucket, sweeper: Sweeper
) -> None:
    daemon, sent = forwarding_under_way(forwarded, 10, latency=0.5)
    daemon.signal(signal.SIGKILL)
    daemon.wait(10)
    arrived = forwarded.standin.arrivals()

    restarted = forwarded.start_daemon(storage_dir=daemon.storage_dir, BATCH_WINDOW_SECONDS="600")
    assert not list((restarted.storage_dir / ".forwarding" / "s3" / "copies").iterdir()), "the last run's state cleared"
    (killed_batch,) = forwarded.open_batch_ids()
    assert sweeper.seal() == [killed_batch]
    assert restarted.stop() == 0

    found = consistent(forwarded, sent)
    (sealed,) = found.values()
    assert sealed.closed_by == "sweeper" and not sealed.stored_by_storedicom and len(sealed.objects) == 10
    # At least once: what StoreDICOM stored before the kill is imported again by the sweeper's batch.
    assert set(arrived) <= {item.sop_instance_uid for item in sealed.objects}
    assert restarted.log_messages("StoreDICOM forwarding resumes") == [], "the restart resumes nothing of the batch"


def test_a_batch_the_sweeper_sealed_first_puts_its_later_stored_objects_in_a_late_batch_that_says_so(
    forwarded: ForwardedBucket, sweeper: Sweeper
) -> None:
    daemon = forwarded.start_daemon(BATCH_WINDOW_SECONDS="4")
    sent = instances(forwarded.workdir, 8)
    sealed_id = seal_between(daemon, sweeper, forwarded.server, sent[:3], sent[3:])

    wait_for(lambda: len(forwarded.manifests()) == 2, 30, "the sweeper's manifest and the late batch's")

    found = consistent(forwarded, sent)
    late = next(manifest for manifest in found.values() if manifest.late_from == sealed_id)
    assert late.closed_by == "late" and late.stored_by_storedicom and len(late.objects) == 5
    # The sweeper's manifest knows nothing of StoreDICOM: its import job stores those three again (at least once).
    assert not found[sealed_id].stored_by_storedicom and len(found[sealed_id].objects) == 3
