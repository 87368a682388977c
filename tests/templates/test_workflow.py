"""The import workflow's wiring: ASL placeholders, Lambda packages, environment, state machine and triggers."""

from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path
from typing import Any

from tests.templates import cfn
from tests.templates.cfn import ROOT

ASL = ROOT / "statemachines" / "import.asl.json"
FUNCTIONS = ROOT / "functions"


def _lambdas(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: resource["Properties"]
        for name, resource in template["Resources"].items()
        if resource["Type"] == "AWS::Lambda::Function"
    }


def _function_directories() -> list[Path]:
    return sorted(path.parent for path in FUNCTIONS.glob("*/app.py"))


ARTIFACT_BUCKET = {
    "Fn::If": [
        "UsePublishedArtifacts", {"Fn::Sub": "${ArtifactBucketName}-${AWS::Region}"}, {"Ref": "ArtifactBucketName"}
    ]
}


def _package_name(properties: dict[str, Any]) -> str:
    key, names = properties["Code"]["S3Key"]["Fn::Sub"]
    assert key == "${ArtifactKeyPrefix}functions/${Package}.zip", key
    assert re.fullmatch(r"[a-z_]+", names["Package"]), names
    return str(names["Package"])


def test_placeholders_and_substitutions_match_both_ways(template: dict[str, Any]) -> None:
    placeholders = set(re.findall(r"\$\{([A-Za-z0-9_]+)\}", ASL.read_text()))
    machine = template["Resources"]["ImportStateMachine"]["Properties"]
    assert placeholders == set(machine["DefinitionSubstitutions"])


def test_substitutions_point_at_the_functions_they_name(template: dict[str, Any]) -> None:
    substitutions = template["Resources"]["ImportStateMachine"]["Properties"]["DefinitionSubstitutions"]
    for placeholder, value in substitutions.items():
        function = placeholder.removesuffix("Arn")
        assert value == {"Fn::GetAtt": [function, "Arn"]}, placeholder
        assert template["Resources"][function]["Type"] == "AWS::Lambda::Function"


def test_every_function_directory_has_a_lambda_reading_its_zip(template: dict[str, Any]) -> None:
    packaged = sorted(_package_name(properties) for properties in _lambdas(template).values())
    assert packaged == [path.name for path in _function_directories()]


def test_the_makefile_builds_the_zip_names_the_template_reads(template: dict[str, Any]) -> None:
    dry_run = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", "package-functions"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    built = set(re.findall(r"zip -X -q -D \.\./([a-z_]+)\.zip", dry_run))
    assert built == {_package_name(properties) for properties in _lambdas(template).values()}
    assert "build/statemachines/import.asl.json" in dry_run


def _required_variables(app: Path) -> set[str]:
    """Names a function's settings read with ``reader.text(...)`` or ``reader.required_integer(...)``, in its own
    app.py or in the settings class of common/config.py it uses: it fails at cold start without them."""
    tree = ast.parse(app.read_text())
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    shared = ast.parse((app.parents[1] / "common" / "config.py").read_text())
    classes = [node for node in shared.body if isinstance(node, ast.ClassDef) and node.name in used]
    return _names_read(tree) | {name for node in classes for name in _names_read(node)}


