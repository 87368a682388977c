"""The forwarding tags' own signed request against a moto_server that authenticates and authorizes every request
(moto checks the SigV4 signature and the caller's IAM policy, as S3 does; the shared server accepts anything)."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.credentials import Credentials, RefreshableCredentials

from batch_contract.manifest import StoredByStoreDICOM
from batch_contract.stored_tags import parse_stored_tags, stored_tags
from scp.forwarding.object_tagging import TaggingClient, TaggingEndpoint, TaggingFailed
from tests.support.moto import MotoServer, start_moto_server

pytestmark = pytest.mark.integration

ANSWER = StoredByStoreDICOM("2026-11-23T18:57:03.113Z", "0123456789abcdef0123456789abcdef", None)
BUCKET = "dicom-auth"
KEY = "batches/20261123T185700Z-3f9a1c2b7d4e5f60/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
# The receiver's grant on the objects (templates/dicom-store-scp.template.yaml): tagging alone is what is tested.
RECEIVER_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:PutObjectTagging", "Resource": f"arn:aws:s3:::{BUCKET}/batches/*"}],
}


class Authenticating:
    """moto_server past its first three requests (an administrator's user and key), with the bucket and one object."""

    def __init__(self, server: MotoServer) -> None:
        self.server = server
        unauthenticated = self.client("iam", "testing", "testing")
        unauthenticated.create_user(UserName="admin")
        admin_policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        unauthenticated.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(admin_policy))
        key = unauthenticated.create_access_key(UserName="admin")["AccessKey"]
        self.admin = (key["AccessKeyId"], key["SecretAccessKey"])
        self.s3 = self.client("s3", *self.admin)
        self.iam = self.client("iam", *self.admin)
        self.s3.create_bucket(Bucket=BUCKET)
        self.s3.put_object(Bucket=BUCKET, Key=KEY, Body=b"DICM")

    def receiver(self, name: str) -> list[tuple[str, str]]:
        """A user with the receiver's grant and its two access keys."""
        self.iam.create_user(UserName=name)
        self.iam.put_user_policy(UserName=name, PolicyName="tags", PolicyDocument=json.dumps(RECEIVER_POLICY))
        keys = [self.iam.create_access_key(UserName=name)["AccessKey"] for _ in range(2)]
        return [(key["AccessKeyId"], key["SecretAccessKey"]) for key in keys]

    def client(self, service: str, access_key: str, secret_key: str) -> Any:
        return boto3.client(
            service, endpoint_url=self.server.endpoint, region_name="us-east-1",
            aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        )  # fmt: skip

    def tags(self) -> StoredByStoreDICOM | None:
        return parse_stored_tags(self.s3.get_object_tagging(Bucket=BUCKET, Key=KEY)["TagSet"])


@pytest.fixture(scope="module")
def s3() -> Iterator[Authenticating]:
    server = start_moto_server(settings={"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        yield Authenticating(server)
    finally:
        server.stop()


def endpoint(s3: Authenticating, credentials: Any) -> TaggingEndpoint:
    return TaggingEndpoint(f"{s3.server.endpoint}/{BUCKET}", "us-east-1", credentials, 5, 15)


def test_s3_accepts_the_signature_and_the_receivers_grant_covers_the_request(s3: Authenticating) -> None:
    access_key, secret_key = s3.receiver("receiver")[0]
    client = TaggingClient(endpoint(s3, Credentials(access_key, secret_key)))
    client.put_tags(KEY, stored_tags(ANSWER))
    assert s3.tags() == ANSWER
    with pytest.raises(TaggingFailed, match="403 SignatureDoesNotMatch"):
        TaggingClient(endpoint(s3, Credentials(access_key, "not-the-secret"))).put_tags(KEY, stored_tags(ANSWER))
    with pytest.raises(TaggingFailed, match="403 AccessDenied"):
        client.put_tags("elsewhere/1.2.3.4.5.dcm", stored_tags(ANSWER))  # outside the grant: the check is real
    client.close()


def test_each_request_is_signed_with_the_credentials_botocore_holds_then(s3: Authenticating) -> None:
    """A task role's credentials are replaced before they expire: a request after that is signed with the new ones."""
    keys = s3.receiver("rotated-receiver")
    current = list(keys[0])

    def refresh() -> dict[str, str]:
        # Five minutes from expiry: botocore refreshes before each use (from ten minutes before expiry).
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
        return {"access_key": current[0], "secret_key": current[1], "token": "", "expiry_time": expiry.isoformat()}

    client = TaggingClient(endpoint(s3, RefreshableCredentials.create_from_metadata(refresh(), refresh, "test")))
    client.put_tags(KEY, stored_tags(ANSWER))
    s3.iam.delete_access_key(UserName="rotated-receiver", AccessKeyId=current[0])
    current[:] = keys[1]
    later = StoredByStoreDICOM("2026-11-23T18:58:00.000Z", "0123456789abcdef0123456789abcdef", None)
    client.put_tags(KEY, stored_tags(later))  # the old key no longer exists: this one is signed with the new
    assert s3.tags() == later
    client.close()
