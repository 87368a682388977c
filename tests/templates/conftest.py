"""The product template, parsed once for the template tests."""

from __future__ import annotations

from typing import Any

import pytest

from tests.templates import cfn


@pytest.fixture(scope="session")
def template() -> dict[str, Any]:
    return cfn.load()


@pytest.fixture(scope="session")
def resources(template: dict[str, Any]) -> dict[str, Any]:
    return dict(template["Resources"])
