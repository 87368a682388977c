"""PutObjectTagging as one SigV4-signed HTTP request over a kept-alive connection, without botocore's client.

Every stored instance is tagged, beside the receive path: through botocore's client a tag cost about 2 ms of CPU
under the interpreter lock (serialization, handlers, parsing), this request 0.6 to 0.9 ms, most of it http.client
and the socket (docs/forwarding.rst, "Measured"). It is the request botocore sends (Amazon S3 API Reference,
PutObjectTagging): ``PUT /<key>?tagging``, the Tagging XML, a CRC32 of the body because S3 requires a checksum of
this request, the body's SHA-256 signed by botocore's S3 signer. Where it goes and as which Region it is signed are
the S3 client's, asked once.
"""

from __future__ import annotations

import base64
import http.client
import re
import select
import socket
import ssl
import urllib.parse
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest, AWSResponse, HTTPHeaders
from botocore.credentials import Credentials

SERVICE = "s3"
_NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"
# An answer to PutObjectTagging is empty or a short XML error; anything longer is not read to the end.
_ANSWER_MAX = 64 * 1024
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,64})</Code>")
_ERROR_MESSAGE = re.compile(rb"<Message>([^<]{0,200})</Message>")
_PROBE_KEY = "probe"


class TaggingFailed(Exception):
    """No tag written: S3 answered with an error, or no answer came (the request may have reached S3)."""


@dataclass(frozen=True)
class TaggingEndpoint:
    """Where one bucket's PutObjectTagging requests go, how they are signed and how long they may take."""

    bucket_url: str  # the URL an object's key (its path, percent-encoded) is appended to, after a slash
    region: str
    credentials: Any  # botocore's, refreshed by it; frozen for each signature
    connect_timeout: float
    read_timeout: float


def tagging_endpoint(client: Any, bucket: str, credentials: Any) -> TaggingEndpoint:
    """The S3 client's own URL for this bucket's PutObjectTagging, its signing Region and its timeouts.

    botocore resolves the URL by its endpoint rules (AWS_ENDPOINT_URL, the Region, path-style addressing for a
    custom endpoint and for a bucket name with dots, virtual-hosted otherwise): one call of the client resolves it
    and is answered by a ``before-call`` handler, the hook botocore's Stubber uses, so nothing is sent. The key
    takes no part in the rules, so the URL of a probe key gives the bucket's.
    """
    resolved: dict[str, str] = {}

    def answer_here(
        params: Mapping[str, Any], context: Mapping[str, Any], **_: Any
    ) -> tuple[AWSResponse, dict[str, Any]]:
        resolved["url"] = str(params["url"])
        resolved["region"] = str(context.get("signing", {}).get("region") or client.meta.region_name)
        return AWSResponse(params["url"], 200, HTTPHeaders(), None), {}

    event = "before-call.s3.PutObjectTagging"
    client.meta.events.register_first(event, answer_here)
    try:
        client.put_object_tagging(Bucket=bucket, Key=_PROBE_KEY, Tagging={"TagSet": []})
    finally:
        client.meta.events.unregister(event, answer_here)
    url = urllib.parse.urlsplit(resolved["url"])
    assert url.query == "tagging" and url.path.endswith(f"/{_PROBE_KEY}"), resolved["url"]
    return TaggingEndpoint(
        bucket_url=f"{url.scheme}://{url.netloc}{url.path.removesuffix(f'/{_PROBE_KEY}')}",
        region=resolved["region"],
        credentials=credentials,
        connect_timeout=float(client.meta.config.connect_timeout),
        read_timeout=float(client.meta.config.read_timeout),
    )


def tagging_body(tags: Sequence[Mapping[str, str]]) -> bytes:
    """The Tagging document of PutObjectTagging's request."""
    items = "".join(f"<Tag><Key>{escape(tag['Key'])}</Key><Value>{escape(tag['Value'])}</Value></Tag>" for tag in tags)
    return f'<Tagging xmlns="{_NAMESPACE}"><TagSet>{items}</TagSet></Tagging>'.encode()


@dataclass(frozen=True)
class SignedRequest:
    path: str  # the request target: the bucket's path, the key, ``?tagging``
    headers: dict[str, str]  # besides Host and Content-Length, which http.client writes
    body: bytes


