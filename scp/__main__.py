"""Entry point: `dicom-store-scp [serve|healthcheck|status]`. Parses settings, wires the parts, serves until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import Sequence

from scp import __version__, logs, receivers, server
from scp.commitment.startup import create_shared_databases, start_commitment
from scp.config import Settings, SettingsError
from scp.handlers import StoreHandler
from scp.limits import Limits
from scp.metrics import Metrics
from scp.spool import Spool
from scp.storage import Store
from scp.storage.local import LocalStore

LOG = logging.getLogger("scp")

EXIT_CONFIGURATION = 2


def _parser() -> argparse.ArgumentParser:
    settings = "\n".join(
        f"  {name:<26} {meaning} (default: {default or 'empty'})" for name, default, meaning in Settings.documentation()
    )
    parser = argparse.ArgumentParser(
        prog="dicom-store-scp",
        description="DICOM Store SCP for AWS HealthImaging: receives C-STORE and C-ECHO, stores every object "
        "durably on local disk or in S3 before acknowledging it, and answers Storage Commitment requests.",
        epilog=f"Every setting is an environment variable:\n{settings}\n\n"
        "Exit codes: 0 clean stop (or healthy), 1 failure (or unhealthy), 2 invalid configuration.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=["serve", "healthcheck", "status"],
        help="serve (default): run the SCP; healthcheck: exit 0 if the running SCP answers DICOM; "
        "status: import status of a study or a modality's sending (see `dicom-store-scp status --help`)",
    )
    return parser


def build_store(settings: Settings, metrics: Metrics) -> Store:
    if settings.dicom_bucket is None:
        local = LocalStore(settings.storage_dir)
        if settings.datastore_id is None:
            return local
        from scp.forwarding.startup import start_forwarding  # botocore loads only when forwarding

        return start_forwarding(local, settings, metrics)
    from scp.storage.s3 import S3Store, s3_client  # boto3 loads only when S3 is configured

    store = S3Store(s3_client(settings), settings, metrics)
    store.check_bucket()
    forwarding: Store = store
    if settings.datastore_id is not None:
        from scp.forwarding.startup import start_s3_forwarding

        forwarding = start_s3_forwarding(store, settings, metrics)
    store.start()
    return forwarding


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
EXIT_FAILURE = 1


def _stop_this_process() -> None:
    """Wake the main thread's sigwait as SIGTERM would (a signal to the process, not to the calling thread)."""
    os.kill(os.getpid(), signal.SIGTERM)

# A report being delivered on a new association gets this long to finish; ECS allows 120 s after SIGTERM in all.
_COMMITMENT_STOP_SECONDS = 5.0


def serve(settings: Settings) -> int:
    # Block the stop signals before any thread exists (threads inherit the mask), then take them with sigwait:
    # otherwise the kernel may deliver SIGTERM to a worker thread while the main thread sleeps, and Python would
    # run the handler only whenever the main thread next wakes.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    logs.configure(settings.log_level)
    spool = Spool(settings.storage_dir)
    try:
        leftovers = spool.prepare()  # once, before any receiver: the spool is theirs in common
        listening = server.bind(settings)
    except OSError as error:
        LOG.error("cannot start", extra={"error": str(error)})
        return EXIT_FAILURE
    if settings.receiver_processes == 1:
        limits = Limits(settings.maximum_associations)
        return _receive(settings, spool, listening, limits, receiver=None, leftovers=leftovers)
    try:
        create_shared_databases(settings)
    except (OSError, sqlite3.Error) as error:
        LOG.error("cannot start", extra={"error": str(error)})
        return EXIT_FAILURE
    _log_listening(settings, int(listening.getsockname()[1]), leftovers)
    return receivers.supervise(
        settings,
        listening,
        lambda sock, limits, number: _receive(settings, spool, sock, limits, receiver=number),
    )


def _receive(
    settings: Settings,
    spool: Spool,
    listening: socket.socket,
    limits: Limits,
    receiver: int | None,
    leftovers: int = 0,
) -> int:
    """Serve until SIGTERM, drain, close the store. ``receiver``: this process's number among several receiver
    processes, None when it is the only one."""
    if receiver is not None:
        logs.tag_receiver(receiver)
        metrics = Metrics(task_open=limits.open_associations, receiver=receiver)
    else:
        metrics = Metrics()
    try:
        store = build_store(settings, metrics)
        commitment, store = start_commitment(settings, store, receiver or 0)
        listener = server.start(
            settings,
            # The local store flushes the receive file where it lies, the S3 store uploads it and removes it.
            StoreHandler(store, spool, metrics, writeback=settings.dicom_bucket is None),
            metrics,
            _stop_this_process,
            commitment,
            listening,
            limits,
        )
    except (OSError, sqlite3.Error) as error:  # sqlite3: the commitment databases under STORAGE_DIR
        LOG.error("cannot start", extra={"error": str(error)})
        return EXIT_FAILURE
    metrics.start()
    if receiver is None:
        _log_listening(settings, listener.port, leftovers)
    else:
        LOG.info("receiver started", extra={"pid": os.getpid()})
    signal.sigwait(_STOP_SIGNALS)
    if receiver is None:
        LOG.info("stopping: no new associations", extra={"grace_seconds": settings.shutdown_grace_seconds})
    aborted = server.drain(listener, settings.shutdown_grace_seconds)
    commitment.stop(_COMMITMENT_STOP_SECONDS)  # what is still pending is answered after the next start
    store.close()
    metrics.stop()  # after the store: closing the last batch is counted too
    # With several receivers, the parent's "stopped" line sums what each aborted.
    LOG.info("stopped" if receiver is None else "receiver stopped", extra={"associations_aborted": aborted})
    # A listener that died leaves a process that looks alive to a TCP check: exit non-zero to be replaced.
    return EXIT_FAILURE if listener.failure is not None else 0


def _log_listening(settings: Settings, port: int, leftovers: int) -> None:
    LOG.info(
        "listening",
        extra={
            "address": settings.bind_address,
            "port": port,
            "ae_title": settings.ae_title,
            "store": (settings.dicom_bucket and f"s3://{settings.dicom_bucket}") or str(settings.storage_dir),
            "version": __version__,
            "spool_files_removed": leftovers,
            "receiver_processes": settings.receiver_processes,
        },
    )


def healthcheck(settings: Settings) -> int:
    from scp.healthcheck import check

    logging.basicConfig(level=logging.CRITICAL)
    healthy, seen = check(settings)
    sys.stdout.write(f"{'healthy' if healthy else 'unhealthy'}: {seen}\n")
    return 0 if healthy else 1


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["status"]:
        # A client of the import table, not of the daemon's settings: it has options of its own.
        from scp.forwarding import local_status
        from scp.import_status import command

        if local_status.applies(words[1:], os.environ):  # no table: a standalone gateway's own results
            return local_status.main(words[1:], os.environ)
        return command.main(words[1:], os.environ)
    arguments = _parser().parse_args(words)
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as error:
        sys.stderr.write(f"dicom-store-scp: {error}\n")
        return EXIT_CONFIGURATION
    if arguments.command == "healthcheck":
        return healthcheck(settings)
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
