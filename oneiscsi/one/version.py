"""Which OpenNebula called us, and what that means for the wire format.

The version is (major, minor, patch): the patch level decides rules (6.0.3 is not
6.0.2, 6.4.2 is not 6.4.1). Every rule below names its source; the per-version
model of oned's side the tests check replies against is tests/onedmodel.py.
"""
from __future__ import annotations

import os
import re

# Without remotes/VERSION nor ONEISCSI_ONE_VERSION we assume the newest line; the
# input readers accept every version's shape anyway.
LATEST = (7, 0, 0)
DEFAULT_REMOTES = "/var/lib/one/remotes"


def parse(text: str):
    """'6.0.3' -> (6, 0, 3); '6.8' -> (6, 8, 0); '5.12.0.4' -> (5, 12, 0); else None."""
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def full(version) -> tuple:
    """Any (major, minor[, patch...]) tuple as (major, minor, patch); (6, 0) is 6.0.0."""
    v = tuple(int(x) for x in version)[:3]
    return v + (0,) * (3 - len(v))


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
    """(major, minor, patch) from ONEISCSI_ONE_VERSION, else <remotes>/VERSION, else LATEST."""
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
    """Version-dependent formats. Sources (OpenNebula/one):

    * error text: src/mad/ruby/CommandManager.rb `GenericCommand#get_error_message`
      keeps only the ERROR MESSAGE block up to release-6.0.2 and the whole stderr
      (newlines as spaces) from release-6.0.3 to 6.10.5; release-7.0.0+
      src/mad/ruby/DriverExecHelper.rb `get_info_from_execution` glues the stderr
      lines that are not `LEVEL:` lines and sends `LEVEL:` lines as LOG messages.
    * cp: src/image/ImageManagerProtocol.cc `ImageManager::_cp` reads `SOURCE FORMAT`
      and fails without FORMAT from release-6.0.0; 4.x/5.x
      (src/image/ImageManagerDriver.cc `cp_action`) read the first word.
    * clone: `ImageManager::_clone` stores the whole reply as SOURCE from release-6.0.0
      to release-6.4.1 (`image->set_source(msg->payload())`); from release-6.4.2 it
      reads SOURCE and an optional FORMAT.
    """

    def __init__(self, version):
        self.version = full(version)

    @property
    def cp_prints_format(self) -> bool:  # `SOURCE FORMAT` from 6.0.0 (ImageManager::_cp)
        return self.version >= (6, 0, 0)

    @property
    def clone_prints_format(self) -> bool:  # whole reply = SOURCE in 6.0.0-6.4.1 (ImageManager::_clone)
        return self.version >= (6, 4, 2)

    @property
    def error_block(self) -> bool:  # ERROR MESSAGE markers up to 6.0.2 (get_error_message)
        return self.version < (6, 0, 3)

    @property
    def stderr_logs(self) -> bool:
        """INFO/WARN/DEBUG lines on stderr only where oned does not glue them into the
        error text: 6.0.3 to 6.10.x take the whole stderr as the error (see log.py)."""
        return not ((6, 0, 3) <= self.version < (7, 0, 0))

    @property
    def fs_element(self) -> str:
        return "FS" if self.version >= (6, 0, 0) else "FSTYPE"

    def __str__(self):
        return "%d.%d.%d" % self.version
