"""A local stand-in for HealthImaging's StoreDICOM (STOW-RS): checks what a client sends, answers like the service.

It verifies the SigV4 signature in full (scope: date, Region, service ``medical-imaging``; signed headers; the body
hash), the path ``/datastore/<id>/studies``, the body framing (``application/dicom`` or ``multipart/related;
type="application/dicom"``), and parses every instance with pydicom. It answers with a DICOM JSON data set:
ReferencedSOPSequence (0008,1199) for the stored instances, FailedSOPSequence (0008,1198) with FailureReason for
the refused ones; 200 when all were stored, 202 when some were not, 409 when none was (PS3.18 10.5.3). Tests
switch it to answer 503 or 429, to refuse chosen instances, to warn, or to add latency; and, for the end-to-end
run, to drop a connection before storing, to hold a request and then drop it, to store and then lose the answer,
and to judge each instance through ``verdict`` (refused, stored with a warning, or stored into a non-primary image
set). What it stored, into which image set, and whether the client can have seen the answer, is kept per instance
in ``received``; each fault it applied is counted in ``faults``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO

import pydicom
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

ACCESS_KEY = "AKIDSTANDIN"
SECRET_KEY = "standin-secret-key"
REGION = "eu-west-2"
DATASTORE_ID = "0123456789abcdef0123456789abcdef"
_CHUNK = 1024 * 1024
_KEEP_BYTES = 16 * 1024 * 1024  # instances up to this size are kept whole for byte comparison
# What ``verdict`` may say of an instance: refused in FailedSOPSequence, stored with a warning, or stored into a
# non-primary image set of its own (its metadata conflicts with the study's primary one).
REFUSE, WARN, NON_PRIMARY = "refuse", "warning", "nonprimary"
REFUSED_REASON = 0xC000  # PS3.4 C.4.2.1.4: Cannot understand
WARNING_REASON = 0xB000  # PS3.4 C.4.2.1.4: Coercion of data elements
_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>[0-9]{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request,"
    r"\s*SignedHeaders=(?P<headers>[a-z0-9;-]+),\s*Signature=(?P<signature>[0-9a-f]{64})"
)


@dataclass
class Received:
    """One instance as it arrived: its SHA-256, its exact bytes (unless large), and the request that carried it."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sha256: str
    data: bytes | None
    request_number: int
    image_set_id: str = ""
    # Seconds from the request's arrival to its answer leaving, and whether the answer was lost (the connection
    # dropped after storing): the client cannot know that these were stored.
    answer_seconds: float = 0.0
    answer_lost: bool = False


