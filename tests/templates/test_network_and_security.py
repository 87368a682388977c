"""Load balancer conditions (TLS, optional networks), security groups, IAM scoping, buckets, outputs."""

from __future__ import annotations

from typing import Any

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


def test_without_certificate_the_listener_is_plain_tcp(template: dict[str, Any]) -> None:
    listener = _created(template)["DicomListener"]["Properties"]
    assert listener["Protocol"] == "TCP"
    assert "SslPolicy" not in listener and "Certificates" not in listener
    assert listener["ListenerAttributes"] == [{"Key": "tcp.idle_timeout.seconds", "Value": "350"}]


def test_with_certificate_the_listener_is_tls_13_12_only(template: dict[str, Any]) -> None:
    listener = _created(template, TLSCertificateARN=CERTIFICATE)["DicomListener"]["Properties"]
    assert listener["Protocol"] == "TLS"
    assert listener["SslPolicy"] == "ELBSecurityPolicy-TLS13-1-2-2021-06"
    assert listener["Certificates"] == [{"CertificateArn": CERTIFICATE}]
    assert "ListenerAttributes" not in listener  # the TLS idle timeout is fixed


def test_empty_optional_networks_create_no_rule(template: dict[str, Any]) -> None:
    resources = _created(template)
    rules = _ingress_rules(resources, "LoadBalancerSecurityGroup")
    assert sorted(rule["CidrIp"] for rule in rules) == ["10.0.0.0/16", "203.0.113.0/24"]
    assert all(rule["CidrIp"] for rule in rules)


def test_given_optional_networks_each_get_a_rule_on_the_dicom_port(template: dict[str, Any]) -> None:
    resources = _created(template, PeerCIDR2="198.51.100.0/24", PeerCIDR3="192.0.2.0/24", SCPPort=4242)
    rules = _ingress_rules(resources, "LoadBalancerSecurityGroup")
    assert sorted(rule["CidrIp"] for rule in rules) == [
        "10.0.0.0/16", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"
    ]
    assert all(rule["FromPort"] == rule["ToPort"] == "4242" and rule["IpProtocol"] == "tcp" for rule in rules)


def test_receivers_admit_only_the_load_balancer(template: dict[str, Any]) -> None:
    resources = _created(template)
    rules = _ingress_rules(resources, "ReceiverSecurityGroup")
    assert rules and all(
        rule["SourceSecurityGroupId"] == {"Fn::GetAtt": ["LoadBalancerSecurityGroup", "GroupId"]} for rule in rules
    )
    assert all("CidrIp" not in rule for rule in rules)
    groups = resources["ReceiverService"]["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"]
    assert groups["SecurityGroups"] == [{"Fn::GetAtt": ["ReceiverSecurityGroup", "GroupId"]}]
    extra = _created(template, SecurityGroupID="sg-0123456789abcdef0")["ReceiverService"]["Properties"]
    assert "sg-0123456789abcdef0" in extra["NetworkConfiguration"]["AwsvpcConfiguration"]["SecurityGroups"]


def test_load_balancer_is_public_with_its_own_security_group(template: dict[str, Any]) -> None:
    balancer = template["Resources"]["NetworkLoadBalancer"]["Properties"]
    assert balancer["Type"] == "network" and balancer["Scheme"] == "internet-facing"
    assert balancer["Subnets"] == {"Ref": "PublicSubnetIDs"}
    assert balancer["SecurityGroups"] == [{"Fn::GetAtt": ["LoadBalancerSecurityGroup", "GroupId"]}]


def _role_statements(template: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    statements = []
    for name, resource in template["Resources"].items():
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
    assert [role for role, _ in passing] == ["StartImportRole"]
    for _role, statement in passing:
        assert statement["Resource"] == {"Fn::GetAtt": ["ImportDataAccessRole", "Arn"]}
        assert statement["Condition"] == {"StringEquals": {"iam:PassedToService": "medical-imaging.amazonaws.com"}}


def test_receivers_put_only_under_their_prefixes(template: dict[str, Any]) -> None:
    statements = [s for role, s in _role_statements(template) if role == "ReceiverTaskRole"]
    puts = [s for s in statements if "s3:PutObject" in _actions(s)]
    assert puts and all(
        resource in ({"Fn::Sub": "${DicomBucket.Arn}/batches/*"}, {"Fn::Sub": "${DicomBucket.Arn}/manifests/*"})
        for statement in puts
        for resource in statement["Resource"]
    )
    granted = {action for statement in statements for action in _actions(statement)}
    assert granted == {"s3:ListBucket", "s3:PutObject", "s3:AbortMultipartUpload", "kms:GenerateDataKey", "kms:Decrypt"}


def test_healthimaging_data_access_role(template: dict[str, Any]) -> None:
    role = template["Resources"]["ImportDataAccessRole"]["Properties"]
    (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "medical-imaging.amazonaws.com"}
    statements = [s for name, s in _role_statements(template) if name == "ImportDataAccessRole"]
    by_action = {action: s["Resource"] for s in statements for action in _actions(s)}
    assert by_action["s3:GetObject"] == {"Fn::Sub": "${DicomBucket.Arn}/batches/*"}
    assert by_action["s3:PutObject"] == {"Fn::Sub": "${ResultsBucket.Arn}/jobs/*"}
    assert by_action["kms:Decrypt"] == {"Fn::GetAtt": ["EncryptionKey", "Arn"]}


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
    assert outputs["DICOMAETitle"]["Value"] == {"Ref": "SCPAETitle"}
    assert outputs["DatastoreId"]["Value"] == {"Fn::GetAtt": ["Datastore", "DatastoreId"]}
    assert outputs["ImportTableName"]["Value"] == {"Ref": "ImportTable"}
    assert outputs["ReceiverLogGroupName"]["Value"] == {"Ref": "PacsServerTaskDefPacsContainerLogGroup"}
    assert {"DicomBucketName", "ResultsBucketName"} <= set(outputs)
