"""The eqliscsi transfer actions: VM disks are EqualLogic volumes logged in on the hosts.

The volume of a disk: a persistent disk uses its image's volume (SOURCE); a non-persistent
one its per-VM clone `<volume>-<vmid>`. The disk path `<system_dir>/disk.<id>` on the host
is a symlink to the logged-in device (host/iscsi.py). The VM, its disks and datastores
come from oned (one read each); SOURCE comes from the VM's DISK, never from argv.

clone     SAN clone `<volume>-<vmid>` (multihost and EQL_SECURITY_ACCESS as at cp), attach,
          link. A clone that exists with our description is reused (a re-run).
ln        attach the image's volume, link.
mv        by the VM's LCM state (OpenNebula include/VirtualMachine.h):
          EPILOG_STOP/EPILOG_UNDEPLOY (10, 30, failures 41, 42): detach on the source only;
          PROLOG_RESUME/PROLOG_UNDEPLOY (9, 31, failures 49, 50): attach on the destination;
          PROLOG_MIGRATE* (8, 43, 45, 60 = after a host failure, failures 38, 44, 46, 61):
          detach on the source best-effort (a dead source never blocks recovery; its host
          access record is removed on the SAN, which fences it), then attach on the destination;
          any other state: the same as a migration when the hosts differ.
          Hosts listed in NO_ISCSI are skipped. The VM directory line is the system TM's.
mvds      detach (and drop the host's access record); 4.x SAVE_AS/SAVE_AS_SOURCE: SAN clone
          to the new image's volume; a non-persistent clone is then deleted.
cpds      oned's order `host:path SOURCE snap_id vmid dsid`: SAN clone of the live volume
          (snap_id -1) or of snapshot `one-snap-<snap_id>` to the new image's volume.
delete    VM directory: `rm -rf` of `<...>/<vmid>` on the host. Disk: detach, drop the host's
          access record, and delete the per-VM clone of a NON-persistent disk only; a persistent
          volume is never deleted, whatever path called delete. Already gone = success; a host
          that cannot be reached is a warning.
resize    SAN grow (skipped when the volume is already that big), then a rescan on the host.
snap_create / snap_delete / snap_revert
          group snapshots `one-snap-<id>`. Revert needs the volume offline: detach, offline,
          restore, online, re-attach (two ssh round trips; the re-attach also runs on failure).
premigrate / postmigrate / failmigrate: migrate.py.
context, mkimage, mkswap, monitor, snap_create_live: not supported (not a system datastore).

Access. EQL_MULTIHOST (default enable) is applied on attach; premigrate enables it while two
hosts use the volume, postmigrate/failmigrate set it back. EQL_HOST_ACCESS (datastore template
or eqliscsi.conf) adds a per-host access record on attach and removes it on detach:
  none       (default) nothing: volumes keep EQL_SECURITY_ACCESS or `unrestricted` (the seed);
  ipaddress  a record for the host's IPv4 address as the frontend resolves its name;
  initiator  a record for the host's InitiatorName (read over ssh once, then cached);
with `authmethod chap username EQL_CHAP_USER` when EQL_CHAP_USER is set. Records that
EQL_SECURITY_ACCESS lists are never removed.

Every action is idempotent, holds the volume's lock, uses one SAN CLI session (kept open over
the host step, so an undo needs no second one) and one ssh round trip per host it touches.
A failure undoes what the action itself did (a clone it made, a record it added, a login it
made) and nothing else. Stray sessions: before attaching, the volume is logged out on hosts
that attachments.py recorded and the VM does not use (oned never tells image drivers about a
failed live migration).
"""
from __future__ import annotations

import contextlib
import ipaddress
import re
import socket

from oneiscsi import log, validate
from oneiscsi.drivers.eqliscsi import attachments, common
from oneiscsi.errors import Failure, Invalid, NotSupported
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


