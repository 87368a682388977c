"""Checks a line against the CloudWatch Embedded Metric Format specification and reads its metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# The units the EMF specification's JSON schema allows (CloudWatch's StandardUnit values).
UNITS = {
    "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes", "Terabytes", "Bits",
    "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count", "Bytes/Second", "Kilobytes/Second",
    "Megabytes/Second", "Gigabytes/Second", "Terabytes/Second", "Bits/Second", "Kilobits/Second", "Megabits/Second",
    "Gigabits/Second", "Terabits/Second", "Count/Second", "None",
}  # fmt: skip


@dataclass(frozen=True)
class Datum:
    """One metric value as CloudWatch would extract it."""

    namespace: str
    name: str
    unit: str
    dimensions: tuple[tuple[str, str], ...]
    values: tuple[float, ...]


def is_emf(line: str) -> bool:
    return line.startswith("{") and "_aws" in json.loads(line)


def extract(document: dict[str, Any]) -> list[Datum]:
    """Validate ``document`` as the specification requires and return every datum it defines."""
    metadata = document["_aws"]
    assert isinstance(metadata["Timestamp"], int) and metadata["Timestamp"] > 1_500_000_000_000
    data = []
    for directive in metadata["CloudWatchMetrics"]:
        namespace = directive["Namespace"]
        assert isinstance(namespace, str) and 1 <= len(namespace) <= 255
        assert len(directive["Metrics"]) <= 100
        for dimension_set in directive["Dimensions"]:
            assert len(dimension_set) <= 9
            for key in dimension_set:
                assert isinstance(document[key], str), f"dimension {key} must be a string member"
        for definition in directive["Metrics"]:
            name, unit = definition["Name"], definition.get("Unit", "None")
            assert unit in UNITS, unit
            value = document[name]
            values = tuple(value) if isinstance(value, list) else (value,)
            assert 1 <= len(values) <= 100
            assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in values), value
            for dimension_set in directive["Dimensions"]:
                dimensions = tuple((key, str(document[key])) for key in dimension_set)
                data.append(Datum(namespace, name, unit, dimensions, values))
    return data


def data_from_lines(lines: list[str]) -> list[Datum]:
    return [datum for line in lines if is_emf(line) for datum in extract(json.loads(line))]
