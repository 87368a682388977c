"""One version, written in pyproject.toml: the image tag, the artifact prefix, the Dockerfile label, the daemon
and the Makefile's publish and image targets follow it."""

from __future__ import annotations

import re
import subprocess
import tomllib
from typing import Any

import scp
from tests.templates import cfn
from tests.templates.cfn import ROOT

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# AWS Marketplace's registry and the product's repository in it (the seeds' container README).
MARKETPLACE_REPOSITORY = "709825985650.dkr.ecr.us-east-1.amazonaws.com/man-machine-interface/dicom-store-scp"


def _make_dry_run(*arguments: str) -> str:
    return subprocess.run(
        ["make", "--no-print-directory", "-n", *arguments],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    ).stdout


def test_the_default_image_is_this_release(template: dict[str, Any]) -> None:
    image = template["Parameters"]["ContainerImage"]["Default"]
    assert image == f"{MARKETPLACE_REPOSITORY}:v{VERSION}"


def test_the_default_artifacts_are_this_release(template: dict[str, Any]) -> None:
    assert template["Parameters"]["ArtifactKeyPrefix"]["Default"] == f"dicom-store-scp/v{VERSION}/"


def test_the_daemon_and_the_image_label_carry_the_version() -> None:
    assert scp.__version__ == VERSION
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z]+)="([^"]*)"', (ROOT / "Dockerfile").read_text()))
    assert labels["org.opencontainers.image.version"] == VERSION


def test_publish_uploads_where_the_template_reads_in_every_region(template: dict[str, Any]) -> None:
    commands = _make_dry_run("-B", "publish", "AWS=aws")
    (loop,) = re.findall(r"for region in ([a-z0-9 -]+); do", commands)
    assert tuple(loop.split()) == cfn.HEALTHIMAGING_REGIONS
    base = template["Parameters"]["ArtifactBucketName"]["Default"]
    assert f"build/ s3://{base}-$region/dicom-store-scp/v{VERSION}/" in commands


def test_the_image_is_tagged_with_the_version() -> None:
    assert f"-t dicom-store-scp:v{VERSION} ." in _make_dry_run("image")


def test_the_version_history_starts_with_this_release() -> None:
    text = (ROOT / "CHANGELOG.rst").read_text()
    versions = re.findall(r"^(\d+\.\d+\.\d+)\n-+$", text, flags=re.MULTILINE)
    assert versions[0] == VERSION
    assert ".. include:: ../CHANGELOG.rst" in (ROOT / "docs" / "changelog.rst").read_text()
