"""The eqliscsi transfer actions: VM disks are EqualLogic volumes logged in on the hosts.

Which volume a disk uses follows oned, never a DISK attribute the VM owner wrote
(opennebula-semantics.md section 1; src/image/Image.cc `Image::disk_attribute` and
src/tm/TransferManager.cc, release-6.10.5): oned runs `clone` for CLONE=YES and `ln` for
CLONE=NO, so `clone` always makes a per-VM clone and `ln` always uses the image's own volume
(a disk whose CLONE contradicts the action is refused). Other actions read CLONE; without it
the image's PERSISTENT, TYPE and PERSISTENT_TYPE from oned (one.image.info) decide.
A user-written PERSISTENT=YES next to a non-persistent image changes nothing.

Per-VM clones: `<volume>-<vmid>`, or `<volume>-<vmid>-<diskid>` when the VM has that image
twice; a clone is the disk's only when its description says "OpenNebula VM <vmid> disk <id>:
clone of <volume>". Nothing else is ever deleted or taken offline by a VM action; the image's
own volume (CLONE=NO) is never deleted, whatever called delete.

Shared volumes (IMMUTABLE, CDROM, SHAREABLE; usage.py): a host session to a volume is released
only when no other VM on that host uses it (else only `disk.<id>` goes); READONLY disks are
attached read-only on the host (`blockdev --setro`). Shared system datastores (usage.py
`shared_vm_dir`): postmigrate and failmigrate never remove the `disk.<id>` link the other host's
VM uses.

clone     SAN clone (multihost and EQL_SECURITY_ACCESS as at cp), attach, link; a clone with our
          description is reused (a re-run, another frontend).
ln        attach the image's volume, link.
mv        by the VM's LCM state (include/VirtualMachine.h):
          EPILOG_STOP/EPILOG_UNDEPLOY (10, 30, failures 41, 42): release on the source only;
          PROLOG_RESUME/PROLOG_UNDEPLOY (9, 31, failures 49, 50): attach on the destination;
          PROLOG_MIGRATE* (8, 43, 45, 60 = after a host failure, failures 38, 44, 46, 61):
          release on the source best-effort (a dead source never blocks recovery), then attach;
          any other state: the same as a migration when the hosts differ.
mvds      release; 4.x SAVE_AS: SAN clone to the new image's volume once oned's image record
          confirms SAVE_AS_SOURCE; a per-VM clone is then deleted.
cpds      oned's order `host:path SOURCE snap_id vmid dsid`: SAN clone of the live volume
          (snap_id -1) or of snapshot `one-snap-<snap_id>`.
delete    VM directory: `rm -rf` on the host. Disk: release; the per-VM clone of a CLONE=YES disk
          is deleted once no host is logged in to it (stray sessions on the VM's earlier hosts are
          logged out first). Already gone = success; an unreachable host is a warning.
resize    SAN grow (skipped when already that big), then a rescan on the host.
snap_create_live: snap_create of a running VM, guest filesystems frozen around it (below).
snap_create / snap_delete / snap_revert: group snapshots `one-snap-<id>`; revert takes the
          volume offline, so it is refused for volumes other VMs use or may use (READONLY,
          SHAREABLE, other users in oned).
premigrate / postmigrate / failmigrate: migrate.py.

Sessions: a CLI slot (one of EQL_MAX_SESSIONS) is held only while talking to the group, never
across an ssh host step; an undo opens a new session. Every action takes the volumes' locks
(on this frontend) and the host scripts a flock per target (on the host); decisions about
other users come from oned and the group, so any frontend of an HA zone can run any step
(README, "HA frontends"). Stray sessions (a failed live migration: oned never calls an image
driver's failmigrate) are looked for on the VM's earlier hosts when the group counts more
connections than the users in oned explain.

Access. EQL_MULTIHOST (default enable) is applied on attach; it is enabled while two hosts use
the volume (premigrate, shared images) and set back when one is left. EQL_HOST_ACCESS adds a
per-host access record on attach and removes it when the host's last user leaves:
  none       (default) nothing: volumes keep EQL_SECURITY_ACCESS or `unrestricted` (the seed);
  ipaddress  a record for the host's IPv4 address as the frontend resolves its name;
  initiator  a record for the host's InitiatorName (read over ssh, cached);
with `authmethod chap username EQL_CHAP_USER` when EQL_CHAP_USER is set. Records that
EQL_SECURITY_ACCESS lists are never removed.
"""
from __future__ import annotations

import contextlib
import ipaddress
import re
import socket

from oneiscsi import log, validate
from oneiscsi.drivers.eqliscsi import common, initiators, usage
from oneiscsi.errors import Failure, Invalid, NotSupported
from oneiscsi.san import parse
from oneiscsi.one.action import disk_id, host_path, int_arg
from oneiscsi.one.version import remotes_dir

DRIVER = "eqliscsi"
MiB = common.MiB

