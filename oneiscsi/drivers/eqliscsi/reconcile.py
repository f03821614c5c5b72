"""`oneiscsi.pyz reconcile [--fix] [--hosts h1,h2] [--remotes DIR]`: iSCSI sessions and
access records of eqliscsi volumes that no VM needs (a failed live migration leaves them:
oned never calls an image driver's failmigrate under a shared/ssh system datastore).

Everything comes from oned, the hosts and the group, never from files on this frontend, so
any frontend of an HA zone gives the same answer:
- what VMs need: oned's VM pool (one.vmpool.infoextended, else one.vmpool.info); each
  eqliscsi disk needs its volume on the hosts usage.vm_hosts() names;
- the hosts: oned's host pool, the VMs' history and --hosts;
- what exists: each host's sessions (one ssh round trip per host) and, where a datastore sets
  EQL_HOST_ACCESS, the access records of the group's volumes;
- whose it is: only volumes whose description says this driver made them ("OpenNebula image
  <id>: ...", "OpenNebula VM <vmid> disk <id>: clone of ...", "OpenNebula image saved from ...")
  are considered; names are compared as the group does (case-insensitive).

With --fix, each finding is fixed under the volume's lock after the VMs that may use it are read
again from oned (the image's VMS, or the clone's VM); the host refuses to log out a disk that is
still open there. Backup reference snapshots (`oneiscsi-bk-v<vm>-...`, drivers/eqliscsi/backup.py)
of VMs oned no longer has (DONE, or gone) are findings too (`STRAY backup-snapshot`): a VM that
ends removes its own, unless the group could not be reached then. Prints one line per finding
(`STRAY session`, `STRAY access`, `STRAY backup-snapshot`), prefixed with `FIXED` when --fix
cleaned it, then a summary. Exit 0 when nothing stray is left, 1 otherwise.
"""
from __future__ import annotations

import argparse
import re
import sys

from oneiscsi import log
from oneiscsi.drivers.eqliscsi import common, usage
from oneiscsi.errors import Failure, Invalid
from oneiscsi.san import parse

OURS = re.compile(r"^OpenNebula (image (\d+):|VM (\d+) disk (\d+): clone of |image saved from VM )")


def _one():
    from oneiscsi.one.rpc import One
    return One()


def needed(vms) -> dict:
    """{volume (lower case): set(hosts)} of what the VMs use now."""
    need = {}
    for vm in vms:
        hosts = usage.vm_hosts(vm)
        if not hosts:
            continue
        for d in vm.disks:
            if d.tm_mad != "eqliscsi":
                continue
            try:
                src = common.parse_source(d["SOURCE"], "SOURCE")
                clone = d["CLONE"].upper()
                names = [src] if clone != "YES" else []
                if clone != "NO":   # YES, or unknown (not written by oned): both readings are needed
                    names += [common.clone_name(src, vm.id), common.clone_name(src, vm.id, d.disk_id)]
            except Invalid:
                continue
            for n in names:
                need.setdefault(n.lower(), set()).update(hosts)
    return need


class Groups:
    """The EqualLogic groups of the eqliscsi datastores, one CLI session each (opened lazily)."""

    def __init__(self, remotes, datastores):
        from oneiscsi import config
        self.entries = []       # (cfg, group, mode)
        seen = set()
        for ds in datastores:
            if "eqliscsi" not in (ds["DS_MAD"], ds["TM_MAD"]):
                continue
            try:
                cfg = config.load(remotes, ds)
                group = cfg.group()
                mode = common.host_access_mode(cfg, ds)
            except Failure as e:
                print("WARN datastore %s: %s" % (ds.id, e))
                continue
            if (group.address, mode) not in seen:
                seen.add((group.address, mode))
                self.entries.append((cfg, group, mode))
        self._sessions = {}
        self._stack = None

    def session(self, group):
        import contextlib
        from oneiscsi.san import client
        if self._stack is None:
            self._stack = contextlib.ExitStack()
        if group.address not in self._sessions:
            self._sessions[group.address] = self._stack.enter_context(client.session(group))
        return self._sessions[group.address]

    def close(self):
        """Close the CLI sessions (no slot is kept over host steps)."""
        if self._stack is not None:
            self._stack.close()
        self._stack, self._sessions = None, {}

    def find(self, volume):
        """(cfg, group, info) of the driver's volume `volume`, or None."""
        for cfg, group, _ in self.entries:
            info = self.session(group).volume_info(volume)
            if info is not None and OURS.match(parse.field(info, "description")):
                return cfg, group, info
        return None


def users_now(one, info, volume) -> set:
    """Hosts where VMs use `volume` now, read again from oned (the owner its description names)."""
    m = OURS.match(parse.field(info, "description"))
    if m and m.group(3):
        vmids = [int(m.group(3))]
    elif m and m.group(2):
        try:
            image = one.image(int(m.group(2)))
            vmids = [int(e.text) for e in image.el.findall("VMS/ID") if (e.text or "").strip().isdigit()]
        except Failure:
            vmids = []
    else:
        vmids = []
    vms = []
    for vmid in vmids:
        try:
            vms.append(one.vm(vmid))
        except Failure:
            continue
    return needed(vms).get(volume.lower(), set())


def _volume_of(iqn: str) -> str:
    return common.volume_of_iqn(iqn)


