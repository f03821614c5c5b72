"""Frontend-side records of where oneiscsi logged each eqliscsi volume in, and which host
access records it added for it.

oned never calls an image driver's failmigrate under a shared/ssh system datastore, so a
failed live migration leaves the destination logged in. These records let the next `ln`,
`mv` or `premigrate` of the volume log out such stray sessions on hosts that are not the
VM's, and let `oneiscsi.pyz reconcile` compare them with what the VMs need.

One JSON file per (group, volume) in ONEISCSI_STATE_DIR, else ~/.cache/oneiscsi/attachments:

    {"group": "10.0.0.5", "volume": "disk.7", "iqn": "iqn...", "dsid": 110,
     "hosts": {"host1": {"vmid": 42, "record": ["ipaddress", "10.0.0.11"]}}}

`record` is the access record oneiscsi added for that host (absent with EQL_HOST_ACCESS=none).
The records are a hint, never the truth: every use tolerates a missing or stale one.
Initiator names learnt from hosts (EQL_HOST_ACCESS=initiator) are cached in `initiators/`.
"""
from __future__ import annotations

import json
import os
import time

from oneiscsi import locks, log


def state_dir() -> str:
    d = os.environ.get("ONEISCSI_STATE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "oneiscsi")
    path = os.path.join(d, "attachments")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def _path(group: str, volume: str) -> str:
    return os.path.join(state_dir(), locks.file_name("%s-%s" % (group, volume)) + ".json")


def load(group: str, volume: str) -> dict:
    try:
        with open(_path(group, volume), encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict) and isinstance(data.get("hosts"), dict):
            return data
    except (OSError, ValueError):
        pass
    return {"group": group, "volume": volume, "iqn": "", "dsid": None, "hosts": {}}


def _save(data: dict) -> None:
    path = _path(data["group"], data["volume"])
    if not data["hosts"]:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, sort_keys=True)
    os.replace(tmp, path)


def _update(group: str, volume: str, change) -> None:
    try:
        with locks.lock("eql-attach-%s-%s" % (group, volume), 30, "attachment record of %s" % volume):
            data = load(group, volume)
            change(data)
            _save(data)
    except (OSError, locks.LockTimeout) as e:  # a hint only: never fail an action for it
        log.warn("cannot update the attachment record of volume %s: %s" % (volume, e))


def attached(group, volume, host, iqn, vmid=None, dsid=None, record=None) -> None:
    def change(data):
        data["iqn"] = iqn or data.get("iqn", "")
        if dsid is not None:
            data["dsid"] = int(dsid)
        entry = {"vmid": vmid, "t": int(time.time())}
        old = data["hosts"].get(host) or {}
        rec = record if record is not None else old.get("record")
        if rec:
            entry["record"] = list(rec)
        data["hosts"][host] = entry
    _update(group, volume, change)


def detached(group, volume, host) -> None:
    _update(group, volume, lambda data: data["hosts"].pop(host, None))


def hosts(group, volume) -> dict:
    """{host: entry} where the volume was last seen logged in."""
    return dict(load(group, volume)["hosts"])


def every() -> list:
    """All records (for reconcile)."""
    out = []
    d = state_dir()
    for name in sorted(os.listdir(d)):
        if name.endswith(".json"):
            try:
                with open(os.path.join(d, name), encoding="utf-8") as f:
                    data = json.load(f)
                if isinstance(data, dict) and isinstance(data.get("hosts"), dict):
                    out.append(data)
            except (OSError, ValueError):
                continue
    return out


# ---- initiator names of hosts (EQL_HOST_ACCESS=initiator) -------------------------------
def _initiator_path(host: str) -> str:
    d = os.path.join(state_dir(), "initiators")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return os.path.join(d, locks.file_name(host))


def cached_initiator(host: str) -> str:
    try:
        with open(_initiator_path(host), encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def cache_initiator(host: str, name: str) -> None:
    try:
        with open(_initiator_path(host), "w", encoding="utf-8") as f:
            f.write(name + "\n")
    except OSError as e:
        log.warn("cannot cache the initiator name of %s: %s" % (host, e))
