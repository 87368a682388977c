"""Storage Commitment Push Model against the real daemon: pynetdicom as the modality and as its event receiver."""

from __future__ import annotations

import queue
import signal
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from pydicom.uid import generate_uid

from tests.support.commitment import (
    CLASS_INSTANCE_CONFLICT,
    NO_SUCH_OBJECT,
    PROCESSING_FAILURE,
    EventReceiver,
    Modality,
    action_information,
    instances,
    references,
)
from tests.support.corpus import CT_IMAGE_STORAGE, SECONDARY_CAPTURE
from tests.support.daemon import Daemon, start_daemon
from tests.support.moto import MotoServer
from tests.support.stow import StowStandIn
from tests.support.waits import wait_for

REPORT_WAIT = 30


@pytest.fixture
def receiver() -> Iterator[EventReceiver]:
    events = EventReceiver()
    yield events
    events.close()


@pytest.mark.parametrize("propose_scu_role", [False, True], ids=["default roles", "scu role proposed"])
def test_report_on_the_same_association_names_every_instance_committed(
    daemon: Daemon, tmp_path: Path, propose_scu_role: bool
) -> None:
    modality = Modality(daemon)
    sent = instances(tmp_path, 3)
    association = modality.associate(propose_scu_role=propose_scu_role)
    try:
        modality.store(association, sent)
        information = action_information(references(sent))
        assert modality.request(association, information) == 0x0000
        report = modality.reports.get(timeout=REPORT_WAIT)
        # The modality answers the report on this association; the daemon logs it delivered once that answer came.
        logged = wait_for(lambda: daemon.log_messages("commitment reported"), 10, "the report's response")
    finally:
        association.release()
    assert report.event_type == 1
    assert report.transaction_uid == information.TransactionUID
    assert sorted(report.committed) == sorted(references(sent))
    assert report.failed == []
    assert [(entry["via"], entry["response_status"]) for entry in logged] == [("same association", "0x0000")]


def test_instances_never_sent_fail_with_no_such_object_at_the_deadline(daemon_factory: object, tmp_path: Path) -> None:
    daemon = daemon_factory(COMMITMENT_TIMEOUT="2")  # type: ignore[operator]
    modality = Modality(daemon)
    sent = instances(tmp_path, 2)
    never_sent = (CT_IMAGE_STORAGE, generate_uid())
    association = modality.associate(transfer_syntax="1.2.840.10008.1.2")  # implicit VR, too
    try:
        modality.store(association, sent)
        assert modality.request(association, action_information([*references(sent), never_sent])) == 0x0000
        report = modality.reports.get(timeout=REPORT_WAIT)
        wait_for(lambda: daemon.log_messages("commitment reported"), 10, "the report's response")
    finally:
        association.release()
    assert report.event_type == 2
    assert sorted(report.committed) == sorted(references(sent))
    assert report.failed == [(*never_sent, NO_SUCH_OBJECT)]


def test_a_stored_instance_named_under_another_sop_class_is_a_class_instance_conflict(
    daemon: Daemon, tmp_path: Path
) -> None:
    modality = Modality(daemon)
    sent = instances(tmp_path, 1)
    ((_, instance_uid),) = references(sent)
    association = modality.associate()
    try:
        modality.store(association, sent)
        assert modality.request(association, action_information([(SECONDARY_CAPTURE, instance_uid)])) == 0x0000
        report = modality.reports.get(timeout=REPORT_WAIT)
        wait_for(lambda: daemon.log_messages("commitment reported"), 10, "the report's response")
    finally:
        association.release()
    assert report.event_type == 2
    assert report.failed == [(SECONDARY_CAPTURE, instance_uid, CLASS_INSTANCE_CONFLICT)]


def test_report_goes_on_a_new_association_once_the_modality_has_released(
    daemon_factory: object, tmp_path: Path, receiver: EventReceiver
) -> None:
    daemon = daemon_factory(COMMITMENT_PEERS=receiver.peer_setting, COMMITMENT_TIMEOUT="20")  # type: ignore[operator]
    modality = Modality(daemon, receiver.ae_title)
    first, late = instances(tmp_path, 2)
    association = modality.associate()
    modality.store(association, [first])
    information = action_information(references([first, late]))
    assert modality.request(association, information) == 0x0000
    association.release()  # before the late instance arrives: the report cannot go on this association
    association = modality.associate()
    modality.store(association, [late])
    association.release()
    report = receiver.reports.get(timeout=REPORT_WAIT)
    assert report.event_type == 1
    assert report.transaction_uid == information.TransactionUID
    assert sorted(report.committed) == sorted(references([first, late]))
    assert modality.reports.empty()
    # PS3.4 J.3.3.1.3: the daemon proposed the SCP role for itself; the receiver, as acceptor, acts as SCU only.
    assert receiver.roles == [(True, False)]


def test_pending_request_survives_sigkill_and_is_answered_after_the_restart(
    tmp_path: Path, receiver: EventReceiver
) -> None:
    settings = {"COMMITMENT_PEERS": receiver.peer_setting, "COMMITMENT_TIMEOUT": "60"}
    daemon = start_daemon(tmp_path, **settings)
    modality = Modality(daemon, receiver.ae_title)
    stored, missing = instances(tmp_path, 2)
    association = modality.associate()
    modality.store(association, [stored])
    information = action_information(references([stored, missing]))
    assert modality.request(association, information) == 0x0000
    association.release()
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    with pytest.raises(queue.Empty):
        receiver.reports.get(timeout=0.5)

    restarted = start_daemon(tmp_path, storage_dir=daemon.storage_dir, **settings)
    try:
        association = Modality(restarted, receiver.ae_title).associate()
        Modality(restarted, receiver.ae_title).store(association, [missing])
        association.release()
        report = receiver.reports.get(timeout=REPORT_WAIT)
    finally:
        restarted.stop()
    assert report.event_type == 1
    assert report.transaction_uid == information.TransactionUID
    assert sorted(report.committed) == sorted(references([stored, missing]))


