"""Settings: the one place that reads the environment, parsed once, typed, and validated all at once."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from scp.cpus import usable_cpus
from scp.uids import is_valid_uid

T = TypeVar("T")

# PS3.8 9.3.1: an AE title is 1-16 characters of the default repertoire; backslash (the value separator) and
# control characters are not allowed, and leading/trailing spaces are not significant.
_AE_TITLE_MAX = 16

# Every PDU is held whole in memory while pynetdicom decodes it, so the PDU size is what bounds memory per
# association; "0" (DICOM's "no limit") is taken as the product default rather than as unlimited.
DEFAULT_MAXIMUM_PDU_SIZE = 1_048_576
_PDU_SIZE_MIN = 4_096
_PDU_SIZE_MAX = 4_194_304

# HealthImaging import jobs take at most 5,000 files and 10 GB (its service quotas); batches stay below both.
_IMPORT_JOB_MAX_FILES = 5_000
_IMPORT_JOB_MAX_BYTES = 10_000_000_000

# PS3.8 9.1.2's ARTIM timer: 30 s, unless the network timeout is shorter, which it then follows.
_ACSE_TIMEOUT_CEILING = 30.0
_ACSE_TIMEOUT_DEFAULT = f"min({_ACSE_TIMEOUT_CEILING:g}, NETWORK_TIMEOUT)"

_DATASTORE_ID_LENGTH = 32

_AUTO = "auto"
_PROCESSES_MAX = 64

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


# COMMITMENT_AFTER: what "committed" means in a Storage Commitment report.
COMMITMENT_AFTER_STORE = "store"
COMMITMENT_AFTER_HEALTHIMAGING = "healthimaging"
_HOSTNAME_MAX = 253
# RFC 1123 host names: labels of 1-63 letters, digits and hyphens, not starting or ending with a hyphen.
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True)
class CommitmentPeer:
    """Where a modality's AE receives its Storage Commitment reports on a new association."""

    ae_title: str
    host: str
    port: int


