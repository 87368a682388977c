"""The Dockerfile: non-root, exec-form entry point, the daemon's health check, pins that match the project's."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement

from tests.templates.cfn import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions(name: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(f"{name} ")]


def test_runs_the_daemon_as_pid_1_and_not_as_root() -> None:
    assert _instructions("ENTRYPOINT") == ['["dicom-store-scp"]']
    (user,) = _instructions("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert "dicomuser" in DOCKERFILE


def test_health_check_storage_and_port() -> None:
    (healthcheck,) = _instructions("HEALTHCHECK")
    assert healthcheck.endswith('CMD ["dicom-store-scp", "healthcheck"]')
    assert "STORAGE_DIR=/app/storage" in " ".join(_instructions("ENV"))
    assert _instructions("EXPOSE") == ["11112"]
    assert len(_instructions("FROM")) >= 2, "multi-stage"


def test_pinned_dependencies_satisfy_the_project_requirements() -> None:
    pins = dict(re.findall(r"\b([A-Za-z][A-Za-z0-9_.-]*)==([0-9][0-9A-Za-z.]*)", DOCKERFILE))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        requirement = Requirement(line)
        assert requirement.name in pins, f"{requirement.name} is not pinned in the Dockerfile"
        assert requirement.specifier.contains(pins[requirement.name]), f"{requirement.name}=={pins[requirement.name]}"
