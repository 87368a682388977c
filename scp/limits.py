"""The listener's counts, in one process or shared by every receiver process: connections (MAXIMUM_ASSOCIATIONS
plus spare ones, and the health check's loopback reserve), admitted associations, and what metrics and the
shutdown report need from each process.

Each process writes its own row of a table in shared memory created before the receivers are forked; a decision
that reads every row (is there a slot left?) holds a file lock that the kernel releases when its holder dies, so a
receiver killed at any moment can neither leave the lock taken nor, once its row is cleared, keep its slots.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import threading
from collections.abc import Iterator, MutableSequence
from typing import cast

from scp.association import Association, Registry

REGULAR, RESERVED = "regular", "reserved"
# Connections that never send an association request hold a thread until ACSE_TIMEOUT; past this many beyond
# MAXIMUM_ASSOCIATIONS a new connection is closed at once instead of costing another thread.
SPARE_CONNECTIONS = 64
# Beyond that, a few connections from the host itself are still served: the container's health check runs there
# (`dicom-store-scp healthcheck`), and a task that is only busy must not be replaced for being busy. Under a
# flood, the flood comes through the load balancer, never from the task's own loopback.
HEALTH_CHECK_RESERVE = 2
_LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})

# The columns of a process's row.
_CONNECTIONS, _RESERVED, _ADMITTED, _OPEN, _ABORTED, _ALIVE = range(6)
_COLUMNS = 6
_CELL_BYTES = 8


class Counts:
    """The table: one row per receiver process. ``shared`` puts it in memory that forked processes share."""

    def __init__(self, processes: int, shared: bool = False) -> None:
        self.processes = processes
        self._thread_lock = threading.Lock()
        self._memory_fd: int | None = None
        self._lock_fd: int | None = None
        self._lock_pid = 0
        cells = processes * _COLUMNS
        self._cells: MutableSequence[int]
        if shared:
            self._memory_fd = os.memfd_create("dicom-store-scp-counts", os.MFD_CLOEXEC)
            os.ftruncate(self._memory_fd, cells * _CELL_BYTES)
            self._memory = mmap.mmap(self._memory_fd, cells * _CELL_BYTES)
            # Indexed and assigned like a list of 64-bit integers, which is all this class does with it.
            self._cells = cast("MutableSequence[int]", memoryview(self._memory).cast("q"))
        else:
            self._cells = [0] * cells

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with self._thread_lock:
            if self._memory_fd is None:
                yield
                return
            descriptor = self._own_lock_descriptor()
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(descriptor, fcntl.LOCK_UN)

    def _own_lock_descriptor(self) -> int:
        # flock excludes open file descriptions, and a forked child shares its parent's: each process opens the
        # memory file anew for a description of its own.
        assert self._memory_fd is not None
        if self._lock_pid != os.getpid() or self._lock_fd is None:
            self._lock_fd = os.open(f"/proc/self/fd/{self._memory_fd}", os.O_RDWR | os.O_CLOEXEC)
            self._lock_pid = os.getpid()
        return self._lock_fd

    def get(self, row: int, column: int) -> int:
        return self._cells[row * _COLUMNS + column]

    def set(self, row: int, column: int, value: int) -> None:
        self._cells[row * _COLUMNS + column] = value

    def add(self, row: int, column: int, delta: int) -> None:
        self._cells[row * _COLUMNS + column] += delta

    def total(self, column: int) -> int:
        return sum(self._cells[row * _COLUMNS + column] for row in range(self.processes))

    # -- the supervising process ---------------------------------------------------------------------------------

    def starting(self, row: int) -> None:
        """A receiver process takes ``row``; whatever its predecessor there held died with it."""
        with self.locked():
            for column in range(_COLUMNS):
                self.set(row, column, 0)

    def ended(self, row: int) -> None:
        with self.locked():
            for column in range(_COLUMNS):
                if column != _ABORTED:  # kept for the shutdown report
                    self.set(row, column, 0)

    def aborted(self) -> int:
        return self.total(_ABORTED)


class Limits:
    """One receiver process's view of the counts: takes and gives back slots under the table's lock."""

    def __init__(self, maximum_associations: int, counts: Counts | None = None, row: int = 0) -> None:
        self._maximum = maximum_associations
        self._counts = counts or Counts(1)
        self._row = row

    @property
    def connection_limit(self) -> int:
        return self._maximum + SPARE_CONNECTIONS

    def take_connection(self, source: str) -> str | None:
        counts, row = self._counts, self._row
        with counts.locked():
            if counts.total(_CONNECTIONS) < self.connection_limit:
                counts.add(row, _CONNECTIONS, 1)
                return REGULAR
            if source in _LOOPBACK and counts.total(_RESERVED) < HEALTH_CHECK_RESERVE:
                counts.add(row, _RESERVED, 1)
                return RESERVED
        return None

    def connection_ended(self, slot: str) -> None:
        with self._counts.locked():
            self._counts.add(self._row, _RESERVED if slot == RESERVED else _CONNECTIONS, -1)

    def admit(self) -> bool:
        counts = self._counts
        with counts.locked():
            if counts.total(_ADMITTED) >= self._maximum:
                return False
            counts.add(self._row, _ADMITTED, 1)
            return True

    def admission_ended(self) -> None:
        with self._counts.locked():
            self._counts.add(self._row, _ADMITTED, -1)

    def serving(self) -> None:
        """This process accepts from now on: the others may leave connections to it (not before, or a receiver
        still starting, its S3 bucket being checked, would hold up the connections left to it)."""
        self._counts.set(self._row, _ALIVE, 1)

    def least_loaded(self) -> bool:
        """Whether no other live receiver holds fewer connections than this one: the one that should accept next.

        Read without the lock: a stale count only sends one connection to a process that is one busier.
        """
        counts = self._counts
        mine = counts.get(self._row, _CONNECTIONS)
        others = (
            counts.get(row, _CONNECTIONS)
            for row in range(counts.processes)
            if row != self._row and counts.get(row, _ALIVE)
        )
        return all(mine <= theirs for theirs in others)

    def open_associations(self, here: int) -> int:
        """Publish this process's open associations; the task's total, for the ActiveAssociations gauge."""
        self._counts.set(self._row, _OPEN, here)
        return self._counts.total(_OPEN)

    def aborted_at_shutdown(self, associations: int) -> None:
        self._counts.set(self._row, _ABORTED, associations)


class LimitedRegistry(Registry):
    """The association registry whose admissions count against MAXIMUM_ASSOCIATIONS across every process."""

    def __init__(self, limits: Limits) -> None:
        super().__init__()
        self._limits = limits
        self._admitted_here: set[Association] = set()
        self._here_lock = threading.Lock()

    def admit(self, association: Association, limit: int) -> bool:
        if not self._limits.admit():
            return False
        with self._here_lock:
            self._admitted_here.add(association)
        return super().admit(association, limit)

    def remove(self, association: Association) -> None:
        super().remove(association)
        with self._here_lock:
            admitted = association in self._admitted_here
            self._admitted_here.discard(association)
        if admitted:
            self._limits.admission_ended()