def tagging_request(endpoint: TaggingEndpoint, key: str, tags: Sequence[Mapping[str, str]]) -> SignedRequest:
    """PutObjectTagging of ``key``, signed now with the credentials of the moment."""
    body = tagging_body(tags)
    parsed = urllib.parse.urlsplit(endpoint.bucket_url)
    # The key as botocore writes it into the path: percent-encoded but for its slashes and RFC 3986's unreserved.
    path = f"{parsed.path.rstrip('/')}/{urllib.parse.quote(key, safe='/~')}?tagging"
    checksum = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
    headers = {"x-amz-checksum-crc32": checksum, "x-amz-sdk-checksum-algorithm": "CRC32"}
    request = AWSRequest(method="PUT", url=f"{parsed.scheme}://{parsed.netloc}{path}", data=body, headers=headers)
    frozen = endpoint.credentials.get_frozen_credentials()
    # S3's signer signs the body's SHA-256 in X-Amz-Content-SHA256 and leaves the path as written (no normalizing).
    S3SigV4Auth(Credentials(frozen.access_key, frozen.secret_key, frozen.token), SERVICE, endpoint.region).add_auth(
        request
    )
    return SignedRequest(path, dict(request.headers.items()), body)


class TaggingClient:
    """One HTTP connection to S3, kept alive between requests; not shared between threads."""

    def __init__(self, endpoint: TaggingEndpoint) -> None:
        self._endpoint = endpoint
        parsed = urllib.parse.urlsplit(endpoint.bucket_url)
        self._scheme = parsed.scheme
        self._host = parsed.hostname or ""
        self._port = parsed.port
        self._connection: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def put_tags(self, key: str, tags: Sequence[Mapping[str, str]]) -> None:
        """Replace ``key``'s tags with ``tags``; raise :class:`TaggingFailed` unless S3 answered 200."""
        request = tagging_request(self._endpoint, key, tags)
        try:
            connection = self._connect()
            connection.request("PUT", request.path, body=request.body, headers=request.headers)
            response = connection.getresponse()
            content = response.read(_ANSWER_MAX + 1)
            if response.will_close or len(content) > _ANSWER_MAX:
                self.close()  # a longer answer's rest is still on the connection
        except (OSError, http.client.HTTPException) as error:
            self.close()
            raise TaggingFailed(_describe(error)) from error
        if response.status != 200:
            raise TaggingFailed(_error(response.status, content))

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is not None and _closed_by_peer(self._connection):
            self.close()
        if self._connection is None:
            timeout = self._endpoint.connect_timeout
            if self._scheme == "https":
                self._connection = http.client.HTTPSConnection(
                    self._host, self._port, timeout=timeout, context=ssl.create_default_context()
                )
            else:
                self._connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
            self._connection.connect()
            assert self._connection.sock is not None
            self._connection.sock.settimeout(self._endpoint.read_timeout)
            self._connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._connection


def _closed_by_peer(connection: http.client.HTTPConnection) -> bool:
    """S3 closes a connection idle for a while; an idle socket that is readable holds that end of stream (what
    urllib3, under boto3, checks before it reuses a connection), and the request then goes on a new one."""
    if connection.sock is None:
        return True
    poller = select.poll()
    poller.register(connection.sock, select.POLLIN)
    return bool(poller.poll(0))


def _error(status: int, content: bytes) -> str:
    """S3's error answer (Amazon S3 API Reference, "Error responses"): its status, Code and Message."""
    code = _ERROR_CODE.search(content)
    message = _ERROR_MESSAGE.search(content)
    text = f"S3 answered {status}"
    if code:
        text += f" {code.group(1).decode('utf-8', 'replace')}"
    if message and message.group(1):
        text += f": {message.group(1).decode('utf-8', 'replace')}"
    return text


def _describe(error: BaseException) -> str:
    if isinstance(error, socket.timeout | TimeoutError):
        return "S3 did not answer in time"
    if isinstance(error, OSError) and error.strerror:
        return f"S3 connection failed: {error.strerror}"
    return f"S3 connection failed: {type(error).__name__}"
