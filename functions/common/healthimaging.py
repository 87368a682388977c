"""HealthImaging errors turned into the named exceptions the state machine's Retry and Catch rules match."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotocoreConnectionError

from common.layout import check_batch_id

# Step Functions waits out throttling and transport errors with backoff and jitter, billing nothing while it
# waits; retrying inside the function as well would only multiply the calls against the service's rate limits.
# The timeouts end a hung call well inside the functions' 30 s, so it surfaces as HealthImagingUnreachable
# (retried) rather than as a Lambda timeout.
CLIENT_CONFIG = Config(
    retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=5, read_timeout=20
)

# A read timeout, a reset or refused connection: the request may have reached the service or not.
TRANSPORT_ERRORS = (HTTPClientError, BotocoreConnectionError)


class ImportThrottled(Exception):
    """ThrottlingException: retried by the state machine with backoff and jitter, never failed."""


class ImportQuotaExceeded(Exception):
    """ServiceQuotaExceededException (concurrent import jobs per data store): waited out like throttling."""


class HealthImagingServerError(Exception):
    """InternalServerException: retried a bounded number of times."""


class HealthImagingUnreachable(Exception):
    """No answer (timeout, connection error): retried; a repeated start finds its job again by client token."""


class ImportRejected(Exception):
    """Access denied, validation, not found or conflict: retrying cannot help; the batch is marked failed."""


_BY_CODE: dict[str, type[Exception]] = {
    "ThrottlingException": ImportThrottled,
    "ServiceQuotaExceededException": ImportQuotaExceeded,
    "InternalServerException": HealthImagingServerError,
    "AccessDeniedException": ImportRejected,
    "ValidationException": ImportRejected,
    "ResourceNotFoundException": ImportRejected,
    "ConflictException": ImportRejected,
}


def translate(error: ClientError) -> Exception:
    """The named exception for a HealthImaging error; unknown codes stay ClientError (caught, not retried)."""
    details = error.response.get("Error", {})
    code = str(details.get("Code", ""))
    kind = _BY_CODE.get(code)
    if kind is None:
        return error
    return kind(f"{code}: {details.get('Message', '')}".rstrip(": "))


@contextmanager
def named_errors() -> Iterator[None]:
    """Turn what a HealthImaging call raises into the names the state machine's Retry and Catch match."""
    try:
        yield
    except ClientError as error:
        raise translate(error) from error
    except TRANSPORT_ERRORS as error:
        raise HealthImagingUnreachable(f"{type(error).__name__}: {error}") from error


def client_token(batch_id: str, execution_arn: str) -> str:
    """One token per import attempt: stable across the retries of one execution, new for every execution.

    A repeated start within the execution (task retry, lost response) gets the same job back; a deliberate
    re-import (a new execution for the same batch) gets a new job instead of the old one. 33 + 1 + 16
    characters of ``[0-9A-Za-z-]``, within HealthImaging's 1-64 ``[A-Za-z0-9._-]``.
    """
    attempt = hashlib.sha256(execution_arn.encode()).hexdigest()[:16]
    return f"{check_batch_id(batch_id)}-{attempt}"
