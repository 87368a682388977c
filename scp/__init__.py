"""DICOM Store SCP for AWS HealthImaging: the receiving daemon."""

from importlib import metadata

# The version is written once, in pyproject.toml; the installed package's metadata carries it here.
__version__ = metadata.version("dicom-store-scp")

# PS3.7 D.3.3.2: Implementation Class UID and Version Name identify this product in every file meta and
# association it writes. The UID is rooted in the UUID-derived arc 2.25 (PS3.5 B.2), so it needs no
# registered organisation root.
IMPLEMENTATION_CLASS_UID = "2.25.228751185369544805442236484832870901072"
IMPLEMENTATION_VERSION_NAME = f"STORESCP_{__version__.replace('.', '')}"
