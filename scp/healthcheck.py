"""`dicom-store-scp healthcheck`: is the daemon answering DICOM? Decided by a real association and C-ECHO."""

from __future__ import annotations

from pynetdicom import AE

from scp.association import HEALTHCHECK_AE_TITLE
from scp.config import Settings
from scp.contexts import VERIFICATION_SOP_CLASS

_TIMEOUT_SECONDS = 10


def target_address(settings: Settings) -> str:
    if settings.bind_address in ("0.0.0.0", "::"):  # noqa: S104 - listening everywhere: ask over loopback
        return "127.0.0.1" if settings.bind_address == "0.0.0.0" else "::1"  # noqa: S104
    return settings.bind_address


def check(settings: Settings) -> tuple[bool, str]:
    """(healthy, what was seen).

    An association rejection still proves the daemon is serving DICOM: at MAXIMUM_ASSOCIATIONS it answers
    "local limit exceeded", and a busy task must not be replaced for being busy.
    """
    ae = AE(ae_title=HEALTHCHECK_AE_TITLE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = _TIMEOUT_SECONDS
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    association = ae.associate(target_address(settings), settings.scp_port, ae_title=settings.ae_title)
    if association.is_rejected:
        return True, "association rejected by a running daemon"
    if not association.is_established:
        return False, "no association (connection refused, timed out or aborted)"
    try:
        status = association.send_c_echo()
    finally:
        association.release()
    if status and status.Status == 0:
        return True, "C-ECHO succeeded"
    return False, "C-ECHO failed"