# ---- one disk ---------------------------------------------------------------------------
class Target:
    """One eqliscsi disk of a VM: its volume, settings and (after `san_read`) IQN and size."""

    def __init__(self, call, disk, vmid: int, link: str = ""):
        self.disk, self.vmid, self.did = disk, int(vmid), disk.disk_id
        self.persistent = disk.persistent
        self.source = common.parse_source(disk["SOURCE"], "SOURCE of disk %s" % self.did)
        self.volume = common.disk_volume(disk, vmid)
        dsid = validate.number(disk["DATASTORE_ID"], "DATASTORE_ID of disk %s" % self.did, 0, 2 ** 31)
        self.dsid = dsid
        self.datastore = call.one.datastore(dsid)
        self.cfg = common.disk_config(remotes_dir(call.argv0), self.datastore, disk)
        self.group = self.cfg.group()
        self.hs = common.HostSettings(self.cfg)
        self.mode = common.host_access_mode(self.cfg, self.datastore)
        self.link = validate.safe_path(link, "disk path") if link else ""
        self.iqn, self.size, self.multihost = "", None, None

    @property
    def clone_description(self) -> str:
        from oneiscsi.san import cli
        return cli.clean_description("OpenNebula VM %d disk %s: clone of %s" % (self.vmid, self.did, self.source))

    def volume_for(self, link=None):
        from oneiscsi.host.iscsi import Volume
        return Volume(self.hs.portal, self.iqn, self.volume, link if link is not None else self.link or None,
                      self.size)

    def __repr__(self):
        return "<disk %s of VM %d: %s>" % (self.did, self.vmid, self.volume)


def target_of(call, vmid, path: str) -> Target:
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
    return Target(call, disk, vmid, path)


def _host(value: str, what: str) -> str:
    return validate.hostname(value, what)


# ---- SAN steps (inside one session) --------------------------------------------------------
def san_read(s, t: Target, must=True) -> bool:
    """IQN, size and multihost of t's volume; False (or Failure when `must`) if it is gone."""
    from oneiscsi.san import parse
    info = s.volume_info(t.volume)
    if info is None:
        if must:
            raise Failure("volume %s (disk %s of VM %d) does not exist on EqualLogic group %s"
                          % (t.volume, t.did, t.vmid, t.group.address))
        return False
    t.iqn = info["iqn"]
    try:
        t.size = parse.size_mb(info.get("Size", "")) * MiB
    except parse.ParseError:
        t.size = None
    mh = next((v for k, v in info.items() if k.lower() == "multihost-access"), "")
    t.multihost = mh.lower().startswith("enable")
    return True


def make_clone(s, t: Target, undo: list) -> None:
    """The per-VM clone of a non-persistent disk (reused when it exists and is ours)."""
    from oneiscsi.san import client
    info = s.volume_info(t.volume)
    if info is not None:
        if info.get("Description", "") != t.clone_description:
            raise Failure("volume %s exists but is not the clone oneiscsi makes for disk %s of VM %d "
                          "(description %r): left alone" % (t.volume, t.did, t.vmid, info.get("Description", "")))
        log.info("clone %s exists already (a re-run): reused" % t.volume)
        return
    unrestricted = not t.cfg.access
    try:
        s.clone_volume(t.source, t.volume, t.clone_description, unrestricted=unrestricted)
    except client.TransportError as e:
        info = s.volume_info(t.volume) if e.unsure else None
        if info is None or info.get("Description", "") != t.clone_description:
            raise
        log.info("the connection broke during the clone, which the group did")
    undo.append(("delete clone %s" % t.volume, lambda: s.delete_volume(t.volume)))
    log.info("cloned %s to %s" % (t.source, t.volume))
    s.set_multihost(t.volume, t.cfg.multihost)
    for rec in t.cfg.access:
        s.add_access(t.volume, rec)


def _is_static(t: Target, words) -> bool:
    return any(_key(rec) == _key(words) for rec in t.cfg.access)


def _key(words):
    d = dict(zip(words[0::2], words[1::2]))
    return ("initiator", d["initiator"]) if "initiator" in d else ("ipaddress", d.get("ipaddress", ""))


def _matches(row, words) -> bool:
    kind, value = _key(words)
    if kind == "initiator":
        return row.get("initiator", "") == value
    return not row.get("initiator") and row.get("ipaddress", "") == value


def add_host_record(s, t: Target, words, undo: list) -> None:
    if not words or any(_matches(r, words) for r in s.access_records(t.volume)):
        return
    rid = s.add_access(t.volume, tuple(words))
    log.info("access record %s for %s added to %s" % (rid, " ".join(words[:2]), t.volume))
    undo.append(("access record %s of %s" % (rid, t.volume), lambda: s.delete_access(t.volume, rid)))


def remove_host_record(s, t: Target, words) -> None:
    if not words or _is_static(t, words):
        return
    for r in s.access_records(t.volume):
        if _matches(r, words):
            s.delete_access(t.volume, r["id"])
            log.info("access record %s (%s) removed from %s" % (r["id"], " ".join(words[:2]), t.volume))


def run_undo(undo: list) -> str:
    """Undo steps in reverse; -> a suffix for the error message."""
    failed = []
    for what, fn in reversed(undo):
        try:
            fn()
        except Exception as e:  # keep undoing the rest
            log.error("undo of %s failed: %s" % (what, e))
            failed.append(what)
    undo.clear()
    return "; could NOT undo: %s" % ", ".join(failed) if failed else ""


