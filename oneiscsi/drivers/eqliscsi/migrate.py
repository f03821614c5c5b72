"""Live migration of every eqliscsi disk of a VM: premigrate, postmigrate, failmigrate.

Both call styles arrive here through Call.migrate(): `migrate_other` of a 5.x+ system TM
(`src dst system_dir vmid dsid <system_tm>`, the VM template base64 on stdin, once per
driver; src/tm_mad/tm_common.sh) and the 4.x legacy wrapper (template as 6th argument;
drivers/wrapper.py, which undoes every driver's premigrate when a later step fails). The
template is read per DISK element; only disks whose TM_MAD is eqliscsi are ours. Nothing
happens when source and destination are the same host.

premigrate   for every disk, in one SAN session per group: multihost-access on, the
             destination's access record (EQL_HOST_ACCESS); stray sessions on the VM's earlier
             hosts logged out; then ALL disks attached on the destination in parallel in one ssh
             round trip, linked at `<system_dir>/disk.<id>`. Any failure undoes all of it.
postmigrate  release on the source (an unreachable source is a warning): sessions no other VM
             there uses, the source's access records; multihost back to EQL_MULTIHOST when one
             host is left. oned runs it no_fail.
failmigrate  the same on the destination: undoes premigrate.

With a shared system datastore (usage.shared_vm_dir) `disk.<id>` is one link for both hosts:
postmigrate and failmigrate leave it, and premigrate's undo too.
"""
from __future__ import annotations

from oneiscsi import log
from oneiscsi.drivers.eqliscsi import tm, usage


def _targets(call):
    m = call.migrate()
    disks = m.disks_of((tm.DRIVER,))
    if not disks:
        log.info("VM %d has no %s disk" % (m.vmid, tm.DRIVER))
        return m, [], False
    if m.src == m.dst:
        log.info("source and destination are both %s: nothing to do" % m.src)
        return m, [], False
    vm = m.vm if m.vm is not None and m.vm.history else call.one.vm(m.vmid)
    base = m.system_dir.rstrip("/")
    targets = [tm.Target(call, d, m.vmid, "%s/disk.%s" % (base, d.disk_id), vm=vm) for d in disks]
    shared = usage.shared_vm_dir(call.one, vm, m.caller or call.sys_tm, m.dsid)
    log.info("VM %d: system datastore %d is %s" % (m.vmid, m.dsid, "shared" if shared else "per host"))
    return m, targets, shared


def premigrate(call):
    m, targets, shared = _targets(call)
    if targets:
        tm.bring(m.dst, targets, keep={m.src, m.dst}, multihost=True, shared_dir=shared)


def postmigrate(call):
    m, targets, shared = _targets(call)
    if targets:
        tm.release(m.src, targets, best_effort=True, stay_host=m.dst, keep_link=shared)


def failmigrate(call):
    m, targets, shared = _targets(call)
    if targets:
        tm.release(m.dst, targets, best_effort=True, stay_host=m.src, keep_link=shared)
