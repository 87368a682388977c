"""Sphinx directives that render tables from the CloudFormation template and the daemon's code at build time.

Each directive reads its source (template, ``scp.config``, ``scp.contexts``) itself: the tables never drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

TEMPLATE = Path(__file__).resolve().parents[2] / "templates" / "dicom-store-scp.template.yaml"
CONTAINER_NAME = "dicom-store-scp"


class _CloudFormationLoader(yaml.SafeLoader):
    """YAML loader that keeps short-form intrinsic functions (``!Ref x``) as ``{"Ref": x}`` mappings."""


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = suffix if suffix == "Ref" or suffix == "Condition" else f"Fn::{suffix}"
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if suffix == "GetAtt" and isinstance(value, str):
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {name: value}


_CloudFormationLoader.add_multi_constructor("!", _intrinsic)


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    with path.open(encoding="utf-8") as stream:
        document: dict[str, Any] = yaml.load(stream, Loader=_CloudFormationLoader)  # noqa: S506 - SafeLoader subclass
    return document


def _paragraph(content: str | nodes.Node) -> nodes.paragraph:
    paragraph = nodes.paragraph()
    paragraph += content if isinstance(content, nodes.Node) else nodes.Text(content)
    return paragraph


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str | nodes.Node]], widths: Sequence[int]
) -> nodes.table:
    table = nodes.table()
    group = nodes.tgroup(cols=len(headers))
    table += group
    for width in widths:
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    group += head
    head += _row(headers)
    body = nodes.tbody()
    group += body
    for cells in rows:
        body += _row(cells)
    return table


def _row(cells: Sequence[str | nodes.Node]) -> nodes.row:
    row = nodes.row()
    for cell in cells:
        entry = nodes.entry()
        entry += _paragraph(cell)
        row += entry
    return row


def _literal(text: str) -> nodes.literal:
    return nodes.literal(text=text)


def _node(content: str | nodes.Node) -> nodes.Node:
    return content if isinstance(content, nodes.Node) else nodes.Text(content)


def _default(parameter: dict[str, Any]) -> str | nodes.Node:
    if "Default" not in parameter:
        return "(required)"
    value = str(parameter["Default"])
    return _literal(value) if value else "(empty)"


def _constraint(parameter: dict[str, Any]) -> str | nodes.Node:
    if "AllowedValues" in parameter:
        return ", ".join(str(value) for value in parameter["AllowedValues"])
    if "MinValue" in parameter or "MaxValue" in parameter:
        return f"{parameter.get('MinValue', '')} to {parameter.get('MaxValue', '')}"
    if "ConstraintDescription" in parameter:
        return str(parameter["ConstraintDescription"])
    return f"AWS type {parameter['Type']}"


class CloudFormationParameters(SphinxDirective):
    """One table per parameter group of ``AWS::CloudFormation::Interface``, in the console's order."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        template = load_template()
        parameters = template["Parameters"]
        interface = template["Metadata"]["AWS::CloudFormation::Interface"]
        labels = interface["ParameterLabels"]
        output: list[nodes.Node] = []
        for group in interface["ParameterGroups"]:
            rubric = nodes.rubric(text=group["Label"]["default"])
            rows = []
            for name in group["Parameters"]:
                parameter = parameters[name]
                title = nodes.inline()
                title += nodes.strong(text=name)
                title += nodes.Text(f" ({labels[name]['default']})")
                description = str(parameter["Description"])
                rows.append([title, _default(parameter), _constraint(parameter), description])
            output.append(rubric)
            output.append(_table(["Parameter", "Default", "Allowed", "Description"], rows, [22, 14, 20, 44]))
        return output


class CloudFormationOutputs(SphinxDirective):
    """The stack's outputs with their descriptions."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        outputs = load_template()["Outputs"]
        rows = [[nodes.strong(text=name), str(output["Description"])] for name, output in outputs.items()]
        return [_table(["Output", "What it is"], rows, [30, 70])]


def _environment(template: dict[str, Any]) -> dict[str, Any]:
    definition = template["Resources"]["ReceiverTaskDefinition"]["Properties"]
    container = next(c for c in definition["ContainerDefinitions"] if c["Name"] == CONTAINER_NAME)
    return {item["Name"]: item["Value"] for item in container["Environment"]}


def _source(value: Any, parameters: dict[str, Any]) -> str | nodes.Node:
    if isinstance(value, dict) and set(value) == {"Fn::If"}:  # DATASTORE_ID, RECEIVER_PROCESSES
        condition, when_true, when_false = value["Fn::If"]
        phrase = nodes.inline()
        for branch, joint in ((when_true, f" with {condition}, else "), (when_false, "")):
            nested = isinstance(branch, dict) and "Fn::If" in branch
            phrase += nodes.Text("(" if nested else "")
            phrase += _node(_source(branch, parameters))
            phrase += nodes.Text((")" if nested else "") + joint)
        return phrase
    if isinstance(value, dict) and set(value) == {"Fn::FindInMap"}:
        mapping, key, _attribute = value["Fn::FindInMap"]
        phrase = nodes.inline(text=f"mapping {mapping} by ")
        phrase += _node(_source(key, parameters))
        return phrase
    if isinstance(value, dict) and set(value) == {"Fn::GetAtt"}:
        return f"resource {value['Fn::GetAtt'][0]}"
    if value == "":
        return "(empty)"
    if not (isinstance(value, dict) and "Ref" in value):
        return _literal(str(value))
    reference = str(value["Ref"])
    if reference.startswith("AWS::"):
        return f"the stack's {reference.removeprefix('AWS::')}"
    return f"parameter {reference}" if reference in parameters else f"resource {reference}"


class DaemonSettings(SphinxDirective):
    """Every environment variable the daemon reads, its default, and what the task definition sets it to."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from scp.config import Settings  # the daemon's own table of settings

        template = load_template()
        environment = _environment(template)
        rows = []
        for name, default, meaning in Settings.documentation():
            value = environment.get(name)
            in_product = "(its default)" if value is None else _source(value, template["Parameters"])
            rows.append([_literal(name), _literal(default) if default else "(empty)", in_product, meaning])
        return [_table(["Variable", "Default", "Set by the stack to", "Meaning"], rows, [24, 14, 22, 40])]


class TransferSyntaxes(SphinxDirective):
    """The transfer syntaxes the SCP accepts for storage, from the daemon's own list."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from pydicom.uid import UID

        from scp.contexts import IMPORTABLE_TRANSFER_SYNTAXES

        rows = [[_literal(uid), UID(uid).name] for uid in IMPORTABLE_TRANSFER_SYNTAXES]
        return [_table(["Transfer Syntax UID", "Name"], rows, [35, 65])]


class StorageSopClasses(SphinxDirective):
    """Every storage SOP class the SCP accepts by default, from the daemon's own list."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from pydicom.uid import UID

        from scp.contexts import storage_sop_classes

        rows = [[_literal(uid), UID(uid).name] for uid in storage_sop_classes()]
        return [_table(["SOP Class UID", "Name"], rows, [35, 65])]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("cfn-parameters", CloudFormationParameters)
    app.add_directive("cfn-outputs", CloudFormationOutputs)
    app.add_directive("daemon-settings", DaemonSettings)
    app.add_directive("dicom-transfer-syntaxes", TransferSyntaxes)
    app.add_directive("dicom-storage-sop-classes", StorageSopClasses)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
