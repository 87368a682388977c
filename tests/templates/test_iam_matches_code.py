"""Every AWS call the code makes is allowed by the role that runs it in the template, and the role allows nothing
the code does not need.

The calls are read from the source: boto3 client and DynamoDB table methods named after a botocore operation,
paginators, ``batch_writer`` and the S3 transfer manager, and the requests the code signs itself (StoreDICOM, the
forwarding tags). A Lambda function's code is what its handler reaches
(functions/<name>/app.py and the shared modules, followed through calls and references); the receiver's is every
module the serving daemon imports. Besides the API actions, a role may hold only what those calls imply: KMS
through the service that encrypts (S3 objects, the table, the function's environment, the data store),
``iam:PassRole`` for an import job, and a function's own logs and traces.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore import xform_name

from tests.templates import cfn
from tests.templates.cfn import ROOT

FUNCTIONS = ROOT / "functions"
# The status command runs with the administrator's own credentials, not the task role (docs/operations.rst).
STATUS_COMMAND = "scp.import_status"  # the status command's package: it runs with an admin's credentials
SERVICES = {"s3": "s3", "dynamodb": "dynamodb", "medical-imaging": "medical-imaging", "stepfunctions": "states"}
S3_ACTIONS = {
    "ListObjectsV2": {"s3:ListBucket"},
    "ListObjects": {"s3:ListBucket"},
    "HeadBucket": {"s3:ListBucket"},
    "HeadObject": {"s3:GetObject"},
    "GetObject": {"s3:GetObject"},
    "PutObject": {"s3:PutObject"},
    # A copy carries the source's tags (TaggingDirective COPY, the default), which needs both tagging actions.
    "CopyObject": {"s3:GetObject", "s3:PutObject", "s3:GetObjectTagging", "s3:PutObjectTagging"},
    "GetObjectTagging": {"s3:GetObjectTagging"},
    "PutObjectTagging": {"s3:PutObjectTagging"},
    "CreateMultipartUpload": {"s3:PutObject"},
    "UploadPart": {"s3:PutObject"},
    "UploadPartCopy": {"s3:GetObject", "s3:PutObject"},
    "CompleteMultipartUpload": {"s3:PutObject"},
    "AbortMultipartUpload": {"s3:AbortMultipartUpload"},
    "DeleteObject": {"s3:DeleteObject"},
}
MULTIPART = ["CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "AbortMultipartUpload"]
# boto3's managed transfers: the operations each may make.
TRANSFERS = {
    "create_transfer_manager": ["PutObject", *MULTIPART],
    "upload_file": ["PutObject", *MULTIPART],
    "upload_fileobj": ["PutObject", *MULTIPART],
    "copy": ["HeadObject", "CopyObject", "UploadPartCopy", *MULTIPART[:1], *MULTIPART[2:]],
}
# HealthImaging's data encryption guide: what a caller needs on a data store's customer managed key.
HEALTHIMAGING_KEY = {"kms:DescribeKey", "kms:CreateGrant", "kms:Decrypt", "kms:GenerateDataKey"}
LAMBDA_PLATFORM = {"logs:CreateLogStream", "logs:PutLogEvents", "xray:PutTraceSegments", "xray:PutTelemetryRecords"}


@cache
def _operations() -> dict[str, tuple[str, str] | None]:
    """Python method name -> (service, operation) for the services the product calls; None for a name two services
    share (tag_resource, ...), which the code must not call without this test learning which client it is."""
    session = botocore.session.get_session()
    names: dict[str, tuple[str, str] | None] = {}
    for service in SERVICES:
        for operation in session.get_service_model(service).operation_names:
            name = xform_name(operation)
            names[name] = None if name in names else (service, operation)
    return names


# --- Reading the code ---------------------------------------------------------------------------------------------
@dataclass
class Module:
    name: str
    tree: ast.Module
    definitions: dict[str, ast.AST] = field(default_factory=dict)  # "func" and "Class.method"
    imports: dict[str, str] = field(default_factory=dict)  # local name -> module or module.attribute


def _module_name(path: Path) -> str:
    relative = path.relative_to(FUNCTIONS if path.is_relative_to(FUNCTIONS) else ROOT).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _path_of(name: str) -> Path | None:
    for base in (ROOT, FUNCTIONS):
        parts = name.split(".")
        for candidate in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
            if candidate.is_file():
                return candidate
    return None


@cache
def _parse(name: str) -> Module | None:
    path = _path_of(name)
    if path is None:
        return None  # a library, not the product's code
    module = Module(name, ast.parse(path.read_text()))
    for node in module.tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            module.definitions[node.name] = node
        elif isinstance(node, ast.ClassDef):
            module.definitions[node.name] = node
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    module.definitions[f"{node.name}.{item.name}"] = item
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                module.imports[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, source] if source else base)
            for alias in node.names:
                module.imports[alias.asname or alias.name] = f"{source}.{alias.name}"
    return module


def _imported_modules(module: Module) -> set[str]:
    found = set()
    for target in module.imports.values():
        if _parse(target) is not None:
            found.add(target)
        elif _parse(target.rpartition(".")[0]) is not None:
            found.add(target.rpartition(".")[0])
    return found


def _locate(module: Module, dotted: str) -> tuple[Module, str] | None:
    """The product definition a dotted name used in ``module`` stands for."""
    head, _, rest = dotted.partition(".")
    if head in module.definitions:
        return module, dotted if dotted in module.definitions else head
    target = module.imports.get(head)
    if target is None:
        return None
    owner = _parse(target)
    if owner is not None:  # a module: the rest names something in it
        return (owner, rest) if rest and rest.split(".")[0] in owner.definitions else None
    owner = _parse(target.rpartition(".")[0])
    name = target.rpartition(".")[2]
    if owner is not None and name in owner.definitions:
        return owner, name
    return None


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _references(module: Module, qualified: str) -> set[tuple[str, str]]:
    """Definitions one definition calls or passes on (callbacks count: they run too)."""
    node = module.definitions[qualified]
    owner_class = qualified.split(".")[0] if "." in qualified else None
    found = set()
    if isinstance(node, ast.ClassDef):  # a class in use: each of its methods may run
        return {(module.name, name) for name in module.definitions if name.startswith(f"{qualified}.")}
    for child in ast.walk(node):
        dotted = _dotted(child) if isinstance(child, ast.Name | ast.Attribute) else None
        if dotted is None:
            continue
        if owner_class and dotted.split(".")[0] in ("self", "cls") and "." in dotted:
            method = f"{owner_class}.{dotted.split('.')[1]}"
            if method in module.definitions:
                found.add((module.name, method))
            continue
        located = _locate(module, dotted)
        if located:
            found.add((located[0].name, located[1]))
    return found


# StoreDICOM and StoreDICOMStudy are not in the AWS SDKs: the code signs its own STOW-RS request
# (scp/forwarding/stow.py). The request path it writes, ``{base}/datastore/{id}/studies`` or ``.../studies/{study}``
# (an f-string or a literal), stands for the action.
_STOW_PATH = re.compile(r"(?:\{\})?/datastore/\{\}/studies(/\{\})?")


def _stow_calls(node: ast.AST) -> set[tuple[str, str]]:
    calls = set()
    for child in ast.walk(node):
        if isinstance(child, ast.JoinedStr):
            text = "".join(str(part.value) if isinstance(part, ast.Constant) else "{}" for part in child.values)
        elif isinstance(child, ast.Constant) and isinstance(child.value, str):
            text = child.value
        else:
            continue
        path = _STOW_PATH.fullmatch(text)
        if path:
            calls.add(("medical-imaging", "StoreDICOMStudy" if path.group(1) else "StoreDICOM"))
    return calls


# The forwarding tags are written as signed S3 requests too (scp/forwarding/object_tagging.py): a function that
# writes a request path ending in ``?tagging`` (an f-string or a literal) and an HTTP method (``method="PUT"``, or
# the first argument of ``request``) makes that method's object tagging operation.
_TAGGING_OPERATIONS = {"PUT": "PutObjectTagging", "GET": "GetObjectTagging", "DELETE": "DeleteObjectTagging"}


def _s3_tagging_calls(node: ast.AST) -> set[tuple[str, str]]:
    calls = set()
    for function in ast.walk(node):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        paths = [
            child for child in ast.walk(function)
            if (isinstance(child, ast.JoinedStr) and child.values and isinstance(child.values[-1], ast.Constant)
                and str(child.values[-1].value).endswith("?tagging"))
            or (isinstance(child, ast.Constant) and isinstance(child.value, str) and child.value.endswith("?tagging"))
        ]  # fmt: skip
        if not paths:
            continue
        methods = set()
        for call in ast.walk(function):
            if not isinstance(call, ast.Call):
                continue
            named = [keyword.value for keyword in call.keywords if keyword.arg == "method"]
            if getattr(call.func, "attr", None) == "request" and call.args:
                named.append(call.args[0])
            methods |= {str(value.value) for value in named if isinstance(value, ast.Constant)}
        assert methods, f"{function.name} writes a ?tagging path without a method this test can read"
        calls |= {("s3", _TAGGING_OPERATIONS[method]) for method in methods}
    return calls


def _calls_in(node: ast.AST) -> set[tuple[str, str]]:
    """(service, operation) of every AWS call written in this code."""
    operations = _operations()
    writers = {
        item.optional_vars.id
        for child in ast.walk(node)
        if isinstance(child, ast.With | ast.AsyncWith)
        for item in child.items
        if isinstance(item.optional_vars, ast.Name) and "batch_writer" in ast.dump(item.context_expr)
    }
    calls = set()
    for child in ast.walk(node):
        if not isinstance(child, ast.Call):
            continue
        function = child.func
        name = getattr(function, "attr", getattr(function, "id", ""))
        receiver = _dotted(function.value) if isinstance(function, ast.Attribute) else None
        if receiver in writers:
            continue  # put_item and delete_item of a batch writer are its BatchWriteItem
        if name == "batch_writer":
            calls.add(("dynamodb", "BatchWriteItem"))
        elif name == "get_paginator" and child.args and isinstance(child.args[0], ast.Constant):
            operation = operations[str(child.args[0].value)]
            assert operation, f"paginator {child.args[0].value} of which service?"
            calls.add(operation)
        elif name in TRANSFERS and (name != "copy" or len(child.args) >= 3):  # dict.copy() takes no arguments
            calls |= {("s3", operation) for operation in TRANSFERS[name]}
        elif name in operations and isinstance(function, ast.Attribute):
            operation = operations[name]
            assert operation, f"{name}() is an operation of several services; which client is {receiver}?"
            calls.add(operation)
        # An operation named by a string and called through getattr(client, name) elsewhere.
        for argument in child.args:
            if isinstance(argument, ast.Constant) and argument.value in operations and name != "get_paginator":
                operation = operations[str(argument.value)]
                assert operation, f"{argument.value} is an operation of several services; which client?"
                calls.add(operation)
    return calls | _stow_calls(node) | _s3_tagging_calls(node)


def calls_reached_from(roots: set[tuple[str, str]]) -> set[tuple[str, str]]:
    seen: set[tuple[str, str]] = set()
    pending = list(roots)
    calls = set()
    while pending:
        module_name, qualified = pending.pop()
        if (module_name, qualified) in seen:
            continue
        seen.add((module_name, qualified))
        module = _parse(module_name)
        assert module is not None
        calls |= _calls_in(module.definitions[qualified])
        pending += _references(module, qualified) - seen
    return calls


def function_calls(package: str) -> set[tuple[str, str]]:
    """The AWS calls a Lambda function's handler can reach."""
    app = f"{package}.app"
    module = _parse(app)
    assert module is not None and "handler" in module.definitions, f"{app} has no handler"
    module_level = ast.Module(body=[n for n in module.tree.body if not isinstance(n, ast.FunctionDef | ast.ClassDef)],
                              type_ignores=[])  # fmt: skip
    return calls_reached_from({(app, "handler")}) | _calls_in(module_level)


