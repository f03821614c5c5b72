"""Backups and in-place restores of `iscsi` / `iscsi_libvirt` disks (called by drivers/backup.py).

These LUNs belong to a target oneiscsi does not manage: there is no snapshot to read from.
- Powered off (`prebackup`): the LUN is read through libiscsi on the backup host into
  `disk.<id>.0` (qcow2); no kernel login, CHAP from the host's libvirt secret (ISCSI_USAGE).
- Live (`prebackup_live`): refused before anything changes. A copy of a LUN the VM writes is
  not consistent, and upstream's way (an overlay in tmp/, src/tm_mad/lib/backup_kvm.rb
  `backup_full_live`) leaves a network disk writing into the overlay (opennebula-backups.md §2).
- Increments: refused (no reference to compare with); use MODE=FULL for VMs with iscsi disks.
- `onevm restore`: the downloaded backup is written onto the LUN through libiscsi.
The reader presents initiator name `iqn.2008-11.org.linux-kvm:oneiscsi-<vmid>`: QEMU's own
family of names (QEMU block/iscsi.c `get_initiator_name`, which adds the VM's UUID, unknown
here); LUNs used by QEMU directly are admitted by address or CHAP, not by that name.
"""
from __future__ import annotations

from oneiscsi import validate
from oneiscsi.drivers.iscsi import Target
from oneiscsi.errors import Invalid

LIVE_REFUSED = ("a live backup of iscsi disk %s is refused: QEMU reads that LUN itself and the iSCSI target is "
                "not oneiscsi's to snapshot, so no consistent copy exists while the VM runs (and upstream's overlay "
                "would leave the VM writing into tmp/); power the VM off for the backup, or leave the disk out "
                "(BACKUP_CONFIG/DISK_IDS, 7.3.80+)")


def _lun(disk, vmid: int):
    from oneiscsi.host.libiscsi import Lun
    t = Target.of_disk(disk).for_libvirt()
    host, port = t.portals[0]
    return Lun(validate.format_portal(host, port), t.iqn, "iqn.2008-11.org.linux-kvm:oneiscsi-%d" % vmid,
               user=t.user, lun=t.lun, usage=t.usage)


class Part:
    def __init__(self, job, disks):
        self.job, self.disks = job, disks

    def check(self) -> None:
        for d in self.disks:
            _lun(d, self.job.vmid)   # validates every attribute
            if self.job.live:
                raise Invalid(LIVE_REFUSED % d.disk_id)
            if self.job.parent >= 0:
                raise Invalid("an incremental backup of iscsi disk %s is refused: the iscsi driver has no snapshot "
                              "of the LUN to compare with; set BACKUP_CONFIG/MODE=FULL for this VM" % d.disk_id)

    def snapshot(self) -> None:
        """Powered off: the LUN does not change while it is read."""

    def read(self, prefix: str = "") -> None:
        from oneiscsi.drivers.backup import _host_step
        from oneiscsi.host import backup as hostbackup
        reads = [(d.disk_id, self.job.backup_id, _lun(d, self.job.vmid), None) for d in self.disks]
        _host_step(self.job.backup_host, prefix + hostbackup.read_script(self.job.backup_dir, reads), "backup read")

    def finish(self, done: bool) -> None:
        pass


class RestoreTarget:
    def __init__(self, call, vm, disk, host, vm_dir):
        self.did, self.host, self.lun = disk.disk_id, host, _lun(disk, int(vm.id))

    def check(self) -> None:
        pass

    def write(self, staged: str) -> None:
        from oneiscsi.drivers.backup import _host_step
        from oneiscsi.host import backup as hostbackup
        _host_step(self.host, hostbackup.write_script(staged, self.lun), "restore of disk %s" % self.did)
