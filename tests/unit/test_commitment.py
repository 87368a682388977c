"""Storage Commitment without sockets: request checks, the pending store, verdicts, the report, the service's pass."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom.dsutils import encode

from scp import dimse
from scp.commitment import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH_MODEL
from scp.commitment import ledger as ledger_module
from scp.commitment import pending as pending_module
from scp.commitment import service as service_module
from scp.commitment.channel import message_pdus
from scp.commitment.committer import (
    AWAITED,
    AWAITED_SEEN,
    ForwardedState,
    HealthImagingEvidence,
    StoreEvidence,
    Verdict,
    at_deadline,
)
from scp.commitment.ledger import Entry, Ledger, journal_path
from scp.commitment.pending import COMMITTED, Added, PendingRequests
from scp.commitment.report import Report, build_report
from scp.commitment.request import (
    MAX_DATA_SET_BYTES,
    MAX_REFERENCES,
    ActionBudget,
    ActionData,
    CommitmentRequest,
    Reference,
    Refused,
    check_command,
    parse_request,
)
from scp.commitment.sender import ReportSender
from scp.commitment.service import CommitmentService
from scp.commitment.verify import LocalFiles
from scp.config import Settings
from scp.instances import ReceivedInstance
from scp.status import FailureReason, Status
from tests.support.corpus import CT_IMAGE_STORAGE, SECONDARY_CAPTURE, make_instance, read

EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


def action(dataset: Dataset, implicit: bool = False) -> ActionData:
    data = ActionData(ActionBudget())
    encoded = encode(dataset, implicit, True)
    assert encoded is not None
    data.append(encoded)
    return data


def information(references: list[tuple[str, str]], transaction_uid: str = "1.2.3.4") -> Dataset:
    dataset = Dataset()
    dataset.TransactionUID = transaction_uid
    items = Sequence()
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
        items.append(item)
    dataset.ReferencedSOPSequence = items
    return dataset


def command(action_type: int = 1, requested_class: str = STORAGE_COMMITMENT_PUSH_MODEL) -> dimse.Command:
    return dimse.Command(dimse.N_ACTION_RQ, 7, True, "", "", requested_class, STORAGE_COMMITMENT_INSTANCE, action_type)


# -- the request ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implicit", [False, True])
def test_a_request_is_read_in_either_little_endian_syntax(implicit: bool) -> None:
    parsed = parse_request(
        action(information([(CT_IMAGE_STORAGE, "1.2.3.5")]), implicit), IMPLICIT if implicit else EXPLICIT
    )
    assert parsed == CommitmentRequest("1.2.3.4", (Reference(CT_IMAGE_STORAGE, "1.2.3.5"),))


def test_malformed_requests_are_refused_with_their_reason() -> None:
    missing_sequence = information([])
    del missing_sequence.ReferencedSOPSequence
    no_transaction = information([(CT_IMAGE_STORAGE, "1.2.3.5")])
    del no_transaction.TransactionUID
    item_without_instance = information([(CT_IMAGE_STORAGE, "1.2.3.5")])
    del item_without_instance.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    cases = {
        "Referenced SOP Sequence missing or empty": action(missing_sequence),
        "Transaction UID missing": action(no_transaction),
        "item 1: Referenced SOP Instance UID": action(item_without_instance),
    }
    for reason, data in cases.items():
        with pytest.raises(Refused, match=reason) as refused:
            parse_request(data, EXPLICIT)
        assert refused.value.status == Status.INVALID_ARGUMENT_VALUE
    garbage = ActionData(ActionBudget())
    garbage.append(b"\x08\x00\x95\x11UI\xff\xff" + b"\x00" * 10)  # an element longer than the data set
    with pytest.raises(Refused, match=r"undecodable|Transaction UID"):
        parse_request(garbage, EXPLICIT)
    with pytest.raises(Refused, match="without Action Information"):
        parse_request(None, EXPLICIT)


def test_too_many_references_and_too_large_a_data_set_are_resource_limitations() -> None:
    many = information([(CT_IMAGE_STORAGE, f"1.2.3.{n}") for n in range(MAX_REFERENCES + 1)])
    with pytest.raises(Refused, match=f"over {MAX_REFERENCES}") as refused:
        parse_request(action(many), EXPLICIT)
    assert refused.value.status == Status.RESOURCE_LIMITATION
    huge = ActionData(ActionBudget())
    for _ in range(MAX_DATA_SET_BYTES // 65536 + 1):
        huge.append(bytes(65536))
    assert huge.oversized and huge.data() == b""  # nothing past the cap is held
    with pytest.raises(Refused) as refused:
        parse_request(huge, EXPLICIT)
    assert refused.value.status == Status.RESOURCE_LIMITATION


def test_requests_arriving_at_once_share_one_budget_and_give_their_bytes_back() -> None:
    budget = ActionBudget(limit=1000)
    first, second = ActionData(budget), ActionData(budget)
    first.append(bytes(800))
    second.append(bytes(300))  # over what all associations may hold together
    assert budget.held == 800 and second.crowded
    with pytest.raises(Refused) as refused:
        parse_request(second, EXPLICIT)
    assert refused.value.status == Status.RESOURCE_LIMITATION and "retry later" in refused.value.reason
    first.release()
    assert budget.held == 0
    third = ActionData(budget)
    third.append(bytes(900))
    assert budget.held == 900 and not third.crowded
    third.release()
    third.release()  # once given back, the bytes are not given back again
    assert budget.held == 0


def test_the_command_must_name_the_commitment_class_its_instance_and_action_1() -> None:
    check_command(command())
    with pytest.raises(Refused) as refused:
        check_command(command(action_type=2))
    assert refused.value.status == Status.NO_SUCH_ACTION
    with pytest.raises(Refused) as refused:
        check_command(command(requested_class=CT_IMAGE_STORAGE))
    assert refused.value.status == Status.NO_SUCH_SOP_CLASS


def test_n_action_response_and_event_report_command_sets_round_trip() -> None:
    answered = dimse.parse_command(dimse.action_response(command(), 0x0115, "bad"))
    assert (answered.command_field, answered.message_id, answered.status) == (dimse.N_ACTION_RSP, 7, 0x0115)
    report = dimse.parse_command(
        dimse.event_report_request(9, STORAGE_COMMITMENT_PUSH_MODEL, "1.2.840.10008.1.20.1.1", 2)
    )
    assert (report.command_field, report.message_id, report.has_data_set) == (dimse.N_EVENT_REPORT_RQ, 9, True)


# -- the pending store -----------------------------------------------------------------------------------------------


def test_pending_requests_survive_a_reopen_and_a_transaction_uid_is_used_once(tmp_path: Path) -> None:
    path = tmp_path / "requests.sqlite"
    request = CommitmentRequest(
        "1.2.3.4", (Reference(CT_IMAGE_STORAGE, "1.2.3.5"), Reference(CT_IMAGE_STORAGE, "1.2.3.6"))
    )
    store = PendingRequests(path)
    assert store.add(request, "CT1", 100.0, 700.0) is Added.NEW
    assert store.add(request, "CT1", 101.0, 701.0) is Added.REPEATED
    other = CommitmentRequest("1.2.3.4", request.references[:1])
    assert store.add(other, "CT1", 101.0, 701.0) is Added.REUSED
    store.resolve("1.2.3.4", [(0, COMMITTED)])
    store.close()

    reopened = PendingRequests(path)
    [due] = reopened.due(100.0)
    assert (due.transaction_uid, due.calling_ae_title, due.deadline) == ("1.2.3.4", "CT1", 700.0)
    assert [state.outcome for state in reopened.references("1.2.3.4")] == [COMMITTED, None]
    assert [state.position for state in reopened.references("1.2.3.4", undecided_only=True)] == [1]
    reopened.reported("1.2.3.4", 1, 200.0)
    assert reopened.due(1000.0) == []
    assert reopened.references("1.2.3.4") == []
    assert reopened.add(request, "CT1", 300.0, 900.0) is Added.REUSED  # PS3.4 J.3.3.1.2: no longer active
    reopened.close()


# -- verdicts ---------------------------------------------------------------------------------------------------------


def stored_instance(path: Path) -> ReceivedInstance:
    dataset = read(path)
    return ReceivedInstance(
        str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), str(dataset.StudyInstanceUID),
        str(dataset.SeriesInstanceUID), EXPLICIT, "CT1", path.stat().st_size, None,  # type: ignore[arg-type]
    )  # fmt: skip


def test_store_evidence_commits_only_what_the_store_holds_under_the_requested_class(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    kept, removed = make_instance(root, pixel_bytes=1024), make_instance(root, pixel_bytes=1024)
    ledger = Ledger(tmp_path / "stored.sqlite")
    for path in (kept, removed):
        ledger.record(stored_instance(path), str(path))
    kept_uid, removed_uid = stored_instance(kept).sop_instance_uid, stored_instance(removed).sop_instance_uid
    removed.unlink()
    evidence = StoreEvidence(ledger, LocalFiles(root))
    verdicts = evidence.judge(
        [
            Reference(CT_IMAGE_STORAGE, kept_uid),
            Reference(SECONDARY_CAPTURE, kept_uid),
            Reference(CT_IMAGE_STORAGE, removed_uid),
            Reference(CT_IMAGE_STORAGE, generate_uid()),
        ]
    )
    assert verdicts == [Verdict(COMMITTED), Verdict(FailureReason.CLASS_INSTANCE_CONFLICT), AWAITED_SEEN, AWAITED]
    ledger.close()


def instance_named(uid: str, sop_class: str = CT_IMAGE_STORAGE) -> ReceivedInstance:
    return ReceivedInstance(sop_class, uid, "1.2.3", "1.2.3.4", EXPLICIT, "CT1", 10, None)  # type: ignore[arg-type]


def table_rows(database: Path) -> dict[str, tuple[str, str]]:
    connection = sqlite3.connect(database)
    try:
        return {row[0]: (row[1], row[2]) for row in connection.execute("SELECT * FROM stored")}
    finally:
        connection.close()


def test_the_ledger_journals_each_store_and_a_killed_receivers_successor_folds_it_into_the_table(
    tmp_path: Path,
) -> None:
    database = tmp_path / "stored.sqlite"
    ledger = Ledger(database)
    ledger.record(instance_named("1.1"), "/store/a.dcm")
    ledger.record(instance_named("1.1", SECONDARY_CAPTURE), "/store/b.dcm")  # stored again: the later one counts
    assert table_rows(database) == {}  # one append per store, no transaction
    assert ledger.lookup(["1.1", "1.2"]) == {"1.1": Entry(SECONDARY_CAPTURE, "/store/b.dcm")}
    # Never closed, as after SIGKILL: the next process of this receiver finds every entry and folds them.
    successor = Ledger(database)
    assert table_rows(database) == {"1.1": (SECONDARY_CAPTURE, "/store/b.dcm")}
    assert journal_path(database, 0).stat().st_size == 0
    assert successor.lookup(["1.1"]) == {"1.1": Entry(SECONDARY_CAPTURE, "/store/b.dcm")}
    successor.close()
    ledger.close()


def test_every_receiver_finds_what_another_receiver_journaled_and_what_it_folded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_module, "FOLD_BYTES", 300)
    database = tmp_path / "stored.sqlite"
    first, second = Ledger(database, 0), Ledger(database, 1)
    uids = [f"1.2.{n}" for n in range(10)]
    for uid in uids:
        first.record(instance_named(uid), f"/store/{uid}.dcm")
    folded = table_rows(database)
    assert folded and len(folded) < len(uids)  # some in the table, the rest still in the journal
    assert journal_path(database, 0).stat().st_size < 300
    expected = {uid: Entry(CT_IMAGE_STORAGE, f"/store/{uid}.dcm") for uid in uids}
    assert second.lookup([*uids, "9.9"]) == expected
    assert first.lookup(uids) == expected
    first.close()
    second.close()


def test_a_torn_or_altered_journal_line_is_no_entry(tmp_path: Path) -> None:
    database = tmp_path / "stored.sqlite"
    ledger = Ledger(database, 0)
    ledger.record(instance_named("1.1"), "/store/one.dcm")
    ledger.record(instance_named("1.2"), "/store/two.dcm")
    ledger.record(instance_named("1.3"), "/store/three.dcm")
    journal = journal_path(database, 0)
    lines = journal.read_bytes().split(b"\n")
    # A power loss cut the last line short; a location lost a character: neither may read as an entry.
    journal.write_bytes(lines[0] + b"\n" + lines[1].replace(b"two", b"tw") + b"\n" + lines[2][:20])
    assert ledger.lookup(["1.1", "1.2", "1.3"]) == {"1.1": Entry(CT_IMAGE_STORAGE, "/store/one.dcm")}
    ledger.close()
    assert set(table_rows(database)) == set()
    Ledger(database, 0).close()
    assert set(table_rows(database)) == {"1.1"}


def test_a_location_the_journal_cannot_hold_goes_to_the_table(tmp_path: Path) -> None:
    database = tmp_path / "stored.sqlite"
    ledger = Ledger(database)
    ledger.record(instance_named("1.1"), "/store\twith a tab/a.dcm")
    assert table_rows(database) == {"1.1": (CT_IMAGE_STORAGE, "/store\twith a tab/a.dcm")}
    assert ledger.lookup(["1.1"]) == {"1.1": Entry(CT_IMAGE_STORAGE, "/store\twith a tab/a.dcm")}
    ledger.close()


def test_local_files_refuses_a_location_outside_the_store(tmp_path: Path) -> None:
    outside = make_instance(tmp_path, pixel_bytes=1024)
    (tmp_path / "store").mkdir()
    reference = Reference(CT_IMAGE_STORAGE, stored_instance(outside).sop_instance_uid)
    assert LocalFiles(tmp_path / "store").holds(str(outside), reference) is False
    assert LocalFiles(tmp_path).holds(str(outside), reference) is True


class Forwarded:
    """The forwarding results as a table, the shape HealthImagingEvidence reads."""

    def __init__(self, states: dict[str, ForwardedState]) -> None:
        self._states = states

    def states(self, sop_instance_uids: list[str]) -> dict[str, ForwardedState]:
        return {uid: self._states[uid] for uid in sop_instance_uids if uid in self._states}


def test_healthimaging_evidence_commits_only_what_healthimaging_confirmed() -> None:
    evidence = HealthImagingEvidence(
        Forwarded(
            {
                "1.1": ForwardedState(CT_IMAGE_STORAGE, "imported"),
                "1.2": ForwardedState(CT_IMAGE_STORAGE, "warning"),
                "1.3": ForwardedState(CT_IMAGE_STORAGE, "forwarding"),
                "1.4": ForwardedState(CT_IMAGE_STORAGE, "failed"),
                "1.5": ForwardedState(SECONDARY_CAPTURE, "imported"),
            }
        )
    )
    verdicts = evidence.judge([Reference(CT_IMAGE_STORAGE, f"1.{n}") for n in range(1, 7)])
    assert verdicts == [
        Verdict(COMMITTED), Verdict(COMMITTED), AWAITED_SEEN, Verdict(FailureReason.PROCESSING_FAILURE),
        Verdict(FailureReason.CLASS_INSTANCE_CONFLICT), AWAITED,
    ]  # fmt: skip


def test_at_the_deadline_never_received_is_no_such_object_and_received_but_unconfirmed_a_processing_failure() -> None:
    assert at_deadline(AWAITED) == FailureReason.NO_SUCH_OBJECT_INSTANCE
    assert at_deadline(AWAITED_SEEN) == FailureReason.PROCESSING_FAILURE
    assert at_deadline(Verdict(COMMITTED)) == COMMITTED


def test_the_report_names_every_instance_once() -> None:
    committed, failed = Reference(CT_IMAGE_STORAGE, "1.1"), Reference(CT_IMAGE_STORAGE, "1.2")
    all_good = build_report("1.9", [(committed, COMMITTED)])
    assert (all_good.event_type, all_good.committed, all_good.failed) == (1, 1, 0)
    assert "FailedSOPSequence" not in all_good.event_information
    mixed = build_report("1.9", [(committed, COMMITTED), (failed, FailureReason.NO_SUCH_OBJECT_INSTANCE)])
    assert mixed.event_type == 2
    [item] = mixed.event_information.FailedSOPSequence
    assert (item.ReferencedSOPInstanceUID, item.FailureReason) == ("1.2", 0x0112)
    assert [i.ReferencedSOPInstanceUID for i in mixed.event_information.ReferencedSOPSequence] == ["1.1"]


# -- the service's pass ---------------------------------------------------------------------------------------------


class Channel:
    """The association side of a report: records what would be sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[Report, int]] = []

    def next_message_id(self) -> int:
        return len(self.sent) + 1

    def send_event_report(self, report: Report, message_id: int) -> None:
        self.sent.append((report, message_id))