def receiver_calls() -> set[tuple[str, str]]:
    """The AWS calls of every module the serving daemon imports (the status command's own modules aside)."""
    assert _parse(STATUS_COMMAND) is not None, f"{STATUS_COMMAND} moved: name the status command's module here"
    modules, pending = set(), ["scp.__main__"]
    while pending:
        name = pending.pop()
        if name in modules or name == STATUS_COMMAND or name.startswith(STATUS_COMMAND + "."):
            continue
        modules.add(name)
        module = _parse(name)
        assert module is not None
        pending += _imported_modules(module)
        if "." in name:
            pending.append(name.rpartition(".")[0])  # a package's __init__ runs first
    calls = set()
    for name in modules:
        module = _parse(name)
        assert module is not None
        calls |= _calls_in(module.tree)
    return calls


def needed_actions(calls: set[tuple[str, str]]) -> set[str]:
    actions = set()
    for service, operation in calls:
        actions |= S3_ACTIONS[operation] if service == "s3" else {f"{SERVICES[service]}:{operation}"}
    return actions


# --- Reading the template -----------------------------------------------------------------------------------------
def _statements(resources: dict[str, dict[str, Any]], role: str) -> list[dict[str, Any]]:
    documents = [policy["PolicyDocument"] for policy in resources[role]["Properties"].get("Policies", [])]
    for resource in resources.values():
        if resource["Type"] == "AWS::IAM::Policy" and {"Ref": role} in resource["Properties"]["Roles"]:
            documents.append(resource["Properties"]["PolicyDocument"])
    return [statement for document in documents for statement in document["Statement"]]


