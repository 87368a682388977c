"""The local store's path rule, the last guard between a received UID and the filesystem."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from scp.status import Status, StoreFailure
from scp.storage import ReceivedInstance
from scp.storage.local import LocalStore


def instance(study: str = "1.2", series: str = "1.2.3", sop: str = "1.2.3.4") -> ReceivedInstance:
    return ReceivedInstance("1.2.840.10008.5.1.4.1.1.2", sop, study, series, "1.2.840.10008.1.2.1", "CT1", 10,
                            datetime.now(UTC))  # fmt: skip


def test_path_is_study_series_instance_under_the_root(tmp_path: Path) -> None:
    assert LocalStore(tmp_path).path_for(instance()) == tmp_path.resolve() / "1.2" / "1.2.3" / "1.2.3.4.dcm"


@pytest.mark.parametrize("field", ["study", "series", "sop"])
@pytest.mark.parametrize("value", ["", ".", "..", "../x", "/etc", "a\x00b"])
def test_names_that_would_leave_the_store_are_refused(tmp_path: Path, field: str, value: str) -> None:
    if field == "sop" and value in ("", ".", ".."):
        value = value + "/x"  # ".dcm" and "..dcm" are harmless names; a slash is not
    with pytest.raises(StoreFailure) as raised:
        LocalStore(tmp_path).path_for(instance(**{field: value}))
    assert raised.value.status == Status.CANNOT_UNDERSTAND


def test_store_renames_into_place(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    (tmp_path / "store").mkdir()
    staged = tmp_path / "staged.dcm"
    staged.write_bytes(b"object")
    stored = store.store(staged, instance())
    assert Path(stored.location).read_bytes() == b"object" and not stored.replaced
    staged.write_bytes(b"again")
    assert store.store(staged, instance()).replaced
    assert not staged.exists()