def _reraise(e: BaseException, suffix: str):
    if suffix and isinstance(e, Failure):
        err = Failure(str(e) + suffix)
        err.exit_code = e.exit_code
        raise err from None
    raise e


# ---- host access records ----------------------------------------------------------------------
def host_record(t: Target, host: str, learn=True):
    """The access record words EQL_HOST_ACCESS wants for `host` (None for `none`)."""
    from oneiscsi.san import cli
    if t.mode == "none":
        return None
    chap = ("authmethod", "chap", "username", t.cfg.chap_user) if t.cfg.chap_user else ()
    if t.mode == "ipaddress":
        return ("ipaddress", cli.ip_pattern(_ipv4(host), "address of host %s" % host)) + chap
    name = attachments.cached_initiator(host)
    if not name and learn:
        name = learn_initiator(host)
    if not name:
        return None
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


def learn_initiator(host: str) -> str:
    from oneiscsi import host as hostrun
    res = hostrun.run(host, "cat /etc/iscsi/initiatorname.iscsi\n", timeout=60, what="initiator name")
    m = re.search(r"^\s*InitiatorName\s*=\s*(\S+)\s*$", res.stdout or "", re.M)
    if res.returncode != 0 or not m:
        raise Failure("EQL_HOST_ACCESS=initiator: cannot read /etc/iscsi/initiatorname.iscsi on host %s (%s)"
                      % (host, hostrun.last_line(res.stderr) or "exit %d" % res.returncode))
    from oneiscsi.san import cli
    name = cli.initiator(m.group(1), "InitiatorName of host %s" % host)
    attachments.cache_initiator(host, name)
    return name


# ---- locks and sessions over several disks ------------------------------------------------------
@contextlib.contextmanager
def held(targets):
    """The volume locks of `targets` (sorted, no deadlock) and one CLI session per group:
    yields {group address: session}."""
    from oneiscsi.san import client
    with contextlib.ExitStack() as stack:
        seen = set()
        for t in sorted(targets, key=lambda t: (t.group.address, t.volume)):
            if (t.group.address, t.volume) not in seen:
                seen.add((t.group.address, t.volume))
                stack.enter_context(common.volume_lock(t.group.address, t.volume, t.cfg.lock_wait))
        sessions = {}
        for t in targets:
            if t.group.address not in sessions:
                sessions[t.group.address] = stack.enter_context(client.session(t.group))
        yield sessions


def by_settings(targets) -> list:
    groups = {}
    for t in targets:
        groups.setdefault(t.hs.key, []).append(t)
    return list(groups.values())


# ---- bringing disks to a host, taking them away -------------------------------------------------
def logout_strays(sessions, targets, keep) -> None:
    """Log the volumes out on recorded hosts outside `keep` (failed live migrations)."""
    from oneiscsi.host import iscsi as hostiscsi
    per_host = {}
    for t in targets:
        for h, entry in attachments.hosts(t.group.address, t.volume).items():
            if h not in keep:
                per_host.setdefault(h, []).append((t, entry))
    for h, items in sorted(per_host.items()):
        iqns = [t.iqn for t, _ in items if t.iqn]
        log.warn("volume(s) %s still recorded as logged in on host %s, which the VM does not use: "
                 "logging out there" % (", ".join(t.volume for t, _ in items), h))
        try:
            hostiscsi.logout_strays(h, iqns)
        except Failure as e:
            log.warn("stray sessions on host %s stay: %s" % (h, e))
            continue
        for t, entry in items:
            try:
                remove_host_record(sessions[t.group.address], t, entry.get("record"))
            except Failure as e:
                log.warn("the access record of host %s on %s stays: %s" % (h, t.volume, e))
            attachments.detached(t.group.address, t.volume, h)