def _actions(statement: dict[str, Any]) -> set[str]:
    actions = statement["Action"]
    return {actions} if isinstance(actions, str) else set(actions)


def _via_services(statement: dict[str, Any]) -> set[str]:
    via = statement.get("Condition", {}).get("StringEquals", {}).get("kms:ViaService", [])
    return {item.split(".")[0] for item in ([via] if isinstance(via, str) else via)}


@pytest.fixture(scope="module")
def resources(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return cfn.Resolver(template, cfn.parameter_values(template)).resources()


def _role_of_function(resources: dict[str, dict[str, Any]], package: str) -> str:
    (role,) = [
        resource["Properties"]["Role"]["Fn::GetAtt"][0]
        for resource in resources.values()
        if resource["Type"] == "AWS::Lambda::Function"
        and resource["Properties"]["Code"]["S3Key"]["Fn::Sub"][1]["Package"] == package
    ]
    return str(role)


def _check(statements: list[dict[str, Any]], calls: set[tuple[str, str]], platform: set[str], unit: str,
           kms_via: set[str]) -> None:  # fmt: skip
    needed = needed_actions(calls)
    granted = {action for statement in statements for action in _actions(statement)}
    assert all(statement["Effect"] == "Allow" for statement in statements)
    assert needed <= granted, f"{unit} calls what its role does not allow: {sorted(needed - granted)}"
    implied = set(platform)
    services = {service for service, _ in calls}
    if "medical-imaging" in services:
        implied |= HEALTHIMAGING_KEY
    if ("medical-imaging", "StartDICOMImportJob") in calls:
        implied.add("iam:PassRole")
    if any(action in needed for action in ("s3:GetObject", "s3:PutObject")):
        implied |= {"kms:Decrypt", "kms:GenerateDataKey"}
    extra = granted - needed - implied
    assert not extra, f"{unit}'s role allows what its code never does: {sorted(extra)}"
    allowed_via = {service for service in services if service != "stepfunctions"} | kms_via
    for statement in statements:
        if any(action.startswith("kms:") for action in _actions(statement)):
            via = _via_services(statement)
            assert via and via <= allowed_via, f"{unit}: KMS through {sorted(via)}, but it calls {sorted(services)}"
            if via == {"s3"}:
                assert _actions(statement) <= {"kms:Decrypt", "kms:GenerateDataKey"}
                assert ("kms:GenerateDataKey" in _actions(statement)) <= ("s3:PutObject" in needed), unit
                assert ("kms:Decrypt" in _actions(statement)) <= bool(
                    {"s3:GetObject", "s3:AbortMultipartUpload"} & needed
                ), unit


@pytest.mark.parametrize("package", [path.parent.name for path in sorted(FUNCTIONS.glob("*/app.py"))])
def test_each_function_role_allows_exactly_what_its_code_calls(
    resources: dict[str, dict[str, Any]], package: str
) -> None:
    role = _role_of_function(resources, package)
    calls = function_calls(package)
    assert calls, f"{package}: no AWS call found"
    _check(_statements(resources, role), calls, LAMBDA_PLATFORM, package, kms_via={"lambda", "dynamodb"})


def test_the_receiver_task_role_allows_exactly_what_the_daemon_calls(resources: dict[str, dict[str, Any]]) -> None:
    task = resources["ReceiverTaskDefinition"]["Properties"]
    role = task["TaskRoleArn"]["Fn::GetAtt"][0]
    calls = receiver_calls()
    assert ("s3", "PutObject") in calls and ("s3", "HeadBucket") in calls
    _check(_statements(resources, role), calls, set(), "the receiver", kms_via=set())


@pytest.mark.parametrize("existing", [False, True])
def test_the_receivers_may_store_into_the_data_store_only_while_they_forward(
    template: dict[str, Any], existing: bool
) -> None:
    datastore = {"ExistingDatastoreId": "bd9e62ed2ef14b7d8a1a6b4f0f3c2d11"} if existing else {}
    for setting, allowed in (("Enabled", True), ("Disabled", False)):
        values = cfn.parameter_values(template, StoreDICOMForwarding=setting, **datastore)
        resources = cfn.Resolver(template, values).resources()
        role = resources["ReceiverTaskDefinition"]["Properties"]["TaskRoleArn"]["Fn::GetAtt"][0]
        statements = _statements(resources, role)
        healthimaging = [s for s in statements if any(a.startswith("medical-imaging:") for a in _actions(s))]
        key = [s for s in statements if "medical-imaging" in _via_services(s)]
        assert bool(healthimaging) == allowed, setting
        assert bool(key) == (allowed and not existing), f"{setting}: an existing store's key was not given"
        for statement in healthimaging:
            assert _actions(statement) == {"medical-imaging:StoreDICOM"}
            target = statement["Resource"]
            if existing:
                assert target["Fn::Sub"].endswith(":datastore/bd9e62ed2ef14b7d8a1a6b4f0f3c2d11"), target
            else:
                assert target == {"Fn::GetAtt": ["Datastore", "DatastoreArn"]}


def test_the_reading_of_the_code_finds_what_it_claims() -> None:
    """The analysis itself: known calls are found, through shared modules and callbacks, and nothing else."""
    register = function_calls("register_batch")
    assert {("s3", "GetObject"), ("dynamodb", "PutItem"), ("dynamodb", "GetItem")} <= register
    assert ("dynamodb", "Query") not in register and ("s3", "PutObject") not in register
    assert ("medical-imaging", "StartDICOMImportJob") in function_calls("start_import")
    assert ("s3", "ListObjectsV2") in function_calls("sweeper")
    assert ("s3", "CopyObject") in function_calls("process_results")
    tree = ast.parse("def f(s3, table):\n    with table.batch_writer() as w:\n        w.put_item(Item={})\n"
                     "    s3.get_paginator('list_objects_v2')\n    {}.copy()\n"
                     "    conditional(table, 'update_item', {})\n")  # fmt: skip
    assert _calls_in(tree) == {("dynamodb", "BatchWriteItem"), ("s3", "ListObjectsV2"), ("dynamodb", "UpdateItem")}
    assert ("medical-imaging", "StoreDICOM") in receiver_calls()  # the daemon's own signed STOW-RS request
    stow = ast.parse('def f(base, store, study):\n    return f"{base}/datastore/{store}/studies/{study}"\n')
    assert _calls_in(stow) == {("medical-imaging", "StoreDICOMStudy")}
    tagging = ast.parse('def f(url, key, sign):\n    return sign(method="PUT", url=f"{url}/{key}?tagging")\n')
    assert _calls_in(tagging) == {("s3", "PutObjectTagging")}
    # The forwarding tags' own signed request, besides the one call that asks the client for its URL.
    tagger = _parse("scp.forwarding.object_tagging")
    assert tagger is not None
    assert _s3_tagging_calls(tagger.definitions["tagging_request"]) == {("s3", "PutObjectTagging")}


def test_the_documented_standalone_task_policy_is_what_the_daemon_calls() -> None:
    """docs/ecs-console.rst gives this policy for running the container without the stack."""
    document = json.loads((ROOT / "docs" / "receiver-task-policy.json").read_text())
    granted = {action for statement in document["Statement"] for action in _actions(statement)}
    assert granted == needed_actions(receiver_calls())
