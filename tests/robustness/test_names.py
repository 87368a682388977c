"""Crafted calling AE titles: stored as data, never a path, an S3 key or a raw log line.

The AE VR allows "/" and "." (PS3.5 6.2), so ``A/../B`` is a title a modality may really send: it is accepted and
its objects stored. Control characters are not allowed; they are replaced by "?" wherever the title is written
(file meta, batch manifest, log), and the JSON log escapes whatever else it carries.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.robustness import wire
from tests.robustness.conftest import Watched
from tests.robustness.test_data import assert_log_is_clean, ct, encode
from tests.robustness.wire import Peer
from tests.support.corpus import read
from tests.support.moto import MotoServer
from tests.support.s3 import manifests, new_bucket, objects, read_part10

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# (as sent on the wire, as written into the file meta and the manifest, as logged)
CRAFTED = [
    ("A/../B", "A/../B", "A/../B"),
    ("../../etc/cron.d", "../../etc/cron.d", "../../etc/cron.d"),
    ("CT\x01\x1b[2J\x07\r\n", "CT??[2J???", "CT??[2J???"),
    ("\\\\host\\share", "??host?share", "\\\\host\\share"),  # AE VR: no backslash; JSON escapes it in the log
]
UID_NAME = r"[0-9]+(?:\.[0-9]+)*"


def store_as(port: int, calling: str, data_set: bytes, sop_instance_uid: str) -> int | None:
    with Peer(port) as peer:
        peer.associate(wire.associate_rq(calling=calling))
        status = peer.store(sop_instance_uid, data_set)
        peer.release()
    return status


@pytest.mark.parametrize(("calling", "written", "logged"), CRAFTED,
                         ids=["dot-dot", "absolute-ish", "control", "backslash"])  # fmt: skip
def test_crafted_calling_ae_title_never_reaches_a_path_or_a_raw_log_line(
    watched: Watched, tmp_path: Path, calling: str, written: str, logged: str
) -> None:
    dataset = ct(tmp_path)
    storage = watched.daemon.storage_dir
    before = set(storage.parent.rglob("*"))
    assert store_as(watched.port, calling, encode(dataset), dataset.SOPInstanceUID) == 0
    watched.acknowledged[dataset.SOPInstanceUID] = dataset.PixelData
    # The only new names anywhere near the store are the UIDs of the object, under the store.
    for entry in set(storage.parent.rglob("*")) - before:
        parts = entry.relative_to(storage).parts
        assert all(re.fullmatch(UID_NAME, part.removesuffix(".dcm")) for part in parts), entry
    (path,) = [p for p in watched.daemon.stored_files() if p.stem == dataset.SOPInstanceUID]
    assert read(path).file_meta.SourceApplicationEntityTitle == written
    accepted = watched.log_messages("association accepted")
    assert [entry["calling_ae"] for entry in accepted] == [logged]
    assert_log_is_clean(watched)


def test_crafted_calling_ae_titles_never_reach_an_s3_key(
    start_watched: Callable[..., Watched], moto: MotoServer, tmp_path: Path
) -> None:
    bucket = new_bucket(moto, "names")
    watched = start_watched(DICOM_BUCKET=bucket, BATCH_WINDOW_SECONDS="1", **moto.env())
    sent = {}
    for calling, written, _ in CRAFTED:
        dataset = ct(tmp_path)
        assert store_as(watched.port, calling, encode(dataset), dataset.SOPInstanceUID) == 0
        sent[dataset.SOPInstanceUID] = written
    watched.daemon.stop()  # closes the open batch: its manifest is written
    bodies = objects(moto, bucket)
    for key in bodies:
        assert re.fullmatch(rf"batches/[0-9TZ]+-[0-9a-f]{{16}}/{UID_NAME}/{UID_NAME}/{UID_NAME}\.dcm", key) or (
            re.fullmatch(r"manifests/[0-9TZ]+-[0-9a-f]{16}\.json", key)
        ), key
    stored = {
        str(part10.SOPInstanceUID): str(part10.file_meta.SourceApplicationEntityTitle)
        for part10 in (read_part10(body) for key, body in bodies.items() if key.startswith("batches/"))
    }
    assert stored == sent
    (manifest,) = manifests(moto, bucket)
    assert sorted(manifest["callingAETitles"]) == sorted(set(sent.values()))
    assert sorted(o["callingAETitle"] for o in manifest["objects"]) == sorted(sent.values())
    assert_log_is_clean(watched)