@dataclass
class StowStandIn:
    region: str = REGION
    datastore_id: str = DATASTORE_ID
    latency_seconds: float = 0.0
    close_without_answer: bool = False  # read the request, store it, then drop the connection
    drop_before_storing: bool = False  # read the request, then drop the connection, storing nothing
    hang_seconds: float = 0.0  # hold each request this long, then drop its connection, storing nothing
    answer_status: int | None = None  # 503, 429, ...: answer every request with it, storing nothing
    refuse_http: set[str] = field(default_factory=set)  # a request carrying one of these gets HTTP 400
    refuse_dicom: dict[str, int] = field(default_factory=dict)  # in FailedSOPSequence with this FailureReason
    warn: dict[str, int] = field(default_factory=dict)  # stored, with this WarningReason
    verdict: Callable[[str], str | None] | None = None  # per SOP Instance UID: REFUSE, WARN, NON_PRIMARY or None
    delay: dict[str, float] = field(default_factory=dict)  # a request carrying one is answered this much later
    # Told of each instance stored (and whether into a primary image set): the data store's search sees it.
    on_stored: Callable[[Received, bool], None] | None = None
    received: list[Received] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)  # by answer status
    instances_per_request: list[int] = field(default_factory=list)
    content_types: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)  # by kind, one per request it applied to
    lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    # -- control -----------------------------------------------------------------------------------------------

    def start(self) -> StowStandIn:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                arrived = time.monotonic()
                status, body, stored = standin._handle(self)
                if status == 0 or standin.close_without_answer:
                    with standin.lock:
                        for item in stored:
                            item.answer_lost = True
                        if stored:
                            standin.faults["answer lost after storing"] += 1
                    self.close_connection = True
                    return
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                with standin.lock:
                    for item in stored:
                        item.answer_seconds = time.monotonic() - arrived

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="stow-standin", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def daemon_settings(self, tmp: Any) -> dict[str, str]:
        """The environment a daemon needs to forward here (and nothing from the machine's own AWS setup)."""
        return {
            "DATASTORE_ID": self.datastore_id,
            "HEALTHIMAGING_DICOMWEB_URL": self.url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": self.region,
            "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def arrivals(self) -> Counter[str]:
        with self.lock:
            return Counter(item.sop_instance_uid for item in self.received)

    def last_bytes(self, sop_instance_uid: str) -> bytes | None:
        with self.lock:
            return [item.data for item in self.received if item.sop_instance_uid == sop_instance_uid][-1]

    def last_sha256(self, sop_instance_uid: str) -> str:
        with self.lock:
            return [item.sha256 for item in self.received if item.sop_instance_uid == sop_instance_uid][-1]

    @staticmethod
    def image_set_id(study_instance_uid: str, primary: bool = True) -> str:
        """A study's primary image set; an instance whose metadata conflicts with it goes to a non-primary one."""
        name = study_instance_uid if primary else f"{study_instance_uid}:nonprimary"
        return hashlib.md5(name.encode(), usedforsecurity=False).hexdigest()

    # -- one request -------------------------------------------------------------------------------------------

    def _handle(self, request: BaseHTTPRequestHandler) -> tuple[int, bytes, list[Received]]:
        """The answer's status and body, and what this request stored; status 0: drop the connection unanswered."""
        length = int(request.headers.get("Content-Length") or -1)
        if length < 0:
            return self._problem("no Content-Length")
        # The body goes to a temporary file while it is hashed: a large instance never sits in memory here.
        with tempfile.TemporaryFile() as spool:
            digest = hashlib.sha256()
            remaining = length
            while remaining:
                chunk = request.rfile.read(min(_CHUNK, remaining))
                if not chunk:
                    return 400, b"", []  # the client went away mid-body: nothing arrived
                spool.write(chunk)
                digest.update(chunk)
                remaining -= len(chunk)
            spool.seek(0)
            problem = self._check_signature(request, digest.hexdigest(), spool) or self._check_path(request.path)
            if problem:
                return self._problem(problem)
            try:
                instances = self._instances(request.headers.get("Content-Type", ""), spool, digest.hexdigest())
            except ValueError as error:
                return self._problem(str(error))
        if self.drop_before_storing:
            with self.lock:
                self.faults["connection dropped"] += 1
            return 0, b"", []
        if self.hang_seconds:
            with self.lock:
                self.faults["held, then dropped"] += 1
            time.sleep(self.hang_seconds)
            return 0, b"", []
        delay = max((self.delay.get(str(dataset.SOPInstanceUID), 0.0) for dataset, _, _ in instances), default=0.0)
        if self.latency_seconds or delay:
            time.sleep(self.latency_seconds + delay)
        with self.lock:
            if self.answer_status is not None:
                self.requests[str(self.answer_status)] += 1
                code = "ThrottlingException" if self.answer_status == 429 else "ServiceUnavailableException"
                return self.answer_status, f'{{"__type": "{code}", "message": "stand-in"}}'.encode(), []
            if any(dataset.SOPInstanceUID in self.refuse_http for dataset, _, _ in instances):
                self.requests["400"] += 1
                return 400, b'{"__type": "ValidationException", "message": "stand-in refuses this instance"}', []
            number = sum(self.requests.values())
            referenced, failed, stored = [], [], []
            warned = False
            for dataset, sha256, data in instances:
                uid = str(dataset.SOPInstanceUID)
                verdict = self.verdict(uid) if self.verdict is not None else None
                reference: dict[str, Any] = {
                    "00081150": {"vr": "UI", "Value": [str(dataset.SOPClassUID)]},
                    "00081155": {"vr": "UI", "Value": [uid]},
                }
                if uid in self.refuse_dicom or verdict == REFUSE:
                    reason = self.refuse_dicom.get(uid, REFUSED_REASON)
                    failed.append({**reference, "00081197": {"vr": "US", "Value": [reason]}})
                    continue
                study = str(dataset.StudyInstanceUID)
                image_set_id = self.image_set_id(study, primary=verdict != NON_PRIMARY)
                stored.append(Received(uid, study, str(dataset.SeriesInstanceUID), sha256, data, number, image_set_id))
                if self.on_stored is not None:
                    self.on_stored(stored[-1], verdict != NON_PRIMARY)
                reference["00081190"] = {
                    "vr": "UR",
                    "Value": [
                        f"{self.url}/datastore/{self.datastore_id}/studies/{study}/series/"
                        f"{dataset.SeriesInstanceUID}/instances/{uid}?imageSetId={image_set_id}"
                    ],
                }
                if uid in self.warn or verdict == WARN:
                    reference["00081196"] = {"vr": "US", "Value": [self.warn.get(uid, WARNING_REASON)]}
                    warned = True
                referenced.append(reference)
            self.received += stored
            status = 200 if not failed and not warned else 202
            if not referenced:
                status = 409
            self.requests[str(status)] += 1
            self.instances_per_request.append(len(instances))
        answer: dict[str, Any] = {}
        if referenced:
            answer["00081199"] = {"vr": "SQ", "Value": referenced}
        if failed:
            answer["00081198"] = {"vr": "SQ", "Value": failed}
        return status, json.dumps(answer).encode(), stored

    def _problem(self, problem: str) -> tuple[int, bytes, list[Received]]:
        with self.lock:
            self.problems.append(problem)
            self.requests["400"] += 1
        return 400, f'{{"__type": "ValidationException", "message": "{problem}"}}'.encode(), []

    def _check_path(self, path: str) -> str | None:
        expected = f"/datastore/{self.datastore_id}/studies"
        return None if path == expected else f"path {path!r} is not {expected!r}"

    def _check_signature(self, request: BaseHTTPRequestHandler, body_sha256: str, body: BinaryIO) -> str | None:
        match = _AUTHORIZATION.fullmatch(request.headers.get("Authorization", ""))
        if not match:
            return f"no SigV4 Authorization header: {request.headers.get('Authorization')!r}"
        if (match["key"], match["region"], match["service"]) != (ACCESS_KEY, self.region, "medical-imaging"):
            return f"wrong SigV4 scope: {match['key']}/{match['region']}/{match['service']}"
        amz_date = request.headers.get("X-Amz-Date", "")
        if not amz_date.startswith(match["date"]):
            return "X-Amz-Date does not match the credential scope's date"
        if request.headers.get("X-Amz-Content-SHA256") != body_sha256:
            return "X-Amz-Content-SHA256 is not the body's hash"
        signed = match["headers"].split(";")
        if not {"host", "x-amz-date", "content-type", "x-amz-content-sha256"} <= set(signed):
            return f"signed headers lack some that must be signed: {signed}"
        headers = {name: request.headers.get(name, "") for name in signed}
        host = request.headers.get("Host", "")
        replay = AWSRequest(method="POST", url=f"http://{host}{request.path}", headers=headers, data=body)
        replay.context["timestamp"] = amz_date
        auth = SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "medical-imaging", self.region)
        # botocore hashes the body again, reading the file in chunks: the signature covers what arrived.
        expected = auth.signature(auth.string_to_sign(replay, auth.canonical_request(replay)), replay)
        body.seek(0)
        return None if expected == match["signature"] else "SigV4 signature does not match"

    def _instances(self, content_type: str, body: BinaryIO, body_sha256: str) -> list[tuple[Any, str, bytes | None]]:
        self.content_types[content_type.split(";")[0].strip()] += 1
        if content_type.strip() == "application/dicom":
            size = body.seek(0, io.SEEK_END)
            body.seek(0)
            data = body.read() if size <= _KEEP_BYTES else None
            body.seek(0)
            return [(self._dataset(body), body_sha256, data)]
        if not content_type.startswith("multipart/related"):
            raise ValueError(f"Content-Type {content_type!r} is neither application/dicom nor multipart/related")
        if 'type="application/dicom"' not in content_type:
            raise ValueError(f"multipart/related without type=application/dicom: {content_type!r}")
        return [
            (self._dataset(io.BytesIO(part)), hashlib.sha256(part).hexdigest(), part)
            for part in _multipart(content_type, body.read())
        ]

    @staticmethod
    def _dataset(source: BinaryIO) -> Any:
        try:
            dataset = pydicom.dcmread(source, stop_before_pixels=True)
            uid = dataset.SOPInstanceUID
            _ = dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPClassUID
        except Exception as error:
            raise ValueError(f"a part is not a DICOM Part-10 instance: {error}") from None
        if dataset.file_meta.MediaStorageSOPInstanceUID != uid:
            raise ValueError("file meta and data set name different instances")
        return dataset


def _multipart(content_type: str, body: bytes) -> list[bytes]:
    """The parts of a multipart/related body (RFC 2046 5.1.1), strictly: each must be application/dicom."""
    boundary_match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not boundary_match:
        raise ValueError("multipart/related without a boundary")
    delimiter = b"--" + boundary_match[1].encode()
    if not body.startswith(delimiter + b"\r\n"):
        raise ValueError("multipart body does not start with its boundary")
    closing = b"\r\n" + delimiter + b"--"
    end = body.rfind(closing)
    if end < 0 or body[end + len(closing) :] not in (b"", b"\r\n"):
        raise ValueError("multipart body does not end with its closing boundary")
    parts = []
    for chunk in body[len(delimiter) + 2 : end].split(b"\r\n" + delimiter + b"\r\n"):
        head, separator, payload = chunk.partition(b"\r\n\r\n")
        if not separator:
            raise ValueError("a part has no header section")
        headers = dict(
            (name.strip().lower(), value.strip())
            for name, _, value in (line.decode("ascii").partition(":") for line in head.split(b"\r\n"))
        )
        if headers.get("content-type") != "application/dicom":
            raise ValueError(f"a part is {headers.get('content-type')!r}, not application/dicom")
        parts.append(payload)
    return parts
