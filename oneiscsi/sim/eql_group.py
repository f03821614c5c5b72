"""State of a simulated EqualLogic PS group: pools, volumes, snapshots, access
records and CHAP users, optionally mirrored onto a real tgtd.

One ``Group`` is shared by every CLI session of a simulator; every method takes
the group lock.  Errors are ``CliError(message)``; the CLI prints them as
``% Error - <message>``.  Tests may call the methods directly to set up state.

Space model (simplified, documented so tests can compute expectations):
- a thick volume uses its size;
- a thin volume uses max(thin-min-reserve % of its size, its written data), where
  written data is the allocated size of its sparse backing file (0 without tgtd);
- a snapshot uses SNAPSHOT_SPACE_PCT % of the volume size it captured.
``FreeSpace`` = pool capacity - everything above.  An operation that would need
more than the free space fails with "Not enough free space in pool ...".

With a ``Tgtd`` every online volume (and online snapshot) is a tgtd target named
by its IQN, LUN 1 backed by a sparse file in ``<workdir>/volumes``.  Access
records become tgtd bindings (initiator -> initiator-name; ipaddress ``*.*.*.*`` ->
ALL, ``10.1.2.*`` -> 10.1.2.0/24, exact -> address; username with authmethod chap
-> a CHAP account bound with the password of that ``chapuser``, or an unguessable
one when no such user exists).  tgtd cannot express everything a group can:
its ACL entries are OR-ed (a record giving both initiator and ipaddress binds only
the initiator), and CHAP is per target (one chap record makes every initiator of
that volume use CHAP).  ``multihost-access disable`` is recorded, not enforced.
"""
from __future__ import annotations

import functools
import ipaddress
import math
import os
import re
import secrets
import string
import subprocess
import threading
import time

VOLUME_NAME_RE = re.compile(r"^[A-Za-z0-9.:-]{1,64}$")
SNAPSHOT_NAME_RE = re.compile(r"^[A-Za-z0-9.:-]{1,127}$")
CHAP_NAME_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,63}$")
SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)(m|mb|g|gb|t|tb)?$", re.IGNORECASE)
IQN_PREFIX = "iqn.2001-05.com.equallogic:0-8a0906-"
SNAPSHOT_SPACE_PCT = 10
DEFAULT_THIN_MIN_RESERVE = 10
MAX_ACCESS_RECORDS = 16
LUN = 1
LUN_PARAMS = {"vendor_id": "EQLOGIC", "product_id": "100E-00"}


class CliError(Exception):
    """A group CLI error; str() is the message after '% Error - '."""


def parse_size(text) -> int:
    """'100' (MB), '100MB', '10G', '1.5TB' -> MB (rounded up); CliError when invalid."""
    if isinstance(text, int):
        mb = text
    else:
        m = SIZE_RE.match(str(text).strip())
        if not m:
            raise CliError("Invalid size '%s'." % text)
        unit = (m.group(2) or "mb")[0].lower()
        mb = math.ceil(float(m.group(1)) * {"m": 1, "g": 1024, "t": 1024 * 1024}[unit])
    if mb < 1:
        raise CliError("Invalid size '%s'." % text)
    return mb