# LCM_STATE values (OpenNebula include/VirtualMachine.h)
PROLOG_MIGRATE, PROLOG_RESUME, EPILOG_STOP = 8, 9, 10
EPILOG_UNDEPLOY, PROLOG_UNDEPLOY = 30, 31
PROLOG_MIGRATE_FAILURE, EPILOG_STOP_FAILURE, EPILOG_UNDEPLOY_FAILURE = 38, 41, 42
PROLOG_MIGRATE_POWEROFF, PROLOG_MIGRATE_POWEROFF_FAILURE = 43, 44
PROLOG_MIGRATE_SUSPEND, PROLOG_MIGRATE_SUSPEND_FAILURE = 45, 46
PROLOG_RESUME_FAILURE, PROLOG_UNDEPLOY_FAILURE = 49, 50
PROLOG_MIGRATE_UNKNOWN, PROLOG_MIGRATE_UNKNOWN_FAILURE = 60, 61
DISK_RESIZE_UNDEPLOYED = 64
LEAVING = {EPILOG_STOP, EPILOG_UNDEPLOY, EPILOG_STOP_FAILURE, EPILOG_UNDEPLOY_FAILURE}
ARRIVING = {PROLOG_RESUME, PROLOG_UNDEPLOY, PROLOG_RESUME_FAILURE, PROLOG_UNDEPLOY_FAILURE}
MOVING = {PROLOG_MIGRATE, PROLOG_MIGRATE_FAILURE, PROLOG_MIGRATE_POWEROFF, PROLOG_MIGRATE_POWEROFF_FAILURE,
          PROLOG_MIGRATE_SUSPEND, PROLOG_MIGRATE_SUSPEND_FAILURE, PROLOG_MIGRATE_UNKNOWN,
          PROLOG_MIGRATE_UNKNOWN_FAILURE}
CDROM = "1"   # image TYPE (include/Image.h)


# ---- one disk ---------------------------------------------------------------------------
def uses_clone(call, disk, action: str, image_id) -> bool:
    """Does this DISK use a per-VM clone? The action oned ran decides for clone/ln
    (TransferManager::prolog_transfer_command: CLONE=YES -> clone, else ln), CLONE for the
    others; without CLONE, the image in oned (one.image.info)."""
    did = disk.disk_id
    clone = disk["CLONE"].upper()
    if action == "clone":
        if clone == "NO":
            raise Invalid("disk %s has CLONE=NO: oned runs ln for it, never clone; refused" % did)
        return True
    if action == "ln":
        if clone == "YES":
            raise Invalid("disk %s has CLONE=YES: oned runs clone for it, never ln; refused (the image's own "
                          "volume is not given to a non-persistent disk)" % did)
        return False
    if clone in ("YES", "NO"):
        return clone == "YES"
    if image_id is None:
        raise Failure("disk %s has neither CLONE nor IMAGE_ID: cannot tell which volume it uses" % did)
    image = call.one.image(image_id)
    shared = image["TYPE"] == CDROM or image.tpl("PERSISTENT_TYPE").upper() == "IMMUTABLE"
    return not (image.persistent or shared)


class Target:
    """One eqliscsi disk of a VM: its volume, settings and (after `resolve`) IQN and size."""

    def __init__(self, call, disk, vmid: int, link: str = "", action: str = "", vm=None):
        self.disk, self.vmid, self.did = disk, int(vmid), disk.disk_id
        self.vm = vm if vm is not None else call.one.vm(vmid)
        self.source = common.parse_source(disk["SOURCE"], "SOURCE of disk %s" % self.did)
        iid = disk["IMAGE_ID"]
        self.image_id = validate.number(iid, "IMAGE_ID of disk %s" % self.did, 0, 2 ** 31) if iid else None
        self.clone = uses_clone(call, disk, action, self.image_id)
        self.readonly = disk["READONLY"].upper() in ("YES", "1", "TRUE")
        self.shareable = disk["SHAREABLE"].upper() == "YES"
        self.names = [common.clone_name(self.source, vmid), common.clone_name(self.source, vmid, self.did)] \
            if self.clone else [self.source]
        self.volume = self.names[0]
        self.dsid = validate.number(disk["DATASTORE_ID"], "DATASTORE_ID of disk %s" % self.did, 0, 2 ** 31)
        self.datastore = call.one.datastore(self.dsid)
        self.cfg = common.disk_config(remotes_dir(call.argv0), self.datastore, disk)
        self.group = self.cfg.group()
        self.hs = common.HostSettings(self.cfg)
        self.mode = common.host_access_mode(self.cfg, self.datastore)
        self.link = validate.safe_path(link, "disk path") if link else ""
        self.users = usage.Users(call.one, self)
        self.iqn, self.size, self.multihost, self.info, self.record = "", None, None, None, None
        self.other = ""     # another VM disk using this volume on the host at hand (its session stays)
        self.absent = []    # candidate names with no volume at all on the group (after resolve)

    @property
    def clone_description(self) -> str:
        from oneiscsi.san import cli
        return cli.clean_description("OpenNebula VM %d disk %s: clone of %s" % (self.vmid, self.did, self.source))

    def volume_for(self, link=None, logout=True):
        from oneiscsi.host.iscsi import Volume
        return Volume(self.hs.portal, self.iqn, self.volume, link if link is not None else self.link or None,
                      self.size, readonly=self.readonly, logout=logout)

    def __repr__(self):
        return "<disk %s of VM %d: %s>" % (self.did, self.vmid, self.volume)


def target_of(call, vmid, path: str, action: str = "") -> Target:
    """The Target of the `.../disk.<id>` path of VM vmid (VM read from oned)."""
    did = disk_id(path)
    if did is None:
        raise Invalid("%s is not a disk path (<system_dir>/disk.<id>)" % validate.show(path))
    vm = call.one.vm(vmid)
    disk = vm.disk(did)
    if disk is None:
        raise Failure("VM %s has no DISK with DISK_ID %s" % (vmid, did))
    if disk.tm_mad and disk.tm_mad != DRIVER:
        raise Failure("disk %s of VM %s uses TM_MAD %s, not %s" % (did, vmid, disk.tm_mad, DRIVER))
    return Target(call, disk, vmid, path, action, vm)


def _host(value: str, what: str) -> str:
    return validate.hostname(value, what)


