"""pynetdicom event handlers: thin adapters from events to the ingest pipeline and to log lines.

Event contracts are pynetdicom's (``pynetdicom/_handlers.py``): EVT_C_ECHO and EVT_C_STORE return a status
(int or Dataset); notification handlers return nothing.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE

from scp.ingest import Ingest, StoreRequest
from scp.metrics import Metrics
from scp.spool import Spool
from scp.status import Status, StoreFailure

LOG = logging.getLogger("scp.association")

HEALTHCHECK_AE_TITLE = "HEALTHCHECK"

# PS3.8 9.3.4: (result, source, diagnostic) of an A-ASSOCIATE-RJ, as a modality's log shows them.
_REJECT_REASONS = {
    (1, 1, 3): "calling AE title not recognised",
    (1, 1, 7): "called AE title not recognised",
    (2, 3, 2): "local limit exceeded",
    (2, 3, 1): "temporary congestion",
    (1, 2, 2): "protocol version not supported",
    (1, 1, 2): "application context name not supported",
    (2, 2, 1): "no reason given",
}
_LOGGED_VALUE_MAX = 70  # long enough for any real UID or AE title, short enough to keep crafted input out of logs


def printable(value: object) -> str:
    """A received value made safe for a log line: printable ASCII, bounded length."""
    text = "".join(char if 0x20 <= ord(char) < 0x7F else "?" for char in str(value))
    return text if len(text) <= _LOGGED_VALUE_MAX else text[:_LOGGED_VALUE_MAX] + "..."


def calling_ae_title(event: Event) -> str:
    """The peer's AE title as it may appear in a file meta (AE VR: 16 printable characters, no backslash)."""
    title = printable(event.assoc.requestor.ae_title).strip().replace("\\", "?")
    return title[:16]


def _peer(event: Event) -> dict[str, Any]:
    requestor = event.assoc.requestor
    request = requestor.primitive  # the A-ASSOCIATE-RQ: what the peer asked for, not our own title
    return {
        "peer": f"{requestor.address}:{requestor.port}",
        "calling_ae": printable(requestor.ae_title),
        "called_ae": printable(request.called_ae_title if request else event.assoc.acceptor.ae_title),
    }


def _level(event: Event) -> int:
    # Health checks run every few seconds; they would drown the log at INFO.
    return logging.DEBUG if event.assoc.requestor.ae_title == HEALTHCHECK_AE_TITLE else logging.INFO


def handle_echo(event: Event) -> int:
    return int(Status.SUCCESS)


def handle_store(event: Event, ingest: Ingest, metrics: Metrics) -> Dataset | int:
    started = time.monotonic()
    command = cast(C_STORE, event.request)
    request = StoreRequest(
        sop_class_uid=str(command.AffectedSOPClassUID or ""),
        sop_instance_uid=str(command.AffectedSOPInstanceUID or ""),
        transfer_syntax=str(event.context.transfer_syntax),
        calling_ae_title=calling_ae_title(event),
        received_file=event.dataset_path,
    )
    try:
        instance, stored = ingest.receive(request)
    except StoreFailure as failure:
        LOG.warning(
            "store failed",
            extra={
                **_peer(event),
                "status": f"0x{failure.status:04X}",
                "reason": failure.reason,
                "sop_instance_uid": printable(request.sop_instance_uid),
            },
        )
        metrics.store_failed(failure.status)
        return _failure_response(failure)
    except Exception as error:
        LOG.exception(
            "store failed unexpectedly",
            extra={**_peer(event), "status": f"0x{Status.OUT_OF_RESOURCES:04X}", "error": type(error).__name__},
        )
        metrics.store_failed(Status.OUT_OF_RESOURCES)
        return _failure_response(StoreFailure(Status.OUT_OF_RESOURCES, "internal error, retry later"))
    milliseconds = (time.monotonic() - started) * 1000
    metrics.object_stored(instance.size, milliseconds)
    LOG.info(
        "replaced" if stored.replaced else "stored",
        extra={
            **_peer(event),
            "sop_class_uid": instance.sop_class_uid,
            "sop_instance_uid": instance.sop_instance_uid,
            "study_instance_uid": instance.study_instance_uid,
            "series_instance_uid": instance.series_instance_uid,
            "transfer_syntax": instance.transfer_syntax,
            "bytes": instance.size,
            "milliseconds": round(milliseconds, 1),
            "location": stored.location,
        },
    )
    return int(Status.SUCCESS)


def _failure_response(failure: StoreFailure) -> Dataset:
    response = Dataset()
    response.Status = int(failure.status)
    response.ErrorComment = failure.reason[:64]  # LO: at most 64 characters
    return response


def handle_accepted(event: Event, metrics: Metrics) -> None:
    if event.assoc.requestor.ae_title != HEALTHCHECK_AE_TITLE:
        metrics.association_accepted(event.assoc)
    contexts = event.assoc.accepted_contexts
    LOG.log(_level(event), "association accepted", extra={**_peer(event), "accepted_contexts": len(contexts)})


def handle_rejected(event: Event, metrics: Metrics) -> None:
    primitive = cast(A_ASSOCIATE, event.assoc.acceptor.primitive)
    code = (int(primitive.result or 0), int(primitive.result_source or 0), int(primitive.diagnostic or 0))
    reason = _REJECT_REASONS.get(code, "rejected")
    metrics.association_rejected(reason)
    LOG.warning("association rejected", extra={**_peer(event), "reason": reason, "code": list(code)})


def handle_released(event: Event) -> None:
    LOG.log(_level(event), "association released", extra=_peer(event))


def handle_aborted(event: Event) -> None:
    LOG.warning("association aborted", extra=_peer(event))


def handle_connection_closed(event: Event, spool: Spool, metrics: Metrics) -> None:
    metrics.association_ended(event.assoc)
    discarded = spool.discard_unhandled(event.assoc.dul.ident)
    if discarded:
        LOG.warning("incomplete objects discarded", extra={**_peer(event), "objects": discarded})
