"""What the eqliscsi DS and TM actions share: volume names, SOURCE forms, per-volume locks.

Volume names (equallogic-and-peers.md 1.4): the image NAME cleaned (lower case;
blanks, '_' and '.' become '-'; other characters outside a-z 0-9 '-' too;
accents folded to ASCII) + '.' + the image id, cut so that it and a per-VM clone
`<volume>-<vmid>` fit the group's 64 characters. The id makes the name unique and
stable for the image's life (renaming the image does not rename the volume).
"""
from __future__ import annotations

import re
import unicodedata

from oneiscsi import locks, validate
from oneiscsi.errors import Invalid
from oneiscsi.san import cli

MAX_NAME = 64
VMID_ROOM = 11  # "-" + a VM id of up to 10 digits
SNAP_PREFIX = "one-snap-"
_EQL_IQN = re.compile(r"^iqn\.2001-05\.com\.equallogic:\d+-[0-9a-f]+-[0-9a-f]+-[0-9a-f]+-(.+)$", re.IGNORECASE)


def clean_name(name: str) -> str:
    text = unicodedata.normalize("NFKD", str(name or "")).encode("ascii", "ignore").decode().lower()
    text = re.sub(r"[^a-z0-9]+", "-", text)
    return re.sub(r"-{2,}", "-", text).strip("-")


def volume_name(image_name: str, image_id) -> str:
    """`<cleaned NAME>.<id>`, at most 64 - VMID_ROOM characters."""
    iid = validate.number(str(image_id), "image ID", 0, 10 ** 10)
    suffix = ".%d" % iid
    base = clean_name(image_name)[: MAX_NAME - VMID_ROOM - len(suffix)].strip("-") or "image"
    return cli.volume(base + suffix)


def clone_name(volume: str, vmid) -> str:
    """The per-VM clone of a non-persistent image: `<volume>-<vmid>`."""
    vid = validate.number(str(vmid), "VM ID", 0, 10 ** 10)
    suffix = "-%d" % vid
    return cli.volume(cli.volume(volume)[: MAX_NAME - len(suffix)] + suffix)


def snapshot_name(snap_id) -> str:
    """The group snapshot that stands for OpenNebula image snapshot `snap_id`."""
    sid = validate.number(str(snap_id), "snapshot ID", 0, 10 ** 9)
    return cli.snapshot("%s%d" % (SNAP_PREFIX, sid))


def snapshot_id(name: str):
    """The OpenNebula snapshot id of a group snapshot name, or None for other snapshots."""
    m = re.fullmatch(re.escape(SNAP_PREFIX) + r"(\d+)", name or "")
    return int(m.group(1)) if m else None


def parse_source(source: str, what: str = "SOURCE") -> str:
    """SOURCE -> volume name. Forms: `volume`, `host:volume` and the old `host:iqn...`
    (the seed add-on's), also a bare EqualLogic IQN."""
    src = (source or "").strip()
    if not src:
        raise Invalid("%s is empty: it should name the image's EqualLogic volume" % what)
    validate.reject_dangerous(src, what)
    if src.lower().startswith("iqn."):
        return _from_iqn(src, what)
    host, sep, rest = src.partition(":")
    if sep and not rest.lower().startswith("iqn."):
        try:
            validate.hostname(host, what)
        except Invalid:
            return cli.volume(src, what)  # a volume name holding ':'
        return cli.volume(rest, what)
    if sep:
        return _from_iqn(rest, what)
    return cli.volume(src, what)


def _from_iqn(iqn: str, what: str) -> str:
    m = _EQL_IQN.match(iqn)
    if not m:
        raise Invalid("%s %s is refused: not an EqualLogic volume IQN" % (what, validate.show(iqn)))
    return cli.volume(m.group(1).lower(), what)


def volume_lock(group_address: str, volume: str, wait: float):
    """Exclusive lock on one volume of one group, across processes (hold it while changing it)."""
    return locks.lock("eql-volume-%s-%s" % (group_address, volume), wait,
                      "volume %s on group %s" % (volume, group_address))
