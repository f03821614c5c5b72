"""Which OpenNebula called us, and what that means for the wire format."""
from __future__ import annotations

import os
import re

# Without remotes/VERSION nor ONEISCSI_ONE_VERSION we assume the newest line; the
# input readers accept every version's shape anyway.
LATEST = (7, 0)
DEFAULT_REMOTES = "/var/lib/one/remotes"


def parse(text: str):
    m = re.match(r"\s*(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def remotes_dir(argv0: str = "") -> str:
    """The remotes tree: from an action path (`<remotes>/tm/<drv>/<action>`), else the default."""
    if argv0:
        kind_dir = os.path.dirname(os.path.dirname(os.path.abspath(argv0)))
        if os.path.basename(kind_dir) in ("datastore", "tm"):
            return os.path.dirname(kind_dir)
    if os.environ.get("ONE_LOCATION"):
        return os.path.join(os.environ["ONE_LOCATION"], "var", "remotes")
    return DEFAULT_REMOTES


def detect(remotes: str):
    env = parse(os.environ.get("ONEISCSI_ONE_VERSION", ""))
    if env:
        return env
    try:
        with open(os.path.join(remotes, "VERSION"), encoding="utf-8") as f:
            found = parse(f.read(100))
    except OSError:
        found = None
    return found or LATEST


class Wire:
    """Version-dependent formats (opennebula-driver-interface.md, breakpoint table)."""

    def __init__(self, version):
        self.version = tuple(version)

    @property
    def cp_prints_format(self) -> bool:  # `SOURCE FORMAT` from 6.0
        return self.version >= (6, 0)

    @property
    def error_block(self) -> bool:  # ERROR MESSAGE markers up to 6.0
        return self.version < (6, 2)

    @property
    def stderr_logs(self) -> bool:  # see log.py
        return not ((6, 2) <= self.version < (7, 0))

    @property
    def fs_element(self) -> str:
        return "FS" if self.version >= (6, 0) else "FSTYPE"

    def __str__(self):
        return "%d.%d" % self.version