def format_size(mb: int, in_mb: bool = False) -> str:
    """MB -> '500MB', '10GB', '1.50GB', '2TB' (decimals truncated, never rounded up)."""
    if in_mb or mb < 1024:
        return "%dMB" % mb
    for unit, scale in (("TB", 1024 * 1024), ("GB", 1024)):
        if mb >= scale:
            if mb % scale == 0:
                return "%d%s" % (mb // scale, unit)
            return "%.2f%s" % (math.floor(mb * 100 / scale) / 100, unit)
    return "%dMB" % mb


def check_name(name, kind="volume"):
    rule = SNAPSHOT_NAME_RE if kind == "snapshot" else VOLUME_NAME_RE
    if not rule.match(name or ""):
        limit = 127 if kind == "snapshot" else 64
        raise CliError("Invalid %s name '%s'. Use 1-%d characters: letters, digits, "
                       "period, hyphen and colon." % (kind, name, limit))


def ip_pattern_to_acl(pattern):
    """EqualLogic ipaddress pattern -> tgtd ACL entry ('ALL', CIDR or address)."""
    parts = pattern.split(".")
    if len(parts) != 4:
        raise CliError("Invalid IP address '%s'." % pattern)
    stars = [p == "*" for p in parts]
    n = stars.index(True) if True in stars else 4
    if any(not s for s in stars[n:]) or not all(p.isdigit() and int(p) < 256 for p in parts[:n]):
        raise CliError("Invalid IP address '%s'." % pattern)
    if n == 0:
        return "ALL"
    if n == 4:
        return str(ipaddress.ip_address(pattern))
    return "%s/%d" % (".".join(parts[:n] + ["0"] * (4 - n)), 8 * n)


def _random_password(n=16):
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _locked(fn):
    @functools.wraps(fn)
    def wrapper(self, *a, **kw):
        with self.lock:
            return fn(self, *a, **kw)
    return wrapper


class Pool:
    def __init__(self, name, capacity_mb):
        self.name, self.capacity_mb = name, capacity_mb


class Access:
    def __init__(self, id, initiator=None, ipaddress=None, username=None, authmethod="none",
                 apply_to="both"):
        self.id, self.initiator, self.ipaddress = id, initiator, ipaddress
        self.username, self.authmethod, self.apply_to = username, authmethod, apply_to

    def applies_to(self, kind):
        return self.apply_to in (kind, "both")


class Snapshot:
    kind = "snapshot"

    def __init__(self, name, volume, size_mb, description, iqn, backing):
        self.name, self.volume, self.size_mb = name, volume, size_mb
        self.description, self.iqn, self.backing = description, iqn, backing
        self.online = False
        self.created = time.time()


class Volume:
    kind = "volume"

    def __init__(self, name, size_mb, pool, thin, thin_min_reserve, description, iqn, backing):
        self.name, self.size_mb, self.pool = name, size_mb, pool
        self.thin, self.thin_min_reserve = thin, thin_min_reserve
        self.description, self.iqn, self.backing = description, iqn, backing
        self.online = True
        self.multihost = False
        self.cloned_from = ""
        self.access = []            # [Access]
        self.snapshots = {}         # name -> Snapshot, creation order

    def space_mb(self):
        if not self.thin:
            return self.size_mb
        reserve = math.ceil(self.size_mb * self.thin_min_reserve / 100)
        written = 0
        if self.backing and os.path.exists(self.backing):
            written = math.ceil(os.stat(self.backing).st_blocks * 512 / 1024 ** 2)
        return min(self.size_mb, max(reserve, written))


def snapshot_space_mb(size_mb):
    return math.ceil(size_mb * SNAPSHOT_SPACE_PCT / 100)


class Group:
    """The group's state; see the module docstring for the space and tgtd models."""

    def __init__(self, name="group-0", ip="127.0.0.1", pools=None, workdir=None, tgtd=None):
        self.name, self.ip, self.tgtd = name, ip, tgtd
        self.lock = threading.RLock()
        pools = pools if pools is not None else {"default": 2 * 1024 * 1024}
        self.pools = {n: Pool(n, parse_size(c)) for n, c in pools.items()}
        self.volumes = {}           # name -> Volume
        self.chapusers = {}         # name -> password
        self._snap_seq = 0
        # detail views (volume/pool/snapshot show) print field names "hyphen"
        # (`Multihost-access:`) or "camel" (`MultiHostAccess:`), as firmware versions may
        self.field_spelling = "hyphen"
        self._blind_secret = _random_password(24)   # CHAP secret for unknown users
        self.voldir = None          # backing files exist only with a tgtd
        if tgtd is not None:
            if not workdir:
                raise ValueError("a Group with a Tgtd needs a workdir")
            self.voldir = os.path.join(workdir, "volumes")
            os.makedirs(self.voldir, exist_ok=True)

    # ------------------------------------------------------------- queries
    def default_pool(self):
        return "default" if "default" in self.pools else next(iter(self.pools))

    def pool(self, name):
        if name not in self.pools:
            raise CliError("Pool '%s' does not exist." % name)
        return self.pools[name]

    def volume(self, name):
        if name not in self.volumes:
            raise CliError("Volume '%s' does not exist." % name)
        return self.volumes[name]

    def snapshot(self, vol, snap):
        v = self.volume(vol)
        if snap not in v.snapshots:
            raise CliError("Snapshot '%s' does not exist." % snap)
        return v.snapshots[snap]

    @_locked
    def pool_usage(self, name) -> dict:
        """{'total','free','volume_reserve','snapshot_reserve','reported','volumes','snapshots'} in MB."""
        pool = self.pool(name)
        vols = [v for v in self.volumes.values() if v.pool == name]
        vres = sum(v.space_mb() for v in vols)
        sres = sum(snapshot_space_mb(s.size_mb) for v in vols for s in v.snapshots.values())
        return {"total": pool.capacity_mb, "free": pool.capacity_mb - vres - sres,
                "volume_reserve": vres, "snapshot_reserve": sres,
                "reported": sum(v.size_mb for v in vols), "volumes": len(vols),
                "snapshots": sum(len(v.snapshots) for v in vols)}

    def free_mb(self, pool) -> int:
        return self.pool_usage(pool)["free"]

    def connections(self) -> dict:
        """iqn -> number of logged-in iSCSI sessions (empty without tgtd)."""
        if self.tgtd is None:
            return {}
        return {iqn: t["sessions"] for iqn, t in self.tgtd.targets().items()}

    def _need_space(self, pool, mb):
        if mb > self.pool_usage(pool)["free"]:
            raise CliError("Not enough free space in pool '%s' for this operation." % pool)

    def _new_iqn(self, name):
        return "%s%s-%s-%s" % (IQN_PREFIX, secrets.token_hex(5)[:9], secrets.token_hex(8),
                               name.lower())

    def _new_backing(self, iqn):
        if self.voldir is None:
            return None
        return os.path.join(self.voldir, iqn.split(":", 1)[1][:35] + ".img")

    def _name_free(self, name):
        if name in self.volumes:
            raise CliError("Volume name '%s' already exists." % name)

    # ------------------------------------------------------------- volumes
    @_locked
    def create_volume(self, name, size, pool=None, thin=False,
                      thin_min_reserve=DEFAULT_THIN_MIN_RESERVE, description="", online=True,
                      unrestricted=False, _source=None) -> Volume:
        check_name(name)
        self._name_free(name)
        size_mb = parse_size(size)
        pool = pool or self.default_pool()
        self.pool(pool)
        if not 0 <= thin_min_reserve <= 100:
            raise CliError("Invalid thin-min-reserve '%s%%'." % thin_min_reserve)
        _check_description(description)
        iqn = self._new_iqn(name)
        v = Volume(name, size_mb, pool, thin, thin_min_reserve, description, iqn,
                   self._new_backing(iqn))
        need = math.ceil(size_mb * thin_min_reserve / 100) if thin else size_mb
        self._need_space(pool, need)
        if v.backing:
            if _source:
                _copy(_source, v.backing)
            with open(v.backing, "ab"):
                pass
            os.truncate(v.backing, size_mb * 1024 * 1024)
        v.online = online
        self.volumes[name] = v
        if unrestricted:
            v.access.append(Access(1, ipaddress="*.*.*.*"))
        self._sync(v)
        return v

    @_locked
    def delete_volume(self, name):
        v = self.volume(name)
        if v.online:
            raise CliError("Volume is online. Take the volume offline before deleting.")
        for s in list(v.snapshots.values()):
            self._drop_snapshot(v, s)
        del self.volumes[name]
        self._sync(v)
        _unlink(v.backing)

    @_locked
    def rename_volume(self, old, new):
        v = self.volume(old)
        check_name(new)
        self._name_free(new)
        del self.volumes[old]
        v.name = new        # like a group, the iSCSI target name does not change
        self.volumes[new] = v

    @_locked
    def set_online(self, name, online):
        v = self.volume(name)
        v.online = online
        self._sync(v)

    @_locked
    def set_multihost(self, name, enabled):
        self.volume(name).multihost = enabled

    @_locked
    def set_description(self, name, text):
        _check_description(text)
        self.volume(name).description = text

    @_locked
    def resize_volume(self, name, size, snap=True):
        """Grow a volume; without snap=False a snapshot is taken first, as a group does."""
        v = self.volume(name)
        size_mb = parse_size(size)
        if size_mb <= v.size_mb:
            raise CliError("New size must be larger than the current volume size %s."
                           % format_size(v.size_mb))
        grow = 0 if v.thin else size_mb - v.size_mb
        self._need_space(v.pool, grow + (snapshot_space_mb(v.size_mb) if snap else 0))
        if snap:
            self.create_snapshot(name, "Snapshot before resize")
        v.size_mb = size_mb
        if v.backing:
            if self.tgtd is not None and v.online:
                self.tgtd.resize_lun(v.iqn, size_mb * 1024 * 1024)
            else:
                os.truncate(v.backing, size_mb * 1024 * 1024)

    @_locked
    def clone_volume(self, src, new, description="", online=True, unrestricted=False) -> Volume:
        s = self.volume(src)
        v = self.create_volume(new, s.size_mb, s.pool, s.thin, s.thin_min_reserve, description,
                               online, unrestricted, _source=s.backing)
        v.cloned_from = src
        return v

    # ------------------------------------------------------- access records
    @_locked
    def add_access(self, name, initiator=None, ipaddress=None, username=None, authmethod=None,
                   apply_to="both") -> int:
        v = self.volume(name)
        if not (initiator or ipaddress or username):
            raise CliError("Specify an initiator, ipaddress or username for the access record.")
        if ipaddress:
            ip_pattern_to_acl(ipaddress)
        if username and not CHAP_NAME_RE.match(username):
            raise CliError("Invalid CHAP user name '%s'." % username)
        if initiator and not re.match(r"^[A-Za-z0-9.:_-]{1,223}$", initiator):
            raise CliError("Invalid initiator name '%s'." % initiator)
        authmethod = authmethod or ("chap" if username else "none")
        if authmethod not in ("chap", "none"):
            raise CliError("Invalid authmethod '%s'." % authmethod)
        if authmethod == "chap" and not username:
            raise CliError("authmethod chap needs a username.")
        if apply_to not in ("volume", "snapshot", "both"):
            raise CliError("Invalid apply-to '%s'." % apply_to)
        if len(v.access) >= MAX_ACCESS_RECORDS:
            raise CliError("Maximum number of access control records reached for this volume.")
        used = {a.id for a in v.access}
        rid = next(i for i in range(1, len(used) + 2) if i not in used)
        v.access.append(Access(rid, initiator, ipaddress, username, authmethod, apply_to))
        v.access.sort(key=lambda a: a.id)
        self._sync_volume_and_snapshots(v)
        return rid

    @_locked
    def delete_access(self, name, rid):
        v = self.volume(name)
        for a in v.access:
            if str(a.id) == str(rid):
                v.access.remove(a)
                self._sync_volume_and_snapshots(v)
                return
        raise CliError("Access control record '%s' does not exist." % rid)

    # ------------------------------------------------------------ snapshots
    @_locked
    def create_snapshot(self, vol, description="") -> Snapshot:
        v = self.volume(vol)
        _check_description(description)
        self._need_space(v.pool, snapshot_space_mb(v.size_mb))
        self._snap_seq += 1
        name = "%s-%s.%d" % (v.name, time.strftime("%Y-%m-%d-%H:%M:%S"), self._snap_seq)
        iqn = self._new_iqn(name)
        s = Snapshot(name, v, v.size_mb, description, iqn, self._new_backing(iqn))
        if s.backing:
            _copy(v.backing, s.backing)
        v.snapshots[name] = s
        return s

    @_locked
    def delete_snapshot(self, vol, snap):
        v = self.volume(vol)
        self._drop_snapshot(v, self.snapshot(vol, snap))

    def _drop_snapshot(self, v, s):
        del v.snapshots[s.name]
        s.online = False
        self._sync(s)
        _unlink(s.backing)

    @_locked
    def rename_snapshot(self, vol, old, new):
        v = self.volume(vol)
        s = self.snapshot(vol, old)
        check_name(new, "snapshot")
        if new in v.snapshots:
            raise CliError("Snapshot name '%s' already exists." % new)
        del v.snapshots[old]
        s.name = new
        v.snapshots[new] = s

    @_locked
    def set_snapshot_online(self, vol, snap, online):
        s = self.snapshot(vol, snap)
        s.online = online
        self._sync(s)

    @_locked
    def clone_snapshot(self, vol, snap, new, description="", online=True,
                       unrestricted=False) -> Volume:
        v = self.volume(vol)
        s = self.snapshot(vol, snap)
        c = self.create_volume(new, s.size_mb, v.pool, v.thin, v.thin_min_reserve, description,
                               online, unrestricted, _source=s.backing)
        c.cloned_from = "%s/%s" % (vol, snap)
        return c

    @_locked
    def restore_snapshot(self, vol, snap):
        """Restore needs the volume offline; like a group, the current data is kept
        first as a new snapshot."""
        v = self.volume(vol)
        s = self.snapshot(vol, snap)
        if v.online:
            raise CliError("Volume '%s' is online. Take the volume offline before "
                           "restoring a snapshot." % vol)
        self.create_snapshot(vol, "Snapshot before restore of %s" % snap)
        v.size_mb = s.size_mb
        if v.backing:
            _copy(s.backing, v.backing)

    # ------------------------------------------------------------ CHAP users
    @_locked
    def create_chapuser(self, name, password=None) -> str:
        if not CHAP_NAME_RE.match(name or ""):
            raise CliError("Invalid CHAP user name '%s'." % name)
        if name in self.chapusers:
            raise CliError("CHAP user '%s' already exists." % name)
        if password is not None and not re.match(r"^[!-~]{1,255}$", password):
            raise CliError("Invalid CHAP password.")
        self.chapusers[name] = password if password is not None else _random_password()
        self._sync_chap_user(name)
        return self.chapusers[name]

    @_locked
    def chap_password(self, name):
        if name not in self.chapusers:
            raise CliError("CHAP user '%s' does not exist." % name)
        return self.chapusers[name]

    @_locked
    def delete_chapuser(self, name):
        self.chap_password(name)
        del self.chapusers[name]
        self._sync_chap_user(name)

    # ------------------------------------------------------------------ tgtd
    def _sync_chap_user(self, user):
        for v in self.volumes.values():
            if any(a.username == user for a in v.access):
                self._sync_volume_and_snapshots(v)

    def _sync_volume_and_snapshots(self, v):
        self._sync(v)
        for s in v.snapshots.values():
            self._sync(s)

    def _sync(self, obj):
        """Make tgtd match obj (a Volume or Snapshot): target present iff online and
        existing, its ACL and CHAP accounts as its access records say."""
        if self.tgtd is None:
            return
        vol = obj.volume if obj.kind == "snapshot" else obj
        alive = (vol.name in self.volumes and self.volumes[vol.name] is vol
                 and (obj.kind == "volume" or obj.name in vol.snapshots))
        cur = self.tgtd.targets().get(obj.iqn)
        if not (alive and obj.online):
            if cur is not None:
                self.tgtd.delete_target(obj.iqn)
            return
        if cur is None:
            params = dict(LUN_PARAMS, scsi_sn=obj.iqn.split("-")[4])
            self.tgtd.add_target(obj.iqn, obj.backing, lun=LUN, params=params)
            cur = {"acl": [], "accounts": []}
        acl, users = set(), {}
        for a in vol.access:
            if not a.applies_to(obj.kind):
                continue
            acl.add(a.initiator or (ip_pattern_to_acl(a.ipaddress) if a.ipaddress else "ALL"))
            if a.authmethod == "chap":
                users[a.username] = self.chapusers.get(a.username, self._blind_secret)
        for entry in set(cur["acl"]) - acl:
            self.tgtd.unbind(obj.iqn, **_acl_kw(entry))
        for entry in acl - set(cur["acl"]):
            self.tgtd.bind(obj.iqn, **_acl_kw(entry))
        for user in set(cur["accounts"]) - set(users):
            self.tgtd.clear_chap(obj.iqn, user)
        for user, password in users.items():
            self.tgtd.set_chap(obj.iqn, user, password)

    @_locked
    def teardown(self):
        """Remove every target this group put on tgtd (the backing files stay)."""
        if self.tgtd is None:
            return
        for v in self.volumes.values():
            for obj in [v] + list(v.snapshots.values()):
                self.tgtd.delete_target(obj.iqn)


def _acl_kw(entry):
    if entry == "ALL" or re.match(r"^[0-9.]+(/\d+)?$", entry):
        return {"address": entry}
    return {"initiator": entry}


def _check_description(text):
    if len(text or "") > 127 or any(ord(c) < 32 for c in text or ""):
        raise CliError("Invalid description: use at most 127 printable characters.")


def _copy(src, dst):
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", src, dst], check=True,
                   capture_output=True)


def _unlink(path):
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
