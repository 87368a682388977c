"""The STOW-RS request body and the reading of StoreDICOM's answer, without a network."""

from __future__ import annotations

import hashlib
import json
import re
import tracemalloc
import urllib.parse
from pathlib import Path

import pytest

from scp.forwarding.stow import Body, endpoint, parse_answer
from tests.support.stow import _multipart


def reference(uid: str, **extra: object) -> dict[str, object]:
    item: dict[str, object] = {
        "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
        "00081155": {"vr": "UI", "Value": [uid]},
    }
    item.update(extra)
    return item


def test_stored_warned_and_failed_instances_are_told_apart() -> None:
    document = {
        "00081199": {
            "vr": "SQ",
            "Value": [
                reference("1.1", **{"00081190": {"vr": "UR", "Value": ["https://x/studies/1?imageSetId=abc123"]}}),
                reference("1.2", **{"00081196": {"vr": "US", "Value": [0xB000]}}),
            ],
        },
        "00081198": {
            "vr": "SQ",
            "Value": [
                reference("1.3", **{"00081197": {"vr": "US", "Value": [0xA900]}}),
                reference("1.4", **{"00081197": {"vr": "US", "Value": [0xA700]}}),
                reference("1.5"),
            ],
        },
    }
    answer = parse_answer(202, "application/dicom+json", json.dumps(document).encode())
    outcomes = answer.outcomes
    assert outcomes["1.1"].stored and outcomes["1.1"].image_set_id == "abc123" and outcomes["1.1"].reason is None
    assert outcomes["1.2"].stored and outcomes["1.2"].reason == "warning 0xB000 (coercion of data elements)"
    assert not outcomes["1.3"].stored and not outcomes["1.3"].retryable
    assert outcomes["1.3"].reason == "StoreDICOM failure 0xA900 (data set does not match SOP class)"
    assert outcomes["1.4"].retryable, "out of resources on HealthImaging's side is worth another try"
    assert not outcomes["1.5"].stored and outcomes["1.5"].reason == "StoreDICOM failure, no reason"


@pytest.mark.parametrize(
    ("content_type", "content"),
    [
        ("application/json", b'{"__type": "ThrottlingException", "message": "Rate exceeded"}'),
        ("text/html", b"<html>\x00\x01 bad gateway</html>"),
        ("application/dicom+json", b"not json"),
        ("application/dicom+json", b'[{"00081199": "not a sequence"}]'),
    ],
)
def test_an_answer_that_is_not_a_stow_rs_response_names_no_instance(content_type: str, content: bytes) -> None:
    answer = parse_answer(503, content_type, content)
    assert answer.outcomes == {} and answer.status == 503
    assert answer.message.isprintable() and len(answer.message) <= 200


@pytest.mark.parametrize(
    ("image_set_id", "taken"),
    [
        ("0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef"),
        ("../../etc", None),
        ("\uff41\uff42\uff43", None),  # fullwidth letters: alphanumeric to Python, not an image set id
        ("\u0663\u0664", None),  # Arabic-Indic digits
        ("a" * 65, None),
    ],
)
def test_an_image_set_id_is_taken_only_when_it_looks_like_one(image_set_id: str, taken: str | None) -> None:
    url = f"https://x/studies/1?imageSetId={urllib.parse.quote(image_set_id)}"
    document = {"00081199": {"vr": "SQ", "Value": [reference("1.1", **{"00081190": {"vr": "UR", "Value": [url]}})]}}
    outcome = parse_answer(200, "application/dicom+json", json.dumps(document).encode()).outcomes["1.1"]
    assert outcome.image_set_id == taken


def test_one_instance_is_sent_as_application_dicom(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + bytes(range(256)) * 10)
    with Body([path]) as body:
        assert body.content_type == "application/dicom"
        reader = body.reader()
        sent = b"".join(iter(lambda: reader.read(1000), b""))
        assert sent == path.read_bytes() and body.length == len(sent)
        assert body.sha256() == hashlib.sha256(sent).hexdigest()


def test_several_instances_are_one_multipart_related_body_read_in_bounded_chunks(tmp_path: Path) -> None:
    paths = []
    for number in range(3):
        path = tmp_path / f"{number}.dcm"
        # A body that contains CRLF and "--" so the framing, not luck, keeps the parts apart.
        path.write_bytes(b"\r\n--" + bytes([number]) * (1024 * 1024 + 4096 + number))
        paths.append(path)
    with Body(paths) as body:
        assert re.fullmatch(r'multipart/related; type="application/dicom"; boundary=[0-9a-f]{32}', body.content_type)
        reader = body.reader()
        chunks = list(iter(lambda: reader.read(8192), b""))
        assert max(len(chunk) for chunk in chunks) <= 8192
        sent = b"".join(chunks)
        assert len(sent) == body.length
        assert _multipart(body.content_type, sent) == [path.read_bytes() for path in paths]
        assert body.sha256() == hashlib.sha256(sent).hexdigest()


def test_a_multipart_body_is_streamed_from_its_files_not_held_in_memory(tmp_path: Path) -> None:
    paths = []
    for number in range(3):
        path = tmp_path / f"{number}.dcm"
        with path.open("wb") as file:
            file.truncate(16 * 1024 * 1024)  # sparse: 48 MiB of body without writing it
        paths.append(path)
    tracemalloc.start()
    try:
        with Body(paths) as body:
            body.sha256()
            reader = body.reader()
            sent = sum(len(chunk) for chunk in iter(lambda: reader.read(65536), b""))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sent == body.length > 48 * 1024 * 1024
    # A few 1 MiB reads at a time, whatever the body's size: the forwarder's workers stay bounded by the chunk,
    # not by BYTES_PER_REQUEST.
    assert peak < 4 * 1024 * 1024, peak


def test_a_file_replaced_after_the_body_was_made_is_still_sent_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    path.write_bytes(b"first receipt")
    with Body([path]) as body:
        replacement = tmp_path / "b.dcm"
        replacement.write_bytes(b"second receipt, longer")
        replacement.replace(path)  # what the local store does when a modality sends the instance again
        assert body.reader().read() == b"first receipt"
        assert body.sha256() == hashlib.sha256(b"first receipt").hexdigest()


def test_the_endpoint_follows_the_region_unless_configured() -> None:
    assert endpoint(None, "eu-west-1") == "https://dicom-medical-imaging.eu-west-1.amazonaws.com"
    assert endpoint("http://127.0.0.1:8080", "eu-west-1") == "http://127.0.0.1:8080"
