from __future__ import annotations

import pytest

from scp.uids import is_valid_uid


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.2", "2.25.1", "1", "1.2.3.04", "1." + "2" * 62])
def test_valid(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid",
    ["", ".", "1.", ".1", "1..2", "1.2.a", "../1", "/1.2", "1.2\x00", "1\\2", " 1.2", "1." + "2" * 63, "１.2"],  # noqa: RUF001 - a full-width digit, on purpose
)
def test_invalid(uid: str) -> None:
    assert not is_valid_uid(uid)
