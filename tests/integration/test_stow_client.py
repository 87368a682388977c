"""The StoreDICOM client against the stand-in: keep-alive, and no answer (a stall, a dropped connection) is an error
the forwarder retries, never an outcome."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.credentials import Credentials

from scp.forwarding.stow import Body, StowClient, StowError
from tests.support.corpus import make_instance, read
from tests.support.stow import ACCESS_KEY, SECRET_KEY, StowStandIn

pytestmark = pytest.mark.integration


@pytest.fixture
def standin() -> Iterator[StowStandIn]:
    server = StowStandIn().start()
    yield server
    server.stop()


def client(standin: StowStandIn, stall_seconds: float = 5.0) -> StowClient:
    credentials = Credentials(ACCESS_KEY, SECRET_KEY)
    return StowClient(standin.url, standin.datastore_id, standin.region, credentials, stall_seconds)


def test_requests_share_one_connection_and_every_answer_names_its_instances(
    tmp_path: Path, standin: StowStandIn
) -> None:
    stow = client(standin)
    files = [make_instance(tmp_path, pixel_bytes=8192) for _ in range(3)]
    with Body(files[:1]) as body:
        first = stow.store(body)
    with Body(files[1:]) as body:
        second = stow.store(body)
    stow.close()
    assert first.status == 200 and list(first.outcomes) == [str(read(files[0]).SOPInstanceUID)]
    assert second.status == 200 and set(second.outcomes) == {str(read(f).SOPInstanceUID) for f in files[1:]}
    assert all(outcome.stored for outcome in [*first.outcomes.values(), *second.outcomes.values()])
    assert standin.problems == []


def test_a_stalled_answer_is_an_error_within_the_stall_time(tmp_path: Path, standin: StowStandIn) -> None:
    standin.latency_seconds = 3.0
    stow = client(standin, stall_seconds=0.5)
    started = time.monotonic()
    with Body([make_instance(tmp_path, pixel_bytes=8192)]) as body, pytest.raises(StowError, match="in time"):
        stow.store(body)
    assert time.monotonic() - started < 2.5


def test_a_connection_dropped_before_the_answer_is_an_error_and_the_next_request_reconnects(
    tmp_path: Path, standin: StowStandIn
) -> None:
    stow = client(standin)
    path = make_instance(tmp_path, pixel_bytes=8192)
    standin.close_without_answer = True
    with Body([path]) as body, pytest.raises(StowError):
        stow.store(body)
    standin.close_without_answer = False
    with Body([path]) as body:
        assert stow.store(body).status == 200
    assert standin.arrivals()[str(read(path).SOPInstanceUID)] == 2, "stored, unanswered, then stored again"


def test_the_standin_refuses_a_body_that_is_not_the_one_whose_hash_was_signed(
    tmp_path: Path, standin: StowStandIn
) -> None:
    stow = client(standin)
    with Body([make_instance(tmp_path, pixel_bytes=8192)]) as body:
        body._digest = "0" * 64  # signed as if the body were another one
        answer = stow.store(body)
    stow.close()
    assert answer.status == 400 and answer.outcomes == {}
    assert standin.problems == ["X-Amz-Content-SHA256 is not the body's hash"] and standin.received == []
