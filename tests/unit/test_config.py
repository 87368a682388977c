"""Settings: defaults, parsing, and one error naming every bad variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from scp.config import DEFAULT_MAXIMUM_PDU_SIZE, Settings, SettingsError
from scp.cpus import usable_cpus


def test_defaults_match_the_container_readme() -> None:
    settings = Settings.from_env({})
    assert settings.scp_port == 11112
    assert settings.ae_title == "STORESCP"
    assert settings.dicom_bucket is None
    assert settings.require_called_ae_title is False
    assert settings.require_calling_ae_title == ()
    assert settings.max_pool_connections == 50
    assert settings.dimse_timeout == 60
    assert settings.maximum_associations == 300
    assert settings.maximum_pdu_size == 0 and settings.effective_pdu_size == DEFAULT_MAXIMUM_PDU_SIZE
    assert settings.network_timeout == 90
    assert settings.supported_sop_class_uids == ()
    assert settings.log_level == "INFO"
    assert settings.storage_dir == Path("./storage")


def test_values_are_parsed_and_typed() -> None:
    settings = Settings.from_env(
        {
            "DICOM_BUCKET": "my-dicom-bucket",
            "SCP_PORT": "104",
            "AE_TITLE": " PACS ",
            "REQUIRE_CALLED_AE_TITLE": "Yes",
            "REQUIRE_CALLING_AE_TITLE": "CT1, MR2",
            "SUPPORTED_SOP_CLASS_UIDS": "1.2.840.10008.5.1.4.1.1.2, 1.2.840.10008.5.1.4.1.1.4",
            "MAXIMUM_PDU_SIZE": "65536",
            "LOG_LEVEL": "debug",
        }
    )
    assert settings.dicom_bucket == "my-dicom-bucket"
    assert settings.scp_port == 104
    assert settings.ae_title == "PACS"
    assert settings.require_called_ae_title is True
    assert settings.require_calling_ae_title == ("CT1", "MR2")
    assert settings.supported_sop_class_uids == ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4")
    assert settings.effective_pdu_size == 65536
    assert settings.log_level == "DEBUG"


def test_every_bad_variable_is_named_at_once() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(
            {
                "SCP_PORT": "0",
                "AE_TITLE": "A" * 17,
                "REQUIRE_CALLED_AE_TITLE": "maybe",
                "SUPPORTED_SOP_CLASS_UIDS": "1.2.840.10008.5.1.4.1.1.2,1.2.x",
                "DIMSE_TIMEOUT": "-1",
                "MAXIMUM_ASSOCIATIONS": "many",
                "DICOM_BUCKET": "Not_A_Bucket",
            }
        )
    named = [problem.split(":")[0] for problem in raised.value.problems]
    assert named == [
        "DICOM_BUCKET", "SCP_PORT", "AE_TITLE", "REQUIRE_CALLED_AE_TITLE", "DIMSE_TIMEOUT",
        "MAXIMUM_ASSOCIATIONS", "SUPPORTED_SOP_CLASS_UIDS",
    ]  # fmt: skip
    assert "SCP_PORT: expected 1-65535, got '0'" in str(raised.value)


@pytest.mark.parametrize("title", ["", "   ", "BACK\\SLASH", "TAB\tTITLE", "Ünicode", "X" * 17])
def test_invalid_ae_titles(title: str) -> None:
    with pytest.raises(SettingsError, match="AE_TITLE"):
        Settings.from_env({"AE_TITLE": title})


@pytest.mark.parametrize("value", ["1", "4095", "4194305", "-5"])
def test_pdu_size_outside_the_allowed_range(value: str) -> None:
    with pytest.raises(SettingsError, match="MAXIMUM_PDU_SIZE"):
        Settings.from_env({"MAXIMUM_PDU_SIZE": value})


def test_nan_timeouts_are_rejected() -> None:
    with pytest.raises(SettingsError, match="NETWORK_TIMEOUT"):
        Settings.from_env({"NETWORK_TIMEOUT": "nan"})


def test_batches_stay_inside_healthimaging_job_quotas() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"BATCH_MAX_FILES": "5001", "BATCH_MAX_BYTES": "10000000001"})
    assert {p.split(":")[0] for p in raised.value.problems} == {"BATCH_MAX_FILES", "BATCH_MAX_BYTES"}


def test_documentation_lists_every_field_with_its_default() -> None:
    documented = {name: default for name, default, _ in Settings.documentation()}
    assert "SCP_PORT" in documented and documented["SCP_PORT"] == "11112"
    # A default that follows another setting is documented as the rule, not as a value.
    assert documented.pop("ACSE_TIMEOUT") == "min(30, NETWORK_TIMEOUT)"
    assert Settings.from_env(documented) == Settings.from_env({})


def test_acse_timeout_follows_a_shorter_network_timeout() -> None:
    assert Settings.from_env({}).acse_timeout == 30
    assert Settings.from_env({"NETWORK_TIMEOUT": "10"}).acse_timeout == 10
    assert Settings.from_env({"NETWORK_TIMEOUT": "10", "ACSE_TIMEOUT": ""}).acse_timeout == 10
    assert Settings.from_env({"NETWORK_TIMEOUT": "45"}).acse_timeout == 30
    assert Settings.from_env({"NETWORK_TIMEOUT": "10", "ACSE_TIMEOUT": "5"}).acse_timeout == 5


def test_an_error_about_a_default_says_so_and_what_to_set() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"ACSE_TIMEOUT": "120"})
    assert raised.value.problems == [
        "ACSE_TIMEOUT: 120 exceeds NETWORK_TIMEOUT (90, its default); set NETWORK_TIMEOUT to at least 120, "
        "or ACSE_TIMEOUT to at most 90"
    ]
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"ACSE_TIMEOUT": "20", "NETWORK_TIMEOUT": "10"})
    assert raised.value.problems == [
        "ACSE_TIMEOUT: 20 exceeds NETWORK_TIMEOUT (10); set NETWORK_TIMEOUT to at least 20, "
        "or ACSE_TIMEOUT to at most 10"
    ]


def test_aws_region_and_proxy_protocol() -> None:
    assert Settings.from_env({}).aws_region is None
    assert Settings.from_env({"AWS_REGION": "eu-west-2"}).aws_region == "eu-west-2"
    assert Settings.from_env({"AWS_REGION": "us-gov-west-1"}).aws_region == "us-gov-west-1"
    assert Settings.from_env({}).proxy_protocol is False
    assert Settings.from_env({"PROXY_PROTOCOL": "true"}).proxy_protocol is True
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"AWS_REGION": "Europe", "PROXY_PROTOCOL": "v2"})
    assert [problem.split(":")[0] for problem in raised.value.problems] == ["PROXY_PROTOCOL", "AWS_REGION"]


def test_commitment_peers_map_ae_titles_to_addresses() -> None:
    settings = Settings.from_env({"COMMITMENT_PEERS": "CT1=10.0.0.5:104, MR1=[fd00::7]:11112,US1=us-1.example:4242"})
    assert [(p.ae_title, p.host, p.port) for p in settings.commitment_peers] == [
        ("CT1", "10.0.0.5", 104),
        ("MR1", "fd00::7", 11112),
        ("US1", "us-1.example", 4242),
    ]


@pytest.mark.parametrize(
    "value", ["CT1", "CT1=10.0.0.5", "CT1=10.0.0.5:0", "=10.0.0.5:104", "CT1=-bad-:104", "CT1=a:1,CT1=b:2", "CT1=a/b:1"]
)
def test_invalid_commitment_peers(value: str) -> None:
    with pytest.raises(SettingsError, match="COMMITMENT_PEERS"):
        Settings.from_env({"COMMITMENT_PEERS": value})


def test_commitment_after_and_timeout_are_validated() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"COMMITMENT_AFTER": "import", "COMMITMENT_TIMEOUT": "0"})
    assert {p.split(":")[0] for p in raised.value.problems} == {"COMMITMENT_AFTER", "COMMITMENT_TIMEOUT"}


def test_commitment_after_healthimaging_needs_forwarding() -> None:
    with pytest.raises(SettingsError, match="COMMITMENT_AFTER: healthimaging needs StoreDICOM forwarding"):
        Settings.from_env({"COMMITMENT_AFTER": "healthimaging"})
    forwarding = {"COMMITMENT_AFTER": "healthimaging", "DATASTORE_ID": "0123456789abcdef0123456789abcdef"}
    assert Settings.from_env(forwarding).commitment_after == "healthimaging"


def test_receiver_processes_follow_the_usable_cpus_unless_set_or_forwarding() -> None:
    cpus = min(usable_cpus(), 64)
    assert Settings.from_env({}).receiver_processes == cpus
    assert Settings.from_env({"RECEIVER_PROCESSES": "auto"}).receiver_processes == cpus
    assert Settings.from_env({"RECEIVER_PROCESSES": "AUTO"}).receiver_processes == cpus
    assert Settings.from_env({"RECEIVER_PROCESSES": "1"}).receiver_processes == 1
    assert Settings.from_env({"RECEIVER_PROCESSES": "3"}).receiver_processes == 3
    # StoreDICOM forwarding runs in one process: unset and auto give 1 with it.
    forwarding = {"DATASTORE_ID": "a" * 32}
    assert Settings.from_env(forwarding).receiver_processes == 1
    assert Settings.from_env({**forwarding, "RECEIVER_PROCESSES": "auto"}).receiver_processes == 1
    assert Settings.from_env({**forwarding, "RECEIVER_PROCESSES": "1"}).receiver_processes == 1


@pytest.mark.parametrize("value", ["0", "65", "two", "-1"])
def test_invalid_receiver_processes(value: str) -> None:
    with pytest.raises(SettingsError, match="RECEIVER_PROCESSES"):
        Settings.from_env({"RECEIVER_PROCESSES": value})


def test_several_receiver_processes_are_refused_with_forwarding() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"RECEIVER_PROCESSES": "2", "DATASTORE_ID": "a" * 32})
    assert raised.value.problems == [
        "RECEIVER_PROCESSES: StoreDICOM forwarding (DATASTORE_ID) runs in one receiver process; "
        "set RECEIVER_PROCESSES=1 or leave it unset"
    ]