# ---- SAN steps -------------------------------------------------------------------------------
def _read(s, t: Target, info) -> None:
    t.info, t.iqn = info, info["iqn"]
    try:
        t.size = parse.size_mb(info.get("Size", "")) * MiB
    except parse.ParseError:
        t.size = None
    t.multihost = parse.field(info, "multihost access").lower().startswith("enable")


def resolve(s, t: Target, must=True) -> bool:
    """Find the disk's volume on the group (a clone: the candidate name whose description is
    this disk's); read IQN, size, multihost. False (or Failure when `must`) if it is gone."""
    t.absent = []
    for name in t.names:
        info = s.volume_info(name)
        if info is None:
            t.absent.append(name)      # no volume of that name at all (foreign ones are not "gone")
            continue
        if t.clone and parse.field(info, "description") != t.clone_description:
            log.info("volume %s is not the clone of disk %s of VM %d (description %r)"
                     % (name, t.did, t.vmid, parse.field(info, "description")))
            continue
        t.volume = name
        _read(s, t, info)
        return True
    t.iqn, t.info = "", None
    if must:
        what = "the clone of %s" % t.source if t.clone else "volume %s" % t.source
        raise Failure("%s (disk %s of VM %d) does not exist on EqualLogic group %s"
                      % (what, t.did, t.vmid, t.group.address))
    return False


def make_clone(s, t: Target, undo) -> None:
    """The per-VM clone of a CLONE=YES disk: reused when it exists and is ours."""
    from oneiscsi.san import client
    # one look at every candidate name: ours is reused, else the first free one is taken (two
    # looks would let another frontend's clone, made in between, look like a foreign volume)
    infos = [(n, s.volume_info(n)) for n in t.names]
    for name, info in infos:
        if info is not None and parse.field(info, "description") == t.clone_description:
            t.volume = name
            _read(s, t, info)
            log.info("clone %s exists already (a re-run, or another frontend): reused" % t.volume)
            return
    free = [n for n, info in infos if info is None]
    if not free:
        raise Failure("volumes %s exist but none is the clone oneiscsi makes for disk %s of VM %d: left alone"
                      % (" and ".join(t.names), t.did, t.vmid))
    t.volume = free[0]
    try:
        s.clone_volume(t.source, t.volume, t.clone_description, unrestricted=not t.cfg.access)
    except client.TransportError as e:
        if not (e.unsure and resolve(s, t, must=False)):
            raise
        log.info("the connection broke during the clone, which the group did")
    except client.CliError:
        if not resolve(s, t, must=False):      # another frontend made it meanwhile (HA)
            raise
        log.info("clone %s was made meanwhile by another action: reused" % t.volume)
        return
    undo.san(t, "delete clone %s" % t.volume, lambda s, t=t: delete_clone(s, t))
    log.info("cloned %s to %s" % (t.source, t.volume))
    s.set_multihost(t.volume, t.cfg.multihost)
    for rec in t.cfg.access:
        s.add_access(t.volume, rec)
    resolve(s, t)


def delete_clone(s, t: Target) -> bool:
    """Delete the disk's per-VM clone: only a clone with this disk's description and no iSCSI
    connection (another frontend's re-run may use it). True when deleted or gone."""
    if not t.clone:
        return False
    if not resolve(s, t, must=False):
        log.info("the per-VM clone of disk %s is gone already" % t.did)
        return True
    n = common.connections(t.info)
    if n:
        log.warn("per-VM clone %s has %d iSCSI connection(s): not deleted" % (t.volume, n))
        return False
    if s.delete_volume(t.volume):
        log.info("deleted the per-VM clone %s" % t.volume)
    return True


def _key(words):
    d = dict(zip(words[0::2], words[1::2]))
    return ("initiator", d["initiator"]) if "initiator" in d else ("ipaddress", d.get("ipaddress", ""))


def _matches(row, words) -> bool:
    kind, value = _key(words)
    if kind == "initiator":
        return row.get("initiator", "") == value
    return not row.get("initiator") and row.get("ipaddress", "") == value


def is_static(cfg, words) -> bool:
    return any(_key(rec) == _key(words) for rec in cfg.access)


def add_host_record(s, t: Target, words, undo) -> None:
    if not words or any(_matches(r, words) for r in s.access_records(t.volume)):
        return
    rid = s.add_access(t.volume, tuple(words))
    log.info("access record %s for %s added to %s" % (rid, " ".join(words[:2]), t.volume))
    undo.san(t, "access record %s of %s" % (rid, t.volume), lambda s, t=t, rid=rid: s.delete_access(t.volume, rid))


def remove_host_record(s, t: Target, words) -> None:
    if not words or is_static(t.cfg, words):
        return
    for r in s.access_records(t.volume):
        if _matches(r, words):
            s.delete_access(t.volume, r["id"])
            log.info("access record %s (%s) removed from %s" % (r["id"], " ".join(words[:2]), t.volume))


# ---- undo -------------------------------------------------------------------------------------
class Undo:
    """What an action did, undone in reverse on failure: SAN steps (run in a new CLI session:
    no slot is held across host steps) and host steps."""

    def __init__(self):
        self.steps = []

    def san(self, t, what, fn):
        self.steps.append(("san", t.group, what, fn))

    def host(self, what, fn):
        self.steps.append(("host", None, what, fn))

    def run(self) -> str:
        from oneiscsi.san import client
        failed = []
        with contextlib.ExitStack() as stack:
            sessions = {}
            for kind, group, what, fn in reversed(self.steps):
                try:
                    if kind == "host":
                        fn()
                    else:
                        if group.address not in sessions:
                            sessions[group.address] = stack.enter_context(client.session(group))
                        fn(sessions[group.address])
                except Exception as e:  # keep undoing the rest
                    log.error("undo of %s failed: %s" % (what, e))
                    failed.append(what)
        self.steps = []
        return "; could NOT undo: %s" % ", ".join(failed) if failed else ""


