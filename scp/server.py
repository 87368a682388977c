"""Builds the pynetdicom application entity and its listening server, and drains it on shutdown."""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from typing import Any, cast

from pynetdicom import AE, _config, evt
from pynetdicom.transport import ThreadedAssociationServer

from scp import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, handlers, pdu_guard
from scp.config import Settings
from scp.contexts import supported_contexts
from scp.ingest import Ingest
from scp.metrics import Metrics
from scp.spool import Spool

LOG = logging.getLogger(__name__)


class DicomServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a listen backlog sized for a burst of modalities and no Nagle delay."""

    # socketserver's default backlog of 5 drops connections when a few dozen modalities connect at once.
    request_queue_size = 512
    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = super().get_request()
        # Responses are small writes after large reads; without TCP_NODELAY, Nagle plus the peer's delayed ACK
        # can hold every C-STORE response for ~40 ms.
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def stop_accepting(self) -> None:
        """End the accept loop and close the listening socket; live associations go on."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom switches this daemon depends on."""
    # Stream each received data set to a file instead of memory (memory must not grow with object size).
    _config.STORE_RECV_CHUNKED_DATASET = True
    # pynetdicom's standard handlers log every PDU and DIMSE message; ours log one line per outcome.
    _config.LOG_HANDLER_LEVEL = "none"


def build_application_entity(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.maximum_associations = settings.maximum_associations
    ae.maximum_pdu_size = settings.effective_pdu_size
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.require_called_aet = settings.require_called_ae_title
    ae.require_calling_aet = list(settings.require_calling_ae_title)
    ae.supported_contexts = supported_contexts(settings.supported_sop_class_uids)
    return ae


def start(settings: Settings, spool: Spool, ingest: Ingest, metrics: Metrics) -> DicomServer:
    """Listen on the configured address and serve associations on background threads."""
    configure_pynetdicom()
    spool.install()
    pdu_guard.install()
    ae = build_application_entity(settings)
    server = cast(
        DicomServer,
        ae.make_server(
            (settings.bind_address, settings.scp_port),
            evt_handlers=[
                (evt.EVT_C_ECHO, handlers.handle_echo),
                (evt.EVT_C_STORE, handlers.handle_store, [ingest, metrics]),
                (evt.EVT_ACCEPTED, handlers.handle_accepted, [metrics]),
                (evt.EVT_REJECTED, handlers.handle_rejected, [metrics]),
                (evt.EVT_RELEASED, handlers.handle_released),
                (evt.EVT_ABORTED, handlers.handle_aborted),
                (evt.EVT_CONN_CLOSE, handlers.handle_connection_closed, [spool, metrics]),
            ],
            server_class=DicomServer,
        ),
    )
    threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True).start()
    return server


def drain(server: DicomServer, grace_seconds: float) -> int:
    """Stop accepting at once, let live associations finish within the grace period, abort the rest.

    pynetdicom's own ``AE.shutdown()`` aborts every association immediately, which would cut off a modality in
    the middle of a study on every scale-in; returns how many associations had to be aborted.
    """
    server.stop_accepting()
    deadline = time.monotonic() + grace_seconds
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.1)
    remaining = server.active_associations
    for association in remaining:
        association.abort()
    return len(remaining)