def main(argv) -> int:
    ap = argparse.ArgumentParser(prog="oneiscsi.pyz reconcile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--fix", action="store_true", help="log out stray sessions, delete stray access records")
    ap.add_argument("--hosts", default="", help="comma-separated hosts to check besides oned's")
    ap.add_argument("--remotes", default="", help="the OpenNebula remotes tree (for eqliscsi.conf)")
    a = ap.parse_args(argv)
    from oneiscsi import validate
    from oneiscsi.one.version import remotes_dir
    remotes = a.remotes or remotes_dir("")
    one = _one()
    vms = one.pool("vm")
    need = needed(vms)
    hosts = set(one.host_names()) | {h for vm in vms for h in usage.history_hosts(vm)}
    hosts |= {validate.hostname(h.strip(), "--hosts") for h in a.hosts.split(",") if h.strip()}
    groups = Groups(remotes, one.pool("datastore"))
    counts = [0, 0]
    try:
        _sessions(a.fix, hosts, need, groups, counts)
        _access(a.fix, hosts, need, groups, counts)
        _backup_snapshots(a.fix, {int(vm.id) for vm in vms if vm.state != DONE}, groups, counts)
    finally:
        groups.close()
    print("%d finding(s), %d left" % tuple(counts))
    sys.stdout.flush()
    return 0 if counts[1] == 0 else 1


def _sessions(fix, hosts, need, groups, counts) -> None:
    from oneiscsi.host import iscsi as hostiscsi
    stray = []
    for host in sorted(hosts):
        try:
            found = hostiscsi.sessions(host)
        except Failure as e:
            print("WARN host %s: %s" % (host, e))
            continue
        for _, iqn in found:
            vol = _volume_of(iqn)
            if vol and host not in need.get(vol.lower(), set()):
                stray.append((host, vol, iqn))
    groups.close()
    owners = {}
    for host, vol, iqn in stray:
        if vol not in owners:
            owners[vol] = groups.find(vol)
    groups.close()
    for host, vol, iqn in stray:
        if owners[vol] is None:
            continue      # not a volume this driver made: never touched
        counts[0] += 1
        fixed = fix and _fix_session(host, vol, iqn, owners[vol])
        counts[1] += not fixed
        print("%sSTRAY session host=%s volume=%s iqn=%s" % ("FIXED " if fixed else "", host, vol, iqn))


def _fix_session(host, vol, iqn, owner) -> bool:
    from oneiscsi.host import iscsi as hostiscsi
    cfg, group, info = owner
    with common.volume_lock(group, vol, cfg.lock_wait):
        if host in users_now(_one(), info, vol):
            log.warn("volume %s is used on %s now: left logged in" % (vol, host))
            return False
        try:
            return iqn in hostiscsi.logout_strays(host, [iqn])
        except Failure as e:
            log.warn("host %s: %s" % (host, e))
            return False


def _access(fix, hosts, need, groups, counts) -> None:
    """Access records EQL_HOST_ACCESS added for hosts that no longer need the volume."""
    from oneiscsi.drivers.eqliscsi import tm
    for cfg, group, mode in groups.entries:
        if mode == "none":
            continue
        words = {}
        for host in sorted(hosts):
            try:
                words[host] = _host_words(cfg, mode, host)
            except Failure as e:
                print("WARN host %s: %s" % (host, e))
        s = groups.session(group)
        for row in s.volumes():
            vol = row.get("name", "") if isinstance(row, dict) else str(row)
            if not vol:
                continue
            info = s.volume_info(vol)
            if info is None or not OURS.match(parse.field(info, "description")):
                continue
            for rec in s.access_records(vol):
                for host, w in sorted(words.items()):
                    if not tm._matches(rec, w) or tm.is_static(cfg, w) or host in need.get(vol.lower(), set()):
                        continue
                    counts[0] += 1
                    fixed = False
                    if fix:
                        with common.volume_lock(group, vol, cfg.lock_wait):
                            if host not in users_now(_one(), info, vol):
                                fixed = s.delete_access(vol, rec["id"]) or True
                    counts[1] += not fixed
                    print("%sSTRAY access host=%s volume=%s record=%s"
                          % ("FIXED " if fixed else "", host, vol, " ".join(w)))


DONE = 6  # VirtualMachine::DONE (include/VirtualMachine.h)


def _gone(vmid: int) -> bool:
    """The VM has ended, read again from oned (DONE, or unknown to oned)."""
    try:
        return _one().vm(vmid).state == DONE
    except Failure:
        return True


def _backup_snapshots(fix, live_vms, groups, counts) -> None:
    """Backup reference snapshots of VMs that ended: nothing will ever continue their chain."""
    from oneiscsi.drivers.eqliscsi.backup import owner_of
    for cfg, group, _ in groups.entries:
        s = groups.session(group)
        for row in s.volumes():
            vol = row.get("name", "") if isinstance(row, dict) else str(row)
            if not vol or not row.get("snapshots"):
                continue
            for snap in s.snapshots(vol):
                vmid = owner_of(snap["name"])
                if vmid is None or vmid in live_vms:
                    continue
                counts[0] += 1
                fixed = False
                if fix:
                    with common.volume_lock(group, vol, cfg.lock_wait):
                        if _gone(vmid):
                            s.delete_snapshot(vol, snap["name"])
                            fixed = True
                counts[1] += not fixed
                print("%sSTRAY backup-snapshot volume=%s snapshot=%s (VM %d has ended)"
                      % ("FIXED " if fixed else "", vol, snap["name"], vmid))


def _host_words(cfg, mode, host):
    from oneiscsi.drivers.eqliscsi import initiators, tm
    from oneiscsi.san import cli
    if mode == "ipaddress":
        return ("ipaddress", cli.ip_pattern(tm._ipv4(host), "address of host %s" % host))
    return ("initiator", cli.initiator(initiators.of(host), "InitiatorName of host %s" % host))
