"""The batch contract is written once: the daemon, the workflow's functions and the status command share it."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

import tests.functions.workflow  # noqa: F401 - puts functions/ on sys.path, as the Lambda zips lay it out
from batch_contract import layout, manifest, table
from batch_contract.layout import LayoutError
from scp.batches import Batch, Batches, BatchLimits
from scp.import_status.report import FAILED, IMPORTED, IMPORTING, NON_PRIMARY, REQUEUED, STUCK, UNCONFIRMED
from scp.import_status.table import instance_from_item
from scp.instances import ReceivedInstance
from scp.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = f"{STUDY}.1"


def received(number: int, calling: str = "CT01") -> ReceivedInstance:
    return ReceivedInstance(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=f"{SERIES}.{number}",
        study_instance_uid=STUDY,
        series_instance_uid=SERIES,
        transfer_syntax="1.2.840.10008.1.2.1",
        calling_ae_title=calling,
        size=1000 + number,
        received_at=datetime(2026, 11, 23, 18, 57, number, 113_000, tzinfo=UTC),
    )


def daemon_batch(count: int) -> Batch:
    """A batch filled and closed through the daemon's own bookkeeping."""
    batches = Batches(BatchLimits(max_files=count, max_bytes=10**9, window_seconds=60), lambda _: None, Metrics())
    batch = None
    for number in range(1, count + 1):
        instance = received(number, "CT01" if number % 2 else "MR02")
        batch = batches.join(instance.size)
        batches.complete(batch, batch.key_for(instance), instance, instance.size)
    assert batch is not None and batch.closed_by == manifest.CLOSED_BY_FILES
    return batch


def test_a_manifest_the_daemon_writes_is_read_by_the_functions() -> None:
    from common.manifest import parse_manifest as functions_reader

    batch = daemon_batch(3)
    body = manifest.encode_manifest(batch.manifest("dicom-bucket", datetime(2026, 11, 23, 18, 58, tzinfo=UTC)))
    read = functions_reader(body, batch.batch_id, "dicom-bucket")

    assert read.closed_by == "files" and read.prefix == f"batches/{batch.batch_id}/"
    assert [item.sop_instance_uid for item in read.objects] == [f"{SERIES}.{n}" for n in (1, 2, 3)]
    assert read.calling_ae_titles == ("CT01", "MR02")
    assert (read.first_received_at, read.last_received_at) == ("2026-11-23T18:57:01.113Z", "2026-11-23T18:57:03.113Z")
    assert read.byte_count == 1001 + 1002 + 1003
    assert read.objects[0].key == layout.object_key(batch.batch_id, STUDY, SERIES, f"{SERIES}.1")


def test_the_functions_use_the_contracts_definitions() -> None:
    import common.layout
    import common.manifest
    import common.records

    assert common.layout.object_key is layout.object_key
    assert common.layout.check_batch_id is layout.check_batch_id
    assert common.manifest.Manifest is manifest.Manifest
    assert common.manifest.parse_manifest is manifest.parse_manifest
    assert common.records.batch_key is table.batch_key
    assert common.records.instance_key is table.instance_key
    assert (common.records.IMPORTED, common.records.BATCH_REGISTERED) == (table.IMPORTED, table.BATCH_REGISTERED)


def test_the_status_command_knows_every_status_word_of_the_table() -> None:
    expected = {
        table.IMPORTING: IMPORTING,
        table.IMPORTED: IMPORTED,
        table.WARNING: IMPORTED,
        table.REQUEUED: REQUEUED,
        table.FAILED: FAILED,
        table.STUCK: STUCK,
        table.UNCONFIRMED: UNCONFIRMED,
    }
    assert set(expected) == set(table.INSTANCE_STATUSES), "a status word the status command does not map"
    uids = {"sopInstanceUid": "1.1", "studyInstanceUid": "1", "seriesInstanceUid": "1.2", "batchId": "b"}
    for status, state in expected.items():
        assert instance_from_item({**uids, "status": status}, {"b": table.BATCH_IMPORTING}).state == state
    assert instance_from_item({**uids, "status": table.IMPORTED, "isPrimary": False}, {}).state == NON_PRIMARY


def test_a_late_batch_holds_exactly_what_the_sealed_manifest_left_out() -> None:
    batch = daemon_batch(4)
    listed = set(sorted(batch.objects)[:2])
    opened = datetime.now(UTC)
    late = batch.late_batch(listed)

    assert late is not None and late.closed_by == manifest.CLOSED_BY_LATE and late.late_from == batch.batch_id
    assert late.batch_id == layout.late_batch_id(batch.batch_id)
    assert late is batch.late_batch(listed), "a retried close reuses the late batch"
    assert sorted(late.copied_from(item) for item in late.objects.values()) == sorted(set(batch.objects) - listed)
    assert all(layout.parse_object_key(key).batch_id == late.batch_id for key in late.objects)
    read = manifest.parse_manifest(manifest.encode_manifest(late.manifest("b", opened)), late.batch_id, "b")
    assert read.late_from == batch.batch_id and len(read.objects) == 2
    assert Batch("20261123T185700Z-0000000000000000").late_batch(set()) is None, "nothing to move"