def test_a_request_waits_for_its_instances_until_the_deadline_then_reports_the_missing_ones_failed(
    tmp_path: Path,
) -> None:
    clock = [1000.0]
    root = tmp_path / "store"
    root.mkdir()
    ledger = Ledger(tmp_path / "stored.sqlite")
    pending = PendingRequests(tmp_path / "requests.sqlite")
    service = CommitmentService(
        pending, StoreEvidence(ledger, LocalFiles(root)), ReportSender(Settings.from_env({})), (), 60,
        clock=lambda: clock[0],
    )  # fmt: skip
    early, late = make_instance(root, pixel_bytes=1024), make_instance(root, pixel_bytes=1024)
    ledger.record(stored_instance(early), str(early))
    refs = [(CT_IMAGE_STORAGE, stored_instance(path).sop_instance_uid) for path in (early, late)]
    answer = service.handle_action(command(), EXPLICIT, action(information(refs)), "CT1", {})
    assert (answer.status, answer.transaction_uid) == (Status.SUCCESS, "1.2.3.4")
    channel = Channel()
    service.process_due()
    assert channel.sent == []  # held until the N-ACTION-RSP has gone
    service.responded("1.2.3.4", channel)
    service.process_due()
    assert channel.sent == []  # the late instance is awaited
    clock[0] += 61
    service.process_due()
    [(report, message_id)] = channel.sent
    assert report.event_type == 2 and (report.committed, report.failed) == (1, 1)
    assert service.report_answered(channel, message_id, 0x0000)
    assert pending.state("1.2.3.4") == ("reported", 2)
    assert not service.report_answered(channel, message_id, 0x0000)  # answers nothing pending any more
    ledger.close()
    pending.close()


