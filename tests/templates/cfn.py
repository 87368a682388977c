"""The product template as CloudFormation sees it: loaded, its language extensions expanded, its conditions and
Rules evaluated for one set of parameter values.

``python -m tests.templates.cfn`` prints the expanded template as JSON (``make lint`` scans it with checkov,
which does not expand ``Fn::ForEach`` itself).
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

from cfnlint.decode import cfn_yaml

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = ROOT / "templates" / "dicom-store-scp.template.yaml"
NO_VALUE = object()
HEALTHIMAGING_REGIONS = ("us-east-1", "us-west-2", "eu-west-1", "eu-west-2", "ap-southeast-2")
_FOR_EACH = re.compile(r"Fn::ForEach::[A-Za-z0-9]+")

# The only parameters an admin must give: the network (the seeds' required ones).
REQUIRED_EXAMPLES = {
    "VpcID": "vpc-0123456789abcdef0",
    "PublicSubnetIDs": "subnet-0123456789abcdef0,subnet-0123456789abcdef1",
    "PrivateSubnetIDs": "subnet-0123456789abcdef2,subnet-0123456789abcdef3",
    "VpcCIDR": "10.0.0.0/16",
    "PeerCIDR1": "203.0.113.0/24",
}


def load_source() -> dict[str, Any]:
    """The template file as written, ``Fn::ForEach`` blocks included."""
    document: dict[str, Any] = cfn_yaml.load(str(TEMPLATE_PATH))
    return document


def load() -> dict[str, Any]:
    """The template after the ``AWS::LanguageExtensions`` transform, as CloudFormation deploys it."""
    return expand(load_source())


# --- AWS::LanguageExtensions: Fn::ForEach and the Fn::FindInMap it leaves behind ---------------------------------
def expand(template: dict[str, Any]) -> dict[str, Any]:
    expanded = copy.deepcopy(template)
    assert expanded.pop("Transform", None) in (None, "AWS::LanguageExtensions")
    mappings = expanded.get("Mappings", {})
    for section in ("Conditions", "Resources", "Outputs"):
        if section in expanded:
            expanded[section] = _expand(expanded[section], {}, mappings)
    return expanded


def _substitute(text: str, names: dict[str, str]) -> str:
    for name, value in names.items():
        text = text.replace(f"${{{name}}}", value).replace(f"&{{{name}}}", re.sub(r"[^0-9A-Za-z]", "", value))
    return text


def _expand(value: Any, names: dict[str, str], mappings: dict[str, Any]) -> Any:
    if isinstance(value, list):
        return [_expand(item, names, mappings) for item in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"Ref"} and value["Ref"] in names:
        return names[value["Ref"]]
    if set(value) == {"Fn::Sub"}:
        argument = value["Fn::Sub"]
        text = _substitute(argument if isinstance(argument, str) else argument[0], names)
        if isinstance(argument, str):
            return text if "${" not in text else {"Fn::Sub": text}
        return {"Fn::Sub": [text, _expand(argument[1], names, mappings)]}
    if set(value) == {"Fn::FindInMap"}:
        keys = _expand(value["Fn::FindInMap"], names, mappings)
        if all(isinstance(key, str) for key in keys):
            return copy.deepcopy(mappings[keys[0]][keys[1]][keys[2]])
        return {"Fn::FindInMap": keys}
    result: dict[str, Any] = {}
    for key, item in value.items():
        if _FOR_EACH.fullmatch(key):
            identifier, collection, fragment = item
            assert isinstance(collection, list), f"{key}: only literal collections are expanded here"
            for member in collection:
                for new_key, new_value in _expand(fragment, {**names, identifier: str(member)}, mappings).items():
                    assert new_key not in result, f"{key} defines {new_key} twice"
                    result[new_key] = new_value
        else:
            new_key = _substitute(key, names)
            assert new_key not in result, f"{new_key} defined twice"
            result[new_key] = _expand(item, names, mappings)
    return result


# --- Parameters ---------------------------------------------------------------------------------------------------
def parameter_values(template: dict[str, Any], **overrides: Any) -> dict[str, str]:
    """Defaults of the template's parameters, plus example values for the required ones, plus ``overrides``."""
    values = {name: str(spec["Default"]) for name, spec in template["Parameters"].items() if "Default" in spec}
    values.update(REQUIRED_EXAMPLES)
    values.update({name: str(value) for name, value in overrides.items()})
    missing = set(template["Parameters"]) - set(values)
    assert not missing, f"no value for {missing}"
    return values


