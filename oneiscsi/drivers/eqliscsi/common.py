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
from oneiscsi.san import parse

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


def clone_name(volume: str, vmid, disk_id=None) -> str:
    """The per-VM clone of a CLONE=YES disk: `<volume>-<vmid>`, or `<volume>-<vmid>-<disk id>`
    (the name a second DISK of the same image in one VM gets)."""
    vid = validate.number(str(vmid), "VM ID", 0, 10 ** 10)
    suffix = "-%d" % vid
    if disk_id is not None:
        suffix += "-%d" % validate.number(str(disk_id), "DISK_ID", 0, 10 ** 6)
    return cli.volume(cli.volume(volume)[: MAX_NAME - len(suffix)] + suffix)


def connections(info: dict) -> int:
    """The group's count of iSCSI connections to a volume (`Connections: N`)."""
    m = re.match(r"\d+", parse.field(info, "connections") or "0")
    return int(m.group(0)) if m else 0


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


def volume_of_iqn(iqn: str) -> str:
    """The volume name in an EqualLogic target IQN ('' for any other target)."""
    try:
        return _from_iqn(iqn, "IQN")
    except Invalid:
        return ""


def _from_iqn(iqn: str, what: str) -> str:
    m = _EQL_IQN.match(iqn)
    if not m:
        raise Invalid("%s %s is refused: not an EqualLogic volume IQN" % (what, validate.show(iqn)))
    return cli.volume(m.group(1).lower(), what)


def volume_lock(group, volume: str, wait: float):
    """Exclusive lock on one volume of one group, across processes of this frontend (hold it
    while changing it). `group`: a san.client.Group, keyed by its identity (one key whatever
    name or address a datastore uses for the group)."""
    key = group.identity
    return locks.lock("eql-volume-%s-%s" % (key, volume.lower()), wait,
                      "volume %s on group %s" % (volume, group.address))


# ---- what the TM actions share: the volume of a VM disk, its settings, host access ------
MiB = 1024 * 1024
HOST_ACCESS_MODES = ("none", "ipaddress", "initiator")


class _DiskAsImage:
    """config.load's image layer from a DISK: oned copies image attributes into the DISK when
    INHERIT_IMAGE_ATTR lists them, so per-image EQL_* settings reach the TM actions too."""

    def __init__(self, disk):
        self.disk = disk

    def tpl(self, key):
        from oneiscsi import config
        return self.disk[key] if key in config.IMAGE_KEYS else ""


def disk_config(remotes: str, datastore, disk):
    from oneiscsi import config
    return config.load(remotes, datastore, _DiskAsImage(disk) if disk is not None else None)


def host_access_mode(cfg, datastore) -> str:
    """EQL_HOST_ACCESS: none (default) | ipaddress | initiator."""
    mode = (cfg["EQL_HOST_ACCESS"] or "none").strip().lower()
    if mode not in HOST_ACCESS_MODES:
        raise Invalid("EQL_HOST_ACCESS %s is refused: use %s" % (validate.show(mode), " or ".join(HOST_ACCESS_MODES)))
    return mode


class HostSettings:
    """How hosts log in to volumes of one datastore: CHAP, iface, device base, wait bound, NO_ISCSI."""

    def __init__(self, cfg):
        from oneiscsi.host.iscsi import Chap
        iface = (cfg["EQL_IFACE"] or "").strip()
        self.iface = None if iface in ("", "default") else iface
        self.base = (cfg["EQL_BASE_DEVICE"] or "/dev/eql").strip()
        # EQL_WAIT_TIME was the seed's pause; here it bounds the wait for the disk (at least 30 s)
        self.wait = max(30, validate.number((cfg["EQL_WAIT_TIME"] or "1").strip(), "EQL_WAIT_TIME", 0, 3600))
        self.chap = Chap(cfg.chap_user, cfg.chap_password()) if cfg.chap_user else None
        self.no_iscsi = set((cfg["NO_ISCSI"] or "").split())
        host, port = cfg.portal()
        self.portal = validate.format_portal(host, port)

    @property
    def key(self):
        return (self.iface, self.base, self.wait, self.chap.user if self.chap else "", self.portal)
