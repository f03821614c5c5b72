"""Backups and in-place restores of eqliscsi disks (called by oneiscsi/drivers/backup.py).

Backup: one group snapshot per disk, all taken inside one guest freeze when the backup is live
and BACKUP_CONFIG/FS_FREEZE asks for it (oneiscsi/host/freeze.py); each snapshot is put online,
read through libiscsi on the backup host into `disk.<id>.<backup id>` (qcow2), and put offline.
The running VM never leaves its volume: nothing is switched to an overlay.

Increments (BACKUP_CONFIG/MODE INCREMENT, 7.x asks for them for raw disks): the snapshot of
the previous backup stays on the group as the reference, named `oneiscsi-bk-v<vm>-d<disk>-<id>`;
the increment holds exactly the clusters whose content differs between the reference and the
new snapshot (qemu-img rebase in safe mode compares them), backed by the previous file. A full
backup (or MODE FULL) removes older reference snapshots; a MODE FULL backup keeps none. The
reference of the chain oned continues from (LAST_INCREMENT_ID) is kept until the next backup
has one of its own: a backup that fails after the snapshot leaves the chain where it was. If
the reference is gone (deleted on the group), the increment is refused with the way out.

In-place restore: the backup, downloaded to the host, is written onto the volume through the
VM's disk link (the VM is powered off, its disks stay attached), so the link stays the device.
"""
from __future__ import annotations

import re

from oneiscsi import log
from oneiscsi.drivers.eqliscsi import tm
from oneiscsi.errors import Failure, Invalid

PREFIX = "oneiscsi-bk"
_NAME = re.compile(r"^oneiscsi-bk-v(\d+)-d(\d+)-(\d+)$")


def snap_name(vmid: int, did, bid: int) -> str:
    return "%s-v%d-d%d-%d" % (PREFIX, int(vmid), int(did), int(bid))


def owner_of(name: str):
    """The VM id of a backup reference snapshot's name, None for other snapshots."""
    m = _NAME.match(name or "")
    return int(m.group(1)) if m else None


def backup_snapshots(s, t, vmid: int) -> dict:
    """{backup id: snapshot name} of this VM disk's backup snapshots on t.volume."""
    found = {}
    for r in s.snapshots(t.volume):
        m = _NAME.match(r["name"])
        if m and int(m.group(1)) == vmid and m.group(2) == str(t.did):
            found[int(m.group(3))] = r["name"]
    return found


