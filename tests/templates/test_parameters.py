"""Parameters: the seeds' names and defaults, constraints on every string, the console form and the Rules."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import cfnlint
import pytest
import yaml

from tests.templates.cfn import ROOT

SEED_DEFAULTS = {
    "SCPAETitle": "STORESCP",
    "SCPPort": 11112,
    "DIMSETimeout": 60,
    "MaximumAssociations": 300,
    "TaskCPU": 1024,
    "TaskMemoryLimit": 2048,
    "TaskDesiredCount": 1,
    "AutoscaleMaxCapacity": 3,
}
SEED_REQUIRED = ["VpcID", "PublicSubnetIDs", "PrivateSubnetIDs", "VpcCIDR", "PeerCIDR1"]
SEED_OPTIONAL_EMPTY = ["PeerCIDR2", "PeerCIDR3", "TLSCertificateARN", "SecurityGroupID"]
HEALTHIMAGING_REGIONS = {"us-east-1", "us-west-2", "eu-west-1", "eu-west-2", "ap-southeast-2"}


def _matches(template: dict[str, Any], parameter: str, value: str) -> bool:
    return re.fullmatch(template["Parameters"][parameter]["AllowedPattern"], value) is not None


def test_seed_parameters_keep_the_seed_defaults(template: dict[str, Any]) -> None:
    parameters = template["Parameters"]
    for name, default in SEED_DEFAULTS.items():
        assert str(parameters[name]["Default"]) == str(default), name
    for name in SEED_REQUIRED:
        assert "Default" not in parameters[name], f"{name} must be given by the admin"
    for name in SEED_OPTIONAL_EMPTY:
        assert parameters[name]["Default"] == "", name


def test_network_parameters_use_aws_specific_types(template: dict[str, Any]) -> None:
    parameters = template["Parameters"]
    assert parameters["VpcID"]["Type"] == "AWS::EC2::VPC::Id"
    assert parameters["PublicSubnetIDs"]["Type"] == "List<AWS::EC2::Subnet::Id>"
    assert parameters["PrivateSubnetIDs"]["Type"] == "List<AWS::EC2::Subnet::Id>"


def test_every_string_parameter_is_constrained_and_its_default_passes(template: dict[str, Any]) -> None:
    for name, spec in template["Parameters"].items():
        if spec["Type"] != "String":
            continue
        assert spec.get("AllowedPattern") and spec.get("ConstraintDescription"), name
        if "Default" in spec:
            assert _matches(template, name, str(spec["Default"])), f"{name} default fails its own pattern"


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("STORESCP", True),
        ("MY HOSPITAL", True),
        ("A" * 16, True),
        ("CT-01_MAIN.SITE", True),
        ("A" * 17, False),
        ("", False),
        (" LEADING", False),
        ("BACK\\SLASH", False),
        ("TAB\tTITLE", False),
    ],
)
def test_ae_title_pattern_follows_the_ae_value_representation(
    template: dict[str, Any], value: str, accepted: bool
) -> None:
    assert _matches(template, "SCPAETitle", value) is accepted


@pytest.mark.parametrize(
    ("value", "accepted"),
    [("", True), ("CT01", True), ("CT01,MR 2,US_3", True), ("CT01,", False), ("A\\B", False), ("A" * 17, False)],
)
def test_calling_ae_title_list_pattern(template: dict[str, Any], value: str, accepted: bool) -> None:
    assert _matches(template, "AllowedCallingAETitles", value) is accepted


@pytest.mark.parametrize(
    ("value", "accepted"),
    [("10.0.0.0/16", True), ("203.0.113.0/24", True), ("0.0.0.0/0", True), ("10.0.0.0/33", False),
     ("256.1.1.0/24", False), ("10.0.0.0", False), ("", False)],
)
def test_cidr_patterns(template: dict[str, Any], value: str, accepted: bool) -> None:
    assert _matches(template, "PeerCIDR1", value) is accepted
    assert _matches(template, "VpcCIDR", value) is accepted
    # The optional networks also accept nothing at all.
    assert _matches(template, "PeerCIDR2", value) is (accepted or value == "")


def test_tls_certificate_pattern(template: dict[str, Any]) -> None:
    arn = "arn:aws:acm:us-east-1:123456789012:certificate/0f1e2d3c-4b5a-6978-8897-a6b5c4d3e2f1"
    assert _matches(template, "TLSCertificateARN", arn)
    assert _matches(template, "TLSCertificateARN", "")
    assert not _matches(template, "TLSCertificateARN", "arn:aws:iam::123456789012:server-certificate/x")


def test_console_form_groups_and_labels_every_parameter_once(template: dict[str, Any]) -> None:
    interface = template["Metadata"]["AWS::CloudFormation::Interface"]
    grouped = [name for group in interface["ParameterGroups"] for name in group["Parameters"]]
    assert sorted(grouped) == sorted(template["Parameters"]), "each parameter in exactly one group"
    assert len(grouped) == len(set(grouped))
    assert set(interface["ParameterLabels"]) == set(template["Parameters"])


def test_rules_keep_the_stack_in_healthimaging_regions(template: dict[str, Any]) -> None:
    (assertion,) = template["Rules"]["HealthImagingRegion"]["Assertions"]
    regions, reference = assertion["Assert"]["Fn::Contains"]
    assert reference == {"Ref": "AWS::Region"}
    assert set(regions) == HEALTHIMAGING_REGIONS
    assert "ap-northeast-1" not in regions


def test_every_allowed_region_offers_the_healthimaging_datastore_resource() -> None:
    providers = Path(cfnlint.__file__).parent / "data" / "schemas" / "providers"
    for region in HEALTHIMAGING_REGIONS:
        types = json.loads((providers / f"{region}.json").read_text())
        assert "AWS::HealthImaging::Datastore" in types, region
    tokyo = json.loads((providers / "ap-northeast-1.json").read_text())
    assert "AWS::HealthImaging::Datastore" not in tokyo


def test_fargate_size_rules_cover_every_cpu_and_allow_the_default(template: dict[str, Any]) -> None:
    parameters = template["Parameters"]
    rules = {
        str(rule["RuleCondition"]["Fn::Equals"][1]): rule["Assertions"][0]["Assert"]["Fn::Contains"][0]
        for name, rule in template["Rules"].items()
        if name.startswith("FargateTaskSize")
    }
    assert set(rules) == {str(cpu) for cpu in parameters["TaskCPU"]["AllowedValues"]}
    memories = {str(memory) for memory in parameters["TaskMemoryLimit"]["AllowedValues"]}
    assert set().union(*rules.values()) == memories
    assert str(parameters["TaskMemoryLimit"]["Default"]) in rules[str(parameters["TaskCPU"]["Default"])]


def test_taskcat_sets_only_parameters_the_template_has(template: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / ".taskcat.yml").read_text())
    given = set(config["project"]["parameters"])
    for test in config["tests"].values():
        given |= set(test.get("parameters", {}))
    assert given <= set(template["Parameters"]), sorted(given - set(template["Parameters"]))
    assert set(config["project"]["regions"]) == HEALTHIMAGING_REGIONS
    # taskcat deletes its stacks, which deletion protection would refuse.
    assert config["project"]["parameters"]["LoadBalancerDeletionProtection"] == "false"
