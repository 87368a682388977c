"""Deciding, per referenced instance, whether the archive has taken it over: committed, failed with a reason, or
still awaited; past the request's deadline whatever is still awaited fails. Never optimistic: only evidence that
the object is durable (or stored in HealthImaging) makes it committed."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from scp.commitment.ledger import Entry, Ledger
from scp.commitment.pending import COMMITTED
from scp.commitment.request import Reference
from scp.forwarding.results import FAILED, IMPORTED, WARNING
from scp.status import FailureReason


@dataclass(frozen=True)
class Verdict:
    outcome: int | None  # COMMITTED, a FailureReason, or None while awaited
    seen: bool = False  # awaited, but the archive has the instance in hand (stored, still being forwarded)


AWAITED = Verdict(None)
AWAITED_SEEN = Verdict(None, seen=True)
COMMITTED_VERDICT = Verdict(COMMITTED)


class _Known(Protocol):
    @property
    def sop_class_uid(self) -> str: ...


_KnownInstance = TypeVar("_KnownInstance", bound=_Known)


def _verdicts(
    references: Sequence[Reference],
    known: Mapping[str, _KnownInstance],
    decide: Callable[[Reference, _KnownInstance], Verdict],
) -> list[Verdict]:
    """Awaited while the archive does not know the instance, a conflict when it knows it under another SOP class,
    otherwise what ``decide`` makes of what it knows."""
    verdicts = []
    for reference in references:
        instance = known.get(reference.sop_instance_uid)
        if instance is None:
            verdicts.append(AWAITED)
        elif instance.sop_class_uid != reference.sop_class_uid:
            verdicts.append(Verdict(FailureReason.CLASS_INSTANCE_CONFLICT))
        else:
            verdicts.append(decide(reference, instance))
    return verdicts


class Evidence(Protocol):
    def judge(self, references: Sequence[Reference]) -> list[Verdict]:
        """One verdict per reference, in order."""


class ObjectCheck(Protocol):
    def holds(self, location: str, reference: Reference) -> bool | None:
        """Whether the store's object at ``location`` is ``reference``; None when the store cannot tell now."""


class StoreEvidence:
    """COMMITMENT_AFTER=store: committed once the ledger knows the instance under the requested SOP class and
    the store still holds its object."""

    def __init__(self, ledger: Ledger, check: ObjectCheck) -> None:
        self._ledger = ledger
        self._check = check

    def judge(self, references: Sequence[Reference]) -> list[Verdict]:
        entries = self._ledger.lookup(reference.sop_instance_uid for reference in references)
        return _verdicts(references, entries, self._stored)

    def _stored(self, reference: Reference, entry: Entry) -> Verdict:
        return COMMITTED_VERDICT if self._check.holds(entry.location, reference) else AWAITED_SEEN


# Stored in HealthImaging, with or without a warning; anything else but FAILED is still on its way.
_FORWARDED_STORED = (IMPORTED, WARNING)


@dataclass(frozen=True)
class ForwardedState:
    sop_class_uid: str
    status: str


class ForwardingResults(Protocol):
    def states(self, sop_instance_uids: Sequence[str]) -> dict[str, ForwardedState]:
        """The StoreDICOM forwarding state of each instance it knows among ``sop_instance_uids``."""


class HealthImagingEvidence:
    """COMMITMENT_AFTER=healthimaging: committed once StoreDICOM forwarding has HealthImaging's confirmation that
    it stored the instance; an instance forwarding gave up on fails at once."""

    def __init__(self, results: ForwardingResults) -> None:
        self._results = results

    def judge(self, references: Sequence[Reference]) -> list[Verdict]:
        states = self._results.states([reference.sop_instance_uid for reference in references])
        return _verdicts(references, states, _forwarded)


def _forwarded(_reference: Reference, state: ForwardedState) -> Verdict:
    if state.status in _FORWARDED_STORED:
        return COMMITTED_VERDICT
    if state.status == FAILED:
        return Verdict(FailureReason.PROCESSING_FAILURE)
    return AWAITED_SEEN


def at_deadline(verdict: Verdict) -> int:
    """The outcome of a reference still awaited when its request's deadline has passed."""
    if verdict.outcome is not None:
        return verdict.outcome
    # Never received: no such object. Received but not (yet) confirmed durable or stored in HealthImaging: the
    # archive failed to process it in time.
    return FailureReason.PROCESSING_FAILURE if verdict.seen else FailureReason.NO_SUCH_OBJECT_INSTANCE