def service_in(tmp_path: Path) -> tuple[CommitmentService, PendingRequests]:
    """A service over a fresh pending store, judging by an empty ledger (nothing is ever committed)."""
    pending = PendingRequests(tmp_path / "requests.sqlite")
    ledger = Ledger(tmp_path / "stored.sqlite")
    evidence = StoreEvidence(ledger, LocalFiles(tmp_path))
    return CommitmentService(pending, evidence, ReportSender(Settings.from_env({})), (), 60), pending


def test_a_request_that_cannot_be_recorded_is_refused_with_a_processing_failure_not_success(tmp_path: Path) -> None:
    service, pending = service_in(tmp_path)
    # The references' table is gone: the request's row is written, its references are not.
    other = sqlite3.connect(tmp_path / "requests.sqlite")
    other.execute("DROP TABLE request_references")
    other.close()
    refs = [(CT_IMAGE_STORAGE, "1.2.3.4.5")]
    answer = service.handle_action(command(), EXPLICIT, action(information(refs)), "CT1", {})
    assert (answer.status, answer.transaction_uid) == (Status.PROCESSING_FAILURE, None)
    # One transaction: no half-recorded request is left to be reported on.
    assert pending.state("1.2.3.4") is None
    pending.close()


def test_requests_from_several_associations_are_decoded_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoding, most = [0], [0]
    count = threading.Lock()
    real_parse = service_module.parse_request

    def observed_parse(action: ActionData | None, transfer_syntax: str) -> CommitmentRequest:
        with count:
            decoding[0] += 1
            most[0] = max(most[0], decoding[0])
        try:
            time.sleep(0.02)  # room for another association's decode to overlap, were it let in
            return real_parse(action, transfer_syntax)
        finally:
            with count:
                decoding[0] -= 1

    monkeypatch.setattr(service_module, "parse_request", observed_parse)
    service, pending = service_in(tmp_path)
    answers: list[int] = []

    def associate(number: int) -> None:
        data = action(information([(CT_IMAGE_STORAGE, f"1.2.3.{number}")], transaction_uid=f"1.9.{number}"))
        answers.append(service.handle_action(command(), EXPLICIT, data, "CT1", {}).status)

    threads = [threading.Thread(target=associate, args=(number,)) for number in range(1, 7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert answers == [Status.SUCCESS] * 6
    assert most[0] == 1, "two requests were decoded at once"
    pending.close()


def test_the_service_gives_a_decoded_request_s_bytes_back(tmp_path: Path) -> None:
    service, pending = service_in(tmp_path)
    # A data set of the largest size with no Referenced SOP Sequence: refused once decoded, never crowded out.
    dataset = Dataset()
    dataset.TransactionUID = "1.2.3.4"
    dataset.add_new(0x00091010, "UN", b"")
    dataset[0x00091010].value = bytes(MAX_DATA_SET_BYTES - len(encode(dataset, False, True) or b""))
    largest = encode(dataset, False, True)
    assert largest is not None and len(largest) == MAX_DATA_SET_BYTES
    # Nine times in turn, more than all associations may hold at once: each is given back.
    for _ in range(9):
        data = service.new_action()
        data.append(largest)
        answer = service.handle_action(command(), EXPLICIT, data, "CT1", {})
        assert answer.status == Status.INVALID_ARGUMENT_VALUE, answer
    pending.close()


def test_a_message_is_cut_into_pdus_within_the_peer_maximum_command_first() -> None:
    command, data_set = bytes(range(100)), bytes(50_000)
    pdus = message_pdus(3, command, data_set, 16_384)
    fragments = []
    for pdu in pdus:
        assert pdu[0] == 0x04 and int.from_bytes(pdu[2:6], "big") <= 16_384
        length, context_id, header = int.from_bytes(pdu[6:10], "big"), pdu[10], pdu[11]
        assert context_id == 3 and length == len(pdu) - 10
        fragments.append((header, pdu[12:]))
    assert [header for header, _ in fragments] == [0x03, 0x00, 0x00, 0x00, 0x02]
    assert fragments[0][1] == command
    assert b"".join(piece for _, piece in fragments[1:]) == data_set


def test_instances_awaiting_commitment_are_capped_across_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pending_module, "MAX_PENDING_INSTANCES", 3)
    store = PendingRequests(tmp_path / "requests.sqlite")
    two = tuple(Reference(CT_IMAGE_STORAGE, f"1.2.{n}") for n in range(2))
    assert store.add(CommitmentRequest("1.1", two), "CT1", 0.0, 60.0) is Added.NEW
    assert store.add(CommitmentRequest("1.2", two), "CT1", 0.0, 60.0) is Added.FULL
    store.reported("1.1", 1, 1.0)  # a reported request no longer counts
    assert store.add(CommitmentRequest("1.2", two), "CT1", 0.0, 60.0) is Added.NEW
    store.close()
