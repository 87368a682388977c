"""Several receiver processes on one port: the parent binds the listening socket, forks one receiver per process
wanted (each accepts on the inherited socket and counts against limits they all share), passes SIGTERM on, and
starts a new receiver when one is killed.

One interpreter lock per process is what lets a task with several vCPUs use every one of them. One socket, not
one per process with SO_REUSEPORT: the receivers hand the next connection to the least busy of them instead of a
hash of the peer's address, and a connection is never left queued to a process that has died.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from scp.config import Settings
from scp.limits import Counts, Limits

LOG = logging.getLogger("scp.receivers")

EXIT_FAILURE = 1
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
# A receiver that keeps dying is no passing accident: past this many restarts in a window, the daemon stops
# (exit 1) so that the orchestrator replaces the task.
_RESTARTS_MAX = 5
_RESTART_WINDOW_SECONDS = 60.0
# After SIGTERM the receivers drain for SHUTDOWN_GRACE_SECONDS, then abort and close their batches; past this
# margin a receiver that has not exited is killed (ECS sends SIGKILL 120 s after SIGTERM in any case).
_STOP_MARGIN_SECONDS = 15.0
_PR_SET_PDEATHSIG = 1

# What a receiver process runs: (listening socket, its limits, its number) -> exit code.
Receiver = Callable[[socket.socket, Limits, int], int]


@dataclass
class _Child:
    number: int
    pid: int


def supervise(settings: Settings, listening: socket.socket, receive: Receiver) -> int:
    """Run ``settings.receiver_processes`` receivers until SIGTERM; 0 when each drained and exited 0.

    Called before any thread exists (a fork copies only the calling thread), with SIGTERM and SIGINT blocked.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    counts = Counts(settings.receiver_processes, shared=True)
    children = {}
    for number in range(settings.receiver_processes):
        child = _fork(number, settings, listening, counts, receive)
        children[child.pid] = child
    LOG.info(
        "receiver processes started",
        extra={"receiver_processes": settings.receiver_processes, "pids": sorted(children)},
    )
    restarts: list[float] = []
    failed = False
    while True:
        if signal.sigwait(_STOP_SIGNALS | {signal.SIGCHLD}) in _STOP_SIGNALS:
            break
        for child, status in _reap(children):
            counts.ended(child.number)
            code = os.waitstatus_to_exitcode(status)
            if code >= 0:
                # A receiver exits on its own only when it cannot go on (its listener failed, it could not start):
                # the others would fail alike, so the daemon stops and is replaced.
                LOG.critical(
                    "receiver process exited; stopping the others",
                    extra={"receiver": child.number, "pid": child.pid, "exit_code": code},
                )
                failed = True
                break
            now = time.monotonic()
            restarts = [at for at in restarts if now - at < _RESTART_WINDOW_SECONDS] + [now]
            LOG.error(
                "receiver process killed; starting another",
                extra={"receiver": child.number, "pid": child.pid, "signal": signal.Signals(-code).name},
            )
            if len(restarts) > _RESTARTS_MAX:
                LOG.critical("receiver processes keep dying; stopping", extra={"restarts": len(restarts)})
                failed = True
                break
            replacement = _fork(child.number, settings, listening, counts, receive)
            children[replacement.pid] = replacement
        if failed:
            break
    LOG.info("stopping: no new associations", extra={"grace_seconds": settings.shutdown_grace_seconds})
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    # The socket closes once the receivers have closed theirs too: from then on a new connection is refused at
    # once, as by a single process, instead of waiting in the backlog for the whole drain.
    listening.close()
    codes = _wait(children, settings.shutdown_grace_seconds + _STOP_MARGIN_SECONDS)
    LOG.info("stopped", extra={"associations_aborted": counts.aborted(), "receiver_exit_codes": codes})
    return EXIT_FAILURE if failed or any(code != 0 for code in codes) else 0


def _fork(number: int, settings: Settings, listening: socket.socket, counts: Counts, receive: Receiver) -> _Child:
    counts.starting(number)
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return _Child(number, pid)
    code = EXIT_FAILURE
    try:
        # SIGKILL of the daemon kills every receiver with it, as it kills a single process: none goes on serving
        # beside a restarted daemon, which empties the receive spool they would still be writing to.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(EXIT_FAILURE)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        code = receive(listening, Limits(settings.maximum_associations, counts, number), number)
    except Exception:
        LOG.exception("receiver process failed", extra={"receiver": number})
    finally:
        sys.stdout.flush()
        os._exit(code)  # never back into the parent's code


def _reap(children: dict[int, _Child]) -> list[tuple[_Child, int]]:
    ended = []
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        child = children.pop(pid, None)
        if child is not None:
            ended.append((child, status))
    return ended


def _wait(children: dict[int, _Child], seconds: float) -> list[int]:
    """The receivers' exit codes once they have drained (-9 for one killed past ``seconds``)."""
    codes = []
    deadline = time.monotonic() + seconds
    while children and time.monotonic() < deadline:
        for _, status in _reap(children):
            codes.append(os.waitstatus_to_exitcode(status))
        if children:
            signal.sigtimedwait({signal.SIGCHLD}, min(1.0, max(deadline - time.monotonic(), 0.01)))
    for pid in list(children):
        LOG.error("receiver process did not stop in time; killed", extra={"pid": pid})
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        codes.append(-signal.SIGKILL)
    return codes
