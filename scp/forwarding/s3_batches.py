"""StoreDICOM forwarding in S3 mode: objects S3 has confirmed are sent, and each closing batch is split by what
StoreDICOM stored (docs/forwarding.rst, "In the stack").

The S3 objects are the durable outbox; the task's disk is not, so the forwarding database and the local copies
here are this run's working state, cleared at every start. An object is sent from a hard link to its spool file,
made once S3 has confirmed it: the very bytes S3 verified, with no second read over the network. When its batch
closes, what StoreDICOM has not stored (refused, still failing, or no copy kept) goes to an import job instead, and
nothing is sent again; if the daemon dies first, the sweeper seals the batch whole and the import job takes all of
it (at least once: it may store again an instance StoreDICOM had stored). So that the workflow never records failed
what StoreDICOM stored, each stored instance's S3 object is tagged with StoreDICOM's answer (``StoredTagger``).
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from batch_contract.layout import parse_object_key
from batch_contract.manifest import StoredByStoreDICOM
from scp.batches import Batch
from scp.forwarding.forwarder import Forwarder
from scp.forwarding.results import IMPORTED, WARNING, Pending, Results
from scp.forwarding.stored_tagging import StoredTagger
from scp.instances import ReceivedInstance, StoredInstance
from scp.metrics import Metrics
from scp.storage.s3 import S3Store

LOG = logging.getLogger(__name__)

# Beside the standalone gateway's database, never it: the status command reads that one as a gateway's results.
WORKING_DIRECTORY = Path(".forwarding") / "s3"
_DATABASE_NAME = "working.sqlite"
_COPIES_DIRECTORY = "copies"
# How long a closing batch waits for the StoreDICOM requests under way that carry its instances. A request takes
# well under a second when HealthImaging answers; one that takes longer is counted not stored (its instances go to
# the import job), so a stalled connection delays the manifest by this much at most, within the shutdown's time.
WITHDRAW_SECONDS = 10.0
# Copies are kept while their batch is open (BATCH_WINDOW_SECONDS of quiet, or until it is full) or until they are
# sent; a Fargate task has 20 GiB of ephemeral storage by default, shared with the receive spool. Past this much,
# new objects are left to their import job rather than filling the disk during a long StoreDICOM outage.
COPIES_MAX_BYTES = 2 * 1024**3
# ECS waits at most 120 s after SIGTERM; the batches have been closed by the time the forwarder stops.
_STOP_SECONDS = 5.0

_Copy = tuple[str, Path, int]  # SOP Instance UID, local copy, bytes


def prepare(storage_dir: Path) -> tuple[Path, Results]:
    """Clear what an earlier run left (its batches are the sweeper's now) and open a fresh working database."""
    working = storage_dir / WORKING_DIRECTORY
    shutil.rmtree(working, ignore_errors=True)
    copies = working / _COPIES_DIRECTORY
    copies.mkdir(parents=True)
    return copies, Results(working / _DATABASE_NAME)


@dataclass
class _Members:
    """What forwarding knows of one batch: the latest copy of each object by key, and every copy made."""

    latest: dict[str, tuple[str, Path]] = field(default_factory=dict)
    copies: list[_Copy] = field(default_factory=list)


class S3Forwarding:
    """The S3 store, forwarding what it stores (``BatchForwarding`` of scp/storage/s3.py)."""

    def __init__(
        self,
        inner: S3Store,
        results: Results,
        forwarder: Forwarder,
        metrics: Metrics,
        copies: Path,
        tagger: StoredTagger,
        clock: Callable[[], float] = time.time,
        withdraw_seconds: float = WITHDRAW_SECONDS,
        copies_max_bytes: int = COPIES_MAX_BYTES,
    ) -> None:
        self._inner = inner
        self._results = results
        self._forwarder = forwarder
        self._metrics = metrics
        self._copies = copies
        self._tagger = tagger
        self._clock = clock
        self._withdraw_seconds = withdraw_seconds
        self._copies_max_bytes = copies_max_bytes
        self._lock = threading.Lock()
        self._members: dict[str, _Members] = {}
        self._held_bytes = 0
        self._over_budget = False
        # Copies whose request was still under way when their batch closed: removed once it has ended.
        self._abandoned: list[_Copy] = []
        # The key each copy's StoreDICOM answer is tagged on: its object, or after its batch closed without it, its
        # fallback batch's copy. Only the newest copy of a key is here: an answer about an older receipt tags nothing.
        self._tag_keys: dict[Path, str] = {}
        inner.forwarding = self
        forwarder.on_stored = self._stored

    # -- the Store interface -----------------------------------------------------------------------------------

    def store(self, staged: Path, instance: ReceivedInstance) -> StoredInstance:
        return self._inner.store(staged, instance)

    def close(self) -> None:
        """Close every batch first (each takes its instances back), then stop sending."""
        self._inner.close()
        self._forwarder.stop(_STOP_SECONDS)
        self._tagger.stop(_STOP_SECONDS)
        self._results.close()
        shutil.rmtree(self._copies, ignore_errors=True)

    # -- called by the S3 store ----------------------------------------------------------------------------------

    def uploaded(self, staged: Path, key: str, instance: ReceivedInstance) -> None:
        """S3 has confirmed ``key``: keep a copy of the spool file and queue it. Anything going wrong here leaves
        the object to its batch's import job; the C-STORE succeeds either way, S3 holds the object."""
        copy: Path | None = None
        size = 0
        try:
            batch_id = parse_object_key(key).batch_id
            size = os.stat(staged).st_size
            if not self._reserve(size):
                return
            copy = self._copies / f"{uuid.uuid4().hex}.dcm"
            os.link(staged, copy)
            self._results.enqueue(instance, copy, self._clock())
        except (OSError, sqlite3.Error, ValueError) as error:
            LOG.error(
                "not forwarded to StoreDICOM; its batch's import job takes it",
                extra={"key": key, "error": f"{type(error).__name__}: {error}"},
            )
            if copy is not None:
                copy.unlink(missing_ok=True)
            self._release(size)
            return
        with self._lock:
            members = self._members.setdefault(batch_id, _Members())
            if key in members.latest:
                self._tag_keys.pop(members.latest[key][1], None)
            members.latest[key] = (instance.sop_instance_uid, copy)
            self._tag_keys[copy] = key
            members.copies.append((instance.sop_instance_uid, copy, size))
        self._forwarder.wake()

    def closing(self, batch: Batch) -> None:
        """Withdraw the batch's instances from forwarding, wait (bounded) for their requests under way, and split the
        batch: the objects StoreDICOM stored keep their answer, the others go to a fallback batch."""
        with self._lock:
            members = self._members.pop(batch.batch_id, None)
            abandoned, self._abandoned = self._abandoned, []
        self._remove_ended(abandoned, closed_earlier=True)
        if members is None:
            if not batch.split_done:  # nothing forwarded (a retried close finds the split fixed already)
                batch.split({}, datetime.now(UTC))
                self._metrics.forward_left_to_import(len(batch.objects))
            return
        rows = list(members.latest.values())
        try:
            sending = self._forwarder.withdraw(rows, self._withdraw_seconds)
            outcomes = self._results.outcomes(rows)
        except sqlite3.Error as error:
            LOG.error(
                "StoreDICOM results unreadable; the whole batch goes to its import job",
                extra={"batch_id": batch.batch_id, "error": str(error)},
            )
            sending, outcomes = {uid for uid, _ in rows}, {}
        stored: dict[str, StoredByStoreDICOM] = {}
        for key, (uid, _) in members.latest.items():
            status, stored_at, image_set_id, reason = outcomes.get(uid, ("", None, None, None))
            if status in (IMPORTED, WARNING) and stored_at is not None:
                stored[key] = StoredByStoreDICOM(stored_at, image_set_id, reason if status == WARNING else None)
        self._remove_ended(members.copies, closed_earlier=False)
        left = sum(1 for key in batch.objects if key not in stored)
        batch.split(stored, datetime.now(UTC))
        self._follow_into_fallback(batch, members)
        self._metrics.forward_left_to_import(left)
        unanswered = sending - {uid for key, (uid, _) in members.latest.items() if key in stored}
        if unanswered:
            LOG.warning(
                "StoreDICOM requests still under way when their batch closed; the import job takes those instances "
                "and may store them a second time",
                extra={"batch_id": batch.batch_id, "instances": len(unanswered)},
            )
        LOG.info(
            "batch split by StoreDICOM's results",
            extra={
                "batch_id": batch.batch_id,
                "stored_by_storedicom": len(stored),
                "left_to_import": left,
                "fallback_batch_id": batch.fallback.batch_id if batch.fallback is not None else None,
            },
        )

    # -- StoreDICOM's answers on the S3 objects ----------------------------------------------------------------

    def _stored(self, pending: Pending, stored: StoredByStoreDICOM) -> None:
        """The forwarder's word that StoreDICOM stored ``pending``: tag its object (asynchronously)."""
        with self._lock:
            key = self._tag_keys.get(pending.location)
        if key is not None:
            self._tagger.tag(key, stored)

    def _follow_into_fallback(self, batch: Batch, members: _Members) -> None:
        """A request still under way when its batch closed: its answer is tagged on the fallback batch's copy, the
        object the fallback's import job takes. One answered between the outcomes read and now was tagged on the
        object it was copied from, maybe after the copy: tagged on the copy too."""
        if batch.fallback is None:
            return
        fallback = batch.fallback
        moved = {fallback.copied_from(item): item.key for item in fallback.objects.values()}
        followed: list[tuple[str, Path]] = []
        with self._lock:
            for key, (uid, copy) in members.latest.items():
                if key in moved and copy in self._tag_keys:
                    self._tag_keys[copy] = moved[key]
                    followed.append((uid, copy))
        try:
            outcomes = self._results.outcomes(followed)
        except sqlite3.Error as error:
            LOG.error("forwarding working database failed", extra={"error": str(error)})
            return
        for uid, copy in followed:
            status, stored_at, image_set_id, reason = outcomes.get(uid, ("", None, None, None))
            if status in (IMPORTED, WARNING) and stored_at is not None:
                warning = reason if status == WARNING else None
                self._tagger.tag(self._tag_keys[copy], StoredByStoreDICOM(stored_at, image_set_id, warning))

    # -- local copies --------------------------------------------------------------------------------------------

    def _reserve(self, size: int) -> bool:
        with self._lock:
            if self._held_bytes + size > self._copies_max_bytes:
                if not self._over_budget:
                    LOG.warning(
                        "StoreDICOM forwarding holds its most local copies; new objects go to their import job",
                        extra={"bytes_held": self._held_bytes},
                    )
                self._over_budget = True
                return False
            self._held_bytes += size
            self._over_budget = False
            return True

    def _release(self, size: int) -> None:
        with self._lock:
            self._held_bytes -= size

    def _remove_ended(self, copies: list[_Copy], closed_earlier: bool) -> None:
        """Remove the copies no request is sending any more; keep the others for a later close. ``closed_earlier``:
        their batch has closed already, leaving them to its import job; one stored since is stored twice."""
        if not copies:
            return
        sending = self._forwarder.withdraw([(uid, path) for uid, path, _ in copies], 0)
        ended = [(uid, path) for uid, path, _ in copies if uid not in sending]
        try:
            if closed_earlier:
                outcomes = self._results.outcomes(ended)
                late = [uid for uid, (status, *_) in outcomes.items() if status in (IMPORTED, WARNING)]
                if late:
                    self._metrics.forward_duplicated(len(late))
                    LOG.warning(
                        "stored by StoreDICOM after their batch closed; the import job stores them again",
                        extra={"instances": len(late)},
                    )
            self._results.forget(ended)
        except sqlite3.Error as error:
            LOG.error("forwarding working database failed", extra={"error": str(error)})
        for uid, path, size in copies:
            if uid not in sending:
                path.unlink(missing_ok=True)
                self._release(size)
                with self._lock:
                    self._tag_keys.pop(path, None)
        with self._lock:
            self._abandoned += [copy for copy in copies if copy[0] in sending]
