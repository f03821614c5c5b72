"""`oneiscsi.pyz reconcile [--fix] [--hosts h1,h2] [--remotes DIR]`: iSCSI sessions and
access records of eqliscsi volumes that no VM needs (a failed live migration leaves them:
oned never calls an image driver's failmigrate under a shared/ssh system datastore).

What VMs need comes from oned's VM pool (one.vmpool.infoextended, else one.vmpool.info):
every eqliscsi disk of a VM in ACTIVE, SUSPENDED or POWEROFF needs its volume on the VM's
current host, and also on the previous one while the VM is in an ACTIVE state other than
RUNNING (a migration may be under way). What exists: the sessions on the hosts (the hosts of
those VMs, the hosts in oneiscsi's attachment records and --hosts), and the access records
oneiscsi recorded adding (EQL_HOST_ACCESS). Only volumes oneiscsi names
(`<name>.<image id>[-<vmid>]`) or has recorded are considered: other EqualLogic targets on a
host are never touched.

Prints one line per finding (`STRAY session`, `STRAY access`, `STALE record`), prefixed with
`FIXED` when --fix cleaned it, then a summary. Exit 0 when nothing stray is left, 1 otherwise.
"""
from __future__ import annotations

import argparse
import re
import sys

from oneiscsi import log
from oneiscsi.drivers.eqliscsi import attachments, common
from oneiscsi.errors import Failure, Invalid

ACTIVE, SUSPENDED, POWEROFF = 3, 5, 8
RUNNING = 3
OURS = re.compile(r"\.\d+(-\d+)?$")


def vm_pool() -> list:
    """Every VM with its template, from oned over XML-RPC."""
    from oneiscsi.one.rpc import One
    return One().pool("vm")


def needed(vms) -> dict:
    """{volume: set(hosts)} of what the VMs use."""
    need = {}
    for vm in vms:
        if vm.state not in (ACTIVE, SUSPENDED, POWEROFF):
            continue
        hosts = {vm.host} if vm.host else set()
        if vm.state == ACTIVE and vm.lcm_state != RUNNING and vm.prev_host:
            hosts.add(vm.prev_host)
        for d in vm.disks:
            if d.tm_mad != "eqliscsi":
                continue
            try:
                vol = common.disk_volume(d, vm.id)
            except Invalid:
                continue
            need.setdefault(vol, set()).update(hosts)
    return need


def _volume_of(iqn: str) -> str:
    try:
        return common.parse_source(iqn, "IQN")
    except Invalid:
        return ""


def main(argv) -> int:
    ap = argparse.ArgumentParser(prog="oneiscsi.pyz reconcile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--fix", action="store_true", help="log out stray sessions, delete stray access records")
    ap.add_argument("--hosts", default="", help="comma-separated hosts to check besides the known ones")
    ap.add_argument("--remotes", default="", help="the OpenNebula remotes tree (for eqliscsi.conf)")
    a = ap.parse_args(argv)
    from oneiscsi import validate
    from oneiscsi.host import iscsi as hostiscsi
    from oneiscsi.one.version import remotes_dir
    remotes = a.remotes or remotes_dir("")
    vms = vm_pool()
    need = needed(vms)
    records = {r["volume"]: r for r in attachments.every()}
    hosts = {h for hs in need.values() for h in hs}
    hosts |= {h for r in records.values() for h in r["hosts"]}
    hosts |= {validate.hostname(h.strip(), "--hosts") for h in a.hosts.split(",") if h.strip()}
    left = found = 0
    for host in sorted(hosts):
        try:
            sessions = hostiscsi.sessions(host)
        except Failure as e:
            print("WARN host %s: %s" % (host, e))
            left += 1
            continue
        stray = sorted({iqn for _, iqn in sessions
                        if (_volume_of(iqn) in records or OURS.search(_volume_of(iqn)))
                        and host not in need.get(_volume_of(iqn), set())})
        for iqn in stray:
            found += 1
            fixed = False
            if a.fix:
                try:
                    fixed = iqn in hostiscsi.logout_strays(host, [iqn])
                except Failure as e:
                    log.warn("host %s: %s" % (host, e))
            left += not fixed
            print("%sSTRAY session host=%s volume=%s iqn=%s" % ("FIXED " if fixed else "", host, _volume_of(iqn), iqn))
            if fixed and _volume_of(iqn) in records:
                r = records[_volume_of(iqn)]
                if host in r["hosts"] and not r["hosts"][host].get("record"):
                    attachments.detached(r["group"], r["volume"], host)
    for vol, r in sorted(records.items()):
        for host, entry in sorted(r["hosts"].items()):
            if host in need.get(vol, set()):
                continue
            found += 1
            words = entry.get("record")
            fixed = False
            if a.fix:
                try:
                    if words:
                        _delete_record(remotes, r, words)
                    attachments.detached(r["group"], vol, host)
                    fixed = True
                except Failure as e:
                    log.warn("volume %s: %s" % (vol, e))
            left += not fixed
            what = "STRAY access host=%s volume=%s record=%s" % (host, vol, " ".join(words)) if words else \
                "STALE record host=%s volume=%s" % (host, vol)
            print(("FIXED " if fixed else "") + what)
    print("%d finding(s), %d left" % (found, left))
    sys.stdout.flush()
    return 0 if left == 0 else 1


def _delete_record(remotes, r, words) -> None:
    from oneiscsi import config
    from oneiscsi.one.rpc import One
    from oneiscsi.san import client
    from oneiscsi.drivers.eqliscsi import tm
    if r.get("dsid") is None:
        raise Failure("no datastore recorded for %s: delete the record on the group" % r["volume"])
    ds = One().datastore(r["dsid"])
    cfg = config.load(remotes, ds)
    group = cfg.group()
    with common.volume_lock(group.address, r["volume"], cfg.lock_wait), client.session(group) as s:
        if s.volume_info(r["volume"]) is None:
            return
        for row in s.access_records(r["volume"]):
            if tm._matches(row, words) and not any(tm._key(rec) == tm._key(words) for rec in cfg.access):
                s.delete_access(r["volume"], row["id"])
