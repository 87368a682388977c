"""The README's configuration table is the daemon's: same variables, same defaults, same order."""

from __future__ import annotations

import re
from pathlib import Path

from scp.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_configuration_table_matches_settings() -> None:
    rows = re.findall(r"^\| `([A-Z_]+)` \| (`[^`]*`|\(empty\)) \|", README.read_text(), flags=re.MULTILINE)
    documented = [(name, "" if default == "(empty)" else default.strip("`")) for name, default in rows]
    assert documented == [(name, default) for name, default, _ in Settings.documentation()]


def test_readme_starts_with_the_two_commands() -> None:
    text = README.read_text()
    assert text.index("make run") < text.index("make test") < text.index("## Configuration")