def test_keys_and_timestamps() -> None:
    opened = datetime(2026, 11, 23, 18, 57, 0, tzinfo=UTC)
    batch_id = layout.new_batch_id(opened)
    assert re.fullmatch(layout.BATCH_ID_PATTERN, batch_id) and batch_id.startswith("20261123T185700Z-")
    assert layout.batch_opened_at(batch_id) == opened
    assert layout.batch_id_from_manifest_key(layout.manifest_key(batch_id)) == batch_id
    assert layout.batch_id_from_prefix(layout.batch_prefix(batch_id)) == batch_id
    late = layout.late_batch_id(batch_id)
    # Derived: every writer names the same late batch, with the sealed batch's time part, and a chain goes on.
    assert layout.is_batch_id(late) and late.startswith("20261123T185700Z-") and late != batch_id
    assert late == layout.late_batch_id(batch_id) and layout.late_batch_id(late) not in (late, batch_id)
    with pytest.raises(LayoutError):
        layout.late_batch_id("../x")
    with pytest.raises(LayoutError):
        layout.object_key(batch_id, STUDY, SERIES, "1.2/../3")
    from batch_contract.timestamps import iso_millis, parse_iso

    assert iso_millis(opened) == "2026-11-23T18:57:00.000Z" and parse_iso(iso_millis(opened)) == opened


# Literals of the contract that no deployable may spell out again (the contract and the docs may).
_CONTRACT_LITERALS = re.compile(r"""["'](batches/|manifests/|jobs/|BATCH#|STUDY#|INSTANCE#|JOB#|AE#|STATUS#)""")


def test_no_deployable_writes_the_contract_again() -> None:
    sources = [*sorted((ROOT / "scp").rglob("*.py")), *sorted((ROOT / "functions").rglob("*.py"))]
    repeated = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _CONTRACT_LITERALS.search(line)
    ]
    assert not repeated, "contract literals outside batch_contract/:\n" + "\n".join(repeated)


def test_a_split_batch_round_trips_and_never_mixes_the_two_paths() -> None:
    batch = daemon_batch(2)
    closed = batch.manifest("dicom-bucket", datetime(2026, 11, 23, 18, 58, tzinfo=UTC))
    stored = manifest.StoredByStoreDICOM("2026-11-23T18:57:04.000Z", "0123456789abcdef0123456789abcdef", None)
    fallback_id = layout.new_batch_id(datetime(2026, 11, 23, 18, 58, tzinfo=UTC))
    forwarded = replace(
        closed,
        objects=tuple(replace(item, stored_by_storedicom=stored) for item in closed.objects),
        fallback_batch_id=fallback_id,
    )

    read = manifest.parse_manifest(manifest.encode_manifest(forwarded), batch.batch_id, "dicom-bucket")

    assert read == forwarded and read.stored_by_storedicom and not closed.stored_by_storedicom
    with pytest.raises(manifest.ManifestError, match="1 of 2 objects stored by StoreDICOM"):
        replace(closed, objects=(forwarded.objects[0], closed.objects[1]))
    document = forwarded.to_json() | {"fallbackBatchId": "../other"}
    with pytest.raises(manifest.ManifestError, match="fallbackBatchId"):
        manifest.parse_manifest(json.dumps(document).encode(), batch.batch_id, "dicom-bucket")


def test_a_daemon_batch_splits_by_what_storedicom_stored_once_and_for_good() -> None:
    opened = datetime.now(UTC)
    stored = manifest.StoredByStoreDICOM("2026-11-23T18:57:04.000Z", "0123456789abcdef0123456789abcdef", None)
    batch = daemon_batch(4)
    keys = sorted(batch.objects)
    batch.split({keys[0]: stored, keys[2]: stored}, opened)

    fallback = batch.fallback
    assert fallback is not None and fallback.fallback_from == batch.batch_id and fallback.closed_by == batch.closed_by
    assert sorted(batch.objects) == [keys[0], keys[2]]
    assert sorted(fallback.copied_from(item) for item in fallback.objects.values()) == [keys[1], keys[3]]
    split = manifest.parse_manifest(manifest.encode_manifest(batch.manifest("b", opened)), batch.batch_id, "b")
    rest = manifest.parse_manifest(manifest.encode_manifest(fallback.manifest("b", opened)), fallback.batch_id, "b")
    assert split.stored_by_storedicom and split.fallback_batch_id == fallback.batch_id
    assert not rest.stored_by_storedicom and rest.fallback_from == batch.batch_id and len(rest.objects) == 2
    batch.split({}, opened)
    assert batch.fallback is fallback and len(batch.objects) == 2, "a retried close keeps the first split"
    late = batch.late_batch({keys[0]})
    assert late is not None and [item.stored_by_storedicom for item in late.objects.values()] == [stored]

    whole, none = daemon_batch(2), daemon_batch(2)
    whole.split(dict.fromkeys(whole.objects, stored), opened)
    none.split({}, opened)
    assert whole.fallback is None and whole.manifest("b", opened).stored_by_storedicom
    assert none.fallback is None and not none.manifest("b", opened).stored_by_storedicom and len(none.objects) == 2
