"""Small helpers with no labkit imports: where labkit keeps files, a free TCP port, and the
one shape of a bad-option error."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def cache_root() -> Path:
    """labkit's own cache (converted GGUF checkpoints, measured ceilings): `$LABKIT_CACHE`, else
    ~/.cache/labkit."""
    return Path(os.environ.get("LABKIT_CACHE", Path.home() / ".cache" / "labkit"))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` (an address of this machine) that nothing listens on now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_field(ok: bool, field: str, value, allowed: str) -> None:
    """A ValueError naming the field, the value given and what is allowed, unless `ok`."""
    if not ok:
        raise ValueError(f"{field}={value!r} is invalid: must be {allowed}")
