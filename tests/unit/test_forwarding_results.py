"""The forwarding database: outbox rows, receipts of the same instance again, end states and duplicates."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from scp.forwarding.results import FAILED, FORWARDING, IMPORTED, WARNING, Results, study_rows
from scp.instances import ReceivedInstance

STUDY = "1.2.3"


def instance(uid: str) -> ReceivedInstance:
    return ReceivedInstance(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=uid,
        study_instance_uid=STUDY,
        series_instance_uid="1.2.3.4",
        transfer_syntax="1.2.840.10008.1.2.1",
        calling_ae_title="CT01",
        size=100,
        received_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )


def test_rows_are_due_oldest_first_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    results = Results(path)
    for number, uid in enumerate(("1.1", "1.2", "1.3")):
        results.enqueue(instance(uid), tmp_path / f"{uid}.dcm", now=100.0 + number)
    assert [p.sop_instance_uid for p in results.due(now=101.5, limit=10)] == ["1.1", "1.2"]
    assert [p.sop_instance_uid for p in results.due(now=200, limit=10, exclude={"1.1"})] == ["1.2", "1.3"]
    results.close()
    reopened = Results(path)
    assert reopened.backlog() == 3 and reopened.due(float("inf"), 1)[0].next_attempt_at == 100.0


def test_end_states_and_reasons_are_what_the_status_command_reads(tmp_path: Path) -> None:
    results = Results(tmp_path / "db.sqlite")
    for uid in ("1.1", "1.2", "1.3", "1.4"):
        results.enqueue(instance(uid), tmp_path / f"{uid}.dcm", now=1.0)
    first, second, third, fourth = results.due(now=1.0, limit=10)
    results.sending([first, second, third])
    assert results.stored(first, IMPORTED, "abc", None, now=2.0) == 0
    results.stored(second, WARNING, "abc", "warning 0xB000", now=2.0)
    results.failed(third, "StoreDICOM failure 0xA900", now=2.0, answered=True)
    results.retry_later(fourth, "StoreDICOM answered HTTP 503", at=50.0, answered=False)
    assert results.backlog() == 1 and results.due(float("inf"), 1)[0].next_attempt_at == 50.0
    rows = {row.sop_instance_uid: row for row in study_rows(tmp_path / "db.sqlite", STUDY)}
    assert [rows[uid].status for uid in ("1.1", "1.2", "1.3", "1.4")] == [IMPORTED, WARNING, FAILED, FORWARDING]
    assert rows["1.1"].image_set_id == "abc" and rows["1.1"].attempts == 1
    assert rows["1.3"].reason == "StoreDICOM failure 0xA900"
    assert rows["1.4"].last_error == "StoreDICOM answered HTTP 503"


def test_a_request_whose_answer_never_came_counts_as_a_possible_duplicate(tmp_path: Path) -> None:
    results = Results(tmp_path / "db.sqlite")
    results.enqueue(instance("1.1"), tmp_path / "1.1.dcm", now=1.0)
    (pending,) = results.due(now=1.0, limit=1)
    results.sending([pending])  # ... and the process is killed before the answer arrives
    results.close()
    results = Results(tmp_path / "db.sqlite")
    (pending,) = results.due(now=1.0, limit=1)
    results.sending([pending])
    assert results.stored(pending, IMPORTED, None, None, now=3.0) == 1


def test_an_answer_that_stored_nothing_is_no_duplicate_and_a_lost_one_is(tmp_path: Path) -> None:
    results = Results(tmp_path / "db.sqlite")
    results.enqueue(instance("1.1"), tmp_path / "1.1.dcm", now=1.0)
    (pending,) = results.due(now=1.0, limit=1)
    results.sending([pending])
    results.retry_later(pending, "StoreDICOM answered HTTP 429", at=1.0, answered=True)
    results.sending([pending])
    results.refused([pending])  # a 400 about several instances: each is asked again alone
    results.sending([pending])
    results.retry_later(pending, "StoreDICOM did not answer in time", at=1.0, answered=False)
    results.sending([pending])
    assert results.stored(pending, IMPORTED, None, None, now=3.0) == 1, "only the timed-out request may have stored it"


def test_a_new_receipt_starts_over_and_a_late_answer_about_the_old_one_changes_nothing(tmp_path: Path) -> None:
    results = Results(tmp_path / "db.sqlite")
    results.enqueue(instance("1.1"), tmp_path / "1.1.dcm", now=1.0)
    (old,) = results.due(now=1.0, limit=1)
    results.sending([old])
    results.stored(old, IMPORTED, "abc", None, now=2.0)
    results.enqueue(instance("1.1"), tmp_path / "1.1.dcm", now=5.0)  # the modality sends it again
    (new,) = results.due(now=5.0, limit=1)
    assert new.generation == old.generation + 1 and new.attempts == 0
    assert results.stored(old, IMPORTED, "stale", None, now=6.0) == 0
    (row,) = study_rows(tmp_path / "db.sqlite", STUDY)
    assert row.status == FORWARDING and row.image_set_id is None
    results.sending([new])
    assert results.stored(new, IMPORTED, "abc", None, now=7.0) == 1, "stored in HealthImaging a second time"
