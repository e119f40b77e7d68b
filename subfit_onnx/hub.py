"""A fast "is the Hugging Face Hub reachable?" check before anything that would download.

Without it an offline machine waits about 25 s in huggingface_hub's retries and then reports a generic
connection error; with it a hub model id or a dataset calibration source fails in a few seconds with a message
that names the local alternative. ``HF_HUB_OFFLINE=1`` skips the check so cached copies are still used.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from .errors import SubFitError

_TRUE = ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_mode() -> bool:
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str, alternative: str) -> None:
    """Raise a clear error when ``what`` needs the hub and it cannot be reached (unless offline mode is set)."""
    if offline_mode() or hub_reachable():
        return
    raise SubFitError(
        f"{what} needs the Hugging Face Hub, which cannot be reached ({hub_endpoint()}); {alternative} "
        "(or set HF_HUB_OFFLINE=1 to use a cached copy)"
    )
