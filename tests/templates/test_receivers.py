"""The receivers' task definition: every daemon setting wired, values the daemon accepts, the Fargate contract."""

from __future__ import annotations

from typing import Any

import pytest

from scp.config import Settings
from tests.templates import cfn

NLB_TCP_IDLE_TIMEOUT_SECONDS = 350
FARGATE_MAX_STOP_TIMEOUT_SECONDS = 120
PARAMETER_FOR = {
    "SCP_PORT": "SCPPort",
    "AE_TITLE": "SCPAETitle",
    "REQUIRE_CALLED_AE_TITLE": "RequireCalledAETitle",
    "REQUIRE_CALLING_AE_TITLE": "AllowedCallingAETitles",
    "DIMSE_TIMEOUT": "DIMSETimeout",
    "MAXIMUM_ASSOCIATIONS": "MaximumAssociations",
    "SUPPORTED_SOP_CLASS_UIDS": "SupportedSOPClassUIDs",
    "LOG_LEVEL": "LogLevel",
    "BATCH_MAX_FILES": "BatchMaxFiles",
    "BATCH_MAX_BYTES": "BatchMaxBytes",
    "BATCH_WINDOW_SECONDS": "BatchWindowSeconds",
}


CREATED_DATASTORE_ID = "4f1b2c3d4e5f60718293a4b5c6d7e8f9"
REFERENCES = {
    "DicomBucket": "stack-dicombucket-1a2b3c4d5e6f",
    "AWS::Region": "us-east-1",
    "Datastore.DatastoreId": CREATED_DATASTORE_ID,
}


def _container(template: dict[str, Any]) -> dict[str, Any]:
    definition = template["Resources"]["ReceiverTaskDefinition"]["Properties"]
    (container,) = definition["ContainerDefinitions"]
    return dict(container)


def _environment(template: dict[str, Any], **parameters: Any) -> dict[str, str]:
    """The container's environment as the daemon would see it for these parameter values."""
    resolver = cfn.Resolver(template, cfn.parameter_values(template, **parameters))
    environment = {}
    for item in resolver.resolve(_container(template)["Environment"]):
        value = item["Value"]
        if isinstance(value, dict):  # a resource reference: give it a realistic value
            value = REFERENCES[value.get("Ref") or ".".join(value["Fn::GetAtt"])]
        environment[item["Name"]] = str(value)
    return environment


def test_the_task_definition_sets_only_settings_the_daemon_knows(template: dict[str, Any]) -> None:
    names = {item["Name"] for item in _container(template)["Environment"]}
    settings = {name for name, _default, _meaning in Settings.documentation()}
    # AWS_REGION is boto3's; PROXY_PROTOCOL is the daemon's PROXY protocol v2 switch (docs/security.rst).
    assert names - settings <= {"AWS_REGION", "PROXY_PROTOCOL"}, sorted(names - settings)
    assert set(PARAMETER_FOR) <= names


def test_no_daemon_default_is_repeated_as_a_literal(template: dict[str, Any]) -> None:
    """A fixed value in the task definition is one the stack needs to differ from the daemon's default."""
    defaults = {name: default for name, default, _meaning in Settings.documentation()}
    for item in _container(template)["Environment"]:
        value = item["Value"]
        if isinstance(value, str) and item["Name"] in defaults:
            assert value != defaults[item["Name"]], f"{item['Name']}={value} is the daemon's default"


def test_daemon_settings_come_from_their_parameters(template: dict[str, Any]) -> None:
    values = {item["Name"]: item["Value"] for item in _container(template)["Environment"]}
    for variable, parameter in PARAMETER_FOR.items():
        assert values[variable] == {"Ref": parameter}, variable
    assert values["DICOM_BUCKET"] == {"Ref": "DicomBucket"}


def test_the_daemon_accepts_the_defaults(template: dict[str, Any]) -> None:
    settings = Settings.from_env(_environment(template))
    assert settings.ae_title == "STORESCP"
    assert settings.scp_port == 11112
    assert settings.dicom_bucket == "stack-dicombucket-1a2b3c4d5e6f"
    assert str(settings.storage_dir) == "/app/storage"


def test_the_receivers_forward_to_the_stack_data_store_unless_told_not_to(template: dict[str, Any]) -> None:
    assert template["Parameters"]["StoreDICOMForwarding"]["Default"] == "Enabled"
    existing = "bd9e62ed2ef14b7d8a1a6b4f0f3c2d11"
    for parameters, datastore_id in (
        ({}, CREATED_DATASTORE_ID),
        ({"ExistingDatastoreId": existing}, existing),
        ({"StoreDICOMForwarding": "Disabled"}, None),
        ({"StoreDICOMForwarding": "Disabled", "ExistingDatastoreId": existing}, None),
    ):
        environment = _environment(template, **parameters)
        settings = Settings.from_env(environment)
        assert settings.datastore_id == datastore_id, parameters
        assert settings.dicom_bucket == "stack-dicombucket-1a2b3c4d5e6f"  # forwarding beside S3, never instead
        # The StoreDICOM endpoint follows the Region the task runs in.
        assert environment["AWS_REGION"] == "us-east-1" and "HEALTHIMAGING_DICOMWEB_URL" not in environment


