"""STOW-RS to HealthImaging (StoreDICOM): one signed POST of Part-10 files streamed from disk, and its answer.

HealthImaging developer guide, "Storing instances with STOW-RS" (dicomweb-storing.html): POST to
``https://dicom-medical-imaging.<region>.amazonaws.com/datastore/<datastore-id>/studies``, signed with SigV4 for
the service ``medical-imaging``, body ``application/dicom`` (one instance) or ``multipart/related;
type="application/dicom"`` (several), at most 1 GB per request, answer ``application/dicom+json`` (PS3.18 10.5.3).
StoreDICOM is not in the AWS SDKs, so the request is signed with botocore's SigV4 signer.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import secrets
import socket
import ssl
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

SERVICE = "medical-imaging"
MAXIMUM_REQUEST_BYTES = 1_000_000_000  # the guide: "up to 1GB of DICOM data per request"
_CHUNK = 1024 * 1024
_CONNECT_TIMEOUT_SECONDS = 10.0
# A socket read or write that makes no progress for this long fails the attempt (it is retried); a large request
# takes as long as its bytes need, this bounds only a stall.
_STALL_SECONDS = 60.0

# PS3.18 10.5.3 / PS3.3 C.12.2 (Storage Commitment-style references): the STOW-RS response data set.
_RETRIEVE_URL = "00081190"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_CLASS_UID = "00081150"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"

# PS3.18 Table I.2-1 / PS3.4 B.2.3: what the failure and warning codes of a STOW-RS answer mean.
_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class-instance conflict",
    0x0122: "referenced SOP class not supported",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
    0xC000: "cannot understand",
}


@dataclass(frozen=True)
class Outcome:
    """What the answer says about one instance."""

    stored: bool
    code: int | None  # the FailureReason or WarningReason, if any
    reason: str | None
    image_set_id: str | None = None

    @property
    def retryable(self) -> bool:
        # A7xx: out of resources on HealthImaging's side, not a fault of the instance; worth sending again.
        return not self.stored and self.code is not None and self.code & 0xFF00 == 0xA700


@dataclass(frozen=True)
class Answer:
    status: int
    outcomes: dict[str, Outcome]  # by SOP Instance UID; instances the answer does not name are absent
    message: str  # a short, printable description of an answer that is not a STOW-RS response


class StowError(Exception):
    """No answer: the connection failed or stalled. The request may or may not have reached HealthImaging."""


def endpoint(base_url: str | None, region: str) -> str:
    """The StoreDICOM endpoint: the configured one, or HealthImaging's DICOMweb endpoint of ``region``."""
    return base_url or f"https://dicom-medical-imaging.{region}.amazonaws.com"


