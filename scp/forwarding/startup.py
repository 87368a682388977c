"""Wiring for ``DATASTORE_ID``: the forwarding database, the StoreDICOM client and the forwarder, around a store."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import botocore.session

from scp.config import Settings
from scp.forwarding.forwarder import Forwarder
from scp.forwarding.outbox import ForwardingStore
from scp.forwarding.recovery import boot_id, needs_recovery, recover
from scp.forwarding.results import Results, database_path
from scp.forwarding.stow import StowClient, endpoint
from scp.metrics import Metrics
from scp.storage import Store

if TYPE_CHECKING:
    from scp.forwarding.s3_batches import S3Forwarding
    from scp.storage.s3 import S3Store

LOG = logging.getLogger(__name__)


class ForwardingUnavailable(OSError):
    """Forwarding cannot start (no Region, no credentials, no database); the daemon does not start either."""


def start_forwarding(inner: Store, settings: Settings, metrics: Metrics) -> ForwardingStore:
    new_client, base_url, region = _stow_clients(settings)
    try:
        results = Results(database_path(settings.storage_dir))
        current_boot = boot_id()
        since = needs_recovery(results, current_boot)
        if since is not None:
            recover(results, settings.storage_dir, since, time.time())
        results.running(current_boot, time.time())
    except sqlite3.Error as error:
        raise ForwardingUnavailable(f"forwarding database cannot be opened: {error}") from error
    forwarder = Forwarder(results, new_client, metrics)
    metrics.forwarding_enabled()
    forwarder.start()
    LOG.info(
        "forwarding to HealthImaging with StoreDICOM",
        extra={"datastore_id": settings.datastore_id, "endpoint": base_url, "region": region,
               "database": str(results.path)},
    )  # fmt: skip
    return ForwardingStore(inner, results, forwarder)


def start_s3_forwarding(inner: S3Store, settings: Settings, metrics: Metrics) -> S3Forwarding:
    """S3 mode: the S3 objects are the outbox; the database and the local copies are this run's working state."""
    from scp.forwarding.object_tagging import TaggingClient, tagging_endpoint
    from scp.forwarding.s3_batches import S3Forwarding, prepare
    from scp.forwarding.stored_tagging import StoredTagger
    from scp.storage.s3 import s3_client, s3_session

    new_client, base_url, region = _stow_clients(settings)
    try:
        copies, results = prepare(settings.storage_dir)
    except (OSError, sqlite3.Error) as error:
        raise ForwardingUnavailable(f"forwarding working state cannot be prepared: {error}") from error
    forwarder = Forwarder(results, new_client, metrics)
    assert settings.dicom_bucket
    # The tags go where the store's client would send them, signed with that client's credentials.
    session = s3_session(settings)
    credentials = session.get_credentials()
    if credentials is None:
        raise ForwardingUnavailable("StoreDICOM forwarding needs AWS credentials (the standard AWS chain found none)")
    tags = tagging_endpoint(s3_client(settings, session), settings.dicom_bucket, credentials)
    tagger = StoredTagger(lambda: TaggingClient(tags), metrics)
    forwarding = S3Forwarding(inner, results, forwarder, metrics, copies, tagger)
    metrics.forwarding_enabled()
    tagger.start()
    forwarder.start()
    LOG.info(
        "forwarding to HealthImaging with StoreDICOM once S3 has confirmed each object",
        extra={"datastore_id": settings.datastore_id, "endpoint": base_url, "region": region},
    )
    return forwarding


def _stow_clients(settings: Settings) -> tuple[Callable[[], StowClient], str, str]:
    """A factory of StoreDICOM clients (one per worker), the endpoint and the Region it signs for."""
    assert settings.datastore_id
    session = botocore.session.get_session()
    region = settings.aws_region or session.get_config_variable("region")
    if not region:
        raise ForwardingUnavailable("StoreDICOM forwarding needs an AWS Region: set AWS_REGION")
    credentials = session.get_credentials()
    if credentials is None:
        raise ForwardingUnavailable("StoreDICOM forwarding needs AWS credentials (the standard AWS chain found none)")
    base_url = endpoint(settings.healthimaging_dicomweb_url, region)
    datastore_id = settings.datastore_id
    return lambda: StowClient(base_url, datastore_id, region, credentials), base_url, region