def _names_read(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("text", "required_integer")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(str(node.args[0].value))
    return names


def test_every_required_environment_variable_is_set(template: dict[str, Any]) -> None:
    by_package = {_package_name(properties): properties for properties in _lambdas(template).values()}
    for directory in _function_directories():
        required = _required_variables(directory / "app.py")
        assert required, f"{directory.name}: no settings found"
        variables = set(by_package[directory.name]["Environment"]["Variables"])
        assert required <= variables, f"{directory.name} misses {sorted(required - variables)}"


def test_functions_share_the_runtime_the_packages_are_built_for(template: dict[str, Any]) -> None:
    for name, properties in _lambdas(template).items():
        assert properties["Runtime"] == "python3.12", name
        assert properties["Handler"] == "app.handler", name
        assert properties["Architectures"] == ["x86_64"], name
        assert properties["Code"]["S3Bucket"] == ARTIFACT_BUCKET, name


def test_state_machine_loads_the_asl_file_logs_without_data_and_traces(template: dict[str, Any]) -> None:
    machine = template["Resources"]["ImportStateMachine"]["Properties"]
    assert machine["DefinitionS3Location"] == {
        "Bucket": ARTIFACT_BUCKET,
        "Key": {"Fn::Sub": "${ArtifactKeyPrefix}statemachines/import.asl.json"},
    }
    assert machine["StateMachineType"] == "STANDARD"
    assert machine["LoggingConfiguration"]["IncludeExecutionData"] is False
    assert machine["LoggingConfiguration"]["Level"] in ("ERROR", "FATAL")
    assert machine["TracingConfiguration"] == {"Enabled": True}
    json.loads(ASL.read_text())  # the file the template loads is valid JSON


def test_a_new_manifest_starts_the_workflow(template: dict[str, Any]) -> None:
    rule = template["Resources"]["ManifestCreatedRule"]["Properties"]
    pattern = rule["EventPattern"]
    assert pattern["source"] == ["aws.s3"]
    assert pattern["detail-type"] == ["Object Created"]
    assert pattern["detail"]["bucket"]["name"] == [{"Ref": "DicomBucket"}]
    assert pattern["detail"]["object"]["key"] == [{"prefix": "manifests/"}]
    (target,) = rule["Targets"]
    assert target["Arn"] == {"Ref": "ImportStateMachine"}
    assert "Input" not in target and "InputPath" not in target  # the event itself is the input


def test_sweeper_runs_on_a_schedule(template: dict[str, Any]) -> None:
    schedule = template["Resources"]["SweeperSchedule"]["Properties"]
    assert schedule["ScheduleExpression"].startswith("rate(")
    assert schedule["Targets"][0]["Arn"] == {"Fn::GetAtt": ["SweeperFunction", "Arn"]}
    permission = template["Resources"]["SweeperInvokePermission"]["Properties"]
    assert permission["SourceArn"] == {"Fn::GetAtt": ["SweeperSchedule", "Arn"]}


def test_the_workflow_functions_are_defined_once(template: dict[str, Any]) -> None:
    """One Fn::ForEach block defines every function: adding one touches its collection and its Mappings entry."""
    source = cfn.load_source()
    assert source["Transform"] == "AWS::LanguageExtensions"
    assert not [name for name, resource in source["Resources"].items()
                if isinstance(resource, dict) and resource.get("Type") == "AWS::Lambda::Function"]  # fmt: skip
    (loop,) = [value for name, value in source["Resources"].items() if name.startswith("Fn::ForEach::")]
    identifier, collection, fragment = loop
    assert {f"${{{identifier}}}Function", f"${{{identifier}}}Role", f"${{{identifier}}}LogGroup"} <= set(fragment)
    packages = sorted(source["Mappings"]["Functions"][name]["Package"] for name in collection)
    assert packages == [path.name for path in _function_directories()]
    assert set(collection) == set(source["Mappings"]["Functions"])
    # Expanded, each function writes to the log group made for it, which the key policy admits.
    for name in collection:
        function = template["Resources"][f"{name}Function"]["Properties"]
        group = template["Resources"][f"{name}LogGroup"]["Properties"]["LogGroupName"]
        assert group["Fn::Sub"][0] == "/aws/lambda/" + function["FunctionName"]["Fn::Sub"][0]


def test_the_sweeper_follows_the_batch_window_and_can_start_imports(template: dict[str, Any]) -> None:
    variables = template["Resources"]["SweeperFunction"]["Properties"]["Environment"]["Variables"]
    assert variables["BATCH_WINDOW_SECONDS"] == {"Ref": "BatchWindowSeconds"}
    assert variables["TABLE_NAME"] == {"Ref": "ImportTable"}
    # STATE_MACHINE_ARN names the state machine by the name it is given, without waiting on it.
    arn_text, arn_names = variables["STATE_MACHINE_ARN"]["Fn::Sub"]
    name_text, name_names = template["Resources"]["ImportStateMachine"]["Properties"]["StateMachineName"]["Fn::Sub"]
    assert arn_text.endswith(":stateMachine:" + name_text) and arn_names == name_names
    statements = template["Resources"]["SweeperPermissions"]["Properties"]["PolicyDocument"]["Statement"]
    by_sid = {statement["Sid"]: statement for statement in statements}
    assert by_sid["StartImportExecutions"]["Action"] == "states:StartExecution"
    assert by_sid["StartImportExecutions"]["Resource"] == {"Ref": "ImportStateMachine"}
    assert by_sid["FindBatchItems"]["Action"] == "dynamodb:GetItem"


def test_a_lost_manifest_event_is_kept_and_alarmed(template: dict[str, Any]) -> None:
    resources = template["Resources"]
    (target,) = resources["ManifestCreatedRule"]["Properties"]["Targets"]
    assert target["DeadLetterConfig"] == {"Arn": {"Fn::GetAtt": ["ManifestEventsDeadLetterQueue", "Arn"]}}
    queue = resources["ManifestEventsDeadLetterQueue"]["Properties"]
    assert queue["KmsMasterKeyId"] == {"Ref": "EncryptionKey"}
    (grant,) = resources["ManifestEventsDeadLetterQueuePolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert grant["Principal"] == {"Service": "events.amazonaws.com"} and grant["Action"] == "sqs:SendMessage"
    assert grant["Condition"] == {"ArnEquals": {"aws:SourceArn": {"Fn::GetAtt": ["ManifestCreatedRule", "Arn"]}}}
    alarm = resources["ManifestEventsDeadLetteredAlarm"]["Properties"]
    assert alarm["Namespace"] == "AWS/SQS" and alarm["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert alarm["Dimensions"] == [
        {"Name": "QueueName", "Value": {"Fn::GetAtt": ["ManifestEventsDeadLetterQueue", "QueueName"]}}
    ]
    assert alarm["Threshold"] == 0 and alarm["ComparisonOperator"] == "GreaterThanThreshold"
    # CloudWatch must reach the encrypted alarm topic, and EventBridge the encrypted queue, through the key.
    statements = resources["EncryptionKey"]["Properties"]["KeyPolicy"]["Statement"]
    (events,) = [s for s in statements if s["Principal"] == {"Service": "events.amazonaws.com"}]
    arn_text, arn_names = events["Condition"]["ArnLike"]["aws:SourceArn"]["Fn::Sub"]
    name_text, name_names = resources["ManifestCreatedRule"]["Properties"]["Name"]["Fn::Sub"]
    assert arn_text.endswith(":rule/" + name_text) and arn_names == name_names