def test_each_vcpu_of_a_task_receives_unless_storedicom_forwarding_runs(template: dict[str, Any]) -> None:
    """One receiver process per vCPU of the task, set by the stack (the container may not see the task's CPU limit),
    and one with StoreDICOM forwarding, which the daemon would refuse beside more."""
    for task_cpu in template["Parameters"]["TaskCPU"]["AllowedValues"]:
        vcpus = max(1, int(task_cpu) // 1024)
        alone = Settings.from_env(_environment(template, TaskCPU=task_cpu, StoreDICOMForwarding="Disabled"))
        assert alone.receiver_processes == vcpus, task_cpu
        forwarding = Settings.from_env(_environment(template, TaskCPU=task_cpu))
        assert forwarding.datastore_id and forwarding.receiver_processes == 1, task_cpu


@pytest.mark.parametrize("bound", ["MinValue", "MaxValue"])
def test_the_daemon_accepts_every_numeric_parameter_at_its_bounds(template: dict[str, Any], bound: str) -> None:
    wired = {parameter for parameter in PARAMETER_FOR.values()}
    for name, spec in template["Parameters"].items():
        if name in wired and bound in spec:
            Settings.from_env(_environment(template, **{name: spec[bound]}))


def test_the_daemon_accepts_the_optional_lists(template: dict[str, Any]) -> None:
    settings = Settings.from_env(
        _environment(
            template,
            AllowedCallingAETitles="CT01,MR 2",
            SupportedSOPClassUIDs="1.2.840.10008.5.1.4.1.1.2,1.2.840.10008.5.1.4.1.1.4",
            RequireCalledAETitle="true",
        )
    )
    assert settings.require_calling_ae_title == ("CT01", "MR 2")
    assert settings.require_called_ae_title is True
    assert len(settings.supported_sop_class_uids) == 2


def test_timeouts_fit_the_load_balancer_and_fargate(template: dict[str, Any]) -> None:
    settings = Settings.from_env(_environment(template))
    container = _container(template)
    assert settings.network_timeout < NLB_TCP_IDLE_TIMEOUT_SECONDS
    assert container["StopTimeout"] == FARGATE_MAX_STOP_TIMEOUT_SECONDS
    assert settings.shutdown_grace_seconds < container["StopTimeout"]
    attributes = {
        item["Key"]: item["Value"]
        for item in template["Resources"]["ReceiverTargetGroup"]["Properties"]["TargetGroupAttributes"]
    }
    assert attributes["deregistration_delay.connection_termination.enabled"] == "false"
    assert int(attributes["deregistration_delay.timeout_seconds"]) <= 300


def test_container_is_non_root_read_only_with_a_writable_receive_area(template: dict[str, Any]) -> None:
    container = _container(template)
    definition = template["Resources"]["ReceiverTaskDefinition"]["Properties"]
    assert container["User"] not in ("root", "0")
    assert container["ReadonlyRootFilesystem"] is True
    assert container["LinuxParameters"]["Capabilities"]["Drop"] == ["ALL"]
    (mount,) = container["MountPoints"]
    assert mount["ContainerPath"] == _environment(template)["STORAGE_DIR"]
    assert mount["ReadOnly"] is False
    assert mount["SourceVolume"] in {volume["Name"] for volume in definition["Volumes"]}
    assert definition["RequiresCompatibilities"] == ["FARGATE"]
    assert definition["Cpu"] == {"Ref": "TaskCPU"}
    assert definition["Memory"] == {"Ref": "TaskMemoryLimit"}


def test_health_check_logs_and_port(template: dict[str, Any]) -> None:
    container = _container(template)
    assert container["HealthCheck"]["Command"] == ["CMD", "dicom-store-scp", "healthcheck"]
    assert container["PortMappings"] == [{"ContainerPort": {"Ref": "SCPPort"}, "Protocol": "tcp"}]
    options = container["LogConfiguration"]["Options"]
    assert container["LogConfiguration"]["LogDriver"] == "awslogs"
    # The seeds name the log group <stack-name>-PacsServerTaskDefPacsContainerLogGroup*.
    assert options["awslogs-group"] == {"Ref": "PacsServerTaskDefPacsContainerLogGroup"}
    assert "LogGroupName" not in template["Resources"]["PacsServerTaskDefPacsContainerLogGroup"]["Properties"]


def test_service_runs_in_private_subnets_and_autoscales_between_the_parameters(template: dict[str, Any]) -> None:
    resources = template["Resources"]
    service = resources["ReceiverService"]["Properties"]
    network = service["NetworkConfiguration"]["AwsvpcConfiguration"]
    assert network["Subnets"] == {"Ref": "PrivateSubnetIDs"}
    assert network["AssignPublicIp"] == "DISABLED"
    assert service["DesiredCount"] == {"Ref": "TaskDesiredCount"}
    target = resources["ReceiverScalableTarget"]["Properties"]
    assert target["MinCapacity"] == {"Ref": "TaskDesiredCount"}
    assert target["MaxCapacity"] == {"Ref": "AutoscaleMaxCapacity"}
    policy = resources["ReceiverCpuScaling"]["Properties"]
    assert policy["PolicyType"] == "TargetTrackingScaling"
    assert resources["Cluster"]["Properties"]["ClusterSettings"] == [{"Name": "containerInsights", "Value": "enabled"}]