class StowClient:
    """One HTTP connection, kept alive between requests; not shared between threads."""

    def __init__(
        self, base_url: str, datastore_id: str, region: str, credentials: Any, stall_seconds: float = _STALL_SECONDS
    ) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        self._scheme = parsed.scheme
        self._host = parsed.hostname or ""
        self._port = parsed.port
        self._base_path = parsed.path.rstrip("/")
        self.url = f"{base_url}/datastore/{datastore_id}/studies"
        self._path = f"{self._base_path}/datastore/{datastore_id}/studies"
        self._region = region
        self._credentials = credentials  # botocore's, refreshed by it; frozen for each signature
        self._stall_seconds = stall_seconds
        self._connection: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def store(self, body: Body) -> Answer:
        """POST ``body``; raise :class:`StowError` when no HTTP answer arrives."""
        headers = {
            "Content-Type": body.content_type,
            "Accept": "application/dicom+json",
            "Content-Length": str(body.length),
            "X-Amz-Content-SHA256": body.sha256(),
        }
        signed = self._sign(headers)
        try:
            connection = self._connect()
            connection.request("POST", self._path, body=body.reader(), headers=signed)
            response = connection.getresponse()
            content = response.read(_ANSWER_MAX + 1)
            if response.will_close:
                self.close()
        except (OSError, http.client.HTTPException) as error:
            self.close()
            raise StowError(_describe(error)) from error
        if len(content) > _ANSWER_MAX:
            self.close()  # the rest of the answer is still on the connection
            return Answer(response.status, {}, "answer too large to read")
        return parse_answer(response.status, response.getheader("Content-Type") or "", content)

    def _sign(self, headers: dict[str, str]) -> dict[str, str]:
        frozen = self._credentials.get_frozen_credentials()
        request = AWSRequest(method="POST", url=self.url, headers=headers)
        _PrecomputedPayloadAuth(
            Credentials(frozen.access_key, frozen.secret_key, frozen.token), SERVICE, self._region
        ).add_auth(request)
        return dict(request.headers.items())

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            if self._scheme == "https":
                self._connection = http.client.HTTPSConnection(
                    self._host,
                    self._port,
                    timeout=_CONNECT_TIMEOUT_SECONDS,
                    context=ssl.create_default_context(),
                    blocksize=_CHUNK,
                )
            else:
                self._connection = http.client.HTTPConnection(
                    self._host, self._port, timeout=_CONNECT_TIMEOUT_SECONDS, blocksize=_CHUNK
                )
            self._connection.connect()
            assert self._connection.sock is not None
            self._connection.sock.settimeout(self._stall_seconds)
            self._connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._connection


# An answer lists a few hundred bytes per instance; anything far larger is not a STOW-RS response.
_ANSWER_MAX = 4 * 1024 * 1024


class _PrecomputedPayloadAuth(SigV4Auth):
    """SigV4 over the body hash computed while streaming it once, instead of reading the files again."""

    def payload(self, request: AWSRequest) -> str:
        return str(request.headers["X-Amz-Content-SHA256"])


class Body:
    """The request body: a single Part-10 file, or a multipart/related body of several (RFC 2387), streamed.

    Each file is opened once: the hash and the send read the same bytes even if the store replaces the file
    (a modality sending the instance again) in between.
    """

    def __init__(self, parts: Sequence[Path]) -> None:
        assert parts
        self.paths = list(parts)
        self._files: list[BinaryIO] = []
        try:
            for part in parts:
                self._files.append(open(part, "rb"))  # noqa: SIM115 - closed by close()
        except OSError:
            self.close()
            raise
        sizes = [os.fstat(file.fileno()).st_size for file in self._files]
        if len(parts) == 1:
            self.content_type = "application/dicom"
            self._pieces: list[bytes | BinaryIO] = [self._files[0]]
        else:
            boundary = secrets.token_hex(16)
            self.content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
            self._pieces = []
            for file in self._files:
                self._pieces += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), file, b"\r\n"]
            self._pieces.append(f"--{boundary}--\r\n".encode())
        self._sizes = dict(zip(map(id, self._files), sizes, strict=True))
        self.length = sum(len(p) if isinstance(p, bytes) else self._sizes[id(p)] for p in self._pieces)
        self._digest: str | None = None

    def close(self) -> None:
        for file in self._files:
            file.close()

    def __enter__(self) -> Body:
        return self

    def __exit__(self, *exception: object) -> None:
        self.close()

    def chunks(self) -> Iterator[bytes]:
        for piece in self._pieces:
            if isinstance(piece, bytes):
                yield piece
                continue
            piece.seek(0)
            remaining = self._sizes[id(piece)]
            while remaining:
                chunk = piece.read(min(_CHUNK, remaining))
                if not chunk:
                    raise OSError("a stored file became shorter while it was sent")
                remaining -= len(chunk)
                yield chunk

    def sha256(self) -> str:
        if self._digest is None:
            digest = hashlib.sha256()
            for chunk in self.chunks():
                digest.update(chunk)
            self._digest = digest.hexdigest()
        return self._digest

    def reader(self) -> BinaryIO:
        return _ChunkReader(self.chunks())  # type: ignore[return-value]


