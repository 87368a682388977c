"""AWS_REGION selects the Region the daemon's S3 requests are signed for, seen at a local HTTP endpoint."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.daemon import start_daemon
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration

# SigV4: Credential=<key id>/<date>/<region>/<service>/aws4_request
_SCOPE = re.compile(r"Credential=[^/]+/\d{8}/([a-z0-9-]+)/s3/aws4_request")


class _Recorder(BaseHTTPRequestHandler):
    """Answers every request with an empty 200 and keeps its Authorization header."""

    authorizations: list[str]

    def _answer(self) -> None:
        type(self).authorizations.append(self.headers.get("Authorization", ""))
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = do_PUT = do_POST = _answer

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[tuple[str, list[str]]]:
    seen: list[str] = []
    handler = type("Recorder", (_Recorder,), {"authorizations": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("region_env", "signed_for"),
    [
        ({"AWS_REGION": "eu-west-2"}, "eu-west-2"),
        ({"AWS_REGION": "ap-southeast-2", "AWS_DEFAULT_REGION": "us-west-2"}, "ap-southeast-2"),
        ({"AWS_DEFAULT_REGION": "us-west-2"}, "us-west-2"),  # without AWS_REGION, the standard chain
    ],
    ids=["aws-region-alone", "aws-region-first", "standard-chain"],
)
def test_aws_region_selects_the_signing_region(
    tmp_path: Path, endpoint: tuple[str, list[str]], region_env: dict[str, str], signed_for: str
) -> None:
    url, authorizations = endpoint
    daemon = start_daemon(
        tmp_path,
        DICOM_BUCKET="region-check",
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_CONFIG_FILE=str(tmp_path / "no-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        **region_env,
    )
    # The daemon checks its bucket at start: that first request is signed for the Region it chose.
    wait_for(lambda: authorizations, 15, "the daemon's first S3 request")
    daemon.stop()
    regions = {match.group(1) for header in authorizations if (match := _SCOPE.search(header))}
    assert regions == {signed_for}, authorizations