def bring(host: str, targets: list, keep, clone=False, multihost=None) -> dict:
    """Make `targets` usable on `host`: (clone,) multihost, access record, strays out, attach
    in one ssh round trip, links. Undone on failure. -> {volume: device}"""
    from oneiscsi.host import iscsi as hostiscsi
    host = _host(host, "destination host")
    targets = [t for t in targets if host not in t.hs.no_iscsi]
    if not targets:
        log.info("host %s is in NO_ISCSI: nothing to attach there" % host)
        return {}
    devices = {}
    with held(targets) as sessions:
        undo = []
        try:
            for t in targets:
                s = sessions[t.group.address]
                if clone and not t.persistent:
                    make_clone(s, t, undo)
                san_read(s, t)
                want = True if multihost else t.cfg.multihost
                if t.multihost != want:
                    s.set_multihost(t.volume, want)
                    if multihost:
                        undo.append(("multihost of %s" % t.volume,
                                     lambda s=s, t=t: s.set_multihost(t.volume, False)))
                t.record = host_record(t, host)
                add_host_record(s, t, t.record, undo)
            logout_strays(sessions, targets, set(keep) | {host})
            for group in by_settings(targets):
                hs = group[0].hs
                try:
                    devices.update(hostiscsi.attach(host, [t.volume_for() for t in group], hs.chap, hs.iface,
                                                    hs.base, hs.wait))
                except hostiscsi.HostFailure as e:
                    done = [t for t in targets if t.volume in e.devices or t.volume in devices]
                    if done:
                        undo.append(("login of %s on %s" % (", ".join(t.volume for t in done), host),
                                     lambda done=done: _detach(host, done)))
                    raise
                for t in group:
                    attachments.attached(t.group.address, t.volume, host, t.iqn, t.vmid, t.dsid, t.record)
        except BaseException as e:
            for t in targets:
                if t.volume in devices:
                    attachments.detached(t.group.address, t.volume, host)
            _reraise(e, run_undo(undo))
    for t in targets:
        log.info("disk %s of VM %d: %s on %s -> %s" % (t.did, t.vmid, t.volume, host, devices.get(t.volume, "?")))
    return devices


def release(host: str, targets: list, best_effort=False, sync_multihost=False, after=None) -> None:
    """Take `targets` off `host`: detach (an unreachable host is a warning), drop the host's
    access record, forget the attachment; `after(sessions)` runs in the same SAN sessions."""
    host = _host(host, "host")
    with held(targets) as sessions:
        for t in targets:
            if not san_read(sessions[t.group.address], t, must=False):
                t.iqn = attachments.load(t.group.address, t.volume).get("iqn", "")
                log.info("volume %s does not exist (any more)" % t.volume)
        on_host = [t for t in targets if host not in t.hs.no_iscsi]
        if on_host:
            try:
                _detach(host, on_host)
            except Failure as e:
                if not best_effort:
                    raise
                log.warn("detaching on %s failed (continuing: %s)" % (host, e))
        for t in targets:
            s = sessions[t.group.address]
            entry = attachments.hosts(t.group.address, t.volume).get(host) or {}
            words = entry.get("record") or (host_record(t, host, learn=False) if t.iqn else None)
            if t.iqn:
                remove_host_record(s, t, words)
                if sync_multihost and t.multihost != t.cfg.multihost:
                    s.set_multihost(t.volume, t.cfg.multihost)
            attachments.detached(t.group.address, t.volume, host)
        if after is not None:
            after(sessions)


def _detach(host, targets):
    from oneiscsi.host import iscsi as hostiscsi
    missing = [t for t in targets if not t.iqn]
    for t in missing:
        log.warn("disk %s of VM %d: the IQN of %s is unknown: nothing to log out on %s" % (t.did, t.vmid, t.volume, host))
    for group in by_settings([t for t in targets if t.iqn]):
        hs = group[0].hs
        hostiscsi.detach(host, [t.volume_for() for t in group], hs.iface, True, hs.base)


# ---- actions ----------------------------------------------------------------------------------
def _args(call, n, usage):
    if len(call.args) < n:
        raise Invalid("%s needs %s, got %d arguments" % (call.action, usage, len(call.args)))
    return call.args


def tm_ln(call, clone=False):
    a = _args(call, 3, "SOURCE HOST:PATH VMID [DSID]")
    host, path = host_path(a[1])
    t = target_of(call, int_arg(a[2], "VMID"), path)
    if clone and t.persistent:
        log.info("disk %s is persistent: linked, not cloned" % t.did)
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
    vm = call.one.vm(vmid)
    t = target_of(call, vmid, dst_path)
    state = vm.lcm_state
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


def tm_mvds(call):
    a = _args(call, 3, "HOST:PATH SOURCE VMID [DSID]")
    host, path = host_path(a[0])
    vmid = int_arg(a[2], "VMID")
    t = target_of(call, vmid, path)
    save_as = t.disk["SAVE_AS_SOURCE"]

    def after(sessions):
        s = sessions[t.group.address]
        if save_as:
            new = common.parse_source(save_as, "SAVE_AS_SOURCE")
            _copy_volume(s, t, new, None, "OpenNebula image saved from VM %d disk %s" % (vmid, t.did))
        if not t.persistent:
            _delete_clone(s, t)
    release(host, [t], after=after)


