"""S3-mode daemons forwarding to StoreDICOM's stand-in, and their bucket on moto_server: what the forwarding tests
in S3 mode start from, with the one invariant they all check (each acknowledged instance in exactly one manifest)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from batch_contract.manifest import Manifest
from tests.support.corpus import make_instance, read
from tests.support.daemon import Daemon
from tests.support.moto import MotoServer
from tests.support.s3 import open_batch_ids, parsed_manifests
from tests.support.stow import StowStandIn


@dataclass(frozen=True)
class ForwardedBucket:
    # Starts an S3-mode daemon storing to ``bucket`` and forwarding to ``standin`` (tests/integration/conftest.py).
    start_daemon: Callable[..., Daemon]
    server: MotoServer
    bucket: str
    standin: StowStandIn
    workdir: Path

    def series(self, study: str, series: str, count: int, pixel_bytes: int) -> list[Path]:
        """``count`` new instances of one series, as Part-10 files to send."""
        return [
            make_instance(self.workdir, pixel_bytes=pixel_bytes, study_uid=study, series_uid=series)
            for _ in range(count)
        ]

    def manifests(self) -> dict[str, Manifest]:
        return parsed_manifests(self.server, self.bucket)

    def open_batch_ids(self) -> list[str]:
        return open_batch_ids(self.server, self.bucket)

    def each_in_one_manifest(self, sent: list[Path]) -> dict[str, Manifest]:
        """Check that every instance of ``sent`` is listed in exactly one manifest; returns them by batch id."""
        found = self.manifests()
        listed = Counter(item.sop_instance_uid for manifest in found.values() for item in manifest.objects)
        expected = Counter(str(read(path).SOPInstanceUID) for path in sent)
        assert listed == expected, "each instance in exactly one manifest"
        return found
