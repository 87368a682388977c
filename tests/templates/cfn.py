"""Loading the product template and resolving its conditions for one set of parameter values, as CloudFormation does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cfnlint.decode import cfn_yaml

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = ROOT / "templates" / "dicom-store-scp.template.yaml"
NO_VALUE = object()


def load() -> dict[str, Any]:
    document: dict[str, Any] = cfn_yaml.load(str(TEMPLATE_PATH))
    return document


def parameter_values(template: dict[str, Any], **overrides: Any) -> dict[str, str]:
    """Defaults of the template's parameters, plus example values for the required ones, plus ``overrides``."""
    required = {
        "VpcID": "vpc-0123456789abcdef0",
        "PublicSubnetIDs": "subnet-0123456789abcdef0,subnet-0123456789abcdef1",
        "PrivateSubnetIDs": "subnet-0123456789abcdef2,subnet-0123456789abcdef3",
        "VpcCIDR": "10.0.0.0/16",
        "PeerCIDR1": "203.0.113.0/24",
        "ArtifactBucketName": "artifacts-us-east-1",
    }
    values = {name: str(spec["Default"]) for name, spec in template["Parameters"].items() if "Default" in spec}
    values.update(required)
    values.update({name: str(value) for name, value in overrides.items()})
    missing = set(template["Parameters"]) - set(values)
    assert not missing, f"no value for {missing}"
    return values


class Resolver:
    """Evaluates Conditions, Fn::If, Ref to parameters and AWS::NoValue; other intrinsics are kept as they are."""

    def __init__(self, template: dict[str, Any], parameters: dict[str, str]) -> None:
        self.template = template
        self.parameters = parameters
        self.conditions: dict[str, bool] = {}
        for name, expression in template.get("Conditions", {}).items():
            self.conditions[name] = self._condition(expression)

    def _condition(self, expression: Any) -> bool:
        (function, argument), = expression.items()
        if function == "Fn::Equals":
            left, right = (self._value(item) for item in argument)
            return str(left) == str(right)
        if function == "Fn::Not":
            return not self._condition(argument[0])
        if function == "Fn::And":
            return all(self._condition(item) for item in argument)
        if function == "Fn::Or":
            return any(self._condition(item) for item in argument)
        if function == "Condition":
            return self.conditions[argument]
        raise AssertionError(f"unsupported condition function {function}")

    def _value(self, value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"Ref"} and value["Ref"] in self.parameters:
            return self.parameters[value["Ref"]]
        return value

    def resolve(self, value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"Fn::If"}:
                condition, when_true, when_false = value["Fn::If"]
                return self.resolve(when_true if self.conditions[condition] else when_false)
            if set(value) == {"Ref"}:
                if value["Ref"] == "AWS::NoValue":
                    return NO_VALUE
                return self._value(value)
            resolved = {key: self.resolve(item) for key, item in value.items()}
            return {key: item for key, item in resolved.items() if item is not NO_VALUE}
        if isinstance(value, list):
            items = [self.resolve(item) for item in value]
            return [item for item in items if item is not NO_VALUE]
        return value

    def resources(self) -> dict[str, dict[str, Any]]:
        """The resources CloudFormation would create, with their properties resolved."""
        created = {}
        for name, resource in self.template["Resources"].items():
            if "Condition" in resource and not self.conditions[resource["Condition"]]:
                continue
            created[name] = {"Type": resource["Type"], "Properties": self.resolve(resource.get("Properties", {}))}
        return created