def _copy_volume(s, t: Target, new: str, snap, description: str) -> None:
    """SAN clone of t's volume (or of its snapshot `snap`) to `new`; idempotent; a failure
    deletes `new` only when this call made it."""
    from oneiscsi.san import cli, client
    description = cli.clean_description(description)
    if new in (t.volume, t.source):
        raise Invalid("the new image's volume %s is the disk's own volume" % new)
    info = s.volume_info(new)
    if info is not None:
        if info.get("Description", "") == description:
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
            if info is None or info.get("Description", "") != description:
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


def _delete_clone(s, t: Target) -> None:
    """Delete the per-VM clone of a non-persistent disk; never anything else."""
    if t.persistent or t.volume == t.source or t.volume != common.clone_name(t.source, t.vmid):
        return
    if s.delete_volume(t.volume):
        log.info("deleted the per-VM clone %s" % t.volume)
    else:
        log.info("the per-VM clone %s is already gone" % t.volume)


def tm_cpds(call):
    a = _args(call, 4, "HOST:PATH NEW_SOURCE SNAP_ID VMID [DSID]")
    _, path = host_path(a[0])
    if len(a) >= 5:
        snap_id, vmid = int_arg(a[2], "SNAP_ID"), int_arg(a[3], "VMID")
    else:  # the seed's 4-argument shape: host:path new vmid dsid
        snap_id, vmid = -1, int_arg(a[2], "VMID")
    t = target_of(call, vmid, path)
    new = common.parse_source(a[1], "the new image's SOURCE")
    snap = common.snapshot_name(snap_id) if snap_id >= 0 else None
    if new in (t.volume, t.source):
        raise Invalid("the new image's volume %s is the disk's own volume" % new)
    from oneiscsi.san import client
    with common.volume_lock(t.group.address, t.volume, t.cfg.lock_wait), \
            common.volume_lock(t.group.address, new, t.cfg.lock_wait), client.session(t.group) as s:
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
    release(host, [t], after=lambda sessions: _delete_clone(sessions[t.group.address], t))


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


def tm_resize(call):
    a = _args(call, 3, "HOST:PATH SIZE_MB VMID [DSID]")
    host, path = host_path(a[0])
    size_mb = int_arg(a[1], "SIZE")
    vmid = int_arg(a[2], "VMID")
    t = target_of(call, vmid, path)
    vm = call.one.vm(vmid)
    with held([t]) as sessions:
        s = sessions[t.group.address]
        san_read(s, t)
        if t.size is not None and t.size >= size_mb * MiB:
            log.info("volume %s has %d MB already" % (t.volume, t.size // MiB))
        else:
            s.grow_volume(t.volume, size_mb, snap=False)
            log.info("volume %s grown to %d MB" % (t.volume, size_mb))
        t.size = size_mb * MiB
    if vm.lcm_state == DISK_RESIZE_UNDEPLOYED or host in t.hs.no_iscsi:
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
    with held([t]) as sessions:
        s = sessions[t.group.address]
        before = {r["name"] for r in s.snapshots(t.volume)}
        if snap in before:
            log.info("snapshot %s of %s exists already" % (snap, t.volume))
            return
        made = None
        try:
            made = s.create_snapshot(t.volume, "OpenNebula VM %d disk %s snapshot" % (t.vmid, t.did))
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
    log.info("snapshot %s of %s created" % (snap, t.volume))


def tm_snap_delete(call):
    host, t, snap = _snap_target(call)
    with held([t]) as sessions:
        if not sessions[t.group.address].delete_snapshot(t.volume, snap):
            log.warn("snapshot %s of %s does not exist: nothing to delete" % (snap, t.volume))


def tm_snap_revert(call):
    from oneiscsi.drivers.eqliscsi.ds import revert
    from oneiscsi.host import iscsi as hostiscsi
    host, t, snap = _snap_target(call)
    host = _host(host, "host")
    on_host = host not in t.hs.no_iscsi
    with held([t]) as sessions:
        s = sessions[t.group.address]
        san_read(s, t)
        if on_host:
            _detach(host, [t])
        try:
            revert(s, t.volume, snap)
        finally:
            if on_host:
                san_read(s, t)
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
    "snap_delete": tm_snap_delete,
    "snap_revert": tm_snap_revert,
    "premigrate": _migrate("premigrate"),
    "postmigrate": _migrate("postmigrate"),
    "failmigrate": _migrate("failmigrate"),
    "snap_create_live": _not_supported("take disk snapshots with the VM powered off"),
    "context": _not_supported(SYSTEM_DS),
    "mkimage": _not_supported(SYSTEM_DS),
    "mkswap": _not_supported(SYSTEM_DS),
    "monitor": _not_supported(SYSTEM_DS),
}
