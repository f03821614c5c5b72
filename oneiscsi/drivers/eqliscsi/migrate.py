"""Live migration of every eqliscsi disk of a VM: premigrate, postmigrate, failmigrate.

Both call styles arrive here through Call.migrate(): `migrate_other` of a 5.x+ system TM
(`src dst system_dir vmid dsid <system_tm>`, the VM template base64 on stdin, once per
driver) and the 4.x legacy wrapper (template as 6th argument). The template is read per
DISK element; only disks whose TM_MAD is eqliscsi are ours. Nothing happens when source
and destination are the same host.

premigrate   for every disk, in one SAN session per group: multihost-access on (remembered
             for the undo), the destination's access record (EQL_HOST_ACCESS); stray sessions
             of these volumes on recorded hosts other than source and destination are logged
             out; then ALL disks are attached on the destination in parallel in one ssh round
             trip, linked at `<system_dir>/disk.<id>`. Any failure undoes all of it.
postmigrate  detach on the source (an unreachable source is a warning), remove the source's
             access records, multihost-access back to EQL_MULTIHOST. oned runs it no_fail.
failmigrate  the same on the destination: undoes premigrate (oned calls it only for a system
             TM that delegates it; the stray cleanup of the next ln/mv/premigrate and
             `oneiscsi.pyz reconcile` cover the rest).
"""
from __future__ import annotations

from oneiscsi import log
from oneiscsi.drivers.eqliscsi import tm


def _targets(call):
    m = call.migrate()
    disks = m.disks_of((tm.DRIVER,))
    if not disks:
        log.info("VM %d has no %s disk" % (m.vmid, tm.DRIVER))
        return m, []
    if m.src == m.dst:
        log.info("source and destination are both %s: nothing to do" % m.src)
        return m, []
    base = m.system_dir.rstrip("/")
    return m, [tm.Target(call, d, m.vmid, "%s/disk.%s" % (base, d.disk_id)) for d in disks]


def premigrate(call):
    m, targets = _targets(call)
    if targets:
        tm.bring(m.dst, targets, keep={m.src, m.dst}, multihost=True)


def postmigrate(call):
    m, targets = _targets(call)
    if targets:
        tm.release(m.src, targets, best_effort=True, sync_multihost=True)


def failmigrate(call):
    m, targets = _targets(call)
    if targets:
        tm.release(m.dst, targets, best_effort=True, sync_multihost=True)