def _reraise(e: BaseException, suffix: str):
    if suffix and isinstance(e, Failure):
        err = Failure(str(e) + suffix)
        err.exit_code = e.exit_code
        raise err from None
    if suffix:
        log.error(suffix.lstrip("; "))
    raise e


# ---- host access records ----------------------------------------------------------------------
def host_record(t: Target, host: str):
    """The access record words EQL_HOST_ACCESS wants for `host` (None for `none`)."""
    from oneiscsi.san import cli
    if t.mode == "none":
        return None
    chap = ("authmethod", "chap", "username", t.cfg.chap_user) if t.cfg.chap_user else ()
    if t.mode == "ipaddress":
        return ("ipaddress", cli.ip_pattern(_ipv4(host), "address of host %s" % host)) + chap
    name = initiators.of(host)
    return ("initiator", cli.initiator(name, "InitiatorName of host %s" % host)) + chap


def _ipv4(host: str) -> str:
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET)
    except OSError as e:
        raise Failure("EQL_HOST_ACCESS=ipaddress: cannot resolve host %s on the frontend: %s" % (host, e)) from None
    return infos[0][4][0]


# ---- locks and sessions over several disks ------------------------------------------------------
@contextlib.contextmanager
def locked(targets):
    """The volume locks of `targets` (every candidate name, sorted: no deadlock)."""
    with contextlib.ExitStack() as stack:
        wanted = {(t.group.identity, n.lower()): (t.group, n, t.cfg.lock_wait) for t in targets for n in t.names}
        for key in sorted(wanted):
            stack.enter_context(common.volume_lock(*wanted[key]))
        yield


@contextlib.contextmanager
def san(targets):
    """One CLI session per group of `targets`: {group address: session}. Hold it only while
    talking to the group."""
    from oneiscsi.san import client
    with contextlib.ExitStack() as stack:
        sessions = {}
        for t in targets:
            if t.group.address not in sessions:
                sessions[t.group.address] = stack.enter_context(client.session(t.group))
        yield sessions


def by_settings(targets) -> list:
    """Batches for the host steps: one per set of host settings, each volume once per batch
    (two DISKs of one shared image use one volume: the second gets its own round trip)."""
    batches = []
    for t in targets:
        for b in batches:
            if b[0].hs.key == t.hs.key and all(not usage.same_volume(x.volume, t.volume) for x in b):
                b.append(t)
                break
        else:
            batches.append([t])
    return batches


# ---- bringing disks to a host, taking them away -------------------------------------------------
def stray_hosts(t: Target, host: str, keep) -> list:
    """Hosts of the VM's history where the volume may still be logged in for nothing: only
    looked for when the group counts more connections than the users in oned explain."""
    cands = [h for h in usage.history_hosts(t.vm) if h not in keep and h != host and h not in t.hs.no_iscsi]
    if not cands or t.info is None:
        return []
    expected = t.users.hosts() | (set(keep) - {host})
    if common.connections(t.info) <= len(expected):
        return []
    return [h for h in cands if not t.users.on(h)]


def logout_strays(per_host: dict) -> None:
    """{host: [Target]}: log these volumes out there (a holder on the host keeps a session)."""
    from oneiscsi.host import iscsi as hostiscsi
    for h, items in sorted(per_host.items()):
        log.warn("volume(s) %s may be logged in on host %s, where no VM uses them (a failed live migration?): "
                 "logging out there" % (", ".join(t.volume for t in items), h))
        try:
            hostiscsi.logout_strays(h, [t.iqn for t in items if t.iqn])
        except Failure as e:
            log.warn("stray sessions on host %s stay: %s" % (h, e))


def bring(host: str, targets: list, keep, clone=False, multihost=False, shared_dir=False) -> dict:
    """Make `targets` usable on `host`: (clone,) multihost, access record, strays out, attach in
    one ssh round trip, links. Undone on failure (links the other host uses excepted when the
    VM folder is shared). -> {volume: device}"""
    from oneiscsi.host import iscsi as hostiscsi
    host = _host(host, "destination host")
    targets = [t for t in targets if host not in t.hs.no_iscsi]
    if not targets:
        log.info("host %s is in NO_ISCSI: nothing to attach there" % host)
        return {}
    devices = {}
    undo = Undo()
    for t in targets:
        t.record = host_record(t, host)     # may read the host's initiator name: before any CLI slot
    with locked(targets):
        try:
            with san(targets) as sessions:
                for t in targets:
                    s = sessions[t.group.address]
                    if clone and t.clone:
                        make_clone(s, t, undo)
                    else:
                        resolve(s, t)
                    want = multihost or bool(t.users.hosts(enough=2) - {host}) or t.cfg.multihost
                    if t.multihost != want:
                        s.set_multihost(t.volume, want)
                        if want:
                            undo.san(t, "multihost of %s" % t.volume,
                                     lambda s, t=t: s.set_multihost(t.volume, False))
                    add_host_record(s, t, t.record, undo)
            per_host = {}
            for t in targets:
                for h in stray_hosts(t, host, keep):
                    per_host.setdefault(h, []).append(t)
            logout_strays(per_host)
            for t in targets:
                t.other = t.users.on(host)     # its session is not ours to take back
            for group in by_settings(targets):
                hs = group[0].hs
                try:
                    devices.update(hostiscsi.attach(host, [t.volume_for() for t in group], hs.chap, hs.iface,
                                                    hs.base, hs.wait))
                except hostiscsi.HostFailure as e:
                    devices.update(e.devices)
                    raise
                finally:
                    done = [t for t in group if t.volume in devices]
                    if done:
                        undo.host("login of %s on %s" % (", ".join(t.volume for t in done), host),
                                  lambda done=done: _undo_attach(host, done, shared_dir))
        except BaseException as e:
            _reraise(e, undo.run())
    for t in targets:
        log.info("disk %s of VM %d: %s on %s -> %s" % (t.did, t.vmid, t.volume, host, devices.get(t.volume, "?")))
    return devices