def test_bad_requests_get_a_failure_status_and_one_log_line_and_the_daemon_goes_on(
    daemon: Daemon, tmp_path: Path
) -> None:
    modality = Modality(daemon)
    sent = instances(tmp_path, 1)
    association = modality.associate()
    try:
        modality.store(association, sent)
        no_sequence = action_information(references(sent))
        del no_sequence.ReferencedSOPSequence
        assert modality.request(association, no_sequence) == 0x0115
        with pytest.warns(UserWarning, match="Invalid value for VR UI"):
            bad_uid = action_information([(CT_IMAGE_STORAGE, "1.2.3.abc")])
        assert modality.request(association, bad_uid) == 0x0115
        oversized = action_information([(CT_IMAGE_STORAGE, f"1.2.3.{n}") for n in range(10_001)])
        assert modality.request(association, oversized) == 0x0213
        assert modality.request(association, action_information(references(sent)), action_type=2) == 0x0123

        information = action_information(references(sent))
        assert modality.request(association, information) == 0x0000
        assert modality.reports.get(timeout=REPORT_WAIT).event_type == 1
        wait_for(lambda: daemon.log_messages("commitment reported"), 10, "the report's response")
        assert modality.request(association, information) == 0x0115  # its Transaction UID is no longer active
        modality.store(association, instances(tmp_path, 1))  # the association serves on
    finally:
        association.release()
    refusals = daemon.log_messages("commitment request refused")
    assert [entry["status"] for entry in refusals] == ["0x0115", "0x0115", "0x0213", "0x0123", "0x0115"]
    assert daemon.echo_ok()


def test_a_report_larger_than_the_modality_pdu_arrives_whole(daemon_factory: object) -> None:
    daemon = daemon_factory(COMMITMENT_TIMEOUT="1")  # type: ignore[operator]
    modality = Modality(daemon)
    never_sent = [(CT_IMAGE_STORAGE, generate_uid()) for _ in range(1500)]  # about 150 KB of Failed SOP Sequence
    association = modality.associate()
    try:
        assert modality.request(association, action_information(never_sent)) == 0x0000
        report = modality.reports.get(timeout=REPORT_WAIT)
        wait_for(lambda: daemon.log_messages("commitment reported"), 10, "the report's response")
    finally:
        association.release()
    assert association.requestor.maximum_length == 16382  # pynetdicom's default: the report spans ten PDUs
    assert report.failed == [(*reference, NO_SUCH_OBJECT) for reference in never_sent]


def test_s3_mode_commits_what_s3_holds_and_fails_what_it_no_longer_does(
    daemon_factory: object, tmp_path: Path, moto: MotoServer
) -> None:
    client = boto3.client(
        "s3", endpoint_url=moto.endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip
    bucket = f"commitment-{generate_uid()[-12:].replace('.', '')}"
    client.create_bucket(Bucket=bucket)
    daemon = daemon_factory(DICOM_BUCKET=bucket, COMMITMENT_TIMEOUT="3", **moto.env())  # type: ignore[operator]
    modality = Modality(daemon)
    kept, expired = instances(tmp_path, 2)
    association = modality.associate()
    try:
        modality.store(association, [kept, expired])
        ((_, expired_uid),) = references([expired])
        [key] = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"] if expired_uid in o["Key"]]
        client.delete_object(Bucket=bucket, Key=key)  # as a lifecycle rule would, before commitment is asked
        assert modality.request(association, action_information(references([kept, expired]))) == 0x0000
        report = modality.reports.get(timeout=REPORT_WAIT)
        wait_for(lambda: daemon.log_messages("commitment reported"), 10, "the report's response")
    finally:
        association.release()
    assert report.event_type == 2
    assert report.committed == references([kept])
    assert report.failed == [(*references([expired])[0], PROCESSING_FAILURE)]


def test_healthimaging_mode_commits_only_what_storedicom_stored(tmp_path: Path) -> None:
    standin = StowStandIn().start()
    try:
        settings = {**standin.daemon_settings(tmp_path), "COMMITMENT_AFTER": "healthimaging", "COMMITMENT_TIMEOUT": "8"}
        daemon = start_daemon(tmp_path, **settings)
        modality = Modality(daemon)
        imported, warned, refused = instances(tmp_path, 3)
        (_, warned_uid), (_, refused_uid) = references([warned, refused])
        standin.warn[warned_uid] = 0xB000
        standin.refuse_dicom[refused_uid] = 0xA900
        never_sent = (CT_IMAGE_STORAGE, generate_uid())
        association = modality.associate()
        try:
            modality.store(association, [imported, warned, refused])
            information = action_information([*references([imported, warned, refused]), never_sent])
            assert modality.request(association, information) == 0x0000
            report = modality.reports.get(timeout=REPORT_WAIT)
            wait_for(lambda: daemon.log_messages("commitment reported"), 10, "the report's response")
        finally:
            association.release()
            daemon.stop()
    finally:
        standin.stop()
    assert report.event_type == 2
    assert sorted(report.committed) == sorted(references([imported, warned]))
    assert sorted(report.failed) == sorted(
        [(*references([refused])[0], PROCESSING_FAILURE), (*never_sent, NO_SUCH_OBJECT)]
    )
    assert set(standin.arrivals()) == {uid for _, uid in references([imported, warned])}
