"""moto_server's S3 as the tests see it: a client, a fresh bucket, and what the daemon left in it."""

from __future__ import annotations

import io
import json
import uuid
from typing import Any

import boto3
import pydicom

from batch_contract.layout import BATCHES_PREFIX, batch_id_from_manifest_key, batch_id_from_prefix
from batch_contract.manifest import Manifest, parse_manifest
from tests.support.moto import MotoServer


def s3(server: MotoServer) -> Any:
    return boto3.client(
        "s3", endpoint_url=server.endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip


def new_bucket(server: MotoServer, prefix: str = "dicom") -> str:
    """A bucket of its own for one test: the session's moto_server is shared."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    s3(server).create_bucket(Bucket=name)
    return name


def objects(server: MotoServer, bucket: str, prefix: str = "") -> dict[str, bytes]:
    """What the bucket holds under ``prefix``. The daemon may delete an object between the listing and its read
    (a refused upload's stray, a withdrawn fallback copy): that object is not held, so it is left out."""
    client = s3(server)
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    held: dict[str, bytes] = {}
    for item in listing:
        try:
            held[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        except client.exceptions.NoSuchKey:
            continue
    return held


def manifests(server: MotoServer, bucket: str) -> list[dict[str, Any]]:
    """Every manifest as the JSON it is."""
    return [json.loads(body) for body in objects(server, bucket, "manifests/").values()]


def parsed_manifests(server: MotoServer, bucket: str) -> dict[str, Manifest]:
    """Every manifest by batch id, read as the workflow reads it (which refuses one that mixes the two paths)."""
    return {
        batch_id_from_manifest_key(key): parse_manifest(body, batch_id_from_manifest_key(key), bucket)
        for key, body in objects(server, bucket, "manifests/").items()
    }


def open_batch_ids(server: MotoServer, bucket: str) -> list[str]:
    """The batches with objects under their prefix, whether or not a manifest closes them."""
    listing = s3(server).list_objects_v2(Bucket=bucket, Prefix=BATCHES_PREFIX, Delimiter="/")
    return [batch_id_from_prefix(p["Prefix"]) for p in listing.get("CommonPrefixes", [])]


def read_part10(body: bytes) -> Any:
    return pydicom.dcmread(io.BytesIO(body))


def dataset_bytes(part10: bytes) -> bytes:
    """The data set after a Part-10 file's preamble and file meta group."""
    group_length = int.from_bytes(part10[140:144], "little")
    return part10[144 + group_length :]
