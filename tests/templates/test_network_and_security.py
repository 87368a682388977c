"""Load balancer ports (plain, TLS, optional networks), client addresses, security groups, IAM scoping, KMS,
buckets, outputs."""

from __future__ import annotations

import fnmatch
from typing import Any

import pytest

from tests.templates import cfn

CERTIFICATE = "arn:aws:acm:us-east-1:123456789012:certificate/0f1e2d3c-4b5a-6978-8897-a6b5c4d3e2f1"
DATA_SERVICES = ("s3", "dynamodb", "medical-imaging", "kms", "lambda", "states", "logs")


def _created(template: dict[str, Any], **parameters: Any) -> dict[str, dict[str, Any]]:
    return cfn.Resolver(template, cfn.parameter_values(template, **parameters)).resources()


def _ingress_rules(resources: dict[str, dict[str, Any]], group: str) -> list[dict[str, Any]]:
    """Inline and standalone ingress rules of security group ``group``."""
    rules = list(resources[group]["Properties"].get("SecurityGroupIngress", []))
    for resource in resources.values():
        is_ingress = resource["Type"] == "AWS::EC2::SecurityGroupIngress"
        if is_ingress and resource["Properties"]["GroupId"] == {"Fn::GetAtt": [group, "GroupId"]}:
            rules.append(resource["Properties"])
    return rules


def _listeners(resources: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: resource["Properties"]
        for name, resource in resources.items()
        if resource["Type"] == "AWS::ElasticLoadBalancingV2::Listener"
    }


def test_by_default_one_plain_tcp_listener(template: dict[str, Any]) -> None:
    (listener,) = _listeners(_created(template)).values()
    assert listener["Protocol"] == "TCP" and listener["Port"] == "11112"
    assert "SslPolicy" not in listener and "Certificates" not in listener
    assert listener["ListenerAttributes"] == [{"Key": "tcp.idle_timeout.seconds", "Value": "350"}]


def test_with_certificate_tls_gets_its_own_port_beside_the_plain_one(template: dict[str, Any]) -> None:
    listeners = _listeners(_created(template, TLSCertificateARN=CERTIFICATE))
    by_protocol = {listener["Protocol"]: listener for listener in listeners.values()}
    assert set(by_protocol) == {"TCP", "TLS"}
    tls = by_protocol["TLS"]
    assert tls["Port"] == "2762"  # IANA's DICOM-TLS port
    assert tls["SslPolicy"] == "ELBSecurityPolicy-TLS13-1-2-2021-06"
    assert tls["Certificates"] == [{"CertificateArn": CERTIFICATE}]
    assert by_protocol["TCP"]["Port"] == "11112"
    # Both end at the same receivers: TLS ends at the load balancer.
    assert {str(listener["DefaultActions"]) for listener in listeners.values()} == {
        str([{"Type": "forward", "TargetGroupArn": {"Ref": "ReceiverTargetGroup"}}])
    }
    outputs = cfn.Resolver(template, cfn.parameter_values(template, TLSCertificateARN=CERTIFICATE)).outputs()
    assert outputs["DICOMPort"] == "11112" and outputs["DICOMTLSPort"] == "2762"


def test_tls_alone_when_plain_dicom_is_off(template: dict[str, Any]) -> None:
    parameters = cfn.parameter_values(template, TLSCertificateARN=CERTIFICATE, PlainDICOM="false")
    resolver = cfn.Resolver(template, parameters)
    assert resolver.failed_rules() == []
    (listener,) = _listeners(resolver.resources()).values()
    assert listener["Protocol"] == "TLS"
    rules = _ingress_rules(resolver.resources(), "LoadBalancerSecurityGroup")
    assert {rule["FromPort"] for rule in rules} == {"2762"}
    assert "DICOMPort" not in resolver.outputs() and "DICOMTLSPort" in resolver.outputs()
    # Neither port: refused before anything is created.
    without = cfn.Resolver(template, cfn.parameter_values(template, PlainDICOM="false"))
    assert any(failure.startswith("AtLeastOneDICOMPort") for failure in without.failed_rules())
    same_port = cfn.Resolver(template, cfn.parameter_values(template, TLSCertificateARN=CERTIFICATE, TLSPort=11112))
    assert any(failure.startswith("TLSPortBesideThePlainPort") for failure in same_port.failed_rules())


