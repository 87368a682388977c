"""Sphinx configuration of the product documentation (built with ``make docs``, warnings are errors)."""

import sys
from importlib import metadata
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS / "_ext"), str(DOCS.parent)]

project = "DICOM Store SCP for AWS HealthImaging"
author = "DICOM Store SCP maintainers"
copyright = "2026, DICOM Store SCP maintainers"
release = metadata.version("dicom-store-scp")

extensions = ["sphinx.ext.graphviz", "cfn_docs"]
exclude_patterns = ["_build"]
graphviz_output_format = "png"
html_theme = "alabaster"
html_theme_options = {"page_width": "1100px"}
nitpicky = True