def _undo_attach(host, targets, shared_dir):
    """Take back logins this action made: sessions another VM on the host uses stay, and so
    does a link in a shared VM folder (the source host's VM uses it)."""
    _detach(host, targets, keep_link=shared_dir)


def release(host: str, targets: list, best_effort=False, stay_host="", after=None, keep_link=False) -> None:
    """Take `targets` off `host`: the session goes when no other VM on the host uses the volume
    (else only the link), then the host's access record; multihost goes back to EQL_MULTIHOST
    once at most one host is left (`stay_host`: where this VM keeps the volume, if anywhere).
    `after(sessions)` runs in the closing SAN session. With best_effort an unreachable host or a
    failed detach is a warning."""
    host = _host(host, "host")
    with locked(targets):
        with san(targets) as sessions:
            for t in targets:
                if not resolve(sessions[t.group.address], t, must=False):
                    log.info("the volume of disk %s of VM %d does not exist (any more)" % (t.did, t.vmid))
        for t in targets:
            t.other = t.users.on(host) if t.iqn else ""
            if t.other:
                log.info("%s stays logged in on %s: %s uses it" % (t.volume, host, t.other))
        on_host = [t for t in targets if host not in t.hs.no_iscsi and t.iqn]
        if on_host:
            try:
                _detach(host, on_host, keep_link=keep_link)
            except Failure as e:
                if not best_effort:
                    raise
                log.warn("detaching on %s failed (continuing: %s)" % (host, e))
        gone = [t for t in targets if host not in t.hs.no_iscsi and not t.iqn]
        if gone:
            _logout_gone(host, gone)
        todo = [t for t in targets if t.iqn and not t.other]
        if after is None and not any(t.mode != "none" or t.multihost != t.cfg.multihost for t in todo):
            return
        for t in todo:
            try:
                t.record = host_record(t, host)     # may read the host's initiator name: before any CLI slot
            except Failure as e:
                t.record = None
                log.warn("the access record of host %s on %s stays: %s" % (host, t.volume, e))
        with san(targets) as sessions:
            for t in todo:
                s = sessions[t.group.address]
                remove_host_record(s, t, t.record)
                left = t.users.hosts(enough=2) | ({stay_host} if stay_host else set())
                if len(left) <= 1 and t.multihost != t.cfg.multihost:
                    s.set_multihost(t.volume, t.cfg.multihost)
            if after is not None:
                after(sessions)


def _logout_gone(host, targets) -> None:
    """Volumes gone from the group (deleted elsewhere, a re-run): log out what the host still
    has of them, found by the volume name in its sessions' IQNs (one round trip, best effort)."""
    from oneiscsi.host import iscsi as hostiscsi
    try:
        names = [n for t in targets for n in t.absent]
        if not names:
            return
        iqns = [iqn for _, iqn in hostiscsi.sessions(host)
                if any(usage.same_volume(common.volume_of_iqn(iqn), n) for n in names)]
        if iqns:
            log.warn("host %s is still logged in to %s, gone from the group: logging out" % (host, ", ".join(iqns)))
            hostiscsi.logout_strays(host, iqns)
    except Failure as e:
        log.warn("sessions of deleted volumes on %s stay: %s" % (host, e))


def _detach(host, targets, keep_link=False):
    """Host side of a release: logout (or only the link, for volumes another VM on the host uses)."""
    from oneiscsi.host import iscsi as hostiscsi
    for group in by_settings([t for t in targets if t.iqn]):
        hs = group[0].hs
        vols = [t.volume_for(link="" if keep_link else None, logout=not t.other) for t in group]
        vols = [v for v in vols if v.logout or v.link]
        if vols:
            hostiscsi.detach(host, vols, hs.iface, True, hs.base)


# ---- actions ----------------------------------------------------------------------------------
def _args(call, n, usage_text):
    if len(call.args) < n:
        raise Invalid("%s needs %s, got %d arguments" % (call.action, usage_text, len(call.args)))
    return call.args


def tm_ln(call, clone=False):
    a = _args(call, 3, "SOURCE HOST:PATH VMID [DSID]")
    host, path = host_path(a[1])
    t = target_of(call, int_arg(a[2], "VMID"), path, "clone" if clone else "ln")
    bring(host, [t], keep={host}, clone=clone)


def tm_clone(call):
    tm_ln(call, clone=True)


