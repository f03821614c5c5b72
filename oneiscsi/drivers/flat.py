"""The flat `ds-<action>` / `tm-<action>` names of bin/: the driver comes from the data.

DS actions: DS_MAD of the datastore in DS_DRIVER_ACTION_DATA. TM actions: the
TM_MAD of the disk named by the `.../disk.<id>` argument (VM read from oned);
pre/post/failmigrate: every driver of ours that some DISK of the VM uses.
"""
from __future__ import annotations

from oneiscsi.dispatch import DRIVERS, run_call
from oneiscsi.errors import Failure, Invalid
from oneiscsi.one.action import disk_id, host_path

# position of the `host:.../disk.N` argument and of the VM id, per TM action
TM_DISK_ARG = {
    "ln": (1, 2), "clone": (1, 2), "mvds": (0, 2), "cpds": (0, 3), "delete": (0, 1),
    "mv": (0, 2), "resize": (0, 2), "snap_create": (0, 2), "snap_create_live": (0, 2),
    "snap_delete": (0, 2), "snap_revert": (0, 2),
}


def run(call) -> int:
    if call.kind == "ds":
        mad = call.ds().datastore["DS_MAD"]
        if mad not in DRIVERS:
            raise Failure("datastore DS_MAD %r is not a oneiscsi driver (%s)" % (mad, ", ".join(DRIVERS)))
        call.driver = mad
        return run_call(call)
    if call.action in ("premigrate", "postmigrate", "failmigrate"):
        m = call.migrate()
        used = sorted({d.tm_mad for d in m.disks_of(DRIVERS)})
        for drv in used:
            call.driver = drv
            run_call(call)
        return 0
    pos = TM_DISK_ARG.get(call.action)
    if pos is None or len(call.args) <= max(pos):
        raise Invalid("tm-%s cannot tell the driver from its arguments; pass --driver <name>" % call.action)
    _, path = host_path(call.args[pos[0]])
    did = disk_id(path)
    if did is None:
        raise Invalid("tm-%s: %r is not a disk path; pass --driver <name>" % (call.action, call.args[pos[0]]))
    disk = call.one.vm(call.args[pos[1]]).disk(did)
    if disk is None or disk.tm_mad not in DRIVERS:
        raise Failure("disk %s of VM %s does not use a oneiscsi driver" % (did, call.args[pos[1]]))
    call.driver = disk.tm_mad
    return run_call(call)
