"""Pytest plugin: run the tests with this process's clock moved ahead (``-p tests.support.clock_ahead``).

No test may depend on the day it runs. ``CLOCK_AHEAD_DAYS`` (default 400) moves ``time.time`` and
``datetime.now`` of the test process forward while the clock keeps ticking; child processes such as
moto_server and the daemon keep the real clock, as another host would.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest
import time_machine

_TRAVEL: list[time_machine.travel] = []


def pytest_configure(config: pytest.Config) -> None:
    days = int(os.environ.get("CLOCK_AHEAD_DAYS", "400"))
    travel = time_machine.travel(datetime.now(UTC) + timedelta(days=days), tick=True)
    travel.start()
    _TRAVEL.append(travel)


def pytest_unconfigure(config: pytest.Config) -> None:
    while _TRAVEL:
        _TRAVEL.pop().stop()