def tm_mv(call):
    a = _args(call, 3, "SRC_HOST:PATH DST_HOST:PATH VMID [DSID]")
    src, src_path = host_path(a[0])
    dst, dst_path = host_path(a[1])
    if disk_id(dst_path) is None:
        log.info("the VM directory moves with the system datastore's driver: nothing to do here")
        return
    vmid = int_arg(a[2], "VMID")
    t = target_of(call, vmid, dst_path)
    state = t.vm.lcm_state
    known = state in LEAVING | ARRIVING | MOVING
    if not known and src == dst:
        log.info("source and destination are both %s in LCM state %d: nothing to move" % (src, state))
        return
    if state in LEAVING or state in MOVING or not known:
        t.link = validate.safe_path(src_path, "source disk path")
        release(src, [t], best_effort=state not in LEAVING)
    if state in ARRIVING or state in MOVING or not known:
        t.link = validate.safe_path(dst_path, "disk path")
        bring(dst, [t], keep={dst})


def _save_as_source(call, t: Target) -> str:
    """4.x SAVE_AS: the new image's volume, only when oned's image record confirms it (a VM
    owner can write SAVE_AS_SOURCE in the DISK)."""
    written = t.disk["SAVE_AS_SOURCE"]
    if not written:
        return ""
    iid = t.disk["SAVE_AS"]
    if not iid.isdigit():
        raise Invalid("disk %s has SAVE_AS_SOURCE %s but no SAVE_AS image id: refused"
                      % (t.did, validate.show(written)))
    image = call.one.image(int(iid))
    new = common.parse_source(written, "SAVE_AS_SOURCE")
    if not image["SOURCE"] or not usage.same_volume(common.parse_source(image["SOURCE"], "SOURCE of image %s" % iid),
                                                    new):
        raise Invalid("disk %s: SAVE_AS_SOURCE %s is not the SOURCE of image %s in oned (%s): refused"
                      % (t.did, validate.show(written), iid, validate.show(image["SOURCE"])))
    return new


def tm_mvds(call):
    a = _args(call, 3, "HOST:PATH SOURCE VMID [DSID]")
    host, path = host_path(a[0])
    vmid = int_arg(a[2], "VMID")
    t = target_of(call, vmid, path)
    new = _save_as_source(call, t)

    def after(sessions):
        s = sessions[t.group.address]
        if new and t.iqn:
            _copy_volume(s, t, new, None, "OpenNebula image saved from VM %d disk %s" % (vmid, t.did))
        if t.clone:
            delete_clone(s, t)
    release(host, [t], after=after if new or t.clone else None)
    _drop_backup_snapshots(t)


def _drop_backup_snapshots(t: Target) -> None:
    """A VM that ends (EPILOG, not stop/undeploy: it never backs up again) leaves no backup
    reference snapshot on a volume that outlives it (its image's, a shared one); a clone's go with
    the clone. Looked at only when the group counts snapshots on the volume."""
    if t.clone or t.info is None or t.vm.lcm_state in LEAVING:
        return
    if not re.match(r"[1-9]", parse.field(t.info, "snapshots", "0").strip() or "0"):
        return
    from oneiscsi.drivers.eqliscsi import backup
    from oneiscsi.san import client
    try:
        with locked([t]), client.session(t.group) as s:
            for name in backup.backup_snapshots(s, t, t.vmid).values():
                s.delete_snapshot(t.volume, name)
                log.info("removed backup reference %s of %s: VM %d is gone" % (name, t.volume, t.vmid))
    except Failure as e:
        log.warn("backup reference snapshots of VM %d stay on %s: %s" % (t.vmid, t.volume, e))


def _copy_volume(s, t: Target, new: str, snap, description: str) -> None:
    """SAN clone of t's volume (or of its snapshot `snap`) to `new`; idempotent; a failure
    deletes `new` only when this call made it."""
    from oneiscsi.san import cli, client
    description = cli.clean_description(description)
    if any(usage.same_volume(new, n) for n in t.names + [t.source]):
        raise Invalid("the new image's volume %s is the disk's own volume" % new)
    info = s.volume_info(new)
    if info is not None:
        if parse.field(info, "description") == description:
            log.info("volume %s exists already (a re-run): kept" % new)
            return
        raise Failure("volume %s exists already and was not made by this save-as: left alone" % new)
    made = False
    try:
        try:
            if snap is None:
                s.clone_volume(t.volume, new, description, unrestricted=not t.cfg.access)
            else:
                s.clone_snapshot(t.volume, snap, new, description, unrestricted=not t.cfg.access)
            made = True
        except client.TransportError as e:
            info = s.volume_info(new) if e.unsure else None
            if info is None or parse.field(info, "description") != description:
                raise
            made = True
        s.set_multihost(new, t.cfg.multihost)
        for rec in t.cfg.access:
            s.add_access(new, rec)
    except BaseException as e:
        suffix = ""
        if made:
            try:
                s.delete_volume(new)
                suffix = "; volume %s deleted" % new
            except Exception as e2:
                suffix = "; volume %s could NOT be deleted (%s)" % (new, e2)
        _reraise(e, suffix)
    log.info("saved %s%s to volume %s" % (t.volume, " snapshot " + snap if snap else "", new))


def tm_cpds(call):
    from oneiscsi.san import client
    a = _args(call, 4, "HOST:PATH NEW_SOURCE SNAP_ID VMID [DSID]")
    _, path = host_path(a[0])
    if len(a) >= 5:
        snap_id, vmid = int_arg(a[2], "SNAP_ID"), int_arg(a[3], "VMID")
    else:  # the seed's 4-argument shape: host:path new vmid dsid
        snap_id, vmid = -1, int_arg(a[2], "VMID")
    t = target_of(call, vmid, path)
    new = common.parse_source(a[1], "the new image's SOURCE")
    snap = common.snapshot_name(snap_id) if snap_id >= 0 else None
    if any(usage.same_volume(new, n) for n in t.names + [t.source]):
        raise Invalid("the new image's volume %s is the disk's own volume" % new)
    with locked([t]), common.volume_lock(t.group, new, t.cfg.lock_wait), client.session(t.group) as s:
        resolve(s, t)
        _copy_volume(s, t, new, snap, "OpenNebula image saved from VM %d disk %s" % (vmid, t.did))