class _ChunkReader:
    """A file-like ``read`` over a chunk iterator: http.client sends a body with ``read`` piece by piece."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._left = b""

    def read(self, size: int = -1) -> bytes:
        if not self._left:
            self._left = next(self._chunks, b"")
        if size < 0 or size >= len(self._left):
            piece, self._left = self._left, b""
        else:
            piece, self._left = self._left[:size], self._left[size:]
        return piece


def parse_answer(status: int, content_type: str, content: bytes) -> Answer:
    """The STOW-RS answer: per instance stored (with a warning, maybe) or failed with its reason."""
    document: Any = None
    if content and "json" in content_type.lower():
        try:
            document = json.loads(content)
        except (ValueError, UnicodeDecodeError):
            document = None
    if isinstance(document, list) and len(document) == 1:
        document = document[0]  # a DICOM JSON Model answer may be an array of one data set
    if not isinstance(document, dict) or not (_REFERENCED_SOP_SEQUENCE in document or _FAILED_SOP_SEQUENCE in document):
        return Answer(status, {}, _printable(content))
    outcomes: dict[str, Outcome] = {}
    for item in _items(document, _REFERENCED_SOP_SEQUENCE):
        uid = _first(item, _REFERENCED_SOP_INSTANCE_UID)
        if not isinstance(uid, str):
            continue
        code = _first(item, _WARNING_REASON)
        warning = _code(code)
        outcomes[uid] = Outcome(
            stored=True,
            code=warning,
            reason=None if warning is None else _reason("warning", warning),
            image_set_id=_image_set_id(_first(item, _RETRIEVE_URL)),
        )
    for item in _items(document, _FAILED_SOP_SEQUENCE):
        uid = _first(item, _REFERENCED_SOP_INSTANCE_UID)
        if not isinstance(uid, str):
            continue
        failure = _code(_first(item, _FAILURE_REASON))
        reason = _reason("StoreDICOM failure", failure) if failure is not None else "StoreDICOM failure, no reason"
        outcomes[uid] = Outcome(stored=False, code=failure, reason=reason)
    return Answer(status, outcomes, "")


def _items(document: Mapping[str, Any], tag: str) -> list[Mapping[str, Any]]:
    element = document.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return [item for item in values if isinstance(item, dict)] if isinstance(values, list) else []


def _first(item: Mapping[str, Any], tag: str) -> object:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _code(value: object) -> int | None:
    return value if isinstance(value, int) and 0 <= value <= 0xFFFF else None


def _reason(kind: str, code: int) -> str:
    meaning = _REASONS.get(code) or _REASONS.get(code & 0xFF00, "")
    return f"{kind} 0x{code:04X}" + (f" ({meaning})" if meaning else "")


def _image_set_id(retrieve_url: object) -> str | None:
    """HealthImaging names the image set of a stored instance in its retrieve URL's ``imageSetId`` parameter."""
    if not isinstance(retrieve_url, str):
        return None
    values = urllib.parse.parse_qs(urllib.parse.urlsplit(retrieve_url).query).get("imageSetId", [])
    candidate = values[0] if values else ""
    # ASCII letters and digits only: str.isalnum alone takes any script's (fullwidth letters, Arabic-Indic digits).
    return candidate if candidate.isascii() and candidate.isalnum() and len(candidate) <= 64 else None


def _printable(content: bytes) -> str:
    text = content[:200].decode("utf-8", "replace")
    return "".join(char if char.isprintable() else " " for char in text).strip()


def _describe(error: BaseException) -> str:
    if isinstance(error, socket.timeout | TimeoutError):
        return "StoreDICOM did not answer in time"
    if isinstance(error, OSError) and error.strerror:
        return f"StoreDICOM connection failed: {error.strerror}"
    return f"StoreDICOM connection failed: {type(error).__name__}"