def test_the_receivers_learn_the_modality_address_from_proxy_protocol_v2(template: dict[str, Any]) -> None:
    group = _created(template)["ReceiverTargetGroup"]["Properties"]
    attributes = {item["Key"]: item["Value"] for item in group["TargetGroupAttributes"]}
    assert attributes["proxy_protocol_v2.enabled"] == "true"
    assert attributes["preserve_client_ip.enabled"] == "false"
    (container,) = template["Resources"]["ReceiverTaskDefinition"]["Properties"]["ContainerDefinitions"]
    assert {"Name": "PROXY_PROTOCOL", "Value": "true"} in container["Environment"]
    skip = template["Resources"]["NetworkLoadBalancer"]["Metadata"]["checkov"]["skip"][0]
    assert skip["id"] == "CKV_AWS_91" and "PROXY protocol v2" in skip["comment"]


def test_empty_optional_networks_create_no_rule(template: dict[str, Any]) -> None:
    resources = _created(template)
    rules = _ingress_rules(resources, "LoadBalancerSecurityGroup")
    assert sorted(rule["CidrIp"] for rule in rules) == ["10.0.0.0/16", "203.0.113.0/24"]
    assert all(rule["CidrIp"] for rule in rules)


def test_given_optional_networks_each_get_a_rule_on_each_port(template: dict[str, Any]) -> None:
    resources = _created(
        template, PeerCIDR2="198.51.100.0/24", PeerCIDR3="192.0.2.0/24", SCPPort=4242, TLSCertificateARN=CERTIFICATE
    )
    rules = _ingress_rules(resources, "LoadBalancerSecurityGroup")
    networks = ["10.0.0.0/16", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"]
    for port in ("4242", "2762"):
        on_port = [rule for rule in rules if rule["FromPort"] == rule["ToPort"] == port]
        assert sorted(rule["CidrIp"] for rule in on_port) == networks, port
    assert all(rule["IpProtocol"] == "tcp" and rule["Description"] for rule in rules)
    assert len(rules) == 8


def test_receivers_admit_only_the_load_balancer(template: dict[str, Any]) -> None:
    resources = _created(template)
    rules = _ingress_rules(resources, "ReceiverSecurityGroup")
    assert rules and all(
        rule["SourceSecurityGroupId"] == {"Fn::GetAtt": ["LoadBalancerSecurityGroup", "GroupId"]} for rule in rules
    )
    assert all("CidrIp" not in rule for rule in rules)
    groups = resources["ReceiverService"]["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"]
    assert groups["SecurityGroups"] == [{"Fn::GetAtt": ["ReceiverSecurityGroup", "GroupId"]}]


def test_security_group_id_is_the_ecs_services_group(template: dict[str, Any]) -> None:
    """The seeds call SecurityGroupID the security group of the ECS service: given, it is that group."""
    resources = _created(template, SecurityGroupID="sg-0123456789abcdef0")
    assert "ReceiverSecurityGroup" not in resources
    network = resources["ReceiverService"]["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"]
    assert network["SecurityGroups"] == ["sg-0123456789abcdef0"]
    admitted = resources["ReceiversFromLoadBalancer"]["Properties"]
    assert admitted["GroupId"] == "sg-0123456789abcdef0"
    assert admitted["SourceSecurityGroupId"] == {"Fn::GetAtt": ["LoadBalancerSecurityGroup", "GroupId"]}
    egress = resources["LoadBalancerToReceivers"]["Properties"]
    assert egress["DestinationSecurityGroupId"] == "sg-0123456789abcdef0"


def test_load_balancer_is_protected_from_deletion_by_default(template: dict[str, Any]) -> None:
    def attributes(**parameters: Any) -> dict[str, str]:
        balancer = _created(template, **parameters)["NetworkLoadBalancer"]["Properties"]
        return {item["Key"]: item["Value"] for item in balancer["LoadBalancerAttributes"]}

    assert attributes()["deletion_protection.enabled"] == "true"
    assert attributes(LoadBalancerDeletionProtection="false")["deletion_protection.enabled"] == "false"


def test_load_balancer_is_public_with_its_own_security_group(template: dict[str, Any]) -> None:
    balancer = template["Resources"]["NetworkLoadBalancer"]["Properties"]
    assert balancer["Type"] == "network" and balancer["Scheme"] == "internet-facing"
    assert balancer["Subnets"] == {"Ref": "PublicSubnetIDs"}
    assert balancer["SecurityGroups"] == [{"Fn::GetAtt": ["LoadBalancerSecurityGroup", "GroupId"]}]


def _role_statements(template: dict[str, Any], **parameters: Any) -> list[tuple[str, dict[str, Any]]]:
    """Every IAM statement the stack creates with these parameters, by the role or policy that holds it."""
    statements = []
    for name, resource in _created(template, **parameters).items():
        documents = []
        if resource["Type"] == "AWS::IAM::Role":
            documents = [policy["PolicyDocument"] for policy in resource["Properties"].get("Policies", [])]
        elif resource["Type"] == "AWS::IAM::Policy":
            documents = [resource["Properties"]["PolicyDocument"]]
        statements += [(name, statement) for document in documents for statement in document["Statement"]]
    return statements


def _actions(statement: dict[str, Any]) -> list[str]:
    actions = statement["Action"]
    return [actions] if isinstance(actions, str) else list(actions)


def test_no_wildcard_action_on_a_data_service(template: dict[str, Any]) -> None:
    for role, statement in _role_statements(template):
        for action in _actions(statement):
            assert action != "*", role
            service, _, verb = action.partition(":")
            assert not (service in DATA_SERVICES and "*" in verb), f"{role}: {action}"
            if service in ("s3", "dynamodb", "medical-imaging", "kms"):
                assert statement["Resource"] != "*", f"{role}: {action} on every resource"


def test_pass_role_only_to_healthimaging(template: dict[str, Any]) -> None:
    passing = [(role, s) for role, s in _role_statements(template) if "iam:PassRole" in _actions(s)]
    assert [role for role, _ in passing] == ["StartImportPermissions"]
    for _role, statement in passing:
        assert statement["Resource"] == {"Fn::GetAtt": ["ImportDataAccessRole", "Arn"]}
        assert statement["Condition"] == {"StringEquals": {"iam:PassedToService": "medical-imaging.amazonaws.com"}}


@pytest.mark.parametrize("forwarding", ["Enabled", "Disabled"])
def test_receivers_put_only_under_their_prefixes(template: dict[str, Any], forwarding: str) -> None:
    statements = [
        s for role, s in _role_statements(template, StoreDICOMForwarding=forwarding) if role == "ReceiverTaskRole"
    ]
    objects = [s for s in statements if {"s3:PutObject", "s3:GetObject"} & set(_actions(s))]
    assert objects and all(
        resource in ({"Fn::Sub": "${DicomBucket.Arn}/batches/*"}, {"Fn::Sub": "${DicomBucket.Arn}/manifests/*"})
        for statement in objects
        for resource in statement["Resource"]
    )
    # Deleting only what a failed upload may have left among the received objects, never a manifest.
    deletes = [s for s in statements if "s3:DeleteObject" in _actions(s)]
    assert [s["Resource"] for s in deletes] == [{"Fn::Sub": "${DicomBucket.Arn}/batches/*"}]
    granted = {action for statement in statements for action in _actions(statement)}
    s3 = {"s3:ListBucket", "s3:PutObject", "s3:AbortMultipartUpload", "s3:GetObject", "s3:DeleteObject",
          "kms:GenerateDataKey", "kms:Decrypt"}  # fmt: skip
    # StoreDICOMForwarding: StoreDICOM into the data store, and its key through HealthImaging; the received objects
    # StoreDICOM stored are tagged so, and copies of tagged objects carry the tags.
    tagging = {"s3:PutObjectTagging", "s3:GetObjectTagging"}
    forwarded = {"medical-imaging:StoreDICOM"} | KMS_FOR_HEALTHIMAGING | tagging if forwarding == "Enabled" else set()
    assert granted == s3 | forwarded
    tags = [s for s in statements if tagging & set(_actions(s))]
    batches = {"Fn::Sub": "${DicomBucket.Arn}/batches/*"}
    assert [s["Resource"] for s in tags] == ([batches] if forwarding == "Enabled" else [])


def test_healthimaging_data_access_role(template: dict[str, Any]) -> None:
    role = _created(template)["ImportDataAccessRole"]["Properties"]
    (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "medical-imaging.amazonaws.com"}
    # Only import jobs of this stack's data store may assume it (the data store's aws:SourceArn).
    assert trust["Condition"]["ArnEquals"] == {"aws:SourceArn": {"Fn::GetAtt": ["Datastore", "DatastoreArn"]}}
    existing = _created(template, ExistingDatastoreId="0123456789abcdef0123456789abcdef")["ImportDataAccessRole"]
    (trust,) = existing["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Condition"]["ArnEquals"] == {
        "aws:SourceArn": {
            "Fn::Sub": "arn:aws:medical-imaging:us-east-1:${AWS::AccountId}:datastore/0123456789abcdef0123456789abcdef"
        }
    }
    statements = [s for document in role["Policies"] for s in document["PolicyDocument"]["Statement"]]
    by_action = {action: s["Resource"] for s in statements for action in _actions(s)}
    assert by_action["s3:GetObject"] == {"Fn::Sub": "${DicomBucket.Arn}/batches/*"}
    assert by_action["s3:PutObject"] == {"Fn::Sub": "${ResultsBucket.Arn}/jobs/*"}
    assert by_action["kms:Decrypt"] == {"Fn::GetAtt": ["EncryptionKey", "Arn"]}


KMS_FOR_HEALTHIMAGING = {"kms:DescribeKey", "kms:CreateGrant", "kms:Decrypt", "kms:GenerateDataKey"}


def _healthimaging_key_statements(resources: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per role or policy, the statement that lets it use the data store's key through HealthImaging."""
    found = {}
    for name, resource in resources.items():
        if resource["Type"] == "AWS::IAM::Role":
            documents = [policy["PolicyDocument"] for policy in resource["Properties"].get("Policies", [])]
        elif resource["Type"] == "AWS::IAM::Policy":
            documents = [resource["Properties"]["PolicyDocument"]]
        else:
            continue
        for statement in (s for document in documents for s in document["Statement"]):
            via = statement.get("Condition", {}).get("StringEquals", {}).get("kms:ViaService")
            if via == "medical-imaging.us-east-1.amazonaws.com":
                found[name] = statement
    return found


def test_the_data_store_key_is_usable_through_healthimaging_only(template: dict[str, Any]) -> None:
    """HealthImaging's data encryption guide: DescribeKey and CreateGrant besides Decrypt and GenerateDataKey."""
    created = _healthimaging_key_statements(_created(template))
    users = {
        "ImportDataAccessRole",
        "StartImportPermissions",
        "CheckImportPermissions",
        "ReceiverTaskRole",
        "AskHealthImagingPermissions",
    }
    assert set(created) == users
    # Without forwarding the receivers store nothing and no failure is looked up in the data store.
    without_forwarding = _healthimaging_key_statements(_created(template, StoreDICOMForwarding="Disabled"))
    assert set(without_forwarding) == set(created) - {"ReceiverTaskRole", "AskHealthImagingPermissions"}
    for statement in created.values():
        assert set(_actions(statement)) == KMS_FOR_HEALTHIMAGING
        assert statement["Resource"] == {"Fn::GetAtt": ["EncryptionKey", "Arn"]}
    key = "arn:aws:kms:us-east-1:123456789012:key/0f1e2d3c-4b5a-6978-8897-a6b5c4d3e2f1"
    existing_id = "0123456789abcdef0123456789abcdef"
    given = _healthimaging_key_statements(
        _created(template, ExistingDatastoreId=existing_id, ExistingDatastoreKmsKeyArn=key)
    )
    assert set(given) == set(created) and all(s["Resource"] == key for s in given.values())
    # An existing data store with an AWS owned key needs no key permission at all.
    assert _healthimaging_key_statements(_created(template, ExistingDatastoreId=existing_id)) == {}


def test_an_existing_data_store_is_used_instead_of_a_new_one(template: dict[str, Any]) -> None:
    existing_id = "0123456789abcdef0123456789abcdef"
    resolver = cfn.Resolver(template, cfn.parameter_values(template, ExistingDatastoreId=existing_id))
    resources = resolver.resources()
    assert "Datastore" not in resources
    assert resolver.outputs()["DatastoreId"] == existing_id
    environment = resources["StartImportFunction"]["Properties"]["Environment"]["Variables"]
    assert environment["DATASTORE_ID"] == existing_id
    (start,) = [s for s in resources["StartImportPermissions"]["Properties"]["PolicyDocument"]["Statement"]
                if s["Sid"] == "StartImportJobs"]  # fmt: skip
    assert start["Resource"] == {
        "Fn::Sub": f"arn:aws:medical-imaging:us-east-1:${{AWS::AccountId}}:datastore/{existing_id}"
    }
    assert "Datastore" in _created(template)


def test_buckets_are_private_encrypted_versioned_tls_only(template: dict[str, Any]) -> None:
    resources = template["Resources"]
    buckets = [name for name, resource in resources.items() if resource["Type"] == "AWS::S3::Bucket"]
    assert set(buckets) == {"AccessLogsBucket", "DicomBucket", "ResultsBucket"}
    policies = {
        resource["Properties"]["Bucket"]["Ref"]: resource["Properties"]["PolicyDocument"]
        for resource in resources.values()
        if resource["Type"] == "AWS::S3::BucketPolicy"
    }
    for name in buckets:
        properties = resources[name]["Properties"]
        assert all(properties["PublicAccessBlockConfiguration"].values()), name
        assert properties["VersioningConfiguration"] == {"Status": "Enabled"}, name
        rules = properties["LifecycleConfiguration"]["Rules"]
        assert any("AbortIncompleteMultipartUpload" in rule for rule in rules if "Fn::If" not in rule), name
        denial = policies[name]["Statement"][0]
        assert denial["Effect"] == "Deny" and denial["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    for name in ("DicomBucket", "ResultsBucket"):
        properties = resources[name]["Properties"]
        encryption = properties["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
        assert encryption["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"
        assert properties["NotificationConfiguration"]["EventBridgeConfiguration"]["EventBridgeEnabled"] is True


def test_received_copies_expire_only_when_asked(template: dict[str, Any]) -> None:
    def expiring(**parameters: Any) -> list[dict[str, Any]]:
        rules = _created(template, **parameters)["DicomBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
        return [rule for rule in rules if rule.get("Id") == "ExpireReceivedObjects"]

    assert expiring(ReceivedObjectExpirationDays=0) == []
    (rule,) = expiring(ReceivedObjectExpirationDays=30)
    assert rule["Prefix"] == "batches/" and rule["ExpirationInDays"] == "30"


def test_the_key_serves_only_this_stacks_log_groups(template: dict[str, Any]) -> None:
    statements = template["Resources"]["EncryptionKey"]["Properties"]["KeyPolicy"]["Statement"]
    logs_service = {"Fn::Sub": "logs.${AWS::Region}.amazonaws.com"}
    (logs,) = [s for s in statements if s["Principal"].get("Service") == logs_service]
    patterns = [pattern["Fn::Sub"] for pattern in logs["Condition"]["ArnLike"]["kms:EncryptionContext:aws:logs:arn"]]
    texts = [pattern if isinstance(pattern, str) else pattern[0] for pattern in patterns]
    assert all(not text.endswith("log-group:*") for text in texts)
    groups = {
        name: resource["Properties"].get("LogGroupName")
        for name, resource in template["Resources"].items()
        if resource["Type"] == "AWS::Logs::LogGroup"
    }
    # Every log group's name matches one of the patterns (the receivers' is named by CloudFormation).
    for name, group in groups.items():
        text = "${AWS::StackName}-" + name + "-x" if group is None else (
            group["Fn::Sub"] if isinstance(group["Fn::Sub"], str) else group["Fn::Sub"][0]
        )
        arn = "arn:${AWS::Partition}:logs:${AWS::Region}:${AWS::AccountId}:log-group:" + text
        assert any(fnmatch.fnmatchcase(arn, pattern) for pattern in texts), name


def test_key_table_and_datastore_are_encrypted_and_kept(template: dict[str, Any]) -> None:
    resources = template["Resources"]
    assert resources["EncryptionKey"]["Properties"]["EnableKeyRotation"] is True
    table = resources["ImportTable"]["Properties"]
    assert table["SSESpecification"]["KMSMasterKeyId"] == {"Fn::GetAtt": ["EncryptionKey", "Arn"]}
    assert table["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    datastore = resources["Datastore"]
    assert datastore["Properties"]["KmsKeyArn"] == {"Fn::GetAtt": ["EncryptionKey", "Arn"]}
    for name in ("EncryptionKey", "DicomBucket", "ResultsBucket", "ImportTable", "Datastore"):
        assert resources[name]["DeletionPolicy"] == "Retain", name


def test_every_log_group_has_retention_and_the_key(template: dict[str, Any]) -> None:
    for name, resource in template["Resources"].items():
        if resource["Type"] == "AWS::Logs::LogGroup":
            assert resource["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}, name
            assert resource["Properties"]["KmsKeyId"] == {"Fn::GetAtt": ["EncryptionKey", "Arn"]}, name


def test_every_checkov_skip_says_why(template: dict[str, Any]) -> None:
    for name, resource in template["Resources"].items():
        for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", []):
            assert skip["id"].startswith("CKV_") and len(skip["comment"]) > 40, name


def test_outputs_a_modality_needs(template: dict[str, Any]) -> None:
    outputs = template["Outputs"]
    assert outputs["NetworkLoadBalancerDNS"]["Value"] == {"Fn::GetAtt": ["NetworkLoadBalancer", "DNSName"]}
    assert outputs["DICOMPort"]["Value"] == {"Ref": "SCPPort"}
    assert outputs["DICOMTLSPort"]["Value"] == {"Ref": "TLSPort"}
    assert outputs["DICOMAETitle"]["Value"] == {"Ref": "SCPAETitle"}
    assert outputs["DatastoreId"]["Value"] == {
        "Fn::If": ["CreateDatastore", {"Fn::GetAtt": ["Datastore", "DatastoreId"]}, {"Ref": "ExistingDatastoreId"}]
    }
    assert outputs["ImportTableName"]["Value"] == {"Ref": "ImportTable"}
    assert outputs["ReceiverLogGroupName"]["Value"] == {"Ref": "PacsServerTaskDefPacsContainerLogGroup"}
    assert {"DicomBucketName", "ResultsBucketName"} <= set(outputs)