def tm_delete(call):
    a = _args(call, 2, "HOST:PATH VMID [DSID]")
    host, path = host_path(a[0])
    vmid = int_arg(a[1], "VMID")
    if disk_id(path) is None:
        _remove_vm_dir(host, path, vmid)
        return
    try:
        t = target_of(call, vmid, path)
    except Failure as e:
        log.warn("cannot tell the volume of %s (%s): nothing deleted" % (path, e))
        return
    gone = []
    release(host, [t], after=(lambda sessions: gone.append(delete_clone(sessions[t.group.address], t)))
            if t.clone else None)
    if gone == [False]:
        _delete_busy_clone(host, t)
    _drop_backup_snapshots(t)


def _delete_busy_clone(host, t: Target) -> None:
    """The clone still has iSCSI connections after the detach: they are stray sessions on the
    VM's earlier hosts (nothing else uses a per-VM clone). Log them out, then delete."""
    from oneiscsi.san import client
    hosts = [h for h in usage.history_hosts(t.vm) if h != host and h not in t.hs.no_iscsi]
    logout_strays({h: [t] for h in hosts})
    with locked([t]), client.session(t.group) as s:
        if not delete_clone(s, t):
            raise Failure("per-VM clone %s of disk %s still has %d iSCSI connection(s) after the logout on %s: "
                          "not deleted; log it out where it is still used (oneiscsi.pyz reconcile lists it), "
                          "then run the action again" % (t.volume, t.did, common.connections(t.info),
                                                         ", ".join([host] + hosts)))


def _remove_vm_dir(host, path, vmid):
    from oneiscsi import host as hostrun
    path = validate.safe_path(path.rstrip("/"), "VM directory")
    if path.rsplit("/", 1)[-1] != str(vmid) or path.count("/") < 2:
        raise Invalid("%s is refused: a VM directory ends in /<VMID> (%d)" % (validate.show(path), vmid))
    host = _host(host, "host")
    res = hostrun.run(host, "rm -rf -- %s\n" % hostrun.q(path), timeout=300, what="VM directory removal")
    if hostrun.unreachable(res):
        log.warn("host %s is not reachable over ssh: VM directory %s left there" % (host, path))
    elif res.returncode != 0:
        raise Failure("host %s: cannot remove %s: %s" % (host, path, hostrun.last_line(res.stderr)))


def _refuse_shared(t: Target, doing: str) -> None:
    """Taking a volume offline or changing it under other VMs is refused for shared volumes."""
    if t.clone:
        return
    why = "it is READONLY" if t.readonly else "it is SHAREABLE" if t.shareable else ""
    if not why:
        others = t.users.hosts(enough=1)
        why = "other VMs use it (on %s)" % ", ".join(sorted(others)) if others else ""
    if why:
        raise Invalid("cannot %s of disk %s of VM %d: volume %s is shared and %s" % (doing, t.did, t.vmid, t.volume, why))


