"""Initiator names of hosts (EQL_HOST_ACCESS=initiator), cached on the frontend for speed.

The cache is only a cache: losing it (another frontend of an HA zone, a wiped folder) costs one
ssh round trip to the host, never a different decision. It lives in ONEISCSI_STATE_DIR
(default ~oneadmin/.cache/oneiscsi)/initiators, one file per host.
"""
from __future__ import annotations

import os

from oneiscsi import locks, log


def _dir() -> str:
    d = os.environ.get("ONEISCSI_STATE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "oneiscsi")
    path = os.path.join(d, "initiators")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def _path(host: str) -> str:
    return os.path.join(_dir(), locks.file_name(host))


def cached(host: str) -> str:
    try:
        with open(_path(host), encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def _store(host: str, name: str) -> None:
    try:
        tmp = "%s.%d.tmp" % (_path(host), os.getpid())
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(name + "\n")
        os.replace(tmp, _path(host))
    except OSError as e:
        log.warn("cannot cache the initiator name of %s: %s" % (host, e))


def learn(host: str) -> str:
    """Read the host's InitiatorName over ssh (one round trip; through `sudo -n cat` where the
    file is root-only, as on Debian) and cache it."""
    from oneiscsi.host import iscsi as hostiscsi
    from oneiscsi.san import cli
    name = cli.initiator(hostiscsi.initiator_name(host), "InitiatorName of host %s" % host)
    _store(host, name)
    return name


def of(host: str) -> str:
    return cached(host) or learn(host)