class Part:
    """The eqliscsi disks of one pre/postbackup call."""

    def __init__(self, job, disks):
        self.job = job
        self.targets = [tm.Target(job.call, d, job.vmid, "%s/disk.%s" % (job.vm_dir, d.disk_id), vm=job.vm)
                        for d in disks]
        self.made, self.ref, self.records, self.iqn = {}, {}, {}, {}

    def _snap(self, t) -> str:
        return snap_name(self.job.vmid, t.did, self.job.backup_id)

    def check(self) -> None:
        from oneiscsi.host import freeze
        freeze.mode_of(self.job.fs_freeze)

    def snapshot(self) -> None:
        """One CLI session: every disk found, the references checked (a refusal changes
        nothing), older backup snapshots of these disks removed (all but the reference); then
        one snapshot per disk, every disk inside one freeze of the guest, each put online for
        the read. Without a freeze that is all one session; with one, the snapshots get a
        session of their own between the freeze and the thaw (no CLI session is held over an
        ssh step)."""
        from oneiscsi.host import freeze
        job = self.job
        mode = freeze.mode_of(job.fs_freeze) if job.live else "NONE"
        with tm.locked(self.targets):
            with tm.san(self.targets) as ss:
                for t in self.targets:
                    self._prepare(ss[t.group.address], t)
                if mode == "NONE":
                    for t in self.targets:
                        self._take(ss[t.group.address], t)
                    self._expose(ss)
                    return
            with freeze.frozen(job.host, job.deploy_id, mode):
                with tm.san(self.targets) as ss:
                    for t in self.targets:
                        self._take(ss[t.group.address], t)
            with tm.san(self.targets) as ss:
                self._expose(ss)

    def _prepare(self, s, t) -> None:
        job = self.job
        tm.resolve(s, t)
        have = backup_snapshots(s, t, job.vmid)
        if job.parent >= 0:
            if job.parent not in have:
                raise Failure(
                    "increment %d of disk %s (VM %d) needs snapshot %s of volume %s, the reference kept by "
                    "backup %d, and the group no longer has it: take a full backup (onevm backup --reset)"
                    % (job.backup_id, t.did, job.vmid, snap_name(job.vmid, t.did, job.parent), t.volume, job.parent))
            self.ref[t] = have[job.parent]
        for bid, name in sorted(have.items()):
            if name != self.ref.get(t):
                s.delete_snapshot(t.volume, name)
                log.info("removed %s of %s (an earlier backup's)" % (name, t.volume))

    def _take(self, s, t) -> None:
        """The snapshot of this backup (a half-made one is deleted again, as for snap_create)."""
        before = {r["name"] for r in s.snapshots(t.volume)}
        tm._create_snapshot(s, t, self._snap(t), before, "OpenNebula VM %d disk %s backup %d"
                            % (self.job.vmid, t.did, self.job.backup_id))
        self.made[t] = self._snap(t)

    def _expose(self, ss) -> None:
        """Snapshots online (each is a target of its own), their IQNs; a restricted volume
        gets a reader access record for this backup only."""
        from oneiscsi.san import cli
        for t in self.targets:
            s = ss[t.group.address]
            for name in filter(None, (self.made[t], self.ref.get(t))):
                s.set_snapshot_online(t.volume, name, True)
                self.iqn[name] = s.snapshot_iqn(t.volume, name)
            if t.cfg.access:
                self.records[t] = s.add_access(t.volume, cli.initiator_record(t.cfg.initiator(), t.cfg.chap_user))

    def read(self, prefix: str = "") -> None:
        """The host step: `prefix` (the backup folder made ready) and every disk read, in one
        ssh round trip on the backup host."""
        from oneiscsi.drivers.backup import _host_step
        from oneiscsi.drivers.eqliscsi.write import Writer
        from oneiscsi.host import backup as hostbackup
        job = self.job
        reads = []
        for t in self.targets:
            ref = self.ref.get(t)
            reads.append((t.did, job.backup_id, Writer(t.cfg, self.iqn[self.made[t]]).lun(),
                          Writer(t.cfg, self.iqn[ref]).lun() if ref else None))
        res = _host_step(job.backup_host, prefix + hostbackup.read_script(job.backup_dir, reads), "backup read")
        for line in res.stdout.splitlines():
            if line.startswith("DONE "):
                _, did, size, ms = line.split()
                log.info("disk %s: %s bytes in %s/disk.%s.%d, read in %s ms" % (
                    did, size, job.backup_dir, did, job.backup_id, ms))

    def finish(self, done: bool) -> None:
        """Every path: reader records removed, snapshots offline; the new snapshot stays only as
        the reference of an incremental chain after a successful read."""
        try:
            with tm.locked(self.targets), tm.san(self.targets) as ss:
                for t in self.targets:
                    s = ss[t.group.address]
                    try:
                        if t in self.records:
                            s.delete_access(t.volume, self.records.pop(t))
                        for name in filter(None, (self.made.get(t), self.ref.get(t))):
                            s.set_snapshot_online(t.volume, name, False)
                        if t in self.made and not (done and self.job.incremental):
                            s.delete_snapshot(t.volume, self.made.pop(t))
                    except Failure as e:
                        log.error("cleanup of disk %s's backup snapshot on %s failed: %s" % (t.did, t.volume, e))
        except Failure as e:
            log.error("cleanup of the backup snapshots failed: %s" % e)


class RestoreTarget:
    """One eqliscsi disk of `onevm restore`: written through its link on the host."""

    def __init__(self, call, vm, disk, host, vm_dir):
        self.did, self.host = disk.disk_id, host
        self.t = tm.Target(call, disk, int(vm.id), "%s/disk.%s" % (vm_dir, disk.disk_id), vm=vm)

    def check(self) -> None:
        from oneiscsi.san import client
        t = self.t
        if self.host in t.hs.no_iscsi:
            raise Invalid("cannot restore disk %s on %s: NO_ISCSI lists that host" % (t.did, self.host))
        tm._refuse_shared(t, "restore a backup onto")
        with client.session(t.group) as s:
            tm.resolve(s, t)

    def write(self, staged: str) -> None:
        from oneiscsi.drivers.backup import _host_step
        from oneiscsi.host import backup as hostbackup
        with tm.locked([self.t]):
            _host_step(self.host, hostbackup.write_script(staged, None, link=self.t.link), "restore of disk %s"
                       % self.did)