def tm_resize(call):
    from oneiscsi.san import client
    a = _args(call, 3, "HOST:PATH SIZE_MB VMID [DSID]")
    host, path = host_path(a[0])
    size_mb = int_arg(a[1], "SIZE")
    vmid = int_arg(a[2], "VMID")
    t = target_of(call, vmid, path)
    _refuse_shared(t, "resize")
    with locked([t]):
        with client.session(t.group) as s:
            resolve(s, t)
            if t.size is not None and t.size >= size_mb * MiB:
                log.info("volume %s has %d MB already" % (t.volume, t.size // MiB))
            else:
                s.grow_volume(t.volume, size_mb, snap=False)
                log.info("volume %s grown to %d MB" % (t.volume, size_mb))
            t.size = size_mb * MiB
        if t.vm.lcm_state == DISK_RESIZE_UNDEPLOYED or host in t.hs.no_iscsi:
            return
        from oneiscsi.host import iscsi as hostiscsi
        hostiscsi.rescan(_host(host, "host"), [t.volume_for()], t.hs.wait)


def _snap_target(call):
    a = _args(call, 3, "HOST:PATH SNAP_ID VMID [DSID]")
    host, path = host_path(a[0])
    sid = int_arg(a[1], "SNAP_ID")
    t = target_of(call, int_arg(a[2], "VMID"), path)
    return host, t, common.snapshot_name(sid)


def tm_snap_create(call):
    from oneiscsi.san import client
    host, t, snap = _snap_target(call)
    with locked([t]), client.session(t.group) as s:
        resolve(s, t)
        before = _snapshot_names(s, t, snap)
        if before is None:
            return
        _create_snapshot(s, t, snap, before)
    log.info("snapshot %s of %s created" % (snap, t.volume))


def _snapshot_names(s, t: Target, snap):
    """The names of the volume's snapshots, or None when `snap` is among them already."""
    before = {r["name"] for r in s.snapshots(t.volume)}
    if snap in before:
        log.info("snapshot %s of %s exists already" % (snap, t.volume))
        return None
    return before


def _create_snapshot(s, t: Target, snap, before, description="") -> None:
    """A group snapshot of t's volume named `snap`; a half-made one (made but not renamed, or a
    broken connection) is deleted again: only snapshots not in `before` go."""
    from oneiscsi.san import client
    made = None
    try:
        made = s.create_snapshot(t.volume, description or "OpenNebula VM %d disk %s snapshot" % (t.vmid, t.did))
        s.rename_snapshot(t.volume, made, snap)
    except BaseException as e:
        suffix = ""
        if made is not None or isinstance(e, client.TransportError):
            try:
                for extra in sorted({r["name"] for r in s.snapshots(t.volume)} - before):
                    s.delete_snapshot(t.volume, extra)
            except Exception as e2:
                suffix = "; a half-made snapshot of %s could NOT be deleted (%s)" % (t.volume, e2)
        _reraise(e, suffix)


def tm_snap_create_live(call):
    """snap_create on a RUNNING VM (one_vmm_exec.rb `disk_snapshot_create` runs it when
    LIVE_DISK_SNAPSHOTS lists kvm-eqliscsi; release-7.4.0): as snap_create, with the guest's
    filesystems frozen around the group snapshot and thawed on every path (host/freeze.py).
    Ceph's snap_create_live (src/tm_mad/ceph/snap_create_live, release-7.4.0) reads the VM
    (DEPLOY_ID, VM_MAD), runs `virsh domfsfreeze` and, when that fails, snapshots anyway
    (crash-consistent). Here too, unless the VM asks for the guest agent (FEATURES/GUEST_AGENT=yes,
    which gives the domain its qemu-ga channel): then a failed freeze means something is wrong in
    the guest, and no snapshot is taken. Only KVM VMs (Ceph freezes LXC with lxc-freeze)."""
    from oneiscsi.host import freeze
    from oneiscsi.san import client
    host, t, snap = _snap_target(call)
    host = _host(host, "host")
    vmm = t.vm.history[-1]["VM_MAD"] if t.vm.history else ""
    if vmm not in ("", "kvm", "qemu"):
        raise NotSupported("snap_create_live: live snapshots of eqliscsi disks are for KVM VMs (VM_MAD %s): "
                           "power the VM off and use snap_create" % validate.show(vmm))
    deploy_id = t.vm["DEPLOY_ID"]
    agent = t.vm["TEMPLATE/FEATURES/GUEST_AGENT"].lower() in ("yes", "true", "1")
    with locked([t]):
        with client.session(t.group) as s:
            resolve(s, t)
            if _snapshot_names(s, t, snap) is None:
                return
        with contextlib.ExitStack() as quiesced:
            try:
                quiesced.enter_context(freeze.frozen(host, deploy_id, "AGENT"))
            except Invalid:
                raise
            except Failure as e:
                if agent:
                    raise Failure("no snapshot of disk %s of VM %d taken: the VM has FEATURES/GUEST_AGENT=yes and %s"
                                  % (t.did, t.vmid, e)) from None
                log.warn("the guest of VM %d is not frozen (%s): the snapshot is crash-consistent, as Ceph's "
                         "snap_create_live takes it" % (t.vmid, e))
            with client.session(t.group) as s:   # a CLI slot only for the snapshot itself
                before = _snapshot_names(s, t, snap)
                if before is not None:
                    _create_snapshot(s, t, snap, before)
    log.info("snapshot %s of %s created (live)" % (snap, t.volume))


def tm_snap_delete(call):
    from oneiscsi.san import client
    host, t, snap = _snap_target(call)
    with locked([t]), client.session(t.group) as s:
        resolve(s, t)
        if not s.delete_snapshot(t.volume, snap):
            log.warn("snapshot %s of %s does not exist: nothing to delete" % (snap, t.volume))


def tm_snap_revert(call):
    """Revert needs the volume offline: detach, offline, restore, online, re-attach (the
    re-attach also runs on failure). Refused for volumes other VMs use."""
    from oneiscsi.drivers.eqliscsi.ds import revert
    from oneiscsi.host import iscsi as hostiscsi
    from oneiscsi.san import client
    host, t, snap = _snap_target(call)
    host = _host(host, "host")
    _refuse_shared(t, "revert a snapshot")
    on_host = host not in t.hs.no_iscsi
    with locked([t]):
        with client.session(t.group) as s:
            resolve(s, t)
        if on_host:
            _detach(host, [t])
        try:
            with client.session(t.group) as s:
                revert(s, t.volume, snap)
        finally:
            if on_host:
                with client.session(t.group) as s:
                    resolve(s, t)
                hostiscsi.attach(host, [t.volume_for()], t.hs.chap, t.hs.iface, t.hs.base, t.hs.wait)
    log.info("disk %s of VM %d reverted to %s" % (t.did, t.vmid, snap))


def _not_supported(what):
    def action(call):
        raise NotSupported("%s: not supported by eqliscsi: %s" % (call.action, what))
    return action


def _migrate(name):
    def action(call):
        from oneiscsi.drivers.eqliscsi import migrate
        return getattr(migrate, name)(call)
    return action


SYSTEM_DS = "eqliscsi is an image datastore driver; use a shared or ssh system datastore"
TM = {
    "clone": tm_clone,
    "ln": tm_ln,
    "mv": tm_mv,
    "mvds": tm_mvds,
    "cpds": tm_cpds,
    "delete": tm_delete,
    "resize": tm_resize,
    "snap_create": tm_snap_create,
    "snap_create_live": tm_snap_create_live,
    "snap_delete": tm_snap_delete,
    "snap_revert": tm_snap_revert,
    "premigrate": _migrate("premigrate"),
    "postmigrate": _migrate("postmigrate"),
    "failmigrate": _migrate("failmigrate"),
    "context": _not_supported(SYSTEM_DS),
    "mkimage": _not_supported(SYSTEM_DS),
    "mkswap": _not_supported(SYSTEM_DS),
    "monitor": _not_supported(SYSTEM_DS),
}
