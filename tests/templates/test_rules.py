"""A launch with the defaults: only the network is asked for, and every Rule passes in each HealthImaging Region."""

from __future__ import annotations

from typing import Any

import pytest

from tests.templates import cfn

# Each association may hold a PDU of up to 1 MiB while it arrives; each receiver process, its S3 part buffers and
# headroom take about 256 MiB (the template's comment on the AssociationsFit Rules).
MEBIBYTES_PER_ASSOCIATION = 1.25
MEBIBYTES_FOR_THE_PROCESS = 256


def test_only_the_network_parameters_are_required(template: dict[str, Any]) -> None:
    required = {name for name, spec in template["Parameters"].items() if "Default" not in spec}
    assert required == set(cfn.REQUIRED_EXAMPLES) == {"VpcID", "PublicSubnetIDs", "PrivateSubnetIDs", "VpcCIDR",
                                                      "PeerCIDR1"}  # fmt: skip
    assert "ArtifactBucketRegion" not in template["Parameters"], "no Region parameter to get wrong"


@pytest.mark.parametrize("region", cfn.HEALTHIMAGING_REGIONS)
def test_every_rule_passes_with_the_defaults(template: dict[str, Any], region: str) -> None:
    resolver = cfn.Resolver(template, cfn.parameter_values(template), region)
    assert resolver.failed_rules() == []


def test_the_region_rule_refuses_a_region_without_healthimaging(template: dict[str, Any]) -> None:
    resolver = cfn.Resolver(template, cfn.parameter_values(template), "ap-northeast-1")
    (failure,) = resolver.failed_rules()
    assert failure.startswith("HealthImagingRegion:")


@pytest.mark.parametrize("region", cfn.HEALTHIMAGING_REGIONS)
def test_the_default_artifacts_are_read_from_the_regional_copy(template: dict[str, Any], region: str) -> None:
    base = template["Parameters"]["ArtifactBucketName"]["Default"]
    resources = cfn.Resolver(template, cfn.parameter_values(template), region).resources()
    buckets = {resources[name]["Properties"]["Code"]["S3Bucket"] for name in resources if name.endswith("Function")}
    buckets.add(resources["ImportStateMachine"]["Properties"]["DefinitionS3Location"]["Bucket"])
    assert buckets == {f"{base}-{region}"}
    assert len(f"{base}-{region}") <= 63, "an S3 bucket name has at most 63 characters"


def test_a_private_copy_is_read_where_it_is(template: dict[str, Any]) -> None:
    parameters = cfn.parameter_values(template, ArtifactBucketName="my-own-artifacts", ArtifactKeyPrefix="mine/")
    resources = cfn.Resolver(template, parameters, "eu-west-2").resources()
    code = resources["SweeperFunction"]["Properties"]["Code"]
    assert code["S3Bucket"] == "my-own-artifacts"
    assert code["S3Key"]["Fn::Sub"][1]["Package"] == "sweeper"


def _association_failures(template: dict[str, Any], memory: str, associations: str) -> list[str]:
    parameters = cfn.parameter_values(template, TaskMemoryLimit=memory, MaximumAssociations=associations)
    return [f for f in cfn.Resolver(template, parameters).failed_rules() if f.startswith("AssociationsFit")]


def test_maximum_associations_fit_the_task_memory(template: dict[str, Any]) -> None:
    """Every combination the console offers is refused exactly when its associations do not fit its memory."""
    parameters = template["Parameters"]
    for memory in parameters["TaskMemoryLimit"]["AllowedValues"]:
        fits = (int(memory) - MEBIBYTES_FOR_THE_PROCESS) / MEBIBYTES_PER_ASSOCIATION
        for associations in parameters["MaximumAssociations"]["AllowedValues"]:
            refused = bool(_association_failures(template, str(memory), str(associations)))
            assert refused is (int(associations) > fits), (memory, associations)
    choices = map(str, parameters["MaximumAssociations"]["AllowedValues"])
    assert str(parameters["MaximumAssociations"]["Default"]) in choices


def test_a_task_of_several_receiver_processes_has_memory_for_each(template: dict[str, Any]) -> None:
    """Each receiver process takes its own 256 MiB: every task size the Rules allow holds its processes and its
    associations."""
    parameters = template["Parameters"]
    for cpu in parameters["TaskCPU"]["AllowedValues"]:
        processes = int(template["Mappings"]["ReceiverProcesses"][str(cpu)]["PerTask"])
        for memory in parameters["TaskMemoryLimit"]["AllowedValues"]:
            for associations in parameters["MaximumAssociations"]["AllowedValues"]:
                values = cfn.parameter_values(
                    template, TaskCPU=cpu, TaskMemoryLimit=memory, MaximumAssociations=associations,
                    StoreDICOMForwarding="Disabled",
                )  # fmt: skip
                if cfn.Resolver(template, values).failed_rules():
                    continue
                needed = processes * MEBIBYTES_FOR_THE_PROCESS + int(associations) * MEBIBYTES_PER_ASSOCIATION
                assert needed <= int(memory), (cpu, memory, associations)


def test_an_existing_data_store_key_needs_the_data_store(template: dict[str, Any]) -> None:
    key = "arn:aws:kms:us-east-1:123456789012:key/0f1e2d3c-4b5a-6978-8897-a6b5c4d3e2f1"
    alone = cfn.Resolver(template, cfn.parameter_values(template, ExistingDatastoreKmsKeyArn=key))
    assert [f.split(":")[0] for f in alone.failed_rules()] == ["DatastoreKeyNeedsTheDatastore"]
    both = cfn.parameter_values(template, ExistingDatastoreKmsKeyArn=key, ExistingDatastoreId="a" * 32)
    assert cfn.Resolver(template, both).failed_rules() == []
