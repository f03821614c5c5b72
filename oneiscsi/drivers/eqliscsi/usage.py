"""Who uses an eqliscsi volume, and on which host: decided from oned, never from files kept
on one frontend (in an HA zone oned's pool is replicated by Raft; a frontend's disk is not).

Several VMs may use one volume at once (IMMUTABLE and CDROM images, SHAREABLE persistent
ones; opennebula-semantics.md section 1), possibly on one host, so a host session belongs to
every VM on that host that uses the volume. An image lists the VMs using it (`<VMS>` of
one.image.info); each of them is read (one.vm.info) until the question is answered.

Where a VM holds its disks' sessions (states: include/VirtualMachine.h, release-6.10.5):
- STATE ACTIVE: on its current host (last HISTORY's HOSTNAME); while it migrates (MIGRATE,
  SAVE_MIGRATE, BOOT_MIGRATE*, PROLOG_MIGRATE* and their failures) on the previous host too;
  nowhere while it leaves (EPILOG, EPILOG_STOP, EPILOG_UNDEPLOY and their failures,
  CLEANUP_RESUBMIT, CLEANUP_DELETE): its own delete/mv/mvds releases it.
- SUSPENDED, POWEROFF: on its current host (the disks stay linked).
- any other state (PENDING, HOLD, STOPPED, UNDEPLOYED, DONE, ...): nowhere.
The VM running the action counts with its OTHER disks only while it stays on the host (a
disk detach: HOTPLUG, HOTPLUG_EPILOG_POWEROFF); when it leaves, every disk goes.

A failed live migration leaves its destination in the VM's history (oned copies the source
record back: `LifeCycleManager::deploy_failure_action`, src/lcm/LifeCycleStates.cc,
`cp_previous_history`), so the hosts of a VM's history are where its stray sessions can be.
"""
from __future__ import annotations

from oneiscsi import log
from oneiscsi.errors import Failure, Invalid

ACTIVE, SUSPENDED, POWEROFF = 3, 5, 8
MIGRATING = {4, 7, 8, 35, 37, 38, 43, 44, 45, 46, 60, 61}
LEAVING = {10, 11, 15, 23, 30, 40, 41, 42}
STAYING = {17, 34}          # HOTPLUG, HOTPLUG_EPILOG_POWEROFF: one disk goes, the VM stays


def vm_hosts(vm) -> set:
    """The hosts where `vm` holds the sessions of its disks now."""
    hosts = [h["HOSTNAME"] for h in vm.history if h["HOSTNAME"]]
    if not hosts:
        return set()
    if vm.state == ACTIVE:
        if vm.lcm_state in LEAVING:
            return set()
        if vm.lcm_state in MIGRATING and len(hosts) > 1:
            return {hosts[-1], hosts[-2]}
        return {hosts[-1]}
    if vm.state in (SUSPENDED, POWEROFF):
        return {hosts[-1]}
    return set()


def history_hosts(vm) -> list:
    """Every host in the VM's history, newest first, each once."""
    out = []
    for h in reversed(vm.history):
        name = h["HOSTNAME"]
        if name and name not in out:
            out.append(name)
    return out


def same_volume(a: str, b: str) -> bool:
    """Group volume names compare case-insensitively (the group lowercases them in IQNs)."""
    return (a or "").lower() == (b or "").lower()


class Users:
    """The other users of one disk's volume: (label, hosts) per VM disk, read lazily from oned.

    `t` is the disk (tm.Target): its volume, its VM (`t.vm`, already read) and disk id."""

    def __init__(self, one, t):
        self.one, self.t = one, t
        self._found = []
        self._todo = None

    def _vm_ids(self) -> list:
        t = self.t
        if t.clone or t.image_id is None:
            return [t.vmid]           # a per-VM clone belongs to this disk alone
        try:
            image = self.one.image(t.image_id)
        except Failure as e:
            log.warn("cannot read image %s from oned (%s): only VM %d is taken as using %s"
                     % (t.image_id, e, t.vmid, t.volume))
            return [t.vmid]
        ids = []
        for el in image.el.findall("VMS/ID"):
            try:
                ids.append(int((el.text or "").strip()))
            except ValueError:
                continue
        return [t.vmid] + [i for i in ids if i != t.vmid]

    def _more(self) -> bool:
        """Read the next VM; False when none is left."""
        if self._todo is None:
            self._todo = self._vm_ids()
        if not self._todo:
            return False
        vmid = self._todo.pop(0)
        t = self.t
        if vmid == t.vmid:
            vm = t.vm
            if vm.lcm_state not in STAYING:
                return True
        else:
            try:
                vm = self.one.vm(vmid)
            except Failure as e:      # gone meanwhile (DONE): uses nothing
                log.debug("VM %d: %s" % (vmid, e))
                return True
        hosts = vm_hosts(vm)
        if not hosts:
            return True
        from oneiscsi.drivers.eqliscsi import common
        for d in vm.disks:
            if d.tm_mad != "eqliscsi" or (vmid == t.vmid and d.disk_id == t.did):
                continue
            if d["CLONE"].upper() == "YES":
                continue
            try:
                vol = common.parse_source(d["SOURCE"], "SOURCE")
            except Invalid:
                continue
            if same_volume(vol, t.volume):
                self._found.append(("VM %d disk %s" % (vmid, d.disk_id), hosts))
        return True

    def on(self, host: str) -> str:
        """A user of the volume on `host` ('' when none)."""
        i = 0
        while True:
            while i < len(self._found):
                label, hosts = self._found[i]
                if host in hosts:
                    return label
                i += 1
            if not self._more():
                return ""

    def hosts(self, enough: int = 0) -> set:
        """Hosts where other disks use the volume (stops once `enough` are known)."""
        while True:
            found = {h for _, hs in self._found for h in hs}
            if enough and len(found) >= enough:
                return found
            if not self._more():
                return found


def shared_vm_dir(one, vm, sys_tm: str = "", sys_dsid=None) -> bool:
    """Is the VM's `<system_dir>` one folder that every host sees (a `shared` system datastore,
    NFS)? Then `disk.<id>` is the same link on the source and the destination of a migration.

    The system datastore's template says it: SHARED=YES/NO, which oned copies from
    TM_MAD_CONF (`Datastore::set_tm_mad`, src/datastore/Datastore.cc, release-6.10.5). Its id
    and TM_MAD are in the VM's last HISTORY (DS_ID, TM_MAD; 4.x TMMAD). When the datastore cannot
    be read: `ssh` is private, anything else is taken as shared (the safe side: a shared folder's
    link is never removed by the other host's step)."""
    hist = vm.history
    last = hist[-1] if hist else None
    tm = sys_tm or (last["TM_MAD"] or last["TMMAD"] if last is not None else "")
    dsid = sys_dsid if sys_dsid is not None else (last["DS_ID"] if last is not None else "")
    if str(dsid).strip().isdigit():
        try:
            value = one.datastore(int(dsid)).tpl("SHARED").upper()
            if value in ("YES", "NO"):
                return value == "YES"
        except Failure as e:
            log.debug("system datastore %s: %s" % (dsid, e))
    return tm != "ssh"
