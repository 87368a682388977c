"""The daemon's own PutObjectTagging request is the one botocore's S3 client would send, to the same URL."""

from __future__ import annotations

import datetime
import re
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import RefreshableCredentials

from scp.forwarding.object_tagging import TaggingEndpoint, tagging_endpoint, tagging_request

TAGS = [
    {"Key": "storedicom-stored-at", "Value": "2026-11-23T18:57:03.113Z"},
    {"Key": "storedicom-image-set", "Value": "0123456789abcdef0123456789abcdef"},
    {"Key": "storedicom-warning", "Value": "B007 data set does not match: tag 0008 0016 & more"},
]
NOW = datetime.datetime(2026, 11, 23, 18, 57, 3, tzinfo=datetime.UTC)


class Sent(Exception):
    """botocore reached the point of sending; the request is kept instead."""

    def __init__(self, request: AWSRequest) -> None:
        self.request = request


def s3(region: str, endpoint_url: str | None = None) -> tuple[Any, Any]:
    """An S3 client configured as the daemon's (scp/storage/s3.py), and its session's credentials."""
    session = boto3.session.Session(
        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret", aws_session_token="token", region_name=region
    )
    config = Config(request_checksum_calculation="when_supported", connect_timeout=2.5, read_timeout=7.5)
    return session.client("s3", endpoint_url=endpoint_url, config=config), session.get_credentials()


def botocore_request(client: Any, bucket: str, key: str) -> AWSRequest:
    def keep(request: AWSRequest, **_: Any) -> None:
        raise Sent(request)

    client.meta.events.register("before-send.s3.PutObjectTagging", keep)
    try:
        client.put_object_tagging(Bucket=bucket, Key=key, Tagging={"TagSet": TAGS})
    except Sent as sent:
        return sent.request
    finally:
        client.meta.events.unregister("before-send.s3.PutObjectTagging", keep)
    raise AssertionError("botocore sent nothing")


@pytest.mark.parametrize(
    ("region", "endpoint_url", "bucket", "bucket_url"),
    [
        ("eu-west-2", None, "dicom-images", "https://dicom-images.s3.eu-west-2.amazonaws.com"),
        ("us-east-1", None, "dicom-images", "https://dicom-images.s3.amazonaws.com"),
        # TLS names cannot cover a dotted bucket as a subdomain: botocore addresses it in the path.
        ("eu-west-2", None, "dicom.images", "https://s3.eu-west-2.amazonaws.com/dicom.images"),
        ("us-east-1", "http://127.0.0.1:5000", "dicom", "http://127.0.0.1:5000/dicom"),
        ("us-west-2", "https://s3.example.internal/base", "dicom", "https://s3.example.internal/base/dicom"),
    ],
)
def test_the_bucket_url_is_the_s3_clients_own(
    region: str, endpoint_url: str | None, bucket: str, bucket_url: str
) -> None:
    client, credentials = s3(region, endpoint_url)
    endpoint = tagging_endpoint(client, bucket, credentials)
    assert endpoint.bucket_url == bucket_url
    assert (endpoint.region, endpoint.connect_timeout, endpoint.read_timeout) == (region, 2.5, 7.5)
    key = "batches/20261123T185700Z-3f9a1c2b7d4e5f60/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    assert botocore_request(client, bucket, key).url == f"{bucket_url}/{key}?tagging"  # and nothing was sent before


@pytest.mark.parametrize("key", ["batches/b/1.2.3/1.2.3.4/1.2.3.4.5.dcm", "batches/b/a b+c~d%e/é.dcm"])
def test_the_request_is_the_one_botocore_signs(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    monkeypatch.setattr("botocore.auth.get_current_datetime", lambda: NOW)  # both signatures at the same second
    client, credentials = s3("eu-west-2")
    expected = botocore_request(client, "dicom-images", key)
    endpoint = TaggingEndpoint("https://dicom-images.s3.eu-west-2.amazonaws.com", "eu-west-2", credentials, 1, 1)
    request = tagging_request(endpoint, key, TAGS)
    assert f"https://dicom-images.s3.eu-west-2.amazonaws.com{request.path}" == expected.url
    assert request.body == expected.body
    theirs = {name.lower(): _text(value) for name, value in expected.headers.items()}
    signed = re.search(r"SignedHeaders=([^,]+),", theirs["authorization"])
    assert signed and set(signed.group(1).split(";")) == {
        "host", "x-amz-checksum-crc32", "x-amz-content-sha256", "x-amz-date", "x-amz-sdk-checksum-algorithm",
        "x-amz-security-token",
    }  # fmt: skip
    # The same signed headers with the same values, so the same signature; botocore's unsigned ones aside.
    ours = {name.lower(): value for name, value in request.headers.items()}
    assert ours == {name: theirs[name] for name in [*signed.group(1).split(";"), "authorization"] if name != "host"}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def test_each_request_is_signed_with_the_credentials_of_the_moment() -> None:
    issued: list[str] = []

    def refresh() -> dict[str, str]:
        # Credentials five minutes from expiry: botocore refreshes them before every use (its mandatory refresh
        # starts ten minutes before), as a task role's are refreshed once they near their end.
        issued.append(f"AKID{len(issued) + 1}")
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
        return {"access_key": issued[-1], "secret_key": "secret", "token": "token", "expiry_time": expiry.isoformat()}

    credentials = RefreshableCredentials.create_from_metadata(refresh(), refresh, "container-role")
    endpoint = TaggingEndpoint("https://dicom-images.s3.eu-west-2.amazonaws.com", "eu-west-2", credentials, 1, 1)
    authorizations = [tagging_request(endpoint, "batches/b/1.dcm", TAGS).headers["Authorization"] for _ in range(2)]
    assert issued == ["AKID1", "AKID2", "AKID3"]
    assert "Credential=AKID2/" in authorizations[0] and "Credential=AKID3/" in authorizations[1]