class SettingsError(ValueError):
    """Raised with every invalid variable named, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  {problem}" for problem in problems))


def _setting(default: str, meaning: str) -> Any:
    return field(metadata={"default": default, "help": meaning})


@dataclass(frozen=True)
class Settings:
    """The daemon's configuration; each field is one environment variable of the same name in upper case."""

    dicom_bucket: str | None = _setting("", "S3 bucket for received objects; unset stores on local disk")
    scp_port: int = _setting("11112", "TCP port the SCP listens on")
    bind_address: str = _setting("0.0.0.0", "address the SCP listens on")  # noqa: S104 - a network service
    proxy_protocol: bool = _setting(
        "false", "every connection starts with a PROXY protocol v2 header (from the NLB); peers are logged from it"
    )
    ae_title: str = _setting("STORESCP", "the SCP's AE title (1-16 characters)")
    require_called_ae_title: bool = _setting("false", "reject associations whose called AE title is not AE_TITLE")
    require_calling_ae_title: tuple[str, ...] = _setting(
        "", "comma-separated calling AE titles allowed to connect; empty allows any"
    )
    max_pool_connections: int = _setting("50", "size of the S3 client's connection pool")
    aws_region: str | None = _setting(
        "", "AWS Region of the S3 client and of StoreDICOM; empty follows the standard AWS chain"
    )
    dimse_timeout: float = _setting("60", "seconds to wait for a DIMSE message")
    acse_timeout: float = _setting(
        _ACSE_TIMEOUT_DEFAULT, "seconds to wait for the association request (and PROXY header) after connecting"
    )
    network_timeout: float = _setting("90", "seconds of silence before an association is aborted")
    maximum_associations: int = _setting("300", "concurrent associations; more are rejected (local limit)")
    maximum_pdu_size: int = _setting("0", f"largest PDU received, bytes; 0 means {DEFAULT_MAXIMUM_PDU_SIZE}")
    supported_sop_class_uids: tuple[str, ...] = _setting(
        "",
        "comma-separated SOP Class UIDs accepted for storage; empty accepts every storage SOP class, private ones too",
    )
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING, ERROR or CRITICAL")
    storage_dir: Path = _setting(  # noqa: RUF009 - a field with metadata and no default, like the others
        "./storage", "local store root, and the receive spool in S3 mode"
    )
    batch_max_files: int = _setting("4000", "an S3 import batch closes at this many objects")
    batch_max_bytes: int = _setting("8000000000", "an S3 import batch closes at this many bytes")
    batch_window_seconds: float = _setting("60", "an S3 import batch closes after this many quiet seconds")
    shutdown_grace_seconds: float = _setting("100", "on SIGTERM, seconds in-flight associations may take to finish")
    datastore_id: str | None = _setting(
        "",
        "HealthImaging data store that every stored object is also sent to with StoreDICOM (with DICOM_BUCKET, beside "
        "the import batches, which take what it did not store); unset sends nothing",
    )
    healthimaging_dicomweb_url: str | None = _setting(
        "", "StoreDICOM endpoint; empty means https://dicom-medical-imaging.<region>.amazonaws.com"
    )
    commitment_peers: tuple[CommitmentPeer, ...] = _setting(
        "", "AE1=host:port,AE2=host:port: where Storage Commitment reports go when the request's association has ended"
    )
    commitment_after: str = _setting(
        "store", "store: committed means durable in the store; healthimaging: stored in HealthImaging by StoreDICOM"
    )
    commitment_timeout: float = _setting(
        "600", "seconds a Storage Commitment request waits for its instances before the missing ones are failed"
    )
    # One process per usable CPU, since each has its own interpreter lock: docs/architecture.rst, "Receiver processes".
    receiver_processes: int = _setting(
        _AUTO,
        "processes receiving on SCP_PORT; auto: one per CPU the task may use (CPU affinity and cgroup quota), "
        "1 with DATASTORE_ID",
    )

    @property
    def effective_pdu_size(self) -> int:
        return self.maximum_pdu_size or DEFAULT_MAXIMUM_PDU_SIZE

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from ``env``; raise :class:`SettingsError` naming every bad variable."""
        problems: list[str] = []
        values: dict[str, Any] = {}
        for spec in fields(cls):
            name = spec.name.upper()
            raw = env.get(name, "").strip()
            if not raw and spec.name in _DERIVED_DEFAULTS:
                continue  # follows another setting, filled in below
            if name not in env:
                raw = spec.metadata["default"]
            try:
                values[spec.name] = _PARSERS[spec.name](raw)
            except ValueError as error:
                problems.append(f"{name}: {error}, got {raw!r}")
        if not problems:
            for key, derive in (_DERIVED_DEFAULTS | _AUTO_VALUES).items():
                if values.get(key) is None:  # unset, or "auto"
                    values[key] = derive(values)
            problems.extend(_cross_checks(values, env))
        if problems:
            raise SettingsError(problems)
        return cls(**values)

    @classmethod
    def documentation(cls) -> list[tuple[str, str, str]]:
        """(variable, default, meaning) for every setting, in declaration order."""
        return [(spec.name.upper(), spec.metadata["default"], spec.metadata["help"]) for spec in fields(cls)]


# Settings whose default follows other settings: unset (or empty), they are computed from the parsed values.
_DERIVED_DEFAULTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "acse_timeout": lambda values: min(_ACSE_TIMEOUT_CEILING, values["network_timeout"]),
}
# Settings whose value ``auto`` is computed from the parsed values.
_AUTO_VALUES: dict[str, Callable[[dict[str, Any]], Any]] = {
    # StoreDICOM forwarding keeps one outbox and one request rate: it runs in one process.
    "receiver_processes": lambda values: 1 if values["datastore_id"] else min(usable_cpus(), _PROCESSES_MAX),
}


def _cross_checks(values: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    problems = []
    if values["acse_timeout"] > values["network_timeout"]:
        # Only a set ACSE_TIMEOUT can get here (its default follows NETWORK_TIMEOUT); say whether the other
        # side is a default, so an admin knows which variable to set.
        network = f"{values['network_timeout']:g}"
        if "NETWORK_TIMEOUT" not in env:
            network += ", its default"
        problems.append(
            f"ACSE_TIMEOUT: {values['acse_timeout']:g} exceeds NETWORK_TIMEOUT ({network}); set NETWORK_TIMEOUT to "
            f"at least {values['acse_timeout']:g}, or ACSE_TIMEOUT to at most {values['network_timeout']:g}"
        )
    if values["receiver_processes"] > 1 and values["datastore_id"]:
        problems.append(
            "RECEIVER_PROCESSES: StoreDICOM forwarding (DATASTORE_ID) runs in one receiver process; "
            "set RECEIVER_PROCESSES=1 or leave it unset"
        )
    if values["receiver_processes"] > 1 and not hasattr(os, "memfd_create"):
        problems.append("RECEIVER_PROCESSES: more than one receiver process needs Linux; set RECEIVER_PROCESSES=1")
    if values["commitment_after"] == COMMITMENT_AFTER_HEALTHIMAGING and not values["datastore_id"]:
        # HealthImaging's confirmation comes from StoreDICOM forwarding's results.
        problems.append("COMMITMENT_AFTER: healthimaging needs StoreDICOM forwarding; set DATASTORE_ID")
    elif values["commitment_after"] == COMMITMENT_AFTER_HEALTHIMAGING and values["dicom_bucket"]:
        # In S3 mode the results go into the batch manifests; the task's disk keeps none to answer from.
        problems.append("COMMITMENT_AFTER: healthimaging reads a standalone gateway's forwarding results; unset "
                        "DICOM_BUCKET or set COMMITMENT_AFTER=store")
    return problems


def _integer(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"expected a whole number {low}-{high}") from None
        if not low <= value <= high:
            raise ValueError(f"expected {low}-{high}")
        return value

    return parse


def _seconds(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"expected seconds between {low:g} and {high:g}") from None
        if not low <= value <= high:  # also rejects NaN
            raise ValueError(f"expected seconds between {low:g} and {high:g}")
        return value

    return parse


def _boolean(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected true/false, yes/no, 1/0 or on/off")


def parse_ae_title(raw: str) -> str:
    title = raw.strip(" ")
    if not title:
        raise ValueError("an AE title must not be empty")
    if len(title) > _AE_TITLE_MAX:
        raise ValueError(f"an AE title has at most {_AE_TITLE_MAX} characters")
    if "\\" in title or any(not 0x20 <= ord(char) < 0x7F for char in title):
        raise ValueError("an AE title has printable ASCII characters only and no backslash")
    return title


def _ae_title_list(raw: str) -> tuple[str, ...]:
    if not raw:
        return ()
    return tuple(parse_ae_title(part) for part in raw.split(","))


def _uid_list(raw: str) -> tuple[str, ...]:
    if not raw:
        return ()
    uids = tuple(part.strip() for part in raw.split(","))
    bad = [uid for uid in uids if not is_valid_uid(uid)]
    if bad:
        raise ValueError(f"not a valid UID: {', '.join(repr(uid) for uid in bad)}")
    return uids


def _pdu_size(raw: str) -> int:
    value = _integer(0, _PDU_SIZE_MAX)(raw)
    if 0 < value < _PDU_SIZE_MIN:
        raise ValueError(f"expected 0 or {_PDU_SIZE_MIN}-{_PDU_SIZE_MAX}")
    return value


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def _bucket(raw: str) -> str | None:
    if not raw:
        return None
    # S3 bucket naming rules: 3-63 characters, lower-case letters, digits, dots and hyphens.
    if not 3 <= len(raw) <= 63 or not all(c.islower() or c.isdigit() or c in ".-" for c in raw):
        raise ValueError("expected an S3 bucket name (3-63 lower-case letters, digits, dots, hyphens)")
    if not (raw[0].isalnum() and raw[-1].isalnum()):
        raise ValueError("an S3 bucket name starts and ends with a letter or digit")
    return raw


# Region names: us-east-1, eu-west-2, us-gov-west-1, cn-north-1, ...
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]+")


def _region(raw: str) -> str | None:
    if not raw:
        return None
    if not _REGION.fullmatch(raw):
        raise ValueError("expected an AWS Region name such as eu-west-2")
    return raw


def _datastore_id(raw: str) -> str | None:
    if not raw:
        return None
    # HealthImaging data store ids: 32 characters of lower-case letters and digits (its API reference).
    if len(raw) != _DATASTORE_ID_LENGTH or not all(c.isdigit() or "a" <= c <= "z" for c in raw):
        raise ValueError(f"expected a data store id ({_DATASTORE_ID_LENGTH} lower-case letters and digits)")
    return raw


def _dicomweb_url(raw: str) -> str | None:
    if not raw:
        return None
    parsed = urllib.parse.urlsplit(raw)
    if parsed.scheme not in ("https", "http") or not parsed.hostname or parsed.query or parsed.fragment:
        raise ValueError("expected an http(s) URL of a host, with no query")
    if parsed.path.strip("/"):
        raise ValueError("expected the endpoint only; /datastore/<id>/studies is added")
    return raw.rstrip("/")


def _processes(raw: str) -> int | None:
    if raw.lower() == _AUTO:
        return None  # derived once every setting is parsed
    return _integer(1, _PROCESSES_MAX)(raw)


def _commitment_after(raw: str) -> str:
    if raw not in (COMMITMENT_AFTER_STORE, COMMITMENT_AFTER_HEALTHIMAGING):
        raise ValueError(f"expected {COMMITMENT_AFTER_STORE} or {COMMITMENT_AFTER_HEALTHIMAGING}")
    return raw


def _host(raw: str) -> str:
    if raw.startswith("[") and raw.endswith("]"):
        return _address(raw[1:-1])
    with contextlib.suppress(ValueError):
        return _address(raw)
    if len(raw) > _HOSTNAME_MAX or not all(_HOST_LABEL.fullmatch(label) for label in raw.split(".")):
        raise ValueError(f"{raw!r} is not a host name or IP address")
    return raw


def _commitment_peers(raw: str) -> tuple[CommitmentPeer, ...]:
    if not raw:
        return ()
    peers: list[CommitmentPeer] = []
    for entry in raw.split(","):
        title, equals, address = entry.partition("=")
        host, colon, port = address.strip().rpartition(":")
        if not equals or not colon or not host:
            raise ValueError(f"expected AE=host:port, got entry {entry.strip()!r}")
        ae_title = parse_ae_title(title)
        if any(peer.ae_title == ae_title for peer in peers):
            raise ValueError(f"AE title {ae_title!r} is listed twice")
        peers.append(CommitmentPeer(ae_title, _host(host), _integer(1, 65535)(port.strip())))
    return tuple(peers)


def _address(raw: str) -> str:
    try:
        ipaddress.ip_address(raw)
    except ValueError:
        raise ValueError("expected an IPv4 or IPv6 address") from None
    return raw


def _directory(raw: str) -> Path:
    if not raw:
        raise ValueError("expected a directory path")
    return Path(raw)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "dicom_bucket": _bucket,
    "scp_port": _integer(1, 65535),
    "bind_address": _address,
    "proxy_protocol": _boolean,
    "ae_title": parse_ae_title,
    "require_called_ae_title": _boolean,
    "require_calling_ae_title": _ae_title_list,
    "max_pool_connections": _integer(1, 1000),
    "aws_region": _region,
    "dimse_timeout": _seconds(1, 3600),
    "acse_timeout": _seconds(1, 3600),
    "network_timeout": _seconds(1, 3600),
    "maximum_associations": _integer(1, 2000),
    "maximum_pdu_size": _pdu_size,
    "supported_sop_class_uids": _uid_list,
    "log_level": _log_level,
    "storage_dir": _directory,
    "batch_max_files": _integer(1, _IMPORT_JOB_MAX_FILES),
    "batch_max_bytes": _integer(1_000_000, _IMPORT_JOB_MAX_BYTES),
    "batch_window_seconds": _seconds(1, 86_400),
    "shutdown_grace_seconds": _seconds(0, 3600),
    "datastore_id": _datastore_id,
    "healthimaging_dicomweb_url": _dicomweb_url,
    "commitment_peers": _commitment_peers,
    "commitment_after": _commitment_after,
    "commitment_timeout": _seconds(1, 86_400),
    "receiver_processes": _processes,
}
