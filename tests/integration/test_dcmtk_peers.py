"""DCMTK's echoscu and storescu against the real daemon: what a modality does on its first day."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.corpus import PYDICOM_CORPUS, CorpusFile, comparable, make_instance, read
from tests.support.daemon import Daemon

pytestmark = pytest.mark.integration


def storescu(
    daemon: Daemon, *files: Path, options: tuple[str, ...] = (), calling: str = "MODALITY1"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "storescu",
            *options,
            "-aet",
            calling,
            "-aec",
            daemon.ae_title,
            "127.0.0.1",
            str(daemon.port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
    )


def test_echoscu_gets_an_answer(daemon: Daemon) -> None:
    result = subprocess.run(
        ["echoscu", "-aec", "STORESCP", "127.0.0.1", str(daemon.port)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("corpus_file", PYDICOM_CORPUS, ids=lambda f: f.name)
def test_storescu_object_lands_intact_in_its_own_transfer_syntax(daemon: Daemon, corpus_file: CorpusFile) -> None:
    result = storescu(daemon, corpus_file.path, options=("-R", *corpus_file.storescu_options))
    assert result.returncode == 0, result.stdout + result.stderr

    sent = read(corpus_file.path)
    (stored_path,) = daemon.stored_files()
    assert stored_path.relative_to(daemon.storage_dir).parts == (
        sent.StudyInstanceUID,
        sent.SeriesInstanceUID,
        f"{sent.SOPInstanceUID}.dcm",
    )
    stored = read(stored_path)
    # Received in the file's own syntax (nothing transcoded on either side) and kept as received.
    assert stored.file_meta.TransferSyntaxUID == corpus_file.transfer_syntax
    assert comparable(stored) == comparable(sent)
    assert stored.file_meta.SourceApplicationEntityTitle == "MODALITY1"
    assert stored.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
    assert daemon.spool_files() == []
    (line,) = daemon.log_messages("stored")
    assert line["sop_instance_uid"] == sent.SOPInstanceUID
    assert line["calling_ae"] == "MODALITY1" and line["bytes"] > 0


def test_one_association_many_objects(daemon: Daemon) -> None:
    plain = [f.path for f in PYDICOM_CORPUS if not f.storescu_options]
    result = storescu(daemon, *plain)
    assert result.returncode == 0, result.stderr
    assert len(daemon.stored_files()) == len(plain)
    accepted = [e for e in daemon.log_messages("association accepted") if e["calling_ae"] == "MODALITY1"]
    assert len(accepted) == 1


def test_resent_instance_replaces_the_stored_one_and_says_so(daemon: Daemon) -> None:
    path = PYDICOM_CORPUS[0].path
    assert storescu(daemon, path).returncode == 0
    assert storescu(daemon, path).returncode == 0
    assert len(daemon.stored_files()) == 1
    assert len(daemon.log_messages("stored")) == 1
    assert len(daemon.log_messages("replaced")) == 1


def test_unsupported_transfer_syntax_is_refused_at_negotiation(daemon: Daemon) -> None:
    # JPEG 2000 Part 2 multi-component is importable; "JPIP Referenced" (1.2.840.10008.1.2.4.94) is not.
    association = daemon.associate(
        contexts=["1.2.840.10008.1.1", ("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.4.94"])]
    )
    try:
        assert association.is_established
        assert [cx.abstract_syntax for cx in association.accepted_contexts] == ["1.2.840.10008.1.1"]
        assert [cx.abstract_syntax for cx in association.rejected_contexts] == ["1.2.840.10008.5.1.4.1.1.2"]
    finally:
        association.release()


def test_supported_sop_class_list_limits_storage(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(SUPPORTED_SOP_CLASS_UIDS="1.2.840.10008.5.1.4.1.1.4")  # MR only
    ct = PYDICOM_CORPUS[0]
    mr = PYDICOM_CORPUS[1]
    assert storescu(daemon, ct.path).returncode != 0
    assert storescu(daemon, mr.path).returncode == 0
    assert [p.name for p in daemon.stored_files()] == [f"{read(mr.path).SOPInstanceUID}.dcm"]


def test_private_sop_class_is_stored(daemon: Daemon, tmp_path: Path) -> None:
    # DCMTK's storescu refuses to send a SOP class it does not know, so pynetdicom plays a vendor's modality here.
    siemens_csa_non_image = "1.3.12.2.1107.5.9.1"
    sent = read(make_instance(tmp_path, pixel_bytes=4096, sop_class_uid=siemens_csa_non_image))
    association = daemon.associate(contexts=[(siemens_csa_non_image, ["1.2.840.10008.1.2.1"])])
    try:
        assert association.is_established
        assert association.send_c_store(sent).Status == 0x0000
    finally:
        association.release()
    (stored,) = daemon.stored_files()
    assert read(stored).SOPClassUID == siemens_csa_non_image
