"""HealthImaging errors turned into the named exceptions the state machine's Retry and Catch rules match."""

from __future__ import annotations

from botocore.config import Config
from botocore.exceptions import ClientError

# Step Functions waits out throttling with backoff and jitter, billing nothing while it waits; retrying inside
# the function as well would only multiply the calls against StartDICOMImportJob's 1 TPS.
CLIENT_CONFIG = Config(retries={"mode": "standard", "total_max_attempts": 1})


class ImportThrottled(Exception):
    """ThrottlingException: retried by the state machine with backoff and jitter, never failed."""


class ImportQuotaExceeded(Exception):
    """ServiceQuotaExceededException (concurrent import jobs per data store): waited out like throttling."""


class HealthImagingServerError(Exception):
    """InternalServerException: retried a bounded number of times."""


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
