"""The ASL file itself: statelint passes, and its placeholders are exactly those the wiring doc lists."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASL = ROOT / "statemachines" / "import.asl.json"
WIRING_DOC = ROOT / "docs" / "import-workflow.rst"


def placeholders(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z0-9]+)\}", text))


def test_statelint_accepts_the_definition() -> None:
    statelint = Path(sys.executable).parent / "statelint"
    result = subprocess.run([str(statelint), str(ASL)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_definition_is_json_before_substitution() -> None:
    # Loaded with DefinitionSubstitutions: placeholders sit inside strings, so the file stays JSON.
    json.loads(ASL.read_text())


def test_placeholders_match_the_wiring_documentation() -> None:
    section = WIRING_DOC.read_text().split("Wiring for the template", 1)[1]
    documented = set(re.findall(r"``\$\{([A-Za-z0-9]+)\}``", section))
    assert placeholders(ASL.read_text()) == documented


def test_every_task_retries_transient_errors_and_catches_the_rest() -> None:
    states = json.loads(ASL.read_text())["States"]
    tasks = {name: state for name, state in states.items() if state["Type"] == "Task"}
    assert tasks
    for name, state in tasks.items():
        retried = {error for rule in state["Retry"] for error in rule["ErrorEquals"]}
        assert {"Lambda.ServiceException", "Lambda.TooManyRequestsException"} <= retried, name
        assert "States.ALL" not in retried, name
        # Named catches may come first (an error with its own truthful end); the last one catches the rest.
        assert state["Catch"][-1]["ErrorEquals"] == ["States.ALL"], name
        assert state["Catch"][-1]["Next"] == "RecordFailure" or name == "RecordFailure", name
        for rule in state["Retry"]:
            assert rule["JitterStrategy"] == "FULL" and rule["MaxDelaySeconds"] > 0, name


def test_a_named_catch_only_follows_the_retries_of_the_same_error() -> None:
    # JobOutputNotReady is read again first; only when the retries are spent does it go to its own record.
    states = json.loads(ASL.read_text())["States"]
    for name, state in states.items():
        for catch in state.get("Catch", [])[:-1]:
            retried = {error for rule in state["Retry"] for error in rule["ErrorEquals"]}
            assert set(catch["ErrorEquals"]) <= retried, name
