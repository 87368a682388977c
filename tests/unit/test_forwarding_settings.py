"""DATASTORE_ID and HEALTHIMAGING_DICOMWEB_URL: parsed strictly, and refused where forwarding cannot work."""

from __future__ import annotations

import pytest

from scp.config import Settings, SettingsError

DATASTORE = "0123456789abcdef0123456789abcdef"


def test_forwarding_is_off_unless_a_data_store_is_named() -> None:
    settings = Settings.from_env({})
    assert settings.datastore_id is None and settings.healthimaging_dicomweb_url is None


def test_a_data_store_and_an_endpoint_are_taken_as_given() -> None:
    settings = Settings.from_env({"DATASTORE_ID": DATASTORE, "HEALTHIMAGING_DICOMWEB_URL": "http://127.0.0.1:8080/"})
    assert settings.datastore_id == DATASTORE
    assert settings.healthimaging_dicomweb_url == "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DATASTORE_ID", "0123456789ABCDEF0123456789ABCDEF", "DATASTORE_ID: expected a data store id"),
        ("DATASTORE_ID", "../../../etc/passwd", "DATASTORE_ID: expected a data store id"),
        ("HEALTHIMAGING_DICOMWEB_URL", "ftp://example.com", "HEALTHIMAGING_DICOMWEB_URL: expected an http(s) URL"),
        ("HEALTHIMAGING_DICOMWEB_URL", "https://x/datastore/a/studies", "/datastore/<id>/studies is added"),
        ("HEALTHIMAGING_DICOMWEB_URL", "https://x?a=b", "HEALTHIMAGING_DICOMWEB_URL: expected an http(s) URL"),
    ],
)
def test_bad_values_are_named(variable: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({variable: value})
    assert message in str(raised.value)


def test_forwarding_from_the_s3_store_is_allowed_but_not_commitment_after_it() -> None:
    settings = Settings.from_env({"DATASTORE_ID": DATASTORE, "DICOM_BUCKET": "my-dicom-bucket"})
    assert (settings.datastore_id, settings.dicom_bucket) == (DATASTORE, "my-dicom-bucket")
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({**{"DATASTORE_ID": DATASTORE, "DICOM_BUCKET": "b-1"}, "COMMITMENT_AFTER": "healthimaging"})
    assert "COMMITMENT_AFTER: healthimaging reads a standalone gateway's forwarding results" in str(raised.value)
