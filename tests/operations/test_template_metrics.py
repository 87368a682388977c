"""The template's dashboard and alarms use metrics the code emits, under the dimensions it emits them with."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from scp.metrics import FORWARD_METRICS, METRICS, NAMESPACE, SERVICE
from tests.templates.cfn import load

FUNCTIONS = Path(__file__).resolve().parents[2] / "functions"
WORKFLOW_SERVICE = "import-workflow"


def workflow_metrics() -> set[str]:
    """Metric names the Lambda functions pass to Powertools' add_metric (namespace and service set per module)."""
    names = set()
    for path in FUNCTIONS.glob("*/app.py"):
        text = path.read_text()
        if "add_metric(" not in text:
            continue
        assert f'Metrics(namespace="{NAMESPACE}", service="{WORKFLOW_SERVICE}")' in text, path
        names |= set(re.findall(r'add_metric\(\s*name="([A-Za-z]+)"', text))
    return names


EMITTED = {SERVICE: {spec.name for spec in METRICS + FORWARD_METRICS}, WORKFLOW_SERVICE: workflow_metrics()}


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load()


def dashboard_metrics(template: dict[str, Any]) -> list[list[Any]]:
    body = template["Resources"]["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    # ${...} are CloudFormation substitutions; any string stands in for them when reading the JSON.
    document = json.loads(re.sub(r"\$\{[^}]+\}", "resolved", body))
    return [metric for widget in document["widgets"] for metric in widget["properties"]["metrics"]]


def alarms(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: resource["Properties"]
        for name, resource in template["Resources"].items()
        if resource["Type"] == "AWS::CloudWatch::Alarm"
    }


def test_the_workflow_emits_the_metrics_the_issue_asks_for() -> None:
    assert {
        "ImportsStarted",
        "InstancesImported",
        "InstancesFailed",
        "InstancesNonPrimary",
        "ImportJobDurationSeconds",
        "BatchAgeAtImportSeconds",
    } <= EMITTED[WORKFLOW_SERVICE]


def test_every_product_metric_on_the_dashboard_is_emitted_with_that_service(template: dict[str, Any]) -> None:
    used = set()
    for metric in dashboard_metrics(template):
        namespace, name, *rest = [part for part in metric if isinstance(part, str)]
        if namespace != NAMESPACE:
            continue
        dimensions = dict(zip(rest[::2], rest[1::2], strict=True))
        assert list(dimensions) == ["service"], metric
        assert name in EMITTED[dimensions["service"]], f"{name} is not emitted by {dimensions['service']}"
        used.add(name)
    every = EMITTED[SERVICE] | EMITTED[WORKFLOW_SERVICE]
    assert every <= used, f"emitted but not on the dashboard: {sorted(every - used)}"


def test_every_product_metric_an_alarm_watches_is_emitted(template: dict[str, Any]) -> None:
    watched = 0
    for name, alarm in alarms(template).items():
        if alarm["Namespace"] != NAMESPACE:
            continue
        dimensions = {item["Name"]: item["Value"] for item in alarm["Dimensions"]}
        assert list(dimensions) == ["service"], name
        assert alarm["MetricName"] in EMITTED[dimensions["service"]], name
        watched += 1
    assert watched >= 3


def test_the_alarms_the_issue_asks_for_exist(template: dict[str, Any]) -> None:
    watched = {(alarm["Namespace"], alarm["MetricName"]) for alarm in alarms(template).values()}
    assert {
        (NAMESPACE, "InstancesFailed"),  # import failures
        (NAMESPACE, "BatchAgeAtImportSeconds"),  # instances waiting beyond a threshold
        (NAMESPACE, "StoreFailures"),  # failure statuses returned to modalities
        ("AWS/NetworkELB", "HealthyHostCount"),  # no healthy task behind the load balancer
        ("AWS/States", "ExecutionsFailed"),  # state machine failures
    } <= watched


def test_storedicom_forwarding_is_watched_where_the_stack_forwards(template: dict[str, Any]) -> None:
    shown = {metric[1] for metric in dashboard_metrics(template) if metric[0] == NAMESPACE}
    assert {spec.name for spec in FORWARD_METRICS} <= shown
    forwarding = {
        name: template["Resources"][name]
        for name, alarm in alarms(template).items()
        if alarm["Namespace"] == NAMESPACE and alarm["MetricName"].startswith("Forward")
    }
    assert {resource["Properties"]["MetricName"] for resource in forwarding.values()} == {
        "ForwardFailed",  # refused by StoreDICOM or past the deadline: the import jobs take them
        "ForwardLeftToImport",  # sustained throttling or server errors: the fast path is not keeping up
    }
    assert {resource.get("Condition") for resource in forwarding.values()} == {"ForwardToStoreDICOM"}


def test_the_dashboard_shows_what_the_issue_asks_for(template: dict[str, Any]) -> None:
    shown = {(metric[0], metric[1]) for metric in dashboard_metrics(template)}
    assert {
        ("AWS/ECS", "CPUUtilization"),
        ("AWS/ECS", "MemoryUtilization"),
        ("AWS/NetworkELB", "ActiveFlowCount"),
        ("AWS/States", "ExecutionsFailed"),
    } <= shown


def test_alarms_notify_the_topic_only_when_an_email_is_given(template: dict[str, Any]) -> None:
    for name, alarm in alarms(template).items():
        assert alarm["AlarmActions"] == {
            "Fn::If": ["HasAlarmEmail", [{"Ref": "AlarmTopic"}], {"Ref": "AWS::NoValue"}]
        }, name
    resources = template["Resources"]
    assert resources["AlarmTopic"]["Condition"] == resources["AlarmSubscription"]["Condition"] == "HasAlarmEmail"
    assert resources["AlarmSubscription"]["Properties"]["Protocol"] == "email"