class Resolver:
    """Evaluates Conditions, Rules, Fn::If, Ref to parameters and pseudo parameters, AWS::NoValue, Fn::Sub of
    parameters and Fn::FindInMap; other intrinsics (references to resources) are kept as they are."""

    def __init__(self, template: dict[str, Any], parameters: dict[str, str], region: str = "us-east-1") -> None:
        self.template = template
        self.parameters = {**parameters, "AWS::Region": region, "AWS::Partition": "aws"}
        self.conditions: dict[str, bool] = {}
        for name, expression in template.get("Conditions", {}).items():
            self.conditions[name] = self.condition(expression)

    def condition(self, expression: Any) -> bool:
        ((function, argument),) = expression.items()
        if function == "Fn::Equals":
            left, right = (self.resolve(item) for item in argument)
            return str(left) == str(right)
        if function == "Fn::Not":
            return not self.condition(argument[0])
        if function == "Fn::And":
            return all(self.condition(item) for item in argument)
        if function == "Fn::Or":
            return any(self.condition(item) for item in argument)
        if function == "Condition":
            if argument not in self.conditions:  # a condition may name one defined after it
                self.conditions[argument] = self.condition(self.template["Conditions"][argument])
            return self.conditions[argument]
        if function == "Fn::Contains":
            choices, value = (self.resolve(item) for item in argument)
            return str(value) in {str(choice) for choice in choices}
        raise AssertionError(f"unsupported condition function {function}")

    def failed_rules(self) -> list[str]:
        """AssertDescription of every Rule assertion that fails for these parameters, as CloudFormation checks
        them before it creates anything."""
        failures = []
        for name, rule in self.template.get("Rules", {}).items():
            if "RuleCondition" in rule and not self.condition(rule["RuleCondition"]):
                continue
            failures += [
                f"{name}: {assertion['AssertDescription']}"
                for assertion in rule["Assertions"]
                if not self.condition(assertion["Assert"])
            ]
        return failures

    def resolve(self, value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"Fn::If"}:
                condition, when_true, when_false = value["Fn::If"]
                return self.resolve(when_true if self.conditions[condition] else when_false)
            if set(value) == {"Ref"}:
                if value["Ref"] == "AWS::NoValue":
                    return NO_VALUE
                return self.parameters.get(value["Ref"], value)
            if set(value) == {"Fn::Sub"} and isinstance(value["Fn::Sub"], str):
                text = re.sub(
                    r"\$\{([A-Za-z0-9:]+)\}",
                    lambda match: self.parameters.get(match.group(1), match.group(0)),
                    value["Fn::Sub"],
                )
                return text if "${" not in text else {"Fn::Sub": text}
            if set(value) == {"Fn::FindInMap"}:
                keys = self.resolve(value["Fn::FindInMap"])
                if all(isinstance(key, str) for key in keys):
                    return self.resolve(self.template["Mappings"][keys[0]][keys[1]][keys[2]])
                return {"Fn::FindInMap": keys}
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

    def outputs(self) -> dict[str, Any]:
        return {
            name: self.resolve(output["Value"])
            for name, output in self.template["Outputs"].items()
            if "Condition" not in output or self.conditions[output["Condition"]]
        }


if __name__ == "__main__":
    json.dump(load(), sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
