"""The local store: its path rule (the last guard between a received UID and the filesystem) and durability."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from scp.instances import ReceivedInstance
from scp.status import Status, StoreFailure
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


@pytest.fixture
def directory_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The directories fsync'd, in order (the system call is observed; the store itself runs unchanged)."""
    synced: list[Path] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def staged_file(tmp_path: Path, content: bytes = b"object") -> Path:
    staged = tmp_path / f"staged-{len(list(tmp_path.glob('staged-*')))}"
    staged.write_bytes(content)
    return staged


def test_directories_another_association_just_created_are_made_durable_before_the_store_returns(
    tmp_path: Path, directory_fsyncs: list[Path]
) -> None:
    root = tmp_path / "store"
    root.mkdir()
    store = LocalStore(root)
    # Another association has just created the study and series directories and not yet fsync'd their parents.
    (root / "1.2" / "1.2.3").mkdir(parents=True)
    store.store(staged_file(tmp_path), instance())
    root = root.resolve()
    # Each entry on the path is durable in its parent: the root in its own parent, the study, the series, the file.
    assert directory_fsyncs == [root.parent, root, root / "1.2", root / "1.2" / "1.2.3"]


def test_a_second_object_in_a_known_series_costs_one_directory_fsync(
    tmp_path: Path, directory_fsyncs: list[Path]
) -> None:
    root = tmp_path / "store"
    root.mkdir()
    store = LocalStore(root)
    store.store(staged_file(tmp_path), instance(sop="1.2.3.4"))
    directory_fsyncs.clear()
    store.store(staged_file(tmp_path), instance(sop="1.2.3.5"))
    assert directory_fsyncs == [root.resolve() / "1.2" / "1.2.3"]


def test_a_series_removed_behind_the_store_is_made_again(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    store = LocalStore(root)
    store.store(staged_file(tmp_path), instance(sop="1.2.3.4"))
    shutil.rmtree(root / "1.2")  # an operator clearing old studies
    stored = store.store(staged_file(tmp_path, b"again"), instance(sop="1.2.3.5"))
    assert Path(stored.location).read_bytes() == b"again"


def test_a_file_where_the_study_directory_belongs_is_refused_each_time(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    (root / "1.2").write_text("not a directory")
    store = LocalStore(root)
    for _ in range(2):
        with pytest.raises(StoreFailure) as raised:
            store.store(staged_file(tmp_path), instance())
        assert raised.value.status == Status.OUT_OF_RESOURCES
    (root / "1.2").unlink()
    assert Path(store.store(staged_file(tmp_path), instance()).location).read_bytes() == b"object"
